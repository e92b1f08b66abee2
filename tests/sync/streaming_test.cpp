// Streaming DiLoCo (fragments, overlap, mixing) over real Gloo ranks (threads on loopback) and
// real processes: the algorithm against a reference written here with torch::optim::SGD as the
// outer optimizer, P = 1 / tau = 0 / alpha = 0 against plain DiLoCo bit for bit, bytes per
// fragment, option errors, and a peer lost while an exchange is in flight.
#include <ATen/ATen.h>
#include <torch/optim/sgd.h>
#include <torch/torch.h>

#include <chrono>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "diloco/diloco.h"
#include "support/catch.h"
#include "support/processes.h"
#include "support/ranks.h"

using Catch::Matchers::Contains;

namespace {

// Four parameters named like a two-block model, sizes chosen so that P = 2 splits them evenly.
struct Shapes {
  std::vector<std::string> names{"blocks.0.w", "blocks.1.w", "blocks.0.b", "blocks.1.b"};
  std::vector<std::vector<std::int64_t>> sizes{{6, 5}, {6, 5}, {7}, {7}};
};

at::Tensor initial(std::size_t i, const Shapes& s) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(77 + i);
  return at::randn(s.sizes[i], gen);
}

// The inner step every rank runs: SGD on 0.5 * ||theta - target(rank, step)||^2, lr 0.1, with a
// target of its own per rank and step (so the islands drift apart).
at::Tensor target(std::size_t i, int rank, int step, const Shapes& s) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 * rank + 10 * step + i);
  return at::randn(s.sizes[i], gen);
}
constexpr float kInnerLr = 0.1f;

struct Run {
  // Per rank: every parameter after the last step, and the global weights after each step
  // (flattened per parameter, in model order).
  std::vector<std::vector<at::Tensor>> final_local;
  std::vector<std::vector<std::vector<at::Tensor>>> global_after_step;
  std::vector<std::int64_t> rounds;
  std::vector<diloco::CommStats> stats;
};

Run run_library(int world, int steps, const diloco::DiLoCoOptions& options) {
  const Shapes shapes;
  Run out;
  out.final_local.resize(world);
  out.global_after_step.resize(world);
  out.rounds.resize(world);
  out.stats.resize(world);
  diloco_test::run_ranks(world, [&](int rank, std::shared_ptr<diloco::Group> group) {
    diloco::ModelTensors model;
    for (std::size_t i = 0; i < shapes.names.size(); ++i) {
      model.parameters.push_back({shapes.names[i], initial(i, shapes)});
    }
    std::vector<at::Tensor> params;
    for (const auto& p : model.parameters) params.push_back(p.tensor);
    diloco::DiLoCo sync(std::move(model), group, options);
    for (int s = 1; s <= steps; ++s) {
      at::NoGradGuard no_grad;
      for (std::size_t i = 0; i < params.size(); ++i) {
        params[i].sub_(params[i] - target(i, rank, s, shapes), kInnerLr);
      }
      sync.step();
      // The global weights of each parameter: its place in its bucket.
      const auto& buckets = sync.parameters().buckets();
      std::vector<at::Tensor> per_param(params.size());
      for (std::size_t b = 0; b < buckets.size(); ++b) {
        for (std::size_t j = 0; j < buckets[b].members.size(); ++j) {
          const auto m = buckets[b].members[j];
          per_param[m] = sync.global_weights()[b]
                             .narrow(0, buckets[b].offsets[j], params[m].numel())
                             .clone();
        }
      }
      out.global_after_step[rank].push_back(per_param);
    }
    for (const auto& p : params) out.final_local[rank].push_back(p.detach().clone());
    out.rounds[rank] = sync.stats().outer_steps;
    out.stats[rank] = group->stats();
  });
  return out;
}

// The streaming algorithm as the issue states it, all ranks simulated in one loop, the outer
// optimizer torch::optim::SGD (one per fragment) fed the mean pseudo-gradient as its gradient.
struct Reference {
  std::vector<std::vector<at::Tensor>> local;  // [rank][param]
  std::vector<std::vector<at::Tensor>> global_after_step;  // [step][param]
};

Reference run_reference(int world, int steps, std::int64_t H, std::int64_t P, std::int64_t tau,
                        double alpha, const std::vector<std::int64_t>& fragment_of, double lr,
                        double momentum) {
  const Shapes shapes;
  const std::size_t n = shapes.names.size();
  std::vector<at::Tensor> global;
  for (std::size_t i = 0; i < n; ++i) global.push_back(initial(i, shapes).set_requires_grad(true));
  std::vector<std::unique_ptr<torch::optim::SGD>> outer;
  for (std::int64_t f = 0; f < P; ++f) {
    std::vector<at::Tensor> mine;
    for (std::size_t i = 0; i < n; ++i) {
      if (fragment_of[i] == f) mine.push_back(global[i]);
    }
    outer.push_back(std::make_unique<torch::optim::SGD>(
        mine, torch::optim::SGDOptions(lr).momentum(momentum).nesterov(true)));
  }
  Reference ref;
  ref.local.assign(world, {});
  for (int r = 0; r < world; ++r) {
    for (std::size_t i = 0; i < n; ++i) ref.local[r].push_back(initial(i, shapes));
  }
  std::map<std::int64_t, std::vector<at::Tensor>> delta_of;  // fragment -> mean delta per param
  auto offset = [&](std::int64_t f) { return (f + 1) * H / P; };
  auto starting = [&](std::int64_t step) -> std::int64_t {
    if (step < 1) return -1;
    const std::int64_t phase = (step - 1) % H + 1;
    for (std::int64_t f = 0; f < P; ++f) {
      if (offset(f) == phase) return f;
    }
    return -1;
  };
  auto apply = [&](std::int64_t f) {
    at::NoGradGuard no_grad;
    for (std::size_t i = 0; i < n; ++i) {
      if (fragment_of[i] != f) continue;
      global[i].mutable_grad() = delta_of[f][i].clone();
    }
    outer[f]->step();
    for (std::size_t i = 0; i < n; ++i) {
      if (fragment_of[i] != f) continue;
      for (int r = 0; r < world; ++r) {
        ref.local[r][i] = alpha * ref.local[r][i] + (1.0 - alpha) * global[i].detach();
      }
    }
  };
  auto start = [&](std::int64_t f) {
    std::vector<at::Tensor> mean(n);
    for (std::size_t i = 0; i < n; ++i) {
      if (fragment_of[i] != f) continue;
      at::Tensor sum = at::zeros_like(global[i]).detach();
      for (int r = 0; r < world; ++r) sum += global[i].detach() - ref.local[r][i];
      mean[i] = sum / world;
    }
    delta_of[f] = mean;
  };
  for (int s = 1; s <= steps; ++s) {
    for (int r = 0; r < world; ++r) {
      for (std::size_t i = 0; i < n; ++i) {
        ref.local[r][i] = ref.local[r][i] - kInnerLr * (ref.local[r][i] - target(i, r, s, shapes));
      }
    }
    if (tau > 0 && starting(s - tau) >= 0) apply(starting(s - tau));
    if (starting(s) >= 0) {
      start(starting(s));
      if (tau == 0) apply(starting(s));
    }
    std::vector<at::Tensor> g;
    for (const auto& t : global) g.push_back(t.detach().clone());
    ref.global_after_step.push_back(g);
  }
  return ref;
}

double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.reshape({-1}).to(at::kDouble) - b.reshape({-1}).to(at::kDouble)).abs().max().item<double>();
}

}  // namespace

TEST_CASE("streaming DiLoCo follows the algorithm: fragments, overlap, mixing", "[streaming][gloo]") {
  struct Case {
    int world;
    std::int64_t H, P, tau;
    double alpha;
  };
  const Case c = GENERATE(Case{2, 6, 2, 2, 0.5}, Case{3, 6, 2, 2, 0.5}, Case{2, 6, 3, 1, 0.0},
                          Case{3, 4, 2, 0, 0.5}, Case{2, 5, 1, 3, 0.25});
  INFO("world " << c.world << ", H " << c.H << ", P " << c.P << ", tau " << c.tau << ", alpha "
                << c.alpha);
  const int steps = 4 * static_cast<int>(c.H) + 3;
  diloco::DiLoCoOptions o;
  o.inner_steps = c.H;
  o.fragments = c.P;
  o.overlap_steps = c.tau;
  o.mixing = c.alpha;
  // blocks.0.* to fragment 0, blocks.1.* to 1 (P = 2); P = 3 puts the biases in fragment 2.
  o.fragment_of = c.P == 1 ? std::vector<std::int64_t>{0, 0, 0, 0}
                  : c.P == 2 ? std::vector<std::int64_t>{0, 1, 0, 1}
                             : std::vector<std::int64_t>{0, 1, 2, 2};
  const Run lib = run_library(c.world, steps, o);
  const Reference ref = run_reference(c.world, steps, c.H, c.P, c.tau, c.alpha, o.fragment_of,
                                      o.outer.lr, o.outer.momentum);
  double worst = 0.0;
  for (int s = 0; s < steps; ++s) {
    for (std::size_t i = 0; i < 4; ++i) {
      worst = std::max(worst, max_diff(lib.global_after_step[0][s][i], ref.global_after_step[s][i]));
      for (int r = 1; r < c.world; ++r) {  // all ranks bit-identical after every step
        REQUIRE(at::equal(lib.global_after_step[r][s][i], lib.global_after_step[0][s][i]));
      }
    }
  }
  for (int r = 0; r < c.world; ++r) {
    for (std::size_t i = 0; i < 4; ++i) {
      worst = std::max(worst, max_diff(lib.final_local[r][i], ref.local[r][i]));
    }
  }
  INFO("largest difference to the reference " << worst);
  CHECK(worst < 1e-6);
  // Rounds: one per H steps, counted when the last fragment is applied (tau steps late).
  CHECK(lib.rounds[0] == (steps - c.tau) / c.H);
}

TEST_CASE("P = 1, tau = 0, alpha = 0 is plain DiLoCo bit for bit", "[streaming][gloo]") {
  const std::string compression = GENERATE(as<std::string>{}, "none", "int8+ef");
  diloco::DiLoCoOptions plain;
  plain.inner_steps = 3;
  plain.compression = compression;
  diloco::DiLoCoOptions streaming = plain;
  streaming.fragments = 1;
  streaming.overlap_steps = 0;
  streaming.mixing = 0.0;
  streaming.fragment_of = {0, 0, 0, 0};
  const Run a = run_library(2, 10, plain), b = run_library(2, 10, streaming);
  for (int r = 0; r < 2; ++r) {
    for (std::size_t i = 0; i < 4; ++i) REQUIRE(at::equal(a.final_local[r][i], b.final_local[r][i]));
  }
}

TEST_CASE("each fragment exchange carries 1/P of the model's bytes, in total the same",
          "[streaming][gloo]") {
  const std::string compression = GENERATE(as<std::string>{}, "none", "int8");
  INFO(compression);
  auto outer_bytes = [](const diloco::CommStats& s) {
    std::uint64_t sent = 0, calls = 0;
    for (const auto& [name, op] : s.ops) {
      if (name.find(":outer_sync") != std::string::npos && name.find("check") == std::string::npos) {
        sent += op.bytes_sent;
        calls += op.calls;
      }
    }
    return std::make_pair(sent, calls);
  };
  diloco::DiLoCoOptions whole;
  whole.inner_steps = 4;
  whole.compression = compression;
  diloco::DiLoCoOptions halves = whole;
  halves.fragments = 2;
  halves.overlap_steps = 1;
  halves.mixing = 0.5;
  halves.fragment_of = {0, 1, 0, 1};
  // 9 steps: the halves' fourth exchange, started after step 8, is applied after step 9.
  const auto one = outer_bytes(run_library(2, 9, whole).stats[0]);
  const auto two = outer_bytes(run_library(2, 9, halves).stats[0]);
  INFO("whole model: " << one.first << " bytes in " << one.second << " calls; halves: "
                       << two.first << " bytes in " << two.second << " calls");
  // The same total (every parameter once per H steps); a compressed fragment may end in a
  // partial codec block, one block scale (4 bytes) more per exchange at most.
  if (compression == "none") {
    CHECK(two.first == one.first);
  } else {
    CHECK(two.first >= one.first);
    CHECK(two.first <= one.first + 4 * two.second);
  }
  CHECK(two.second == 2 * one.second);  // twice the exchanges, so each is half
}

TEST_CASE("streaming options are validated by name", "[streaming]") {
  auto error_of = [](diloco::DiLoCoOptions o) {
    try {
      o.validate();
    } catch (const diloco::OptionError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  diloco::DiLoCoOptions o;
  o.inner_steps = 8;
  o.fragments = 9;
  CHECK_THAT(error_of(o), Contains("fragments (P) must be in [1, inner_steps = 8]"));
  o.fragments = 4;
  o.overlap_steps = 2;
  CHECK_THAT(error_of(o), Contains("overlap_steps (tau) must be in [0, 2)"));
  o.overlap_steps = 1;
  o.mixing = 1.5;
  CHECK_THAT(error_of(o), Contains("mixing (alpha) must be in [0, 1]"));
  o.mixing = 0.5;
  o.fragment_of = {0, 4};
  CHECK_THAT(error_of(o), Contains("fragment_of[1] must be in [0, fragments = 4)"));
  o.fragment_of = {};
  CHECK(error_of(o) == "no error");

  // A fragment left empty is refused at construction, naming it.
  const auto errors = diloco_test::run_ranks_collect(1, [](int, std::shared_ptr<diloco::Group> g) {
    diloco::ModelTensors m;
    m.parameters.push_back({"w", at::zeros({4})});
    m.parameters.push_back({"b", at::zeros({2})});
    diloco::DiLoCoOptions o;
    o.inner_steps = 6;
    o.fragments = 3;
    diloco::DiLoCo d(std::move(m), g, o);
  });
  CHECK_THAT(errors[0], Contains("fragment 2 of fragments = 3 holds no parameter"));
}

TEST_CASE("a peer lost while a fragment's exchange is in flight raises PeerLostError, nothing half applied",
          "[streaming][peer_loss][process]") {
  const int world = 3;
  const std::string compression = GENERATE(as<std::string>{}, "none", "int8");
  INFO(compression);
  const int port = diloco_test::free_port();
  std::vector<diloco_test::Proc> procs;
  // H = 8, P = 2, tau = 3: fragment 0 starts after step 4 and is due after step 7; rank 2 dies
  // before step 6, with the exchange in flight.
  for (int r = 0; r < world; ++r) {
    procs.push_back(diloco_test::spawn_worker(
        r, world, port,
        {"WORKER_STEPS=40", "WORKER_H=8", "WORKER_FRAGMENTS=2", "WORKER_OVERLAP=3",
         "WORKER_MIXING=0.5", "WORKER_COMPRESS=" + compression, "WORKER_DIE_RANK=2",
         "WORKER_DIE_STEP=14", "DILOCO_TIMEOUT_S=10"}));
  }
  const auto start = std::chrono::steady_clock::now();
  diloco_test::wait_all(procs, std::chrono::seconds(40));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  INFO("all workers ended after " << seconds << " s");
  CHECK(procs[2].exit_code == 3);
  for (int r = 0; r < 2; ++r) {
    const std::string log = diloco_test::slurp(procs[r].log);
    INFO("rank " << r << " log:\n" << log);
    CHECK(procs[r].exit_code == 42);
    CHECK_THAT(log, Contains("PeerLostError"));
  }
  CHECK(seconds < 30);
  diloco_test::cleanup(procs);
}

TEST_CASE("sync() with a fragment in flight applies it and does not send it again",
          "[streaming][gloo]") {
  // H = 4, P = 2, tau = 1: fragment 0 starts after steps 2, 6; fragment 1 after 4, 8. After
  // step 8 fragment 1 is in flight: sync() applies it, exchanges fragment 0 (which trained two
  // steps since its last start), and leaves fragment 1 at its global weights without a sixth
  // exchange.
  const Shapes shapes;
  constexpr int kWorld = 2;
  std::vector<std::uint64_t> exchanges(kWorld);
  std::vector<bool> settled_is_global(kWorld), mixed_differs(kWorld);
  std::vector<std::vector<at::Tensor>> local(kWorld);
  diloco_test::run_ranks(kWorld, [&](int rank, std::shared_ptr<diloco::Group> group) {
    diloco::ModelTensors model;
    for (std::size_t i = 0; i < shapes.names.size(); ++i) {
      model.parameters.push_back({shapes.names[i], initial(i, shapes)});
    }
    std::vector<at::Tensor> params;
    for (const auto& p : model.parameters) params.push_back(p.tensor);
    diloco::DiLoCoOptions o;
    o.inner_steps = 4;
    o.fragments = 2;
    o.overlap_steps = 1;
    o.mixing = 0.5;
    o.fragment_of = {0, 1, 0, 1};
    diloco::DiLoCo sync(std::move(model), group, o);
    for (int s = 1; s <= 8; ++s) {
      at::NoGradGuard no_grad;
      for (std::size_t i = 0; i < params.size(); ++i) {
        params[i].sub_(params[i] - target(i, rank, s, shapes), kInnerLr);
      }
      sync.step();
    }
    sync.sync();
    exchanges[rank] = group->stats().ops.at("allreduce:outer_sync").calls;
    const auto& buckets = sync.parameters().buckets();
    for (std::size_t b = 0; b < buckets.size(); ++b) {
      const bool same = at::equal(buckets[b].flat, sync.global_weights()[b]);
      if (buckets[b].fragment == 1) settled_is_global[rank] = same;
      if (buckets[b].fragment == 0) mixed_differs[rank] = !same;  // alpha = 0.5 mixes it
    }
    for (const auto& p : params) local[rank].push_back(p.detach().clone());
  });
  for (int r = 0; r < kWorld; ++r) {
    INFO("rank " << r);
    CHECK(exchanges[r] == 5);
    CHECK(settled_is_global[r]);
    CHECK(mixed_differs[r]);
  }
}

TEST_CASE("wait_seconds counts the time an island is blocked until an exchange completes",
          "[streaming][gloo]") {
  // Rank 1 is late to start the exchange by 0.5 s; rank 0 started it and trained on for tau = 2
  // steps, then had to wait for rank 1's contribution: at least most of the delay. Waiting is a
  // part of the time in outer steps. The 3-rank case screens the norms first, which with tau > 0
  // runs on the communication thread: the delay is waited for at the same place.
  const int world = GENERATE(2, 3);
  INFO("world " << world);
  constexpr double kDelay = 0.5;
  std::vector<diloco::SyncStats> stats(static_cast<std::size_t>(world));
  diloco_test::run_ranks(world, [&](int rank, std::shared_ptr<diloco::Group> group) {
    diloco::ModelTensors model;
    model.parameters.push_back({"w", at::zeros({64})});
    at::Tensor w = model.parameters.front().tensor;
    diloco::DiLoCoOptions o;
    o.inner_steps = 4;
    o.overlap_steps = 2;
    diloco::DiLoCo sync(std::move(model), group, o);
    for (int s = 1; s <= 8; ++s) {
      w.add_(0.01 * (rank + 1));
      if (rank == 1 && s == 4) {
        std::this_thread::sleep_for(std::chrono::duration<double>(kDelay));
      }
      sync.step();
    }
    sync.sync();
    stats[static_cast<std::size_t>(rank)] = sync.stats();
  });
  INFO("rank 0 waited " << stats[0].wait_seconds << " s of " << stats[0].sync_seconds
                        << " s in outer steps");
  CHECK(stats[0].wait_seconds >= 0.8 * kDelay);
  for (const auto& s : stats) CHECK(s.wait_seconds <= s.sync_seconds);
}

TEST_CASE("next_step_would_wait() says when the next step() would block on a late island",
          "[streaming][gloo]") {
  // Rank 1 starts the exchange (after step 4) 0.5 s late; rank 0 reaches the due step (6, tau =
  // 2) at once. Before step 6 it must read true until rank 1's contribution has arrived, then
  // false, and step() must then not wait; before the other steps (nothing due) false. The 3-rank
  // case screens first on the communication thread, int8 runs its exchange there: the poll
  // covers both. Without overlap an exchange is started and applied in one step(): never true.
  const int world = GENERATE(2, 3);
  const std::string compression = GENERATE(std::string("none"), std::string("int8"));
  const int overlap = GENERATE(2, 0);
  INFO("world " << world << ", " << compression << ", tau " << overlap);
  constexpr double kDelay = 0.5;
  std::vector<int> true_before;          // rank 0: the steps before which it read true
  double polled_s = 0.0, waited_after = 0.0;
  diloco_test::run_ranks(world, [&](int rank, std::shared_ptr<diloco::Group> group) {
    diloco::ModelTensors model;
    model.parameters.push_back({"w", at::zeros({4096})});
    at::Tensor w = model.parameters.front().tensor;
    diloco::DiLoCoOptions o;
    o.inner_steps = 4;
    o.overlap_steps = overlap;
    o.compression = compression;
    diloco::DiLoCo sync(std::move(model), group, o);
    for (int s = 1; s <= 8; ++s) {
      w.add_(0.01 * (rank + 1));
      if (rank == 1 && s == 4) std::this_thread::sleep_for(std::chrono::duration<double>(kDelay));
      if (rank == 0 && sync.next_step_would_wait()) {
        true_before.push_back(s);
        const auto start = std::chrono::steady_clock::now();
        while (sync.next_step_would_wait()) std::this_thread::sleep_for(std::chrono::milliseconds(2));
        polled_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        const double waited = sync.stats().wait_seconds;
        sync.step();
        waited_after = sync.stats().wait_seconds - waited;
        continue;
      }
      sync.step();
    }
    sync.sync();
  });
  if (overlap == 0) {
    CHECK(true_before.empty());
    return;
  }
  INFO("rank 0 polled " << polled_s << " s, then waited " << waited_after << " s in step()");
  CHECK(true_before == std::vector<int>{6});
  CHECK(polled_s >= 0.5 * kDelay);
  CHECK(waited_after < 0.2);
}
