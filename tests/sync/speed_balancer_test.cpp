// The batch controller for islands of different speeds (sync/speed_balancer.h), driven by a
// model of islands: an inner step on island i takes overhead_i + per_sample_i * batch seconds
// (times a per-window jitter), every window ends at an exchange that waits for the slowest
// island, and each island is told its compute and its wait. The ideal is known from the model:
// the slowest island at the base batch, every other at the batch that makes its window as long.

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "diloco/errors.h"
#include "diloco/sync/speed_balancer.h"
#include "support/catch.h"

using Catch::Matchers::Contains;

// An OptionError whose message holds `text`.
#define CHECK_OPTION_ERROR(expr, text)          \
  CHECK_THROWS_AS(expr, diloco::OptionError); \
  CHECK_THROWS_WITH(expr, Contains(text))

namespace {

struct Island {
  double overhead;    // seconds per step whatever the batch
  double per_sample;  // seconds per sequence
};

struct Window {
  std::vector<double> factor;       // each island's factor during the window
  std::vector<double> utilization;  // compute / window length
};

// `windows` windows of `steps` inner steps; islands[i] swapped with islands[j] at `swap_at`.
std::vector<Window> simulate(std::vector<Island> islands, std::vector<diloco::SpeedBalancer>& b,
                             int windows, double jitter, int swap_at = -1, int steps = 25) {
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> noise(-jitter, jitter);
  std::vector<Window> out;
  for (int w = 0; w < windows; ++w) {
    if (w == swap_at) std::reverse(islands.begin(), islands.end());
    Window rec;
    std::vector<double> compute(islands.size(), 0.0);
    for (std::size_t i = 0; i < islands.size(); ++i) {
      rec.factor.push_back(b[i].factor());
      const double j = 1.0 + noise(rng);
      for (int s = 0; s < steps; ++s) {
        const auto batch = static_cast<double>(b[i].next_batch());
        compute[i] += (islands[i].overhead + islands[i].per_sample * batch) * j;
      }
    }
    const double slowest = *std::max_element(compute.begin(), compute.end());
    for (std::size_t i = 0; i < islands.size(); ++i) {
      rec.utilization.push_back(compute[i] / slowest);
      b[i].observe(compute[i], slowest - compute[i]);
    }
    out.push_back(rec);
  }
  return out;
}

double mean_utilization(const std::vector<Window>& ws, std::size_t island, std::size_t from) {
  double sum = 0.0;
  for (std::size_t w = from; w < ws.size(); ++w) sum += ws[w].utilization[island];
  return sum / static_cast<double>(ws.size() - from);
}

}  // namespace

TEST_CASE("speed balancer: the faster island's batch grows until its window is the slowest's",
          "[speed_balancer]") {
  // Island 1 is 1.5x slower per sample; both have a fixed overhead of 20% of a base-batch step.
  const std::vector<Island> islands{{3.2, 1.0}, {4.8, 1.5}};
  std::vector<diloco::SpeedBalancer> b(2, diloco::SpeedBalancer(16));
  const auto ws = simulate(islands, b, 200, 0.0);
  // The model's ideal factor for island 0: 3.2 + 16 f = 4.8 + 1.5 * 16 -> f = 1.6.
  CHECK(b[1].factor() == 1.0);
  CHECK(b[0].factor() == Approx(1.6).margin(0.02));
  CHECK(ws[30].factor[0] > 1.5);  // within 30 windows
  // In the first window (base batches) island 0 computes 3.2 + 16 = 19.2 of the slower island's
  // 4.8 + 24 = 28.8 per step: 0.67 of the window. Balanced, it computes >= 0.99 of it.
  CHECK(ws[0].utilization[0] == Approx(19.2 / 28.8));
  CHECK(mean_utilization(ws, 0, 100) >= 0.99);
  CHECK(mean_utilization(ws, 1, 100) == 1.0);
}

TEST_CASE("speed balancer: islands of equal speed and jitter keep the base batch",
          "[speed_balancer]") {
  // Each window every island's times are off by up to +-2% (the shared machine's jitter): they
  // take turns waiting. The least waiting of a few windows is then ~0, and no batch ratchets up.
  const std::vector<Island> islands{{3.2, 1.0}, {3.2, 1.0}, {3.2, 1.0}};
  std::vector<diloco::SpeedBalancer> b(3, diloco::SpeedBalancer(16));
  const auto ws = simulate(islands, b, 400, 0.02);
  double most = 0.0;
  for (const auto& w : ws) {
    most = std::max(most, *std::max_element(w.factor.begin(), w.factor.end()));
  }
  CHECK(most < 1.05);
  // The least of a few windows is what holds them, not the slowest island's shrinking: without
  // it (shrink 0), 4 windows still keep the base batch, reacting to every window ratchets up.
  diloco::SpeedBalancerOptions no_shrink;
  no_shrink.shrink = 0.0;
  std::vector<diloco::SpeedBalancer> held(3, diloco::SpeedBalancer(16, no_shrink));
  simulate(islands, held, 400, 0.02);
  CHECK(std::max({held[0].factor(), held[1].factor(), held[2].factor()}) < 1.05);
  diloco::SpeedBalancerOptions eager = no_shrink;
  eager.memory = 1;
  std::vector<diloco::SpeedBalancer> e(3, diloco::SpeedBalancer(16, eager));
  simulate(islands, e, 400, 0.02);
  CHECK(std::min({e[0].factor(), e[1].factor(), e[2].factor()}) > 1.2);
}

TEST_CASE("speed balancer: when the speeds swap, the batches follow", "[speed_balancer]") {
  const std::vector<Island> islands{{3.2, 1.0}, {4.8, 1.5}};
  std::vector<diloco::SpeedBalancer> b(2, diloco::SpeedBalancer(16));
  simulate(islands, b, 600, 0.0, /*swap_at=*/200);
  CHECK(b[0].factor() == 1.0);
  CHECK(b[1].factor() == Approx(1.6).margin(0.02));
}

TEST_CASE("speed balancer: a link too slow to hide grows every batch up to max_factor",
          "[speed_balancer]") {
  diloco::SpeedBalancerOptions o;
  o.max_factor = 3.0;
  diloco::SpeedBalancer b(16, o);
  for (int w = 0; w < 100; ++w) b.observe(1.0, 5.0);  // waits 5x its compute, every window
  CHECK(b.factor() == 3.0);
  b.observe(0.0, 1.0);  // a window without compute changes nothing
  CHECK(b.factor() == 3.0);
  // The link got fast: it waits no more; after `memory` such windows it shrinks by 2% a window.
  // (Until then its least waiting is 0 < target_wait: it shrinks by (1.002)^-0.5 a window.)
  for (int w = 0; w < 3; ++w) b.observe(1.0, 0.0);
  const double before = 3.0 * std::pow(1.002, -1.5);
  CHECK(b.factor() == Approx(before));
  b.observe(1.0, 0.0);
  CHECK(b.factor() == Approx(before * 0.98));
  for (int w = 0; w < 60; ++w) b.observe(1.0, 0.0);
  CHECK(b.factor() == 1.0);
}

TEST_CASE("speed balancer: integer batches whose mean follows base * factor",
          "[speed_balancer]") {
  diloco::SpeedBalancer b(16);
  b.observe(1.0, 0.5);  // factor sqrt(1.5 / 1.002)
  const double f = b.factor();
  REQUIRE(f > 1.2);
  std::vector<std::int64_t> batches;
  for (int s = 0; s < 1000; ++s) batches.push_back(b.next_batch());
  for (auto batch : batches) {
    CHECK((batch == static_cast<std::int64_t>(std::floor(16 * f)) ||
           batch == static_cast<std::int64_t>(std::ceil(16 * f))));
  }
  const double mean =
      static_cast<double>(std::accumulate(batches.begin(), batches.end(), std::int64_t{0})) / 1000;
  CHECK(mean == Approx(16 * f).margin(1.0 / 1000));
  // Unbalanced, the base batch every step.
  diloco::SpeedBalancer plain(16);
  for (int s = 0; s < 10; ++s) CHECK(plain.next_batch() == 16);
}

TEST_CASE("speed balancer: options out of range name the option and the range",
          "[speed_balancer]") {
  using diloco::SpeedBalancer;
  using diloco::SpeedBalancerOptions;
  CHECK_OPTION_ERROR(SpeedBalancer(0), "base_batch must be >= 1");
  // Each option set out of its range in a copy of the defaults.
  const auto with = [](auto set) {
    SpeedBalancerOptions o;
    set(o);
    return o;
  };
  const auto target_wait = with([](auto& o) { o.target_wait = -0.1; });
  const auto memory = with([](auto& o) { o.memory = 0; });
  const auto shrink = with([](auto& o) { o.shrink = 0.6; });
  const auto max_factor = with([](auto& o) { o.max_factor = 0.5; });
  const auto gain = with([](auto& o) { o.gain = 0.0; });
  const auto gain_nan = with([](auto& o) { o.gain = std::nan(""); });
  CHECK_OPTION_ERROR(SpeedBalancer(16, target_wait), "target_wait must be in [0, 1]");
  CHECK_OPTION_ERROR(SpeedBalancer(16, memory), "memory must be in [1, 1000]");
  CHECK_OPTION_ERROR(SpeedBalancer(16, shrink), "shrink must be in [0, 0.5]");
  CHECK_OPTION_ERROR(SpeedBalancer(16, max_factor), "max_factor must be in [1, 1024]");
  CHECK_OPTION_ERROR(SpeedBalancer(16, gain), "gain must be in (0, 1]");
  CHECK_OPTION_ERROR(SpeedBalancer(16, gain_nan), "gain");
}

TEST_CASE("speed balancer: memory_for(n) keeps many equal islands at the base batch",
          "[speed_balancer]") {
  CHECK(diloco::SpeedBalancer::memory_for(1) == 4);
  CHECK(diloco::SpeedBalancer::memory_for(2) == 4);
  CHECK(diloco::SpeedBalancer::memory_for(3) == 6);
  CHECK(diloco::SpeedBalancer::memory_for(8) == 21);
  CHECK_OPTION_ERROR(diloco::SpeedBalancer::memory_for(0), "islands must be >= 1");
  // n islands of equal speed, +-10% jitter per window. Each window one island is the latest and
  // does not wait; with 4 windows of memory an island of 4 or 8 often has none without waiting,
  // reads the jitter as being faster and grows its batch: all of them ratchet to max_factor.
  for (const int n : {4, 8}) {
    const std::vector<Island> islands(static_cast<std::size_t>(n), Island{3.2, 1.0});
    const auto largest_at_end = [&](std::int64_t memory) {
      diloco::SpeedBalancerOptions o;
      o.memory = memory;
      std::vector<diloco::SpeedBalancer> b(static_cast<std::size_t>(n),
                                           diloco::SpeedBalancer(16, o));
      simulate(islands, b, 400, 0.10);
      double largest = 0.0;
      for (const auto& x : b) largest = std::max(largest, x.factor());
      return largest;
    };
    INFO(n << " islands");
    CHECK(largest_at_end(4) > 3.5);
    CHECK(largest_at_end(diloco::SpeedBalancer::memory_for(n)) < 1.3);
  }
}
