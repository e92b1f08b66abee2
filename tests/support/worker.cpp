// A real training process for multi-process tests: DiLoCo on a small linear model, configured
// by environment variables on top of torchrun's (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE):
//   WORKER_STEPS       inner steps to run (default 40)
//   WORKER_H           inner steps per outer step (default 2)
//   WORKER_DIE_RANK    this rank exits abruptly (exit code 3) ...
//   WORKER_DIE_STEP    ... before this inner step
// Exit codes: 0 done, 3 died on purpose, 42 PeerLostError, 1 any other error.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "diloco/diloco.h"

namespace {
int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : fallback;
}
}  // namespace

int main() {
  at::set_num_threads(1);
  try {
    auto group = diloco::Group::from_env();
    const int rank = group->rank();
    const int steps = env_int("WORKER_STEPS", 40);
    const int die_rank = env_int("WORKER_DIE_RANK", -1);
    const int die_step = env_int("WORKER_DIE_STEP", -1);
    torch::nn::Linear net(64, 64);
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.01));
    diloco::DiLoCoOptions o;
    o.inner_steps = env_int("WORKER_H", 2);
    diloco::DiLoCo sync(*net, opt, group, o);
    for (int s = 1; s <= steps; ++s) {
      if (rank == die_rank && s == die_step) {
        std::fprintf(stderr, "worker rank %d: exiting abruptly at step %d\n", rank, s);
        std::_Exit(3);
      }
      at::Tensor x = at::randn({8, 64});
      opt.zero_grad();
      net->forward(x).pow(2).mean().backward();
      opt.step();
      sync.step();
    }
    std::printf("worker rank %d: done, %lld outer steps\n", rank,
                static_cast<long long>(sync.stats().outer_steps));
    return 0;
  } catch (const diloco::PeerLostError& e) {
    std::fprintf(stderr, "PeerLostError: %s\n", e.what());
    return 42;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
