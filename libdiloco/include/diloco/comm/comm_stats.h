// Byte accounting of the collectives a Group issues.
//
// Bytes are counted per rank by the cost of the algorithm Gloo runs, not by payload size alone:
//   ring all-reduce of n bytes over N ranks: sends and receives 2(N-1)/N * n;
//   ring all-gather of n bytes per rank:     sends and receives (N-1) * n;
//   broadcast of n bytes from the root:      the root sends (N-1) * n, every other rank receives n;
//   point-to-point send / recv of n bytes:   n sent / n received.
// The formulas live in one function, collective_bytes(), so tests and benchmarks share them.
#pragma once

#include <cstdint>
#include <map>
#include <string>

namespace diloco {

enum class Collective { kAllReduce, kAllGather, kBroadcast, kBarrier, kSend, kRecv };

const char* collective_name(Collective c);

struct ByteCount {
  std::uint64_t sent = 0;
  std::uint64_t received = 0;
};

// Bytes this rank sends and receives for one collective of `payload_bytes` per rank.
ByteCount collective_bytes(Collective c, std::uint64_t payload_bytes, int world_size, int rank,
                           int root = 0);

struct OpStats {
  std::uint64_t calls = 0;
  std::uint64_t bytes_sent = 0;
  std::uint64_t bytes_received = 0;
  double seconds = 0.0;  // wall time from issue to completion, summed
};

// Statistics per operation label ("allreduce:outer_sync", "broadcast:init", ...).
struct CommStats {
  std::map<std::string, OpStats> ops;

  std::uint64_t bytes_sent() const;
  std::uint64_t bytes_received() const;
  std::uint64_t calls() const;
  double seconds() const;
  // Human-readable multi-line table.
  std::string to_string() const;
};

}  // namespace diloco
