// Islands of different speeds: a faster island fills the time it would wait with more samples.
//
// Every exchange waits for the slowest island, so an island whose hardware is faster (or less
// loaded) idles the difference at every sync, whatever the link. The balancer gives such an
// island a larger batch per inner step instead. Every island still takes the same inner steps,
// so the schedule, the order of collectives and the learning-rate schedule are untouched; only
// the number of sequences per step differs between islands (and from run to run: it follows the
// measured times, so a balanced run is not reproducible bit for bit, nor can an audit replay it
// from the step number alone).
//
// It is a controller over local measurements only (no collective of its own): after each window
// of inner steps the island reports the seconds it computed (c) and the seconds it waited for
// exchanges (w, SyncStats::wait_seconds). With m the least w / c of the last `memory` windows,
// the batch factor f (batch = base * f) becomes
//   f <- clamp(f * ((1 + m) / (1 + target_wait))^gain, 1, max_factor).
// The least of a few windows is the part of the waiting that is systematic: islands of equal
// speed take turns being late by a few percent (jitter), so each has windows without waiting and
// its m stays near 0, while an island that is faster waits in every window. A faster island
// therefore grows its batch until it waits about target_wait in its best windows. An island that
// waited at most target_wait in every one of the last `memory` windows is the slowest (everybody
// waits for it): its factor shrinks by `shrink` per window instead, back to the base batch (when
// the speeds swap, the island that was faster gives its extra samples back within a few dozen
// windows). The slowest island so trains at the base batch. Waiting
// for the link itself is filled the same way: on a link too slow for the overlap, every island
// grows its batch, up to max_factor.
//
// Batches are integers: next_batch() rounds base * f with error diffusion, so the mean batch over
// steps follows base * f exactly.
#pragma once

#include <cstdint>
#include <deque>

namespace diloco {

struct SpeedBalancerOptions {
  double target_wait = 0.002;  // the systematic waiting aimed at, over compute: in [0, 1]
  std::int64_t memory = 4;     // windows whose least waiting counts: in [1, 1000]; for n
                               // islands, SpeedBalancer::memory_for(n)
  double shrink = 0.02;        // the slowest island's factor shrinks by this per window: [0, 0.5]
  double max_factor = 4.0;     // the largest batch factor: in [1, 1024]
  double gain = 0.5;           // the exponent of each correction: in (0, 1]
};

class SpeedBalancer {
 public:
  // Throws OptionError naming base_batch (>= 1), target_wait, memory, shrink, max_factor or gain
  // and the range.
  explicit SpeedBalancer(std::int64_t base_batch, SpeedBalancerOptions options = {});

  // The batch of the next inner step (>= 1).
  std::int64_t next_batch();
  // One window's measurements (seconds, >= 0). A window without compute changes nothing.
  void observe(double compute_seconds, double wait_seconds);

  // The memory for `islands` islands (>= 1, else OptionError): max(4, 3 * (islands - 1)). With
  // n islands of equal speed, each window one of them is the latest, so an island has a window
  // without waiting with probability about 1/n per window, and none among m windows with
  // probability (1 - 1/n)^m; m = 3(n - 1) keeps that near e^-3 (2 islands: 1/16 with 4) for any
  // n. With a fixed 4 windows it grows with n (4 islands 0.32, 8 islands 0.59), and the batches
  // of equal islands ratchet up on jitter alone (the tests' model: to max_factor at 4 islands
  // with +-10% jitter per window).
  static std::int64_t memory_for(std::int64_t islands);

  double factor() const { return factor_; }
  std::int64_t base_batch() const { return base_; }
  const SpeedBalancerOptions& options() const { return options_; }

 private:
  std::int64_t base_;
  SpeedBalancerOptions options_;
  double factor_ = 1.0;
  double carry_ = 0.0;  // the rounding error still owed to the running batch count
  std::deque<double> waits_;  // w / c of the last `memory` windows
};

}  // namespace diloco
