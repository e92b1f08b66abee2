// Link emulation: the model's formulas, option validation, and real Gloo collectives that take
// the modelled time on an emulated link (and no longer than that by much).
//
// Lower bounds on time are strict (the Group must never finish early); upper bounds are generous
// because the machine is shared and noisy, but still tight enough to tell overlap from no overlap.
#include <ATen/ATen.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <thread>

#include "diloco/comm/comm_stats.h"
#include "diloco/comm/group.h"
#include "diloco/errors.h"
#include "support/catch.h"
#include "support/env_guard.h"
#include "support/ranks.h"

using Catch::Matchers::Contains;
using diloco::Collective;
using diloco::LinkModel;

namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

LinkModel make_link(double mbit_per_s, double latency_ms) {
  LinkModel l;
  l.mbit_per_s = mbit_per_s;
  l.latency_ms = latency_ms;
  return l;
}

using diloco_test::EnvGuard;

// Per-rank results of a timed run: wall seconds of the timed part and the statistics.
struct Timed {
  double seconds = 0.0;
  diloco::CommStats stats;
};

}  // namespace

TEST_CASE("the link model charges bytes over rate plus latency per message step", "[comm][link]") {
  CHECK(diloco::collective_steps(Collective::kAllReduce, 4) == 6);
  CHECK(diloco::collective_steps(Collective::kAllGather, 4) == 3);
  CHECK(diloco::collective_steps(Collective::kBroadcast, 4) == 1);
  CHECK(diloco::collective_steps(Collective::kBarrier, 2) == 1);
  CHECK(diloco::collective_steps(Collective::kBarrier, 5) == 3);
  CHECK(diloco::collective_steps(Collective::kSend, 3) == 1);
  CHECK(diloco::collective_steps(Collective::kAllReduce, 1) == 0);

  const LinkModel l = make_link(80, 5);
  // 4 ranks, 10 MB: each rank sends 2 * 3/4 * 1e7 = 1.5e7 bytes = 1.2e8 bits -> 1.5 s at
  // 80 Mbit/s, plus 6 steps of 5 ms.
  CHECK(diloco::link_seconds(Collective::kAllReduce, 10'000'000, 4, 0, l) ==
        Approx(1.5 + 0.030).epsilon(1e-12));
  // All-gather: 3 * 1e6 bytes -> 0.3 s, 3 steps.
  CHECK(diloco::link_seconds(Collective::kAllGather, 1'000'000, 4, 0, l) ==
        Approx(0.3 + 0.015).epsilon(1e-12));
  // Broadcast: the root's 3 sends are the bottleneck, whichever rank asks.
  CHECK(diloco::link_seconds(Collective::kBroadcast, 1'000'000, 4, 2, l) ==
        Approx(0.3 + 0.005).epsilon(1e-12));
  // Point-to-point: the message, on both ends.
  CHECK(diloco::link_seconds(Collective::kSend, 1'000'000, 4, 0, l) == Approx(0.105));
  CHECK(diloco::link_seconds(Collective::kRecv, 1'000'000, 4, 0, l) == Approx(0.105));
  CHECK(diloco::link_seconds(Collective::kBarrier, 0, 4, 0, l) == Approx(0.010));
  CHECK(diloco::link_transmission_seconds(Collective::kAllReduce, 10'000'000, 4, 0, l) ==
        Approx(1.5));
  // Zero means unlimited; one rank has no link.
  CHECK(diloco::link_seconds(Collective::kAllReduce, 10'000'000, 4, 0, LinkModel{}) == 0.0);
  CHECK(diloco::link_seconds(Collective::kAllReduce, 10'000'000, 4, 0, make_link(0, 5)) ==
        Approx(0.030));
  CHECK(diloco::link_seconds(Collective::kAllReduce, 10'000'000, 1, 0, l) == 0.0);
  CHECK_FALSE(LinkModel{}.enabled());
  CHECK(make_link(0, 1).enabled());
}

TEST_CASE("link options are validated with their name and range", "[comm][link]") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  for (double bad : {-1.0, nan, inf, 2e6}) {
    INFO("mbit_per_s " << bad);
    CHECK_THROWS_WITH(make_link(bad, 0).validate(),
                      Contains("mbit_per_s") && Contains("[0, 1e6]"));
    CHECK_THROWS_AS(make_link(bad, 0).validate(), diloco::OptionError);
  }
  for (double bad : {-0.5, nan, inf, 1e5}) {
    INFO("latency_ms " << bad);
    CHECK_THROWS_WITH(make_link(0, bad).validate(),
                      Contains("latency_ms") && Contains("[0, 60000]"));
  }
  diloco::GroupOptions o;
  o.rank = 0;
  o.world_size = 2;
  o.link = make_link(-3, 0);
  CHECK_THROWS_WITH(o.validate(), Contains("DILOCO_LINK_MBPS"));
  o.link = make_link(100, 20);
  CHECK_NOTHROW(o.validate());
  CHECK_NOTHROW(make_link(0, 0).validate());
}

TEST_CASE("the link comes from DILOCO_LINK_MBPS and DILOCO_LINK_LATENCY_MS", "[comm][link]") {
  const std::vector<std::pair<std::string, const char*>> base = {
      {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "29555"}, {"RANK", "0"}, {"WORLD_SIZE", "2"}};
  auto with = [&](const char* rate, const char* latency) {
    auto vars = base;
    vars.emplace_back("DILOCO_LINK_MBPS", rate);
    vars.emplace_back("DILOCO_LINK_LATENCY_MS", latency);
    return vars;
  };
  {
    EnvGuard env(with("100", "2.5"));
    const auto o = diloco::GroupOptions::from_env();
    CHECK(o.link.mbit_per_s == 100.0);
    CHECK(o.link.latency_ms == 2.5);
  }
  {
    EnvGuard env(with(nullptr, nullptr));
    const auto o = diloco::GroupOptions::from_env();
    CHECK_FALSE(o.link.enabled());
  }
  {
    EnvGuard env(with("0", "0"));
    CHECK_FALSE(diloco::GroupOptions::from_env().link.enabled());
  }
  for (const char* bad : {"abc", "-1", "nan", "inf", "1e9", "5x", " "}) {
    INFO("DILOCO_LINK_MBPS='" << bad << "'");
    EnvGuard env(with(bad, nullptr));
    CHECK_THROWS_WITH(diloco::GroupOptions::from_env(),
                      Contains("DILOCO_LINK_MBPS") && Contains("[0, 1e6]") && Contains(bad));
    CHECK_THROWS_AS(diloco::GroupOptions::from_env(), diloco::OptionError);
  }
  for (const char* bad : {"-2", "NaN", "ten", "61000"}) {
    INFO("DILOCO_LINK_LATENCY_MS='" << bad << "'");
    EnvGuard env(with(nullptr, bad));
    CHECK_THROWS_WITH(diloco::GroupOptions::from_env(),
                      Contains("DILOCO_LINK_LATENCY_MS") && Contains("[0, 60000]"));
  }
}

TEST_CASE("an all-reduce on an emulated link takes the modelled time on every rank",
          "[comm][link][gloo]") {
  const int world = GENERATE(2, 3);
  const std::int64_t numel = 1'000'000;  // 4 MB of float32
  const LinkModel l = make_link(80, 10);
  const double expect = diloco::link_seconds(Collective::kAllReduce, 4 * numel, world, 0, l);
  std::vector<Timed> timed(world);
  diloco_test::run_ranks(world, [&](int rank, std::shared_ptr<diloco::Group> g) {
    g->set_link(l);
    at::Tensor t = at::full({numel}, static_cast<float>(rank + 1));
    const auto start = Clock::now();
    g->allreduce_sum(t, "timed");
    timed[rank].seconds = since(start);
    if (t[numel - 1].item<float>() != static_cast<float>(world * (world + 1) / 2)) {
      throw std::runtime_error("wrong sum");
    }
    timed[rank].stats = g->stats();
  });
  for (int r = 0; r < world; ++r) {
    INFO("world " << world << " rank " << r << ": " << timed[r].seconds << " s, modelled "
                  << expect << " s");
    CHECK(timed[r].seconds >= expect);
    CHECK(timed[r].seconds < expect + 1.5);
    CHECK(timed[r].stats.ops.at("allreduce:timed").link_seconds == Approx(expect));
    CHECK(timed[r].stats.link_seconds() == Approx(expect));
  }
}

TEST_CASE("an asynchronous collective's link delay overlaps with compute", "[comm][link][gloo]") {
  const std::int64_t numel = 1'000'000;
  const LinkModel l = make_link(40, 0);  // 4 MB at 40 Mbit/s: 0.8 s
  const double link_s = diloco::link_seconds(Collective::kAllReduce, 4 * numel, 2, 0, l);
  const double compute_s = 0.6;
  std::vector<Timed> timed(2);
  diloco_test::run_ranks(2, [&](int rank, std::shared_ptr<diloco::Group> g) {
    g->set_link(l);
    at::Tensor t = at::ones({numel});
    const auto start = Clock::now();
    auto pending = g->allreduce_sum_async(t, "overlapped");
    std::this_thread::sleep_for(std::chrono::duration<double>(compute_s));  // "compute"
    pending.wait();
    timed[rank].seconds = since(start);
  });
  for (int r = 0; r < 2; ++r) {
    INFO("rank " << r << ": " << timed[r].seconds << " s; link " << link_s << " s, compute "
                 << compute_s << " s, serial would be " << link_s + compute_s << " s");
    CHECK(timed[r].seconds >= link_s);
    CHECK(timed[r].seconds < link_s + 0.45);  // well below the serial 1.4 s
  }
}

TEST_CASE("collectives in flight together share the link", "[comm][link][gloo]") {
  const std::int64_t numel = 500'000;  // 2 MB each: 0.2 s at 80 Mbit/s between 2 ranks
  const LinkModel l = make_link(80, 10);
  const double tx = diloco::link_transmission_seconds(Collective::kAllReduce, 4 * numel, 2, 0, l);
  const double one = diloco::link_seconds(Collective::kAllReduce, 4 * numel, 2, 0, l);
  const int in_flight = 3;
  // The last starts on the link when the first two have been transmitted.
  const double expect = (in_flight - 1) * tx + one;
  std::vector<Timed> timed(2);
  diloco_test::run_ranks(2, [&](int rank, std::shared_ptr<diloco::Group> g) {
    g->set_link(l);
    std::vector<at::Tensor> tensors;
    for (int i = 0; i < in_flight; ++i) tensors.push_back(at::ones({numel}));
    const auto start = Clock::now();
    std::vector<diloco::PendingCollective> pending;
    for (auto& t : tensors) pending.push_back(g->allreduce_sum_async(t, "segment"));
    for (auto& p : pending) p.wait();
    timed[rank].seconds = since(start);
    timed[rank].stats = g->stats();
  });
  for (int r = 0; r < 2; ++r) {
    INFO("rank " << r << ": " << timed[r].seconds << " s, modelled " << expect << " s");
    CHECK(timed[r].seconds >= expect);
    CHECK(timed[r].seconds < expect + 1.5);
    CHECK(timed[r].stats.ops.at("allreduce:segment").link_seconds == Approx(in_flight * one));
  }
}

TEST_CASE("send and recv both wait for the emulated transfer", "[comm][link][gloo]") {
  const std::int64_t numel = 250'000;  // 1 MB: 0.1 s at 80 Mbit/s, plus 20 ms
  const LinkModel l = make_link(80, 20);
  const double expect = diloco::link_seconds(Collective::kSend, 4 * numel, 2, 0, l);
  std::vector<Timed> timed(2);
  diloco_test::run_ranks(2, [&](int rank, std::shared_ptr<diloco::Group> g) {
    g->set_link(l);
    at::Tensor t = at::full({numel}, rank == 0 ? 7.0f : 0.0f);
    const auto start = Clock::now();
    auto p = rank == 0 ? g->send_async(t, 1, 3, "p2p") : g->recv_async(t, 0, 3, "p2p");
    p.wait();
    timed[rank].seconds = since(start);
    if (t[numel - 1].item<float>() != 7.0f) throw std::runtime_error("wrong message");
  });
  for (int r = 0; r < 2; ++r) {
    INFO("rank " << r << ": " << timed[r].seconds << " s, modelled " << expect << " s");
    CHECK(timed[r].seconds >= expect);
    CHECK(timed[r].seconds < expect + 1.5);
  }
}

TEST_CASE("a zero link is unlimited and a latency-only link charges latency per step",
          "[comm][link][gloo]") {
  const int world = 3;
  std::vector<Timed> unlimited(world), latency_only(world);
  const LinkModel slow_messages = make_link(0, 50);
  diloco_test::run_ranks(world, [&](int rank, std::shared_ptr<diloco::Group> g) {
    at::Tensor big = at::ones({1'000'000});
    auto start = Clock::now();
    g->allreduce_sum(big, "unlimited");
    unlimited[rank].seconds = since(start);
    unlimited[rank].stats = g->stats();
    g->set_link(slow_messages);
    at::Tensor tiny = at::ones({1});
    start = Clock::now();
    g->allreduce_sum(tiny, "latency");
    latency_only[rank].seconds = since(start);
    latency_only[rank].stats = g->stats();
  });
  // 4 MB at 80 Mbit/s would be 0.53 s for 3 ranks; unlimited is loopback speed.
  const double at_80 =
      diloco::link_seconds(Collective::kAllReduce, 4'000'000, world, 0, make_link(80, 0));
  const double latency = 2 * (world - 1) * 0.050;
  for (int r = 0; r < world; ++r) {
    INFO("rank " << r << ": unlimited " << unlimited[r].seconds << " s, latency-only "
                 << latency_only[r].seconds << " s");
    CHECK(unlimited[r].stats.link_seconds() == 0.0);
    CHECK(unlimited[r].seconds < at_80);
    CHECK(latency_only[r].seconds >= latency);
    CHECK(latency_only[r].seconds < latency + 1.0);
    CHECK(latency_only[r].stats.ops.at("allreduce:latency").link_seconds == Approx(latency));
  }
}

TEST_CASE("a group created from options applies their link", "[comm][link][gloo]") {
  const LinkModel l = make_link(0, 30);
  std::vector<double> seconds(2);
  const auto errors = diloco_test::create_ranks_collect(
      2, [&](int, diloco::GroupOptions& o) { o.link = l; },
      [&](int r, diloco::Group& g) {
        if (g.link().latency_ms != 30.0) throw std::runtime_error("link not applied");
        const auto start = Clock::now();
        g.barrier("b");
        seconds[r] = since(start);
      });
  for (int r = 0; r < 2; ++r) {
    INFO(errors[r]);
    CHECK(errors[r].empty());
    CHECK(seconds[r] >= 0.030);
  }
}

TEST_CASE("a group whose ranks disagree on emulating a link is refused at the rendezvous",
          "[comm][link][gloo]") {
  const auto errors = diloco_test::create_ranks_collect(
      2,
      [](int r, diloco::GroupOptions& o) {
        o.timeout = std::chrono::milliseconds(5000);
        if (r == 1) o.link = make_link(100, 10);  // rank 0 emulates none
      },
      [](int, diloco::Group& g) { g.barrier("never"); });
  INFO("rank 0: " << errors[0] << "\nrank 1: " << errors[1]);
  CHECK_THAT(errors[1], Contains("link emulation") && Contains("differs between ranks") &&
                            Contains("rank 1 emulates a link, rank 0 does not"));
  CHECK_FALSE(errors[0].empty());  // rank 0 learns of the abort and stops too
}

// A real link carries nothing before the peer sends it: the island that issues first waits for
// the late island's transfer, not only for its own (on the emulated link it used to be charged
// from its own issue time and finished a whole transfer early). With several collectives in
// flight, each waits for the late island's queue too: the last ends (n-1) transmissions and one
// collective after the late island issued the first.
TEST_CASE("an early island waits for the late island's transfer on the emulated link",
          "[comm][link][gloo]") {
  const std::int64_t numel = 250'000;  // 1 MB: 0.1 s at 80 Mbit/s
  const LinkModel l = make_link(80, 10);
  const double late_s = 0.4;
  const bool p2p = GENERATE(false, true);
  const int in_flight = p2p ? 1 : GENERATE(1, 3);
  const Collective c = p2p ? Collective::kSend : Collective::kAllReduce;
  const double expect = (in_flight - 1) * diloco::link_transmission_seconds(c, 4 * numel, 2, 0, l) +
                        diloco::link_seconds(c, 4 * numel, 2, 0, l);
  std::vector<Clock::time_point> issued(2), done(2);
  diloco_test::run_ranks(2, [&](int rank, std::shared_ptr<diloco::Group> g) {
    g->set_link(l);
    std::vector<at::Tensor> tensors;
    for (int i = 0; i < in_flight; ++i) tensors.push_back(at::full({numel}, rank == 0 ? 7.0f : 0.0f));
    // Rank 0 is the late one: the sender of the point-to-point case.
    if (rank == 0) std::this_thread::sleep_for(std::chrono::duration<double>(late_s));
    issued[rank] = Clock::now();
    std::vector<diloco::PendingCollective> pending;
    for (auto& t : tensors) {
      pending.push_back(!p2p       ? g->allreduce_sum_async(t, "late")
                        : rank == 0 ? g->send_async(t, 1, 5, "late")
                                    : g->recv_async(t, 0, 5, "late"));
    }
    for (auto& p : pending) p.wait();
    done[rank] = Clock::now();
    if (tensors.back()[numel - 1].item<float>() != 7.0f) throw std::runtime_error("wrong result");
  });
  const auto after_late = [&](int r) {
    return std::chrono::duration<double>(done[r] - issued[0]).count();
  };
  for (int r = 0; r < 2; ++r) {
    INFO((p2p ? "send/recv" : "all-reduce") << " x" << in_flight << ", rank " << r << ": done "
                                            << after_late(r)
                                            << " s after the late rank issued, modelled " << expect
                                            << " s; issued "
                                            << std::chrono::duration<double>(issued[0] - issued[r])
                                                   .count()
                                            << " s before it");
    CHECK(after_late(r) >= expect);
    CHECK(after_late(r) < expect + 1.0);
  }
  // The early rank did issue well before the late one.
  CHECK(std::chrono::duration<double>(issued[0] - issued[1]).count() > late_s / 2);
}

TEST_CASE("ready() says, without blocking, whether wait() would: the late rank and the link",
          "[comm][link][gloo]") {
  // DiLoCo::next_step_would_wait() polls this to fill a wait with work (train_lm --fill-waits):
  // it must stay false until the late rank has issued and the emulated link has carried the
  // transfer, never block, and agree with wait() once true.
  const std::int64_t numel = 250'000;  // 1 MB: 0.1 s at 80 Mbit/s
  const LinkModel l = make_link(80, 10);
  const double late_s = 0.3;
  const double modelled = diloco::link_seconds(Collective::kAllReduce, 4 * numel, 2, 0, l);
  Clock::time_point late_issued;
  std::vector<double> became_ready(2), longest_poll(2), wait_after_ready(2);
  std::vector<int> polls(2);
  diloco_test::run_ranks(2, [&](int rank, std::shared_ptr<diloco::Group> g) {
    g->set_link(l);
    at::Tensor t = at::full({numel}, rank == 0 ? 7.0f : 0.0f);
    if (rank == 0) {
      std::this_thread::sleep_for(std::chrono::duration<double>(late_s));
      late_issued = Clock::now();
    }
    diloco::PendingCollective p = g->allreduce_sum_async(t, "polled");
    for (;;) {
      const auto before = Clock::now();
      const bool ready = p.ready();
      const double poll = std::chrono::duration<double>(Clock::now() - before).count();
      longest_poll[rank] = std::max(longest_poll[rank], poll);
      ++polls[rank];
      if (ready) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    became_ready[rank] = std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
    const auto before_wait = Clock::now();
    p.wait();
    wait_after_ready[rank] = std::chrono::duration<double>(Clock::now() - before_wait).count();
    if (!p.ready()) throw std::runtime_error("not ready after wait()");
    if (t[numel - 1].item<float>() != 7.0f) throw std::runtime_error("wrong result");
  });
  const double late = std::chrono::duration<double>(late_issued.time_since_epoch()).count();
  for (int r = 0; r < 2; ++r) {
    INFO("rank " << r << ": ready " << became_ready[r] - late << " s after the late rank issued "
                 << "(modelled " << modelled << " s), " << polls[r] << " polls, the longest "
                 << longest_poll[r] << " s, wait() after it " << wait_after_ready[r] << " s");
    CHECK(became_ready[r] - late >= modelled);
    CHECK(became_ready[r] - late < modelled + 1.0);
    // Bounds far above a poll's cost (microseconds) that a loaded host's scheduling cannot reach.
    CHECK(longest_poll[r] < 0.2);
    CHECK(wait_after_ready[r] < 0.2);
  }
  // The early rank polled through the late rank's delay, and was not ready meanwhile.
  CHECK(polls[1] > 10);
}
