// DataParallel: gradients become the mean over ranks, and non-finite gradients are refused.
#include <ATen/ATen.h>
#include <torch/torch.h>

#include <cmath>

#include "diloco/diloco.h"
#include "support/catch.h"
#include "support/ranks.h"

using Catch::Matchers::Contains;

TEST_CASE("DataParallel averages gradients over ranks", "[dp][gloo]") {
  const int world = GENERATE(1, 2, 4);
  std::vector<at::Tensor> own(world), synced(world);
  std::vector<diloco::SyncStats> stats(world);
  diloco_test::run_ranks(world, [&](int rank, std::shared_ptr<diloco::Group> g) {
    torch::manual_seed(rank);
    torch::nn::Linear net(5, 3);
    diloco::DataParallel dp(*net, g);
    auto gen = at::make_generator<at::CPUGeneratorImpl>(rank + 1);
    at::Tensor x = at::randn({4, 5}, gen);
    net->forward(x).pow(2).sum().backward();
    own[rank] = at::cat({net->weight.grad().reshape({-1}), net->bias.grad()}).clone();
    dp.sync_gradients();
    synced[rank] = at::cat({net->weight.grad().reshape({-1}), net->bias.grad()}).clone();
    stats[rank] = dp.stats();
  });
  at::Tensor mean = at::zeros_like(own[0]);
  for (const auto& o : own) mean += o;
  mean /= world;
  for (int r = 0; r < world; ++r) {
    CHECK((synced[r] - mean).abs().max().item<float>() < 1e-6);
    CHECK(at::equal(synced[r], synced[0]));
    CHECK(stats[r].outer_steps == 1);
    // 18 float32 gradients, one ring all-reduce (plus the setup collectives).
    CHECK(stats[r].bytes_sent >= static_cast<std::uint64_t>(2 * (world - 1) * 18 * 4 / world));
  }
}

TEST_CASE("DataParallel refuses a NaN gradient on every rank", "[dp][gloo]") {
  const auto errors = diloco_test::run_ranks_collect(2, [](int rank, std::shared_ptr<diloco::Group> g) {
    torch::nn::Linear net(5, 3);
    diloco::DataParallel dp(*net, g);
    net->forward(at::ones({2, 5})).sum().backward();
    if (rank == 0) net->bias.mutable_grad()[1] = std::nan("");
    dp.sync_gradients();
  });
  for (const auto& e : errors) {
    INFO(e);
    CHECK_THAT(e, Contains("NaN or infinite") && Contains("'bias'"));
  }
}
