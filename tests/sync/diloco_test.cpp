// DiLoCo over real Gloo ranks (threads on loopback): the outer step's formula, bit-identical
// global weights, the data-parallel special case, and the errors a user can run into.
#include <ATen/ATen.h>
#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "diloco/diloco.h"
#include "support/catch.h"
#include "support/codec_helpers.h"
#include "support/ranks.h"

using Catch::Matchers::Contains;

namespace {

struct TinyNet : torch::nn::Module {
  explicit TinyNet(int hidden = 16) {
    fc1 = register_module("fc1", torch::nn::Linear(8, hidden));
    fc2 = register_module("fc2", torch::nn::Linear(hidden, 1));
  }
  torch::Tensor forward(torch::Tensor x) { return fc2->forward(torch::tanh(fc1->forward(x))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};

at::Tensor flat_copy(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> parts;
  for (const auto& t : ts) parts.push_back(t.detach().reshape({-1}).to(at::kDouble));
  return at::cat(parts);
}

at::Tensor model_vector(TinyNet& net) { return flat_copy(net.parameters()); }

// One inner step of regression on this rank's own data.
void inner_step(TinyNet& net, torch::optim::Optimizer& opt, int rank, int step) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 * rank + step);
  at::Tensor x = at::randn({16, 8}, gen);
  at::Tensor y = x.sum(1, true).sin();
  opt.zero_grad();
  torch::mse_loss(net.forward(x), y).backward();
  opt.step();
}

}  // namespace

TEST_CASE("the outer step is Nesterov SGD on the mean pseudo-gradient, bit-identical on all ranks",
          "[diloco][gloo]") {
  const int world = GENERATE(1, 2, 3, 4);
  const int H = 3, outer_steps = 3;
  // Per rank: the global weights after each outer step, the weights before each sync, and the
  // initial (broadcast) weights.
  std::vector<std::vector<at::Tensor>> globals(world), locals(world);
  std::vector<at::Tensor> start(world);
  std::vector<bool> model_equals_global(world, true);
  diloco_test::run_ranks(world, [&](int rank, std::shared_ptr<diloco::Group> group) {
    torch::manual_seed(rank);  // different initial weights: rank 0's must win
    TinyNet net;
    torch::optim::AdamW opt(net.parameters(), torch::optim::AdamWOptions(1e-2));
    diloco::DiLoCoOptions o;
    o.inner_steps = H;
    diloco::DiLoCo sync(net, opt, group, o);
    start[rank] = model_vector(net);
    for (int s = 1; s <= H * outer_steps; ++s) {
      inner_step(net, opt, rank, s);
      if (s % H == 0) locals[rank].push_back(model_vector(net));
      if (sync.step()) {
        globals[rank].push_back(flat_copy(sync.global_weights()));
        model_equals_global[rank] =
            model_equals_global[rank] && at::equal(model_vector(net), globals[rank].back());
      }
    }
  });
  // Reference: torch.optim.SGD(lr=0.7, momentum=0.9, nesterov=True) fed the mean pseudo-gradient.
  at::Tensor theta = start[0].clone(), buf = at::zeros_like(theta);
  for (int r = 1; r < world; ++r) REQUIRE(at::equal(start[r], start[0]));
  for (int t = 0; t < outer_steps; ++t) {
    at::Tensor delta = at::zeros_like(theta);
    for (int r = 0; r < world; ++r) delta += theta - locals[r][t];
    delta /= world;
    buf = 0.9 * buf + delta;
    theta = theta - 0.7 * (delta + 0.9 * buf);
    const double diff = (globals[0][t] - theta).abs().max().item<double>();
    INFO("world " << world << " outer step " << t + 1 << " max |diff| vs reference " << diff);
    CHECK(diff < 1e-5);
    for (int r = 1; r < world; ++r) CHECK(at::equal(globals[r][t], globals[0][t]));
    theta = globals[0][t].clone();  // follow the library so float rounding does not accumulate
  }
  for (int r = 0; r < world; ++r) CHECK(model_equals_global[r]);
}

TEST_CASE("H=1, inner SGD, outer averaging is data parallelism", "[diloco][gloo]") {
  const int world = 3, steps = 6;
  std::vector<at::Tensor> dp_result(world), diloco_result(world), initial(world);
  auto train = [&](bool use_diloco) {
    diloco_test::run_ranks(world, [&](int rank, std::shared_ptr<diloco::Group> group) {
      TinyNet net;
      diloco_test::seed_parameters(net.parameters(), 0);
      torch::optim::SGD opt(net.parameters(), torch::optim::SGDOptions(0.05));
      std::unique_ptr<diloco::DiLoCo> outer;
      std::unique_ptr<diloco::DataParallel> dp;
      initial[rank] = model_vector(net);
      if (use_diloco) {
        diloco::DiLoCoOptions o;
        o.inner_steps = 1;
        o.outer = diloco::OuterSGDOptions::averaging();
        outer = std::make_unique<diloco::DiLoCo>(net, opt, group, o);
      } else {
        dp = std::make_unique<diloco::DataParallel>(net, group);
      }
      for (int s = 1; s <= steps; ++s) {
        auto gen = at::make_generator<at::CPUGeneratorImpl>(100 * rank + s);
        at::Tensor x = at::randn({16, 8}, gen);
        opt.zero_grad();
        torch::mse_loss(net.forward(x), x.sum(1, true).sin()).backward();
        if (dp) dp->sync_gradients();
        opt.step();
        if (outer) REQUIRE(outer->step());
      }
      (use_diloco ? diloco_result : dp_result)[rank] = model_vector(net);
    });
  };
  train(false);
  train(true);
  const double diff = (dp_result[0] - diloco_result[0]).abs().max().item<double>();
  INFO("max |DiLoCo(H=1) - data parallel| = " << diff);
  CHECK(diff < 1e-6);
  CHECK((dp_result[0] - initial[0]).abs().max().item<double>() > 1e-3);  // it did train
  for (int r = 1; r < world; ++r) CHECK(at::equal(dp_result[r], dp_result[0]));
}

TEST_CASE("islands with different models fail at construction on every rank", "[diloco][gloo]") {
  const auto errors = diloco_test::run_ranks_collect(3, [](int rank, std::shared_ptr<diloco::Group> g) {
    TinyNet net(rank == 2 ? 32 : 16);
    torch::optim::SGD opt(net.parameters(), torch::optim::SGDOptions(0.1));
    diloco::DiLoCo sync(net, opt, g, {});
  });
  for (int r = 0; r < 3; ++r) {
    INFO("rank " << r << ": " << errors[r]);
    CHECK_THAT(errors[r], Contains("different models") && Contains("'fc1.weight'") &&
                              Contains("[16, 8] Float on rank 0") && Contains("[32, 8] Float on rank 2"));
  }
}

TEST_CASE("a parameter missing from the inner optimizer is an error on every rank", "[diloco][gloo]") {
  const auto errors = diloco_test::run_ranks_collect(2, [](int rank, std::shared_ptr<diloco::Group> g) {
    TinyNet net;
    auto params = rank == 1 ? net.fc1->parameters() : net.parameters();
    torch::optim::SGD opt(params, torch::optim::SGDOptions(0.1));
    diloco::DiLoCo sync(net, opt, g, {});
  });
  for (int r = 0; r < 2; ++r) {
    INFO(errors[r]);
    CHECK_THAT(errors[r], Contains("rank 1") && Contains("'fc2.weight'") && Contains("inner optimizer"));
  }
}

TEST_CASE("a NaN pseudo-gradient is never averaged into the global weights", "[diloco][gloo]") {
  const int world = 3;
  std::vector<at::Tensor> before(world), after(world), model_after(world);
  const auto errors = diloco_test::run_ranks_collect(world, [&](int rank, std::shared_ptr<diloco::Group> g) {
    torch::manual_seed(0);
    TinyNet net;
    torch::optim::SGD opt(net.parameters(), torch::optim::SGDOptions(0.1));
    diloco::DiLoCoOptions o;
    o.inner_steps = 2;
    diloco::DiLoCo sync(net, opt, g, o);
    before[rank] = flat_copy(sync.global_weights());
    inner_step(net, opt, rank, 1);
    sync.step();
    inner_step(net, opt, rank, 2);
    if (rank == 1) {
      torch::NoGradGuard no_grad;
      net.fc2->bias.fill_(std::nan(""));
    }
    try {
      sync.step();
    } catch (...) {
      after[rank] = flat_copy(sync.global_weights());
      model_after[rank] = model_vector(net);
      throw;
    }
  });
  for (int r = 0; r < world; ++r) {
    INFO("rank " << r << ": " << errors[r]);
    CHECK_THAT(errors[r], Contains("NaN or infinite") && Contains("'fc2.bias'") &&
                              Contains(r == 1 ? "own was not finite" : "another rank sent it"));
    REQUIRE(after[r].defined());
    CHECK(at::equal(after[r], before[r]));
    CHECK(at::equal(model_after[r], after[r]));
  }
}

TEST_CASE("DiLoCo options are validated by name", "[diloco]") {
  diloco::DiLoCoOptions o;
  o.inner_steps = 0;
  CHECK_THROWS_WITH(o.validate(), Contains("inner_steps (H)") && Contains(">= 1"));
  o.inner_steps = 10;
  o.outer.lr = -0.5;
  CHECK_THROWS_AS(o.validate(), diloco::OptionError);
  o.outer.lr = 0.7;
  o.outer.momentum = 1.5;
  CHECK_THROWS_WITH(o.validate(), Contains("outer momentum") && Contains("[0, 1)"));
}

TEST_CASE("DiLoCo keeps exactly two float32 copies of the parameters", "[diloco][gloo]") {
  diloco_test::run_ranks(1, [](int, std::shared_ptr<diloco::Group> g) {
    TinyNet net;
    torch::optim::SGD opt(net.parameters(), torch::optim::SGDOptions(0.1));
    diloco::DiLoCo sync(net, opt, g, {});
    std::int64_t n = 0;
    for (const auto& p : net.parameters()) n += p.numel();
    std::int64_t held = 0;
    for (const auto& t : sync.global_weights()) held += t.numel();
    if (held != n || sync.parameters().numel() != n) throw std::runtime_error("global size");
    // The parameters now live in one contiguous bucket: one collective per sync.
    if (sync.parameters().buckets().size() != 1) throw std::runtime_error("buckets");
  });
}

TEST_CASE("a float64 model syncs through a float32 staging buffer, same formula", "[diloco][gloo]") {
  // The path a CPU-offloaded accelerator model takes: the model's storage cannot carry the
  // float32 pseudo-gradient, so it is staged on the outer device.
  const int world = 2, H = 2;
  std::vector<at::Tensor> start(world), before(world), after(world), global(world);
  diloco_test::run_ranks(world, [&](int rank, std::shared_ptr<diloco::Group> group) {
    TinyNet net;
    diloco_test::seed_parameters(net.parameters(), 0);
    net.to(torch::kDouble);
    torch::optim::SGD opt(net.parameters(), torch::optim::SGDOptions(0.1));
    diloco::DiLoCoOptions o;
    o.inner_steps = H;
    o.outer_device = at::Device(at::kCPU);
    diloco::DiLoCo sync(net, opt, group, o);
    start[rank] = model_vector(net);
    for (int s = 1; s <= H; ++s) {
      auto gen = at::make_generator<at::CPUGeneratorImpl>(10 * rank + s);
      at::Tensor x = at::randn({16, 8}, gen).to(at::kDouble);
      opt.zero_grad();
      torch::mse_loss(net.forward(x), x.sum(1, true).sin()).backward();
      opt.step();
      if (s == H) before[rank] = model_vector(net);
      sync.step();
    }
    after[rank] = model_vector(net);
    global[rank] = flat_copy(sync.global_weights());
    if (sync.global_weights()[0].scalar_type() != at::kFloat) throw std::runtime_error("global dtype");
  });
  at::Tensor theta = start[0].to(at::kFloat).to(at::kDouble);
  at::Tensor delta = ((theta - before[0]) + (theta - before[1])) / 2;
  at::Tensor expect = theta - 0.7 * (delta + 0.9 * delta);  // first step: b = delta
  const double diff = (global[0] - expect).abs().max().item<double>();
  INFO("max |diff| vs reference " << diff);
  CHECK(diff < 1e-6);
  CHECK(at::equal(global[0], global[1]));
  CHECK(at::equal(after[0], global[0]));  // the model holds the global weights again
}

TEST_CASE("global weights and momentum offloaded to the CPU for a CUDA model", "[diloco][gloo][cuda]") {
  if (!torch::cuda::is_available()) {
    WARN("no CUDA device: the CUDA offload test runs only on machines with one");
    return;
  }
  std::vector<at::Tensor> global(2), model(2);
  diloco_test::run_ranks(2, [&](int rank, std::shared_ptr<diloco::Group> group) {
    torch::manual_seed(0);
    TinyNet net;
    net.to(torch::kCUDA);
    torch::optim::SGD opt(net.parameters(), torch::optim::SGDOptions(0.1));
    diloco::DiLoCoOptions o;
    o.inner_steps = 1;
    o.outer_device = at::Device(at::kCPU);
    diloco::DiLoCo sync(net, opt, group, o);
    at::Tensor x = at::randn({16, 8}, at::kCUDA);
    opt.zero_grad();
    torch::mse_loss(net.forward(x), x.sum(1, true).sin()).backward();
    opt.step();
    sync.step();
    if (!sync.global_weights()[0].device().is_cpu()) throw std::runtime_error("global not on CPU");
    global[rank] = flat_copy(sync.global_weights());
    model[rank] = model_vector(net).cpu();
  });
  CHECK(at::equal(global[0], global[1]));
  CHECK((model[0] - global[0]).abs().max().item<double>() == 0.0);
}

namespace {

// Three islands of TinyNet, H = 2, `steps` inner steps under `options`; with `corrupt`, rank 2's
// global weights are changed after outer step 1 (a bit flip in memory, a hostile island), so the
// state of every later outer step differs from the others'. Then `after` runs on each rank.
// Returns each rank's error, "" for none.
std::vector<std::string> state_comparison_run(
    diloco::DiLoCoOptions options, int steps, bool corrupt,
    const std::function<void(diloco::Group&, diloco::DiLoCo&)>& after = {}) {
  options.inner_steps = 2;
  return diloco_test::run_ranks_collect(3, [&](int rank, std::shared_ptr<diloco::Group> g) {
    torch::manual_seed(0);
    TinyNet net;
    torch::optim::SGD opt(net.parameters(), torch::optim::SGDOptions(0.05));
    diloco::DiLoCo outer(net, opt, g, options);
    for (int step = 0; step < steps; ++step) {
      inner_step(net, opt, rank, step);
      outer.step();
      if (corrupt && step == 1 && rank == 2) {
        at::NoGradGuard no_grad;
        outer.global_weights()[0].view(-1)[3] += 1e-3f;
      }
    }
    if (after) after(*g, outer);
  });
}

std::uint64_t state_checks_sent(diloco::Group& g) {
  const auto ops = g.stats().ops;
  const auto it = ops.find("allgather:state_check");
  return it == ops.end() ? 0 : it->second.calls;
}

// Every rank's error names rank 2 against the majority after outer step 2.
void check_rank_2_named(const std::vector<std::string>& errors) {
  for (int r = 0; r < 3; ++r) {
    INFO("rank " << r << ": " << errors[static_cast<std::size_t>(r)]);
    CHECK_THAT(errors[static_cast<std::size_t>(r)],
               Contains("[DiLoCo outer step 2, fragment 0] rank " + std::to_string(r) +
                        ": the islands' global states differ after the outer step: rank(s) 2 "
                        "disagree with the majority"));
  }
}

}  // namespace

TEST_CASE("islands compare their global state after every outer step; one that differs is named",
          "[diloco][gloo]") {
  // The states compared after outer step 2 differ, and every rank fails when that comparison
  // is made, at the start of outer step 3's exchange, naming rank 2 against the majority: with
  // screening (3 ranks, the default screen_factor) it rides on the screening's all-gather,
  // without it it is an all-gather of its own.
  for (const double screen_factor : {100.0, 0.0}) {
    INFO("screen_factor " << screen_factor);
    diloco::DiLoCoOptions options;
    options.screen_factor = screen_factor;
    const auto errors = state_comparison_run(options, 6, true);
    check_rank_2_named(errors);
  }
  // Off, nothing is compared (and nothing is sent for it).
  diloco::DiLoCoOptions off;
  off.compare_states = false;
  const auto quiet = state_comparison_run(off, 6, true, [](diloco::Group& g, diloco::DiLoCo& d) {
    d.check_state();
    if (state_checks_sent(g) != 0) throw std::runtime_error("state_check sent");
  });
  for (const auto& e : quiet) CHECK(e.empty());
}

TEST_CASE("with screening the state comparison sends nothing of its own, and check_state() "
          "compares the last outer step", "[diloco][gloo]") {
  // Outer step 2 is the last: with screening nothing was compared on its own when the loop
  // ends, and check_state() finds the difference.
  const auto errors =
      state_comparison_run({}, 4, true, [](diloco::Group& g, diloco::DiLoCo& d) {
        if (state_checks_sent(g) != 0) {
          throw std::runtime_error("a state comparison was sent on its own with screening");
        }
        d.check_state();
        throw std::runtime_error("check_state() found no difference");
      });
  check_rank_2_named(errors);
  // Honest islands: check_state() passes (a second call compares again, with no hash left on any
  // rank), each call one all-gather of its own.
  const auto honest = state_comparison_run({}, 6, false, [](diloco::Group& g, diloco::DiLoCo& d) {
    d.check_state();
    d.check_state();
    if (state_checks_sent(g) != 2) {
      throw std::runtime_error("expected two state comparisons of their own (check_state's)");
    }
  });
  for (const auto& e : honest) CHECK(e.empty());
}

TEST_CASE("a pseudo-gradient far above the others' is refused, named on every rank, and the outer "
          "step averages the rest", "[diloco][gloo]") {
  // Rank 3 adds 1e6 to its weights before the outer step (a hostile or broken island): its
  // pseudo-gradient's norm is ~1e7 x the others'. The reference is the outer step over ranks 0-2.
  const int world = 4;
  std::vector<at::Tensor> local(world), global(world);
  at::Tensor start;
  std::vector<std::int64_t> refused(world);
  std::vector<std::string> named(world);
  diloco_test::run_ranks(world, [&](int rank, std::shared_ptr<diloco::Group> group) {
    torch::manual_seed(0);
    TinyNet net;
    torch::optim::SGD opt(net.parameters(), torch::optim::SGDOptions(0.05));
    diloco::DiLoCoOptions o;
    o.inner_steps = 2;
    diloco::DiLoCo sync(net, opt, group, o);
    if (rank == 0) start = model_vector(net);
    for (int s = 1; s <= 2; ++s) {
      inner_step(net, opt, rank, s);
      if (s == 2 && rank == 3) {
        at::NoGradGuard no_grad;
        for (auto& p : net.parameters()) p.add_(1e6);
      }
      if (s == 2) local[rank] = model_vector(net);
      sync.step();
    }
    global[rank] = flat_copy(sync.global_weights());
    refused[rank] = sync.refused_contributions();
    named[rank] = sync.last_screening();
  });
  at::Tensor delta = at::zeros_like(start);
  for (int r = 0; r < 3; ++r) delta += start - local[r];
  delta /= 3;
  const at::Tensor expected = start - 0.7 * (delta + 0.9 * delta);
  for (int r = 0; r < world; ++r) {
    INFO("rank " << r << ": " << named[r]);
    CHECK(refused[r] == 1);
    CHECK_THAT(named[r], Contains("refused the pseudo-gradient of rank(s) 3") &&
                             Contains("the outer step averages the other 3 islands"));
    CHECK(at::equal(global[r], global[0]));
  }
  CHECK((global[0] - expected).abs().max().item<double>() < 1e-5);
}

TEST_CASE("screen_factor is validated, naming it", "[diloco]") {
  diloco::DiLoCoOptions o;
  o.screen_factor = 0.5;
  CHECK_THROWS_WITH(o.validate(), Contains("screen_factor must be 0 (off) or in [1, 1e12], got 0.5"));
  o.screen_factor = 0.0;
  CHECK_NOTHROW(o.validate());
}

TEST_CASE("a robust aggregator bounds a hostile island's pull: the outer step applies the "
          "coordinate-wise median of the pseudo-gradients", "[diloco][gloo]") {
  // Rank 3 sends its pseudo-gradient times -20 (flipped and scaled: not refused by the screening,
  // 20 < 100). The reference: the outer step over the median of the 4 pseudo-gradients, the
  // mean of the two middle values per coordinate.
  const int world = 4;
  std::vector<at::Tensor> local(world), global(world);
  at::Tensor start;
  std::vector<std::int64_t> refused(world);
  diloco_test::run_ranks(world, [&](int rank, std::shared_ptr<diloco::Group> group) {
    torch::manual_seed(0);
    TinyNet net;
    torch::optim::SGD opt(net.parameters(), torch::optim::SGDOptions(0.05));
    diloco::DiLoCoOptions o;
    o.inner_steps = 2;
    o.aggregator = "median";
    diloco::DiLoCo sync(net, opt, group, o);
    if (rank == 0) start = model_vector(net);
    for (int s = 1; s <= 2; ++s) {
      inner_step(net, opt, rank, s);
      if (s == 2 && rank == 3) {
        at::NoGradGuard no_grad;
        const at::Tensor g = flat_copy(sync.global_weights());
        std::int64_t at_element = 0;
        for (auto& p : net.parameters()) {
          const at::Tensor gp = g.narrow(0, at_element, p.numel()).view(p.sizes());
          p.copy_(gp + 20.0 * (gp - p));  // pseudo-gradient g - p becomes -20 (g - p)
          at_element += p.numel();
        }
      }
      if (s == 2) local[rank] = model_vector(net);
      sync.step();
    }
    global[rank] = flat_copy(sync.global_weights());
    refused[rank] = sync.refused_contributions();
  });
  std::vector<at::Tensor> deltas;
  for (int r = 0; r < world; ++r) deltas.push_back(start - local[r]);
  const at::Tensor sorted = std::get<0>(at::stack(deltas).sort(0));
  const at::Tensor median = (sorted[1] + sorted[2]) / 2;
  const at::Tensor expected = start - 0.7 * (median + 0.9 * median);
  for (int r = 0; r < world; ++r) {
    CHECK(refused[r] == 0);
    CHECK(at::equal(global[r], global[0]));
  }
  CHECK((global[0] - expected).abs().max().item<double>() < 1e-5);
  // The mean would have moved the weights by (3 honest - 20 x one) / 4: far from the median's.
  at::Tensor mean = at::zeros_like(start);
  for (const auto& d : deltas) mean += d / 4;
  CHECK((mean - median).norm().item<double>() > 2 * median.norm().item<double>());
}

TEST_CASE("the aggregator is validated, naming it, the islands and the codec", "[diloco][gloo]") {
  diloco::DiLoCoOptions o;
  o.aggregator = "avg";
  CHECK_THROWS_WITH(o.validate(), Contains("aggregator must be one of mean"));
  o.aggregator = "median";
  o.compression = "powersgd(rank=2)";
  CHECK_THROWS_WITH(o.validate(), Contains("aggregator median needs each island's contribution"));
  const auto errors = diloco_test::run_ranks_collect(3, [](int, std::shared_ptr<diloco::Group> g) {
    TinyNet net;
    torch::optim::SGD opt(net.parameters(), torch::optim::SGDOptions(0.05));
    diloco::DiLoCoOptions options;
    options.aggregator = "trimmed_mean(trim=2)";
    diloco::DiLoCo outer(net, opt, g, options);
  });
  for (const auto& e : errors) {
    CHECK_THAT(e, Contains("trimmed_mean(trim=2) drops 4 values per coordinate: it needs more "
                           "than 4 islands, the group has 3 (trim must be in [1, 1])"));
  }
}

TEST_CASE("an fp32 sum longer than the declared norms allow is refused on every rank, nothing "
          "applied", "[diloco][gloo]") {
  // Rank 3 declares its honest norm but sends its payload times 1000 (a codec that passes for
  // fp32): the all-reduce sums in flight, so no rank can tell who; the sum's norm exceeds the sum
  // of the declared norms, which no honest islands' sum can (triangle inequality).
  diloco_test::register_tampering_codec("fp32_times_1000", "fp32", [](std::uint8_t* p,
                                                                      std::int64_t n) {
    for (std::int64_t i = 0; i + 4 <= n; i += 4) {
      float v;
      std::memcpy(&v, p + i, 4);
      v *= 1000.0f;
      std::memcpy(p + i, &v, 4);
    }
  });
  const int world = 4;
  std::vector<at::Tensor> global(world), model(world);
  at::Tensor start;
  const auto errors = diloco_test::run_ranks_collect(world, [&](int rank,
                                                                std::shared_ptr<diloco::Group> g) {
    torch::manual_seed(0);
    TinyNet net;
    torch::optim::SGD opt(net.parameters(), torch::optim::SGDOptions(0.05));
    diloco::DiLoCoOptions o;
    o.inner_steps = 2;
    o.compression = rank == 3 ? "fp32_times_1000" : "fp32";
    diloco::DiLoCo sync(net, opt, g, o);
    if (rank == 0) start = model_vector(net);
    try {
      for (int s = 1; s <= 2; ++s) {
        inner_step(net, opt, rank, s);
        sync.step();
      }
    } catch (...) {
      global[rank] = flat_copy(sync.global_weights());
      model[rank] = model_vector(net);
      throw;
    }
  });
  for (int r = 0; r < world; ++r) {
    INFO("rank " << r << ": " << errors[r]);
    CHECK_THAT(errors[r], Contains("rank " + std::to_string(r) +
                                   ": the summed pseudo-gradient's norm") &&
                              Contains("exceeds the sum of the norms the contributing islands "
                                       "declared") &&
                              Contains("nothing was applied"));
    REQUIRE(global[r].defined());
    CHECK(at::equal(global[r], start));
    CHECK(at::equal(model[r], start));
  }
}
