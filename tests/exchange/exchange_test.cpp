// Exchanges of compressed pseudo-gradients over real Gloo ranks: every aggregation kind on 1-4 ranks is within bound
// of the uncompressed sum and bit-identical everywhere; error feedback keeps its identity; user
// codecs register by name; a malformed payload is reported naming the rank that sent it; DiLoCo
// accepts a compression spec.
#include <ATen/ATen.h>
#include <torch/torch.h>

#include <cstring>
#include <functional>
#include <limits>

#include "diloco/compress/registry.h"
#include "diloco/diloco.h"
#include "diloco/exchange/exchange.h"
#include "support/catch.h"
#include "support/codec_helpers.h"
#include "support/ranks.h"

using Catch::Matchers::Contains;
using Catch::Matchers::StartsWith;

TEST_CASE("compressed sums are within bound and bit-identical on every rank", "[compress][gloo]") {
  const std::string spec = GENERATE("fp32", "fp16", "int8", "int4", "int3", "fp4", "int8_normal",
                                    "topk(k=32)", "dct", "sign", "randomk(fraction=0.5)", "int2+ef");
  const int world = GENERATE(1, 2, 3, 4);
  INFO("compression " << spec << " on " << world << " ranks");
  const std::vector<std::vector<std::int64_t>> shapes = {{64, 80}, {130}, {9000}};
  std::vector<at::Tensor> results(world), inputs(world);
  std::vector<double> bounds(world);
  diloco_test::run_ranks(world, [&](int rank, std::shared_ptr<diloco::Group> g) {
    auto compressor = diloco::Exchange::from_spec(spec);
    std::int64_t n = 0;
    for (const auto& s : shapes) n += c10::multiply_integers(s);
    auto gen = at::make_generator<at::CPUGeneratorImpl>(rank + 1);
    at::Tensor flat = at::randn({n}, gen);
    inputs[rank] = flat.clone();
    std::vector<at::Tensor> views;
    std::int64_t off = 0;
    double bound = 0;
    for (const auto& s : shapes) {
      const auto numel = c10::multiply_integers(s);
      views.push_back(flat.narrow(0, off, numel).view(s));
      bound = std::max(bound, compressor->codec()->error_bound(views.back()));
      off += numel;
    }
    bounds[rank] = bound;
    compressor->sum(*g, flat, views, "test");
    results[rank] = flat.clone();
  });
  at::Tensor exact = at::zeros_like(inputs[0]);
  double bound = 0;
  for (int r = 0; r < world; ++r) {
    exact += inputs[r];
    bound += bounds[r];
  }
  // Ring re-quantization adds one more rounding per hop, of partial sums up to `world` times
  // larger; the bound below covers it with room.
  const double allowed = bound * world * 2 + 1e-5;
  const double err = (results[0] - exact).abs().max().item<double>();
  INFO("max |sum - exact| " << err << " allowed " << allowed);
  CHECK(err <= allowed);
  for (int r = 1; r < world; ++r) CHECK(at::equal(results[r], results[0]));
}

TEST_CASE("error feedback: sent + new residual = input + beta * old residual", "[compress][gloo]") {
  const std::string spec = GENERATE("topk(k=8)+ef(beta=0.9)", "int2+ef(beta=0.5)", "sign+ef");
  INFO(spec);
  diloco_test::run_ranks(1, [&](int, std::shared_ptr<diloco::Group> g) {
    auto c = diloco::Exchange::from_spec(spec);
    const double beta = spec.find("0.9") != std::string::npos ? 0.9 : spec.find("0.5") != std::string::npos ? 0.5 : 1.0;
    at::Tensor old_residual;
    for (int step = 0; step < 3; ++step) {
      at::Tensor flat = at::randn({4096});
      const at::Tensor input = flat.clone();
      std::vector<at::Tensor> views{flat.view({64, 64})};
      c->sum(*g, flat, views, "ef");
      const at::Tensor expect = old_residual.defined() ? input + beta * old_residual.reshape({-1}) : input;
      const at::Tensor got = flat + c->residuals()[0].reshape({-1});
      const double diff = (got - expect).abs().max().item<double>();
      if (diff > 1e-5) throw std::runtime_error("EF identity off by " + std::to_string(diff));
      old_residual = c->residuals()[0].clone();
    }
  });
}

namespace {
// A user codec: float32 values halved on the wire and doubled back (lossless for the test).
class HalvingCodec : public diloco::Codec {
 public:
  std::string spec() const override { return "halving"; }
  diloco::Aggregation aggregation() const override { return diloco::Aggregation::kSummable; }
  at::ScalarType payload_dtype() const override { return at::kFloat; }
  std::int64_t payload_bytes(c10::IntArrayRef shape) const override {
    return 4 * c10::multiply_integers(shape);
  }
  void encode(const at::Tensor& x, std::uint8_t* out) override {
    at::Tensor o = at::from_blob(out, {x.numel()}, at::kFloat);
    o.copy_(x.reshape({-1}) * 0.5);
  }
  void decode(const std::uint8_t* p, std::int64_t bytes, at::Tensor& out) const override {
    if (bytes != 4 * out.numel()) throw diloco::Error("[codec 'halving'] wrong payload size");
    out.copy_(at::from_blob(const_cast<std::uint8_t*>(p), out.sizes(), at::kFloat) * 2.0);
  }
  double error_bound(const at::Tensor&) const override { return 0.0; }
};

// Runs one compressed sum of a random tensor of this shape over 3 ranks, rank 2 with `rank2_spec`
// and the others with `spec`; returns each rank's error, prefixed with its exception type.
// (Callbacks run on the rank threads, where Catch2's assertions are not allowed: they throw.)
std::vector<std::string> sum_with_rank2(const std::string& spec, const std::string& rank2_spec,
                                        const std::vector<std::int64_t>& shape) {
  return diloco_test::run_ranks_collect(
      3,
      [&](int rank, std::shared_ptr<diloco::Group> g) {
        auto compressor = diloco::Exchange::from_spec(rank == 2 ? rank2_spec : spec);
        auto gen = at::make_generator<at::CPUGeneratorImpl>(rank + 1);
        at::Tensor flat = at::randn({c10::multiply_integers(shape)}, gen);
        std::vector<at::Tensor> views{flat.view(shape)};
        try {
          compressor->sum(*g, flat, views, "outer_sync");
        } catch (const diloco::PeerLostError& e) {
          throw std::runtime_error(std::string("PeerLostError: ") + e.what());
        } catch (const diloco::Error& e) {
          throw std::runtime_error(std::string("Error: ") + e.what());
        }
      },
      std::chrono::milliseconds(5000));
}

}  // namespace

TEST_CASE("user code registers its own codec by name", "[compress]") {
  diloco::register_codec("halving", "halving: test codec",
                         [](diloco::CodecParams&) { return std::make_unique<HalvingCodec>(); });
  CHECK(diloco::make_codec("halving")->spec() == "halving");
  CHECK_THROWS_WITH(diloco::make_codec("halving(x=1)"), Contains("unknown parameter"));
  CHECK_THROWS_WITH(diloco::register_codec("int8", "", [](diloco::CodecParams&) {
                      return std::unique_ptr<diloco::Codec>();
                    }),
                    Contains("built-in"));
}

TEST_CASE("a malformed payload in the gathered exchange names its sender on every rank",
          "[compress][gloo]") {
  // Top-k's payload starts with the 12-bit indices of a 64x64 tile: the second becomes a copy of
  // the first, which the decoder refuses ("index ... appears twice").
  diloco_test::register_tampering_codec("damaged_topk", "topk", [](std::uint8_t* p, std::int64_t bytes) {
    if (bytes < 3) throw std::runtime_error("damaged_topk: payload too short to damage");
    const unsigned first = p[0] | ((p[1] & 0xFu) << 8);
    p[1] = static_cast<std::uint8_t>((p[1] & 0xFu) | ((first & 0xFu) << 4));
    p[2] = static_cast<std::uint8_t>(first >> 4);
  });
  const auto errors = sum_with_rank2("topk", "damaged_topk", {64, 64});
  for (int r = 0; r < 3; ++r) {
    INFO("rank " << r << ": " << errors[r]);
    CHECK_THAT(errors[r], StartsWith("Error: [gathered 'outer_sync'] rank " + std::to_string(r) +
                                     " of 3: malformed payload from rank 2: [codec topk]") &&
                              Contains("appears twice"));
  }
}

TEST_CASE("a malformed chunk in the requantizing ring names its sender", "[compress][gloo]") {
  // An int8 payload starts with its first block's float32 scale: NaN is refused by the decoder.
  diloco_test::register_tampering_codec("damaged_int8", "int8", [](std::uint8_t* p, std::int64_t bytes) {
    if (bytes < 4) throw std::runtime_error("damaged_int8: payload too short to damage");
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::memcpy(p, &nan, sizeof nan);
  });
  // Three ring chunks of 4096 values: rank 2 sends its damaged first chunk to rank 0.
  const auto errors = sum_with_rank2("int8", "damaged_int8", {3 * 4096});
  INFO("rank 0: " << errors[0]);
  CHECK_THAT(errors[0], StartsWith("Error: [ring-requantized 'outer_sync'] rank 0 of 3: "
                                   "malformed payload from rank 2: [codec 'int8'] malformed"));
  // The others fail too (rank 2 on its own damaged chunk, rank 1 when rank 0 leaves the ring);
  // what matters is that none waits forever.
  for (int r = 1; r < 3; ++r) {
    INFO("rank " << r << ": " << errors[r]);
    CHECK_FALSE(errors[r].empty());
  }
}

TEST_CASE("DiLoCo with fp32 compression matches the uncompressed outer step", "[compress][diloco][gloo]") {
  std::vector<at::Tensor> plain(2), packed(2);
  for (const char* spec : {"none", "fp32"}) {
    diloco_test::run_ranks(2, [&](int rank, std::shared_ptr<diloco::Group> g) {
      torch::nn::Linear net(6, 3);
      diloco_test::seed_parameters(net->parameters(), 0);
      torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
      diloco::DiLoCoOptions o;
      o.inner_steps = 2;
      o.compression = spec;
      diloco::DiLoCo sync(*net, opt, g, o);
      for (int s = 0; s < 4; ++s) {
        auto gen = at::make_generator<at::CPUGeneratorImpl>(rank * 10 + s);
        opt.zero_grad();
        net->forward(at::randn({4, 6}, gen)).pow(2).sum().backward();
        opt.step();
        sync.step();
      }
      (std::string(spec) == "none" ? plain : packed)[rank] = sync.global_weights()[0].clone();
    });
  }
  CHECK(at::equal(plain[0], packed[0]));
  CHECK(at::equal(packed[0], packed[1]));
}

TEST_CASE("DiLoCo refuses to compress a NaN pseudo-gradient, on every rank", "[compress][diloco][gloo]") {
  const auto errors = diloco_test::run_ranks_collect(3, [](int rank, std::shared_ptr<diloco::Group> g) {
    torch::manual_seed(0);
    torch::nn::Linear net(6, 3);
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
    diloco::DiLoCoOptions o;
    o.inner_steps = 1;
    o.compression = "int8+ef";
    diloco::DiLoCo sync(*net, opt, g, o);
    const at::Tensor before = sync.global_weights()[0].clone();
    if (rank == 2) {
      torch::NoGradGuard ng;
      net->weight[0][0] = std::nan("");
    }
    try {
      sync.step();
    } catch (...) {
      if (!at::equal(before, sync.global_weights()[0])) throw std::runtime_error("global changed");
      throw;
    }
  });
  for (const auto& e : errors) {
    INFO(e);
    CHECK_THAT(e, Contains("rank(s) 2") && Contains("nothing was sent"));
  }
}

TEST_CASE("a bad compression spec is an option error naming the codecs", "[compress][diloco]") {
  diloco::DiLoCoOptions o;
  o.compression = "zip";
  CHECK_THROWS_WITH(o.validate(), Contains("unknown codec 'zip'") && Contains("int8"));
  o.compression = "int8+ef(beta=2)";
  CHECK_THROWS_WITH(o.validate(), Contains("beta") && Contains("[0, 1]"));
}
