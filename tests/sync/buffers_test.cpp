// Module buffers across islands (sync/buffers.h): a BatchNorm model trained on different data on
// each island ends every outer step with bit-identical buffers, equal to the mean of what the
// islands computed (average), to rank 0's (rank0), or left as computed (local).
#include <ATen/ATen.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>

#include <map>
#include <vector>

#include "diloco/errors.h"
#include "diloco/sync/buffers.h"
#include "diloco/sync/data_parallel.h"
#include "diloco/sync/diloco.h"
#include "support/catch.h"
#include "support/ranks.h"

using Catch::Matchers::Contains;

namespace {

using Snapshot = std::map<std::string, at::Tensor>;  // buffer name -> value

Snapshot snapshot(const torch::nn::Module& m) {
  Snapshot s;
  for (const auto& b : m.named_buffers()) s[b.key()] = b.value().clone();
  return s;
}

torch::nn::Sequential make_net() {
  return torch::nn::Sequential(torch::nn::Linear(8, 16), torch::nn::BatchNorm1d(16),
                               torch::nn::Linear(16, 1));
}

constexpr int kWorld = 3;
constexpr int kH = 3;
constexpr int kOuter = 3;

// Per rank, per outer step: the buffers just before and just after the outer step.
struct Record {
  std::vector<Snapshot> before, after;
};

std::vector<Record> train(diloco::BufferSync mode) {
  std::vector<Record> records(kWorld);
  diloco_test::run_ranks(kWorld, [&](int rank, std::shared_ptr<diloco::Group> g) {
    auto net = make_net();
    std::vector<at::Tensor> params;
    for (auto& p : net->parameters()) params.push_back(p);
    diloco_test::seed_parameters(params, 7);
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.05));
    diloco::DiLoCoOptions o;
    o.inner_steps = kH;
    o.buffers = mode;
    diloco::DiLoCo sync(*net, opt, g, o);
    auto gen = at::detail::createCPUGenerator(100 + rank);
    for (int step = 1; step <= kH * kOuter; ++step) {
      // Each island sees data of another scale and offset, so its running statistics differ.
      at::Tensor x = at::randn({16, 8}, gen) * (1.0 + rank) + rank;
      opt.zero_grad();
      net->forward(x).pow(2).mean().backward();
      opt.step();
      if (step % kH == 0) records[rank].before.push_back(snapshot(*net));
      if (sync.step()) records[rank].after.push_back(snapshot(*net));
    }
  });
  return records;
}

}  // namespace

TEST_CASE("buffers: average makes every island's BatchNorm statistics the mean, bit-identical", "[buffers][gloo]") {
  const auto records = train(diloco::BufferSync::kAverage);
  for (int t = 0; t < kOuter; ++t) {
    for (const auto& [name, value0] : records[0].after[t]) {
      INFO("outer step " << t + 1 << ", buffer " << name);
      for (int r = 1; r < kWorld; ++r) CHECK(at::equal(records[r].after[t].at(name), value0));
      if (at::isFloatingType(value0.scalar_type())) {
        at::Tensor mean = at::zeros_like(value0, at::kDouble);
        for (int r = 0; r < kWorld; ++r) mean += records[r].before[t].at(name).to(at::kDouble);
        mean /= kWorld;
        const double diff = (value0.to(at::kDouble) - mean).abs().max().item<double>();
        INFO("max |buffer - mean of the islands' buffers| = " << diff);
        CHECK(diff < 1e-6);
        // The islands really differed before the sync: the test is not vacuous.
        CHECK_FALSE(at::equal(records[0].before[t].at(name), records[1].before[t].at(name)));
      } else {
        CHECK(at::equal(value0, records[0].before[t].at(name)));  // num_batches_tracked: rank 0's
        CHECK(value0.item<std::int64_t>() == kH * (t + 1));
      }
    }
  }
}

TEST_CASE("buffers: rank0 copies rank 0's, local leaves them as each island computed", "[buffers][gloo]") {
  const auto rank0 = train(diloco::BufferSync::kRank0);
  for (int t = 0; t < kOuter; ++t) {
    for (const auto& [name, value0] : rank0[0].after[t]) {
      for (int r = 0; r < kWorld; ++r) CHECK(at::equal(rank0[r].after[t].at(name), rank0[0].before[t].at(name)));
    }
  }
  const auto local = train(diloco::BufferSync::kLocal);
  for (int t = 0; t < kOuter; ++t) {
    for (int r = 0; r < kWorld; ++r) {
      CHECK(at::equal(local[r].after[t].at("1.running_mean"), local[r].before[t].at("1.running_mean")));
    }
    CHECK_FALSE(at::equal(local[0].after[t].at("1.running_mean"), local[1].after[t].at("1.running_mean")));
  }
}

TEST_CASE("buffers: DataParallel keeps BatchNorm statistics equal at every step", "[buffers][gloo]") {
  std::vector<Snapshot> last(kWorld);
  diloco_test::run_ranks(kWorld, [&](int rank, std::shared_ptr<diloco::Group> g) {
    auto net = make_net();
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.05));
    diloco::DataParallel dp(*net, g);
    for (int step = 0; step < 4; ++step) {
      at::Tensor x = at::randn({16, 8}) * (1.0 + rank);
      opt.zero_grad();
      net->forward(x).pow(2).mean().backward();
      dp.sync_gradients();
      opt.step();
    }
    last[rank] = snapshot(*net);
  });
  for (const auto& [name, v] : last[0]) {
    for (int r = 1; r < kWorld; ++r) CHECK(at::equal(last[r].at(name), v));
  }
}

TEST_CASE("buffers: a non-finite buffer is refused on every rank, naming it", "[buffers][gloo]") {
  const auto errors = diloco_test::run_ranks_collect(2, [](int rank, std::shared_ptr<diloco::Group> g) {
    auto net = make_net();
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.05));
    diloco::DiLoCoOptions o;
    o.inner_steps = 1;
    diloco::DiLoCo sync(*net, opt, g, o);
    if (rank == 1) net->named_buffers()["1.running_var"].fill_(std::numeric_limits<float>::infinity());
    sync.step();
  });
  for (const auto& e : errors) {
    INFO(e);
    CHECK_THAT(e, Contains("'1.running_var'") && Contains("NaN or infinite"));
  }
  CHECK_THROWS_WITH(diloco::parse_buffer_sync("mean"), Contains("buffers") && Contains("average, rank0, local"));
}

namespace {

// A model whose only buffer is an integer one, as a causal mask or a step counter: DiLoCo then
// compares the buffers' digests after an outer step without waiting for it, and settles the
// comparison (rank 0's values when they differ) at the next exchange or at check_state().
struct Counted : torch::nn::Module {
  Counted() {
    fc = register_module("fc", torch::nn::Linear(4, 1));
    seen = register_buffer("seen", torch::zeros({2}, at::kLong));
  }
  torch::nn::Linear fc{nullptr};
  at::Tensor seen;
};

}  // namespace

TEST_CASE("buffers: integer buffers alone are compared in the background and settled at the next exchange", "[buffers][gloo]") {
  constexpr int kWorld2 = 3;
  std::vector<std::int64_t> after_step(kWorld2), after_next(kWorld2), after_check(kWorld2);
  std::vector<std::uint64_t> digests(kWorld2), broadcasts(kWorld2);
  diloco_test::run_ranks(kWorld2, [&](int rank, std::shared_ptr<diloco::Group> g) {
    auto net = std::make_shared<Counted>();
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.05));
    diloco::DiLoCoOptions o;
    o.inner_steps = 2;
    diloco::DiLoCo sync(*net, opt, g, o);
    REQUIRE(sync.buffers().digest_only(o.buffers));
    const auto train_step = [&] {
      opt.zero_grad();
      net->fc->forward(at::ones({3, 4}) * (rank + 1)).pow(2).mean().backward();
      opt.step();
    };
    // Each island counts differently: the digests differ at every outer step.
    net->seen[0] += rank + 1;
    train_step();
    CHECK_FALSE(sync.step());
    train_step();
    REQUIRE(sync.step());
    after_step[rank] = net->seen[0].item<std::int64_t>();  // not settled yet: its own count
    net->seen[1] += 1;
    train_step();
    CHECK_FALSE(sync.step());
    train_step();
    REQUIRE(sync.step());  // the exchange's start settled the first comparison: rank 0's
    after_next[rank] = net->seen[0].item<std::int64_t>();
    // The second comparison saw equal buffers (the first was settled before it was taken);
    // what changes after it is not compared, and check_state() settles it with no broadcast.
    net->seen[0] += rank + 1;
    sync.check_state();
    after_check[rank] = net->seen[0].item<std::int64_t>();
    const auto ops = g->stats().ops;
    digests[rank] = ops.at("allgather:buffers_digest").calls;
    broadcasts[rank] = ops.count("broadcast:buffers") ? ops.at("broadcast:buffers").calls : 0;
  });
  for (int r = 0; r < kWorld2; ++r) {
    INFO("rank " << r);
    CHECK(after_step[r] == r + 1);
    CHECK(after_next[r] == 1);           // rank 0's count, taken at the next exchange
    CHECK(after_check[r] == 1 + r + 1);  // its own: nothing differed when compared
    CHECK(digests[r] == 2);              // one per outer step, both settled (counted on wait)
    CHECK(broadcasts[r] == 1 + 1);       // construction, then the first comparison's
  }
}
