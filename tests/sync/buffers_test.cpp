// Module buffers across islands (sync/buffers.h): a BatchNorm model trained on different data on
// each island ends every outer step with bit-identical buffers, equal to the mean of what the
// islands computed (average), to rank 0's (rank0), or left as computed (local).
#include <ATen/ATen.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>

#include <catch2/catch.hpp>

#include <map>
#include <vector>

#include "diloco/errors.h"
#include "diloco/sync/buffers.h"
#include "diloco/sync/data_parallel.h"
#include "diloco/sync/diloco.h"
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
