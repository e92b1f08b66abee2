// Byte accounting of the collectives a Group issues.
//
// Bytes are counted per rank by the cost of the algorithm Gloo runs, not by payload size alone:
//   ring all-reduce of n bytes over N ranks: sends and receives 2(N-1)/N * n;
//   ring all-gather of n bytes per rank:     sends and receives (N-1) * n;
//   broadcast of n bytes from the root:      the root sends (N-1) * n, every other rank receives n;
//   point-to-point send / recv of n bytes:   n sent / n received.
// The formulas live in one function, collective_bytes(), so tests and benchmarks share them.
//
// Link emulation (LinkModel, link_seconds()): what a collective would cost on a wide-area link
// of a given rate and one-way latency, so that a run on one machine shows the wall time of a run
// over, say, 100 Mbit/s. Every island has its own link of `mbit_per_s` in each direction. A
// collective occupies the links for
//   seconds = max over ranks of (bytes that rank sends) * 8 / (mbit_per_s * 1e6)
//           + steps * latency_ms / 1e3
// where steps counts the algorithm's sequential messages, each of which pays the latency once:
//   ring all-reduce 2(N-1) (reduce-scatter, then all-gather), ring all-gather N-1, broadcast 1
//   (the root's sends go out back to back; the last arrives after (N-1)n/rate + latency),
//   barrier ceil(log2 N) (Gloo's dissemination barrier), send / recv 1.
// For send / recv "bytes sent" is the message, on both ends: the receiver waits for the same
// transfer the sender makes. The delay depends only on the shapes, so every rank of a collective
// waits the same time. One rank (N = 1) has no link: nothing is delayed.
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

// Sequential message steps of a collective's algorithm over `world_size` ranks (see above).
int collective_steps(Collective c, int world_size);

// An emulated wide-area link: rate per island and direction, one-way latency per message.
struct LinkModel {
  static constexpr double kMaxMbitPerS = 1e6;   // 1 Tbit/s
  static constexpr double kMaxLatencyMs = 60e3;  // one minute
  double mbit_per_s = 0.0;  // megabits (1e6 bits) per second, 0 = unlimited
  double latency_ms = 0.0;  // one-way, per message step, >= 0

  bool enabled() const { return mbit_per_s > 0.0 || latency_ms > 0.0; }
  // Throws OptionError naming the field and its range (NaN and infinities are rejected).
  void validate() const;
};

// Seconds a collective of `payload_bytes` per rank occupies the emulated link (see above): the
// same on every rank. Zero when the link is unlimited or world_size is 1.
double link_seconds(Collective c, std::uint64_t payload_bytes, int world_size, int root,
                    const LinkModel& link);
// The transmission part alone (bytes over rate, no latency): how long the collective keeps an
// island's link busy, so that collectives in flight together queue behind each other.
double link_transmission_seconds(Collective c, std::uint64_t payload_bytes, int world_size,
                                 int root, const LinkModel& link);

struct OpStats {
  std::uint64_t calls = 0;
  std::uint64_t bytes_sent = 0;
  std::uint64_t bytes_received = 0;
  double seconds = 0.0;       // wall time from issue to completion, summed
  double link_seconds = 0.0;  // emulated link time (link_seconds()), summed; 0 without a link
};

// Statistics per operation label ("allreduce:outer_sync", "broadcast:init", ...).
struct CommStats {
  std::map<std::string, OpStats> ops;

  std::uint64_t bytes_sent() const;
  std::uint64_t bytes_received() const;
  std::uint64_t calls() const;
  double seconds() const;
  double link_seconds() const;
  // Human-readable multi-line table.
  std::string to_string() const;
};

}  // namespace diloco
