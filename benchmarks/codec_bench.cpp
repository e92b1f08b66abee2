// Benchmark: encode+decode throughput of every codec on one core, next to a memcpy of the same
// buffer in the same run, and each codec's exact bytes per parameter and compression ratio.
//
// Usage:
//   build/benchmarks/codec_bench --out results/codecs        # writes .json, .csv, .md
//   /usr/bin/python3 benchmarks/plot_codecs.py results/codecs.json results/codecs.png
// Throughput is GB/s of float32 input: bytes of x / (encode + decode time), best of --repeats.
// Not a test: it asserts nothing.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <vector>

#include "diloco/comm/auth.h"
#include "diloco/compress/registry.h"

namespace {

using Clock = std::chrono::steady_clock;

template <typename Fn>
double best_seconds(int repeats, Fn&& fn) {
  double best = 1e30;
  for (int i = 0; i < repeats; ++i) {
    const auto t = Clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Encode+decode throughput and bytes per parameter of every codec"};
  std::int64_t rows = 2048, cols = 4096;
  int repeats = 5;
  std::string out = "results/codecs";
  std::vector<std::string> specs = {"fp32", "fp16", "int8", "int8(rounding=stochastic)", "int4",
                                    "int3", "int2", "int8_normal", "fp4", "topk",
                                    "topk(values=2bit)", "dct", "randomk", "sign"};
  app.add_option("--rows", rows, "rows of the test matrix")->check(CLI::Range(1, 1 << 20));
  app.add_option("--cols", cols, "columns of the test matrix")->check(CLI::Range(1, 1 << 20));
  app.add_option("--repeats", repeats, "timed repeats (best is kept)")->check(CLI::Range(1, 1000));
  app.add_option("--codec", specs, "codec specs to measure (repeatable)");
  app.add_option("--out", out, "output path prefix (.json, .csv, .md)");
  CLI11_PARSE(app, argc, argv);
  at::set_num_threads(1);

  at::manual_seed(0);
  at::Tensor x = at::randn({rows, cols});
  at::Tensor copy = at::empty_like(x);
  const double in_bytes = static_cast<double>(x.nbytes());
  const double memcpy_s = best_seconds(repeats, [&] {
    std::memcpy(copy.data_ptr<float>(), x.data_ptr<float>(), x.nbytes());
  });
  const double memcpy_gbs = in_bytes / memcpy_s / 1e9;
  // The MAC every payload carries when a run key is set (diloco/comm/auth.h), over the same bytes.
  const diloco::RunKey run_key("codec_bench run key, 32 bytes..");
  diloco::MacTag tag{};
  const double hmac_s = best_seconds(repeats, [&] {
    tag = run_key.mac({{x.data_ptr<float>(), static_cast<std::size_t>(x.nbytes())}});
  });
  const double hmac_gbs = in_bytes / hmac_s / 1e9;

  nlohmann::json results = nlohmann::json::array();
  std::ofstream md(out + ".md");
  std::ofstream csv(out + ".csv");
  md << "Matrix " << rows << "x" << cols << " float32, one thread; memcpy " << memcpy_gbs
     << " GB/s; HMAC-SHA256 (the run key's payload MAC) " << hmac_gbs << " GB/s ("
     << 100.0 * hmac_gbs / memcpy_gbs << "% of memcpy).\n\n| codec | aggregation | bytes/param | ratio vs fp32 | encode+decode GB/s | % of memcpy | max error / bound |\n|---|---|---|---|---|---|---|\n";
  csv << "codec,aggregation,bytes_per_param,ratio,gbs,pct_memcpy,max_error,bound\n";
  std::printf("memcpy: %.2f GB/s\nhmac-sha256: %.2f GB/s (%.0f%% of memcpy; tag %02x..)\n",
              memcpy_gbs, hmac_gbs, 100.0 * hmac_gbs / memcpy_gbs, tag[0]);
  for (const auto& spec : specs) {
    auto codec = diloco::make_codec(spec);
    const std::int64_t bytes = codec->payload_bytes(x.sizes());
    std::vector<std::uint8_t> payload(static_cast<std::size_t>(bytes));
    at::Tensor y = at::empty_like(x);
    const double enc_dec_s = best_seconds(repeats, [&] {
      codec->encode(x, payload.data());
      codec->decode(payload.data(), bytes, y);
    });
    const double gbs = in_bytes / enc_dec_s / 1e9;
    const double bpp = static_cast<double>(bytes) / static_cast<double>(x.numel());
    const double err = (y - x).abs().max().item<double>();
    const double bound = codec->error_bound(x);
    results.push_back({{"codec", codec->spec()},
                       {"aggregation", diloco::aggregation_name(codec->aggregation())},
                       {"payload_bytes", bytes},
                       {"bytes_per_param", bpp},
                       {"ratio_vs_fp32", 4.0 / bpp},
                       {"encode_decode_s", enc_dec_s},
                       {"gbs", gbs},
                       {"pct_memcpy", 100.0 * gbs / memcpy_gbs},
                       {"max_error", err},
                       {"error_bound", bound}});
    char line[512];
    std::snprintf(line, sizeof line, "| %s | %s | %.4f | %.1fx | %.2f | %.0f%% | %.3g / %.3g |\n",
                  codec->spec().c_str(), diloco::aggregation_name(codec->aggregation()), bpp,
                  4.0 / bpp, gbs, 100.0 * gbs / memcpy_gbs, err, bound);
    md << line;
    std::printf("%s", line);
    csv << '"' << codec->spec() << "\"," << diloco::aggregation_name(codec->aggregation()) << ','
        << bpp << ',' << 4.0 / bpp << ',' << gbs << ',' << 100.0 * gbs / memcpy_gbs << ',' << err
        << ',' << bound << '\n';
  }
  nlohmann::json doc = {{"rows", rows}, {"cols", cols}, {"memcpy_gbs", memcpy_gbs},
                        {"hmac_sha256_gbs", hmac_gbs}, {"codecs", results}};
  std::ofstream(out + ".json") << doc.dump(2) << '\n';
  std::printf("wrote %s.json, %s.csv, %s.md\n", out.c_str(), out.c_str(), out.c_str());
  return 0;
}
