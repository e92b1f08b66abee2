// Benchmark: the cost DiLoCo adds around communication, measured side by side in one run.
//
//   1. Outer sync of a model of --params float32 values (default 10M, in 10 tensors) through
//      DiLoCo::sync(), against a bare c10d ProcessGroupGloo::allreduce of the same number of
//      float32 values on the same ranks. Rounds alternate so drift hits both alike.
//   2. Inner-step overhead: a plain LibTorch training loop (forward, backward, AdamW) against the
//      same loop with DiLoCo::step() after each optimizer step (H larger than the loop, so the
//      measured steps hold no sync). Alternating blocks of steps, on rank 0 after a barrier.
//   3. Memory held by DiLoCo beyond the model: global weights + outer momentum, in parameters.
//   4. What the trust checks cost (the state comparison after the outer step, which rides on
//      the next sync's screening all-gather, and the screening of
//      norms before it): DiLoCo::sync() with both on (the default) against DiLoCo over the same
//      ranks with compare_states off, and with screen_factor 0 too, in an order that rotates
//      from round to round; and the state hash alone, as a one-rank outer step with and without
//      the comparison, interleaved (what the island itself spends on it).
//
// Usage (4 local ranks):
//   build/libdiloco/diloco-run -n 4 -- build/benchmarks/outer_sync_bench --out results/outer_sync
// Writes OUT.json, OUT.csv and OUT.md (rank 0). Not a test: it asserts nothing.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <thread>
#include <cstdio>
#include <fstream>
#include <numeric>

#include "diloco/diloco.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Mlp : torch::nn::Module {
  explicit Mlp(int width) {
    a = register_module("a", torch::nn::Linear(width, width));
    b = register_module("b", torch::nn::Linear(width, width));
  }
  torch::Tensor forward(torch::Tensor x) { return b->forward(torch::relu(a->forward(x))); }
  torch::nn::Linear a{nullptr}, b{nullptr};
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Outer-sync and inner-step overhead of DiLoCo against bare LibTorch/Gloo"};
  std::int64_t params = 10'000'000;
  int rounds = 7, inner_steps = 400, width = 256, block = 50;
  std::int64_t segment = 1 << 20;
  std::string out = "results/outer_sync";
  app.add_option("--params", params, "float32 parameters in the synced model")->check(CLI::Range(std::int64_t{1000}, std::int64_t{2'000'000'000}));
  app.add_option("--rounds", rounds, "timed rounds of each sync")->check(CLI::Range(1, 1000));
  app.add_option("--inner-steps", inner_steps, "timed inner steps per variant")->check(CLI::Range(10, 1'000'000));
  app.add_option("--width", width, "width of the MLP for the inner-step test")->check(CLI::Range(8, 8192));
  app.add_option("--segment", segment, "elements per all-reduce in the segmented baseline")->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 40));
  app.add_option("--out", out, "output path prefix (.json, .csv, .md)");
  CLI11_PARSE(app, argc, argv);
  at::set_num_threads(1);

  auto options = diloco::GroupOptions::from_env();
  auto group = diloco::Group::create(options);
  const int rank = group->rank(), world = group->world_size();

  // A second, bare Gloo group on a separate store for the baseline.
  c10d::TCPStoreOptions so;
  so.port = static_cast<std::uint16_t>(options.master_port + 1);
  so.isServer = rank == 0;
  so.numWorkers = world;
  so.timeout = options.timeout;
  auto store = c10::make_intrusive<c10d::TCPStore>(options.master_addr, so);
  auto gopts = c10d::ProcessGroupGloo::Options::create(options.timeout);
  gopts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  auto bare = c10::make_intrusive<c10d::ProcessGroupGloo>(
      c10::make_intrusive<c10d::PrefixStore>("bare", store), rank, world, gopts);

  // 1. outer sync vs bare all-reduce
  const int tensors = 10;
  std::vector<diloco::NamedParameter> model;
  for (int i = 0; i < tensors; ++i) {
    const std::int64_t n = params / tensors + (i < params % tensors ? 1 : 0);
    model.push_back({"w" + std::to_string(i), at::randn({n}).set_requires_grad(true)});
  }
  diloco::DiLoCoOptions dopts;
  dopts.inner_steps = 1'000'000;
  diloco::DiLoCo sync(diloco::ModelTensors{model, {}, {}}, group, dopts);
  const auto copy_of = [](const std::vector<diloco::NamedParameter>& m) {
    std::vector<diloco::NamedParameter> out;
    for (const auto& p : m) out.push_back({p.name, p.tensor.detach().clone().set_requires_grad(true)});
    return out;
  };
  auto model2 = copy_of(model), model3 = copy_of(model);
  diloco::DiLoCoOptions no_compare_opts = dopts;
  no_compare_opts.compare_states = false;
  diloco::DiLoCo no_compare(diloco::ModelTensors{model2, {}, {}}, group, no_compare_opts);
  diloco::DiLoCoOptions unchecked_opts = no_compare_opts;
  unchecked_opts.screen_factor = 0.0;
  diloco::DiLoCo unchecked(diloco::ModelTensors{model3, {}, {}}, group, unchecked_opts);
  at::Tensor buffer = at::randn({params});
  std::vector<double> bare_s, bare_seg_s, sync_s, no_compare_s, unchecked_s;
  for (int r = 0; r < rounds + 1; ++r) {  // round 0 warms up both
    group->barrier("bench");
    auto t = Clock::now();
    std::vector<at::Tensor> v{buffer};
    bare->allreduce(v)->wait();
    const double b = seconds_since(t);
    group->barrier("bench");
    t = Clock::now();
    {
      std::vector<c10::intrusive_ptr<c10d::Work>> works;
      for (std::int64_t off = 0; off < params; off += segment) {
        std::vector<at::Tensor> piece{buffer.narrow(0, off, std::min(segment, params - off))};
        works.push_back(bare->allreduce(piece));
      }
      for (auto& w : works) w->wait();
    }
    const double bs = seconds_since(t);
    const auto timed_sync = [&](std::vector<diloco::NamedParameter>& m, diloco::DiLoCo& d) {
      {
        at::NoGradGuard g;
        for (auto& p : m) p.tensor.add_(0.001);  // some local progress to sync
      }
      group->barrier("bench");
      const auto start = Clock::now();
      d.sync();
      return seconds_since(start);
    };
    // The three variants in an order that rotates from round to round, so that none always
    // runs first after the bare all-reduces (or right after another's state comparison).
    double s = 0, nc = 0, u = 0;
    for (int k = 0; k < 3; ++k) {
      switch ((r + k) % 3) {
        case 0: s = timed_sync(model, sync); break;
        case 1: nc = timed_sync(model2, no_compare); break;
        default: u = timed_sync(model3, unchecked); break;
      }
    }
    if (r > 0) {
      bare_s.push_back(b);
      bare_seg_s.push_back(bs);
      sync_s.push_back(s);
      no_compare_s.push_back(nc);
      unchecked_s.push_back(u);
    }
  }

  // 2. inner-step overhead (rank 0 trains alone; the others wait at the barrier)
  double plain_s = 0, wrapped_s = 0, step_call_s = 0, compute_only_s = 0, compute_no_compare_s = 0;
  const int step_calls = 1'000'000;
  group->barrier("bench");
  if (rank == 0) {
    auto solo = std::make_shared<diloco::Group>(c10::make_intrusive<c10d::PrefixStore>("solo", store), 0, 1);
    torch::manual_seed(0);
    Mlp net(width);
    torch::optim::AdamW opt(net.parameters(), torch::optim::AdamWOptions(1e-3));
    diloco::DiLoCoOptions o;
    o.inner_steps = 1'000'000'000;
    diloco::DiLoCo wrapper(net, opt, solo, o);
    at::Tensor x = at::randn({32, width});
    auto train_step = [&] {
      opt.zero_grad();
      net.forward(x).pow(2).mean().backward();
      opt.step();
    };
    for (int i = 0; i < 20; ++i) train_step();
    // Alternate which variant runs first in each block, so drift and cache effects cancel.
    for (int done = 0, b = 0; done < inner_steps; done += block, ++b) {
      for (int variant = 0; variant < 2; ++variant) {
        const bool wrapped = (variant == 0) == (b % 2 == 1);
        auto t = Clock::now();
        for (int i = 0; i < block; ++i) {
          train_step();
          if (wrapped) wrapper.step();
        }
        (wrapped ? wrapped_s : plain_s) += seconds_since(t);
      }
    }
    // The wrapper's own cost, free of the loop's noise: step() calls between syncs.
    auto t = Clock::now();
    for (int i = 0; i < step_calls; ++i) wrapper.step();
    step_call_s = seconds_since(t) / step_calls;

    // The outer step's own compute (pseudo-gradient, check, Nesterov update, write-back) with
    // nothing to send: a one-rank group over the same parameter count.
    std::vector<diloco::NamedParameter> solo_model;
    for (int i = 0; i < tensors; ++i) {
      solo_model.push_back({"w" + std::to_string(i), at::randn({params / tensors}).set_requires_grad(true)});
    }
    diloco::DiLoCo solo_sync(diloco::ModelTensors{solo_model, {}, {}}, solo, dopts);
    // The same without the state comparison, interleaved: the difference is what hashing the
    // state costs on the outer step's critical path (the one-rank all-gather is a copy).
    auto solo_model2 = copy_of(solo_model);
    auto solo_no_compare_group =
        std::make_shared<diloco::Group>(c10::make_intrusive<c10d::PrefixStore>("solo2", store), 0, 1);
    diloco::DiLoCo solo_no_compare(diloco::ModelTensors{solo_model2, {}, {}}, solo_no_compare_group,
                                   no_compare_opts);
    std::vector<double> c, c_no_compare;
    for (int r = 0; r < rounds + 1; ++r) {
      auto t0 = Clock::now();
      solo_sync.sync();
      if (r > 0) c.push_back(seconds_since(t0));
      t0 = Clock::now();
      solo_no_compare.sync();
      if (r > 0) c_no_compare.push_back(seconds_since(t0));
    }
    compute_only_s = median(c);
    compute_no_compare_s = median(c_no_compare);
  }
  group->barrier("bench_done");

  if (rank == 0) {
    const double bare_med = median(bare_s), sync_med = median(sync_s);
    const double overhead_pct = 100.0 * (wrapped_s - plain_s) / plain_s;
    const double inner_step_s = plain_s / inner_steps;
    const double call_pct = 100.0 * step_call_s / inner_step_s;
    std::int64_t global_numel = 0;
    for (const auto& g : sync.global_weights()) global_numel += g.numel();
    const double state_ratio = 2.0 * static_cast<double>(global_numel) / static_cast<double>(params);
    const double compare_pct = 100.0 * (sync_med - median(no_compare_s)) / sync_med;
    // The same, paired: the median over rounds of each round's difference.
    std::vector<double> paired;
    for (std::size_t r = 0; r < sync_s.size(); ++r) paired.push_back(sync_s[r] - no_compare_s[r]);
    const double compare_paired_pct = 100.0 * median(paired) / sync_med;
    const double screen_pct = 100.0 * (median(no_compare_s) - median(unchecked_s)) / sync_med;
    const double hash_pct = 100.0 * (compute_only_s - compute_no_compare_s) / sync_med;
    nlohmann::json j = {
        {"world_size", world},
        {"params", params},
        {"rounds", rounds},
        {"bare_allreduce_s", bare_s},
        {"diloco_sync_s", sync_s},
        {"bare_segmented_allreduce_s", bare_seg_s},
        {"bare_segmented_allreduce_median_s", median(bare_seg_s)},
        {"bare_allreduce_median_s", bare_med},
        {"diloco_sync_median_s", sync_med},
        {"sync_ratio", sync_med / bare_med},
        {"sync_ratio_target", 1.15},
        {"outer_step_compute_only_median_s", compute_only_s},
        {"outer_step_compute_without_state_comparison_median_s", compute_no_compare_s},
        {"state_hash_pct_of_sync", hash_pct},
        {"inner_steps_timed", inner_steps},
        {"plain_loop_s", plain_s},
        {"wrapped_loop_s", wrapped_s},
        {"inner_step_overhead_pct", overhead_pct},
        {"inner_step_s", inner_step_s},
        {"step_call_s", step_call_s},
        {"step_call_overhead_pct", call_pct},
        {"inner_step_overhead_target_pct", 1.0},
        {"outer_state_params_ratio", state_ratio},
        {"sync_without_state_comparison_s", no_compare_s},
        {"sync_without_state_comparison_median_s", median(no_compare_s)},
        {"sync_without_comparison_and_screening_s", unchecked_s},
        {"sync_without_comparison_and_screening_median_s", median(unchecked_s)},
        {"state_comparison_pct_of_sync", compare_pct},
        {"state_comparison_paired_pct_of_sync", compare_paired_pct},
        {"cores", std::thread::hardware_concurrency()},
        {"state_comparison_pct_target", 1.0},
        {"screening_pct_of_sync", screen_pct},
    };
    std::ofstream(out + ".json") << j.dump(2) << "\n";
    std::ofstream csv(out + ".csv");
    csv << "round,bare_allreduce_s,diloco_sync_s\n";
    for (std::size_t i = 0; i < bare_s.size(); ++i) csv << i << "," << bare_s[i] << "," << sync_s[i] << "\n";
    std::ofstream md(out + ".md");
    char line[2048];
    md << "| measure | value | target |\n|---|---|---|\n";
    std::snprintf(line, sizeof line,
                  "| bare Gloo all-reduce, %lld float32, %d ranks (median of %d) | %.1f ms | |\n"
                  "| bare Gloo all-reduce in segments of %lld (median) | %.1f ms | |\n"
                  "| DiLoCo outer sync, same size (median) | %.1f ms | |\n"
                  "| ratio sync / bare all-reduce | %.3fx | <= 1.15x |\n"
                  "| outer step compute alone (one rank, nothing sent, median) | %.1f ms | |\n"
                  "| inner step overhead of DiLoCo::step(), loops timed side by side | %.3f %% | < 1 %% |\n"
                  "| DiLoCo::step() between syncs: %.1f ns per call / %.2f ms per inner step | %.5f %% | < 1 %% |\n"
                  "| DiLoCo state beyond the model (global + momentum) | %.2fx parameters | 2x |\n"
                  "| DiLoCo outer sync without the state comparison / without it and the screening (median) | %.1f / %.1f ms | |\n"
                  "| state comparison (hash; it rides on the next screening all-gather), share of the sync end to end, %d ranks on %u cores: difference of the medians / median of the paired differences | %.2f %% / %.2f %% | <= 1 %% |\n"
                  "| screening (norms all-gathered before the exchange), share of the sync | %.2f %% | |\n"
                  "| state hash on the critical path: one-rank outer step with / without the comparison (median) | %.3f / %.3f ms = %.2f %% of the sync | <= 1 %% |\n",
                  static_cast<long long>(params), world, rounds, bare_med * 1e3,
                  static_cast<long long>(segment), median(bare_seg_s) * 1e3, sync_med * 1e3,
                  sync_med / bare_med, compute_only_s * 1e3, overhead_pct, step_call_s * 1e9, inner_step_s * 1e3, call_pct,
                  state_ratio, median(no_compare_s) * 1e3, median(unchecked_s) * 1e3, world,
                  std::thread::hardware_concurrency(), compare_pct, compare_paired_pct, screen_pct, compute_only_s * 1e3, compute_no_compare_s * 1e3, hash_pct);
    md << line;
    std::printf("%s", line);
    std::printf("wrote %s.json, %s.csv, %s.md\n", out.c_str(), out.c_str(), out.c_str());
  }
  return 0;
}
