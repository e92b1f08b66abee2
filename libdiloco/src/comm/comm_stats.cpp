// Byte accounting formulas and CommStats helpers (see comm_stats.h).
#include "diloco/comm/comm_stats.h"

#include <cstdio>
#include <sstream>

#include "diloco/errors.h"

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

int collective_steps(Collective c, int world_size) {
  if (world_size <= 1) return 0;
  switch (c) {
    case Collective::kAllReduce: return 2 * (world_size - 1);
    case Collective::kAllGather: return world_size - 1;
    case Collective::kBroadcast: return 1;
    case Collective::kBarrier: {
      int rounds = 0;
      for (int d = 1; d < world_size; d <<= 1) ++rounds;
      return rounds;
    }
    case Collective::kSend:
    case Collective::kRecv: return 1;
  }
  return 0;
}

void LinkModel::validate() const {
  // Written so that NaN fails too: every comparison with NaN is false.
  if (!(mbit_per_s >= 0.0 && mbit_per_s <= kMaxMbitPerS)) {
    throw OptionError("[Group] link mbit_per_s (DILOCO_LINK_MBPS) must be in [0, 1e6] Mbit/s "
                      "(0 = unlimited), got " + std::to_string(mbit_per_s));
  }
  if (!(latency_ms >= 0.0 && latency_ms <= kMaxLatencyMs)) {
    throw OptionError("[Group] link latency_ms (DILOCO_LINK_LATENCY_MS) must be in [0, 60000] ms, "
                      "got " + std::to_string(latency_ms));
  }
}

double link_transmission_seconds(Collective c, std::uint64_t n, int world_size, int root,
                                 const LinkModel& link) {
  if (world_size <= 1 || link.mbit_per_s <= 0.0) return 0.0;
  // The busiest rank's bytes: the root's for a broadcast, the message itself for point-to-point
  // (on both ends), and for the rings every rank's, which are equal.
  std::uint64_t bytes = n;
  if (c != Collective::kSend && c != Collective::kRecv) {
    bytes = collective_bytes(c, n, world_size, root, root).sent;
  }
  return static_cast<double>(bytes) * 8.0 / (link.mbit_per_s * 1e6);
}

double link_seconds(Collective c, std::uint64_t n, int world_size, int root,
                    const LinkModel& link) {
  if (world_size <= 1) return 0.0;
  return link_transmission_seconds(c, n, world_size, root, link) +
         collective_steps(c, world_size) * link.latency_ms / 1e3;
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

double CommStats::link_seconds() const {
  double s = 0;
  for (const auto& [name, op] : ops) s += op.link_seconds;
  return s;
}

std::string CommStats::to_string() const {
  std::ostringstream out;
  char line[256];
  const bool link = link_seconds() > 0.0;  // the column only when a link is emulated
  std::snprintf(line, sizeof line, "%-28s %8s %16s %16s %10s%s\n", "operation", "calls",
                "bytes sent", "bytes received", "seconds", link ? "   link (s)" : "");
  out << line;
  for (const auto& [name, op] : ops) {
    std::snprintf(line, sizeof line, "%-28s %8llu %16llu %16llu %10.3f", name.c_str(),
                  static_cast<unsigned long long>(op.calls),
                  static_cast<unsigned long long>(op.bytes_sent),
                  static_cast<unsigned long long>(op.bytes_received), op.seconds);
    out << line;
    if (link) {
      std::snprintf(line, sizeof line, " %10.3f", op.link_seconds);
      out << line;
    }
    out << '\n';
  }
  return out.str();
}

}  // namespace diloco
