// minimal: the whole libdiloco API on a toy problem, the first file to read.
//
// Every island fits the same linear model y = x . w to its own random samples of one target
// relation, taking plain inner SGD steps; every 10 steps DiLoCo averages what the islands learnt
// and takes an outer Nesterov step. It is not a benchmark and shows no real model: see
// examples/train_lm for that.
//
// Usage:
//   build/libdiloco/diloco-run -n 4 -- build/examples/minimal
//   # or by hand, one process per island (the torchrun variables):
//   MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 RANK=0 WORLD_SIZE=1 build/examples/minimal
#include <diloco/diloco.h>
#include <torch/torch.h>

#include <cstdio>
#include <cstring>
#include <exception>

int main(int argc, char** argv) try {
  if (argc > 1) {
    const bool help = std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0;
    std::fprintf(help ? stdout : stderr,
                 "%sUsage: build/libdiloco/diloco-run -n 4 -- %s\n"
                 "Trains a toy linear model on every island with DiLoCo (H=10, 200 steps). It "
                 "takes no arguments:\nthe islands come from MASTER_ADDR, MASTER_PORT, RANK and "
                 "WORLD_SIZE, as diloco-run and torchrun set them.\n",
                 help ? "" : "minimal: takes no arguments\n", argv[0]);
    return help ? 0 : 2;
  }
  constexpr int kFeatures = 8;
  constexpr int kSteps = 200;

  // Rendezvous with the other islands (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE).
  auto group = diloco::Group::from_env();

  // The same seed everywhere starts every island from the same weights (DiLoCo would also
  // broadcast rank 0's); the data below gets a seed per rank, so each island sees its own.
  torch::manual_seed(0);
  torch::nn::Linear model(kFeatures, 1);
  torch::optim::SGD inner(model->parameters(), torch::optim::SGDOptions(0.05));

  // After the optimizer: DiLoCo moves the parameters into one flat buffer, which the optimizer,
  // holding the same parameter objects, keeps updating.
  diloco::DiLoCoOptions options;
  options.inner_steps = 10;  // H
  diloco::DiLoCo sync(*model, inner, group, options);

  const auto w_true = torch::linspace(-1.0, 1.0, kFeatures).unsqueeze(1);
  auto data = at::detail::createCPUGenerator(1000 + group->rank());
  for (int step = 1; step <= kSteps; ++step) {
    const auto x = torch::randn({32, kFeatures}, data);
    const auto y = x.matmul(w_true) + 0.1 * torch::randn({32, 1}, data);
    const auto loss = torch::mse_loss(model->forward(x), y);
    inner.zero_grad();
    loss.backward();
    inner.step();
    if (sync.step() && group->rank() == 0) {  // true when an outer step ran
      std::printf("step %3d  outer step %2lld  loss %.4f\n", step,
                  static_cast<long long>(sync.stats().outer_steps), loss.item<double>());
    }
  }

  // After the last outer step every island holds the global weights, close to w_true.
  const double error = (model->weight.detach() - w_true.t()).norm().item<double>();
  const auto stats = sync.stats();
  std::printf(
      "rank %d: |w - w_true| %.4f, %lld inner and %lld outer steps, %.3f s syncing, "
      "sent %llu B, received %llu B\n",
      group->rank(), error, static_cast<long long>(stats.inner_steps),
      static_cast<long long>(stats.outer_steps), stats.sync_seconds,
      static_cast<unsigned long long>(stats.bytes_sent),
      static_cast<unsigned long long>(stats.bytes_received));
  if (group->rank() == 0) std::printf("%s", group->stats().to_string().c_str());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "minimal: %s\n", e.what());
  return 1;
}
