// A real training process for multi-process tests: DiLoCo on a small linear model, configured
// by environment variables on top of torchrun's (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE):
//   WORKER_STEPS       inner steps to run (default 40)
//   WORKER_H           inner steps per outer step (default 2)
//   WORKER_DIE_RANK    this rank exits abruptly (exit code 3) ...
//   WORKER_DIE_STEP    ... before this inner step
//   WORKER_MODE        diloco (default) or dp (DataParallel)
//   WORKER_COMPRESS    compression spec (default none)
//   WORKER_OUTER_LR    outer learning rate (default 0.7)
//   WORKER_NESTEROV    1 (default) or 0
//   WORKER_BUFFERS     average (default), rank0 or local
//   WORKER_AGREE_STEPS when set, the run's steps are a field every island must agree on
//   WORKER_FRAGMENTS, WORKER_OVERLAP, WORKER_MIXING   streaming P, tau, alpha (default 1, 0, 0)
// Exit codes: 0 done, 3 died on purpose, 42 PeerLostError, 2 OptionError, 1 any other error.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "diloco/diloco.h"

namespace {
int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : fallback;
}
std::string env_str(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v ? v : fallback;
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
    std::vector<std::pair<std::string, std::string>> agree_on;
    if (std::getenv("WORKER_AGREE_STEPS")) agree_on.emplace_back("worker steps", std::to_string(steps));
    std::unique_ptr<diloco::DiLoCo> sync;
    std::unique_ptr<diloco::DataParallel> dp;
    if (env_str("WORKER_MODE", "diloco") == "dp") {
      diloco::DataParallelOptions o;
      o.buffers = diloco::parse_buffer_sync(env_str("WORKER_BUFFERS", "average"));
      o.agree_on = agree_on;
      dp = std::make_unique<diloco::DataParallel>(*net, group, o);
    } else {
      diloco::DiLoCoOptions o;
      o.inner_steps = env_int("WORKER_H", 2);
      o.compression = env_str("WORKER_COMPRESS", "none");
      o.outer.lr = std::atof(env_str("WORKER_OUTER_LR", "0.7").c_str());
      o.outer.nesterov = env_int("WORKER_NESTEROV", 1) != 0;
      o.buffers = diloco::parse_buffer_sync(env_str("WORKER_BUFFERS", "average"));
      o.agree_on = agree_on;
      o.fragments = env_int("WORKER_FRAGMENTS", 1);
      o.overlap_steps = env_int("WORKER_OVERLAP", 0);
      o.mixing = std::atof(env_str("WORKER_MIXING", "0").c_str());
      sync = std::make_unique<diloco::DiLoCo>(*net, opt, group, o);
    }
    std::int64_t outer_steps = 0;
    for (int s = 1; s <= steps; ++s) {
      if (rank == die_rank && s == die_step) {
        std::fprintf(stderr, "worker rank %d: exiting abruptly at step %d\n", rank, s);
        std::_Exit(3);
      }
      at::Tensor x = at::randn({8, 64});
      opt.zero_grad();
      net->forward(x).pow(2).mean().backward();
      if (dp) dp->sync_gradients();
      opt.step();
      if (sync) sync->step();
      outer_steps = sync ? sync->stats().outer_steps : dp->stats().outer_steps;
    }
    std::printf("worker rank %d: done, %lld outer steps\n", rank,
                static_cast<long long>(outer_steps));
    return 0;
  } catch (const diloco::PeerLostError& e) {
    std::fprintf(stderr, "PeerLostError: %s\n", e.what());
    return 42;
  } catch (const diloco::OptionError& e) {
    std::fprintf(stderr, "OptionError: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
