// Byte accounting formulas and CommStats helpers (see comm_stats.h).
#include "diloco/comm/comm_stats.h"

#include <cstdio>
#include <sstream>

namespace diloco {

const char* collective_name(Collective c) {
  switch (c) {
    case Collective::kAllReduce: return "allreduce";
    case Collective::kAllGather: return "allgather";
    case Collective::kBroadcast: return "broadcast";
    case Collective::kBarrier: return "barrier";
    case Collective::kSend: return "send";
    case Collective::kRecv: return "recv";
  }
  return "unknown";
}

ByteCount collective_bytes(Collective c, std::uint64_t n, int world_size, int rank, int root) {
  const std::uint64_t peers = world_size > 1 ? static_cast<std::uint64_t>(world_size - 1) : 0;
  ByteCount b;
  switch (c) {
    case Collective::kAllReduce:
      // Ring: reduce-scatter then all-gather, each moving (N-1) chunks of n/N bytes.
      b.sent = b.received = 2 * peers * n / static_cast<std::uint64_t>(world_size);
      break;
    case Collective::kAllGather:
      b.sent = b.received = peers * n;
      break;
    case Collective::kBroadcast:
      if (rank == root) {
        b.sent = peers * n;
      } else {
        b.received = n;
      }
      break;
    case Collective::kBarrier:
      break;
    case Collective::kSend:
      b.sent = n;
      break;
    case Collective::kRecv:
      b.received = n;
      break;
  }
  return b;
}

std::uint64_t CommStats::bytes_sent() const {
  std::uint64_t s = 0;
  for (const auto& [name, op] : ops) s += op.bytes_sent;
  return s;
}

std::uint64_t CommStats::bytes_received() const {
  std::uint64_t s = 0;
  for (const auto& [name, op] : ops) s += op.bytes_received;
  return s;
}

std::uint64_t CommStats::calls() const {
  std::uint64_t s = 0;
  for (const auto& [name, op] : ops) s += op.calls;
  return s;
}

double CommStats::seconds() const {
  double s = 0;
  for (const auto& [name, op] : ops) s += op.seconds;
  return s;
}

std::string CommStats::to_string() const {
  std::ostringstream out;
  char line[256];
  std::snprintf(line, sizeof line, "%-28s %8s %16s %16s %10s\n", "operation", "calls",
                "bytes sent", "bytes received", "seconds");
  out << line;
  for (const auto& [name, op] : ops) {
    std::snprintf(line, sizeof line, "%-28s %8llu %16llu %16llu %10.3f\n", name.c_str(),
                  static_cast<unsigned long long>(op.calls),
                  static_cast<unsigned long long>(op.bytes_sent),
                  static_cast<unsigned long long>(op.bytes_received), op.seconds);
    out << line;
  }
  return out.str();
}

}  // namespace diloco
