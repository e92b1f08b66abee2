// Benchmark: what a run key costs an outer sync (diloco/comm/auth.h).
//
// N ranks (threads of this process, real Gloo over loopback) sum --params float32 values
// (default 470,784: the example language model) with Group::allreduce_sum, and all-gather a
// payload of a tenth of that size (a gathered codec's), in alternating rounds without and with a
// run key, on an emulated link of --mbps Mbit/s (LinkModel; 0 = unlimited, the raw cost).
//
// Usage:
//   build/benchmarks/auth_bench --ranks 4 --mbps 100 --out results/auth
// Writes OUT.json and OUT.md. Not a test: it asserts nothing.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <thread>

#include "diloco/diloco.h"

namespace {

using Clock = std::chrono::steady_clock;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Times {
  std::vector<double> allreduce, allgather;
};

// One round of each operation on `ranks` threads; rank 0's times are recorded.
Times run(int ranks, bool keyed, double mbps, std::int64_t params, int rounds) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  const auto timeout = std::chrono::milliseconds(60000);
  Times times;
  std::vector<std::thread> threads;
  std::vector<std::string> errors(static_cast<std::size_t>(ranks));
  for (int r = 0; r < ranks; ++r) {
    threads.emplace_back([&, r] {
      try {
        at::set_num_threads(1);
        auto backend = diloco::make_gloo_backend(store, r, ranks, timeout);
        if (keyed) {
          backend = diloco::make_authenticated_backend(
              std::move(backend), store, diloco::RunKey("auth_bench key of 32 bytes......"),
              timeout);
        }
        diloco::Group group(std::move(backend), timeout);
        diloco::LinkModel link;
        link.mbit_per_s = mbps;
        group.set_link(link);
        at::Tensor x = at::randn({params});
        at::Tensor g = at::randn({params / 10});
        for (int round = -1; round < rounds; ++round) {  // round -1 warms up
          group.barrier("round");
          auto t0 = Clock::now();
          group.allreduce_sum(x, "outer_sync");
          const double ar = std::chrono::duration<double>(Clock::now() - t0).count();
          group.barrier("round");
          t0 = Clock::now();
          group.allgather(g, "gathered");
          const double ag = std::chrono::duration<double>(Clock::now() - t0).count();
          if (r == 0 && round >= 0) {
            times.allreduce.push_back(ar);
            times.allgather.push_back(ag);
          }
        }
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& e : errors) {
    if (!e.empty()) throw std::runtime_error(e);
  }
  return times;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Outer-sync time with and without a run key"};
  int ranks = 4, rounds = 7, blocks = 3;
  double mbps = 100.0;
  std::int64_t params = 470'784;
  std::string out = "results/auth";
  app.add_option("--ranks", ranks, "ranks (threads)")->check(CLI::Range(2, 16));
  app.add_option("--mbps", mbps, "emulated link, Mbit/s (0 = unlimited)")->check(CLI::Range(0.0, 1e6));
  app.add_option("--params", params, "float32 values summed")->check(CLI::Range(std::int64_t{100}, std::int64_t{1} << 32));
  app.add_option("--rounds", rounds, "timed rounds per block")->check(CLI::Range(1, 1000));
  app.add_option("--blocks", blocks, "alternating blocks without / with the key")->check(CLI::Range(1, 100));
  app.add_option("--out", out, "output path prefix (.json, .md)");
  CLI11_PARSE(app, argc, argv);

  Times plain, keyed;
  for (int b = 0; b < blocks; ++b) {
    for (bool with_key : {false, true}) {
      const Times t = run(ranks, with_key, mbps, params, rounds);
      Times& into = with_key ? keyed : plain;
      into.allreduce.insert(into.allreduce.end(), t.allreduce.begin(), t.allreduce.end());
      into.allgather.insert(into.allgather.end(), t.allgather.begin(), t.allgather.end());
    }
  }
  const double ar0 = median(plain.allreduce), ar1 = median(keyed.allreduce);
  const double ag0 = median(plain.allgather), ag1 = median(keyed.allgather);
  char md[1024];
  std::snprintf(md, sizeof md,
                "%d ranks, %lld float32 values, link %s; medians of %zu rounds, rank 0.\n\n"
                "| operation | no key (s) | run key (s) | overhead |\n|---|---|---|---|\n"
                "| allreduce %lld floats | %.4f | %.4f | %+.1f%% |\n"
                "| allgather %lld floats | %.4f | %.4f | %+.1f%% |\n",
                ranks, static_cast<long long>(params),
                mbps > 0 ? (std::to_string(mbps) + " Mbit/s (emulated)").c_str() : "unlimited",
                plain.allreduce.size(), static_cast<long long>(params), ar0, ar1,
                100.0 * (ar1 - ar0) / ar0, static_cast<long long>(params / 10), ag0, ag1,
                100.0 * (ag1 - ag0) / ag0);
  std::printf("%s", md);
  std::ofstream(out + ".md") << md;
  nlohmann::json doc = {{"ranks", ranks},          {"params", params},
                        {"mbps", mbps},            {"allreduce_plain_s", plain.allreduce},
                        {"allreduce_keyed_s", keyed.allreduce},
                        {"allgather_plain_s", plain.allgather},
                        {"allgather_keyed_s", keyed.allgather}};
  std::ofstream(out + ".json") << doc.dump(2) << '\n';
  return 0;
}
