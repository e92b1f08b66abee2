// Benchmark: how the cost of each aggregation kind grows with the number of islands N.
//
// Every rank holds the same layout of pseudo-gradient tensors (--params float32 values in
// 512-wide matrices plus one vector) and runs Exchange::sum() for each spec, --rounds times.
// Rank 0 reports, per spec: the bytes this rank sent per sync (from the group's accounting),
// the median sync time, and the aggregation kind. Run it with 2, 4, 8 ranks to see
//   summable / all-reduce   ~2(N-1)/N n per rank: flat in N;
//   ring-requantized        ~2(N-1)/N n per rank, plus N-1 re-quantizations per hop chain;
//   gathered                (N-1) n per rank: linear in N.
//
// Usage: build/libdiloco/diloco-run -n 4 -- build/benchmarks/scaling_bench --out results/scaling_4
// Writes OUT.json (rank 0). Not a test: it asserts nothing.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>

#include "diloco/diloco.h"

namespace {

using Clock = std::chrono::steady_clock;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Sync time and bytes per island of each aggregation kind, on N ranks"};
  std::int64_t params = 2'097'152;
  int rounds = 5;
  std::vector<std::string> specs = {"none", "fp16", "int8", "int4+ef", "topk(k=64,values=2bit)+ef",
                                    "dct+ef", "powersgd(rank=4)+ef"};
  std::string out = "results/scaling";
  app.add_option("--params", params, "float32 values in the synced tensors")
      ->check(CLI::Range(std::int64_t{4096}, std::int64_t{1} << 32));
  app.add_option("--rounds", rounds, "timed syncs per spec (the median is kept)")->check(CLI::Range(1, 1000));
  app.add_option("--compress", specs, "compressor specs to measure");
  app.add_option("--out", out, "output path prefix (.json)");
  CLI11_PARSE(app, argc, argv);
  at::set_num_threads(1);

  try {
    auto group = diloco::Group::from_env();
    const int rank = group->rank(), world = group->world_size();
    // Matrices of 512 columns, then the remainder as a vector.
    std::vector<std::vector<std::int64_t>> shapes;
    const std::int64_t rows = 512, cols = 512;
    std::int64_t left = params;
    while (left >= rows * cols) {
      shapes.push_back({rows, cols});
      left -= rows * cols;
    }
    if (left > 0) shapes.push_back({left});

    nlohmann::json results = nlohmann::json::array();
    for (const auto& spec : specs) {
      auto compressor = diloco::Exchange::from_spec(spec);
      std::vector<double> seconds;
      std::uint64_t sent = 0;
      for (int round = 0; round <= rounds; ++round) {
        auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 * rank + round);
        at::Tensor flat = at::randn({params}, gen);
        std::vector<at::Tensor> views;
        std::int64_t off = 0;
        for (const auto& s : shapes) {
          const auto n = c10::multiply_integers(s);
          views.push_back(flat.narrow(0, off, n).view(s));
          off += n;
        }
        group->barrier("scaling");
        const auto before = group->stats().bytes_sent();
        const auto start = Clock::now();
        compressor->sum(*group, flat, views, "scaling");
        const double s = std::chrono::duration<double>(Clock::now() - start).count();
        if (round > 0) {  // the first round warms up connections and buffers
          seconds.push_back(s);
          sent = group->stats().bytes_sent() - before;
        }
      }
      const std::string kind = compressor->codec()
                                   ? diloco::aggregation_name(compressor->codec()->aggregation())
                                   : "two all-reduces";
      results.push_back({{"spec", spec},
                         {"aggregation", kind},
                         {"islands", world},
                         {"params", params},
                         {"payload_bytes", compressor->payload_bytes(
                                               [&] {
                                                 std::vector<at::Tensor> v;
                                                 for (const auto& s : shapes) v.push_back(at::empty(s));
                                                 return v;
                                               }())},
                         {"bytes_sent_per_sync", sent},
                         {"sync_s", median(seconds)}});
      if (rank == 0) {
        std::printf("N=%d %-28s %-16s sent %10llu bytes/sync  %8.2f ms\n", world, spec.c_str(),
                    kind.c_str(), static_cast<unsigned long long>(sent), 1e3 * median(seconds));
        std::fflush(stdout);
      }
    }
    if (rank == 0) {
      std::ofstream(out + ".json") << results.dump(2) << '\n';
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "scaling_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
