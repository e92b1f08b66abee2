// DCT + top-k (DeMo): the basis is orthonormal, the chunked transform agrees with a direct
// double-precision DCT-II, decode inverts it exactly when every coefficient is kept, top-k keeps
// the k largest coefficients, payload bytes, malformed payloads and parameters.
#include "compress/dct.h"

#include <ATen/ATen.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <random>

#include "diloco/compress/registry.h"
#include "diloco/errors.h"
#include "support/catch.h"
#include "support/codec_helpers.h"

using Catch::Matchers::Contains;
using diloco_test::codec_shapes;
using diloco_test::decode_payload;
using diloco_test::encode_payload;
using diloco_test::make_codec_with;

namespace {

// Calls fn(r0, r1, c0, c1) for every chunk of the 2-D view of a tensor of this shape.
template <typename Fn>
void for_each_tile(c10::IntArrayRef shape, std::int64_t chunk, Fn fn) {
  std::int64_t rows = 1, cols = 1, th = 1;
  if (shape.size() >= 2) {
    rows = shape[0];
    for (std::size_t d = 1; d < shape.size(); ++d) cols *= shape[d];
    th = chunk;
  } else {
    cols = shape.empty() ? 1 : shape[0];
  }
  for (std::int64_t r0 = 0; r0 < rows; r0 += th) {
    for (std::int64_t c0 = 0; c0 < cols; c0 += chunk) {
      fn(r0, std::min(rows, r0 + th), c0, std::min(cols, c0 + chunk));
    }
  }
}

at::Tensor view2d(const at::Tensor& x) {
  return x.dim() >= 2 ? x.reshape({x.size(0), -1}) : x.reshape({1, x.numel()});
}

// The DCT-II straight from its definition, in double, one tile at a time (separably):
// Y[u][v] = a_u a_v sum_m sum_n X[m][n] cos(pi (2m+1) u / 2h) cos(pi (2n+1) v / 2w),
// a_0 = sqrt(1/N), a_u = sqrt(2/N).
at::Tensor direct_dct(const at::Tensor& x, std::int64_t chunk) {
  at::Tensor xd = view2d(x.to(at::kDouble)).contiguous();
  at::Tensor y = at::zeros_like(xd);
  const std::int64_t cols = xd.size(1);
  const double* in = xd.data_ptr<double>();
  double* out = y.data_ptr<double>();
  const double pi = std::acos(-1.0);
  auto coef = [pi](std::int64_t u, std::int64_t i, std::int64_t n) {
    const double a = std::sqrt((u == 0 ? 1.0 : 2.0) / static_cast<double>(n));
    return a * std::cos(pi * static_cast<double>((2 * i + 1) * u) / (2.0 * static_cast<double>(n)));
  };
  for_each_tile(x.sizes(), chunk,
                [&](std::int64_t r0, std::int64_t r1, std::int64_t c0, std::int64_t c1) {
                  const std::int64_t h = r1 - r0, w = c1 - c0;
                  std::vector<double> t(static_cast<std::size_t>(h * w), 0.0);
                  for (std::int64_t m = 0; m < h; ++m)
                    for (std::int64_t v = 0; v < w; ++v)
                      for (std::int64_t n = 0; n < w; ++n)
                        t[m * w + v] += in[(r0 + m) * cols + c0 + n] * coef(v, n, w);
                  for (std::int64_t u = 0; u < h; ++u)
                    for (std::int64_t v = 0; v < w; ++v) {
                      double s = 0;
                      for (std::int64_t m = 0; m < h; ++m) s += coef(u, m, h) * t[m * w + v];
                      out[(r0 + u) * cols + c0 + v] = s;
                    }
                });
  return y.view(x.sizes());
}

// Keeps the k largest |coefficients| of every tile (at::topk), zero elsewhere; with sign, the kept
// ones become +-mean|kept|.
at::Tensor keep_topk(const at::Tensor& coef, std::int64_t k, std::int64_t chunk, bool sign) {
  at::Tensor c2 = view2d(coef);
  at::Tensor out = at::zeros_like(c2);
  for_each_tile(
      coef.sizes(), chunk, [&](std::int64_t r0, std::int64_t r1, std::int64_t c0, std::int64_t c1) {
        at::Tensor tile = c2.slice(0, r0, r1).slice(1, c0, c1).reshape({-1});
        at::Tensor idx = std::get<1>(at::topk(tile.abs(), std::min(k, tile.numel())));
        at::Tensor vals = tile.index({idx});
        if (sign) vals = at::where(vals < 0, -1.0, 1.0).to(vals.scalar_type()) * vals.abs().mean();
        at::Tensor kept = at::zeros_like(tile);
        kept.index_put_({idx}, vals);
        out.slice(0, r0, r1).slice(1, c0, c1).copy_(kept.view({r1 - r0, c1 - c0}));
      });
  return out.view(coef.sizes());
}

std::int64_t formula_bytes(c10::IntArrayRef shape, std::int64_t k, std::int64_t chunk, bool sign) {
  std::int64_t bits = 0, kept = 0, chunks = 0;
  for_each_tile(
      shape, chunk, [&](std::int64_t r0, std::int64_t r1, std::int64_t c0, std::int64_t c1) {
        const std::int64_t n = (r1 - r0) * (c1 - c0), kc = std::min(k, n);
        bits += kc * static_cast<std::int64_t>(std::ceil(std::log2(static_cast<double>(n))));
        kept += kc;
        ++chunks;
      });
  return (bits + 7) / 8 + (sign ? 4 * chunks + (kept + 7) / 8 : 4 * kept);
}

double max_abs(const at::Tensor& t) {
  return t.numel() ? t.abs().max().item<double>() : 0.0;
}

}  // namespace

TEST_CASE("dct basis is orthonormal", "[compress][dct]") {
  for (std::int64_t n : {1, 2, 3, 7, 8, 36, 64, 256}) {
    INFO("n = " << n);
    at::Tensor c = diloco::dct_basis(n).to(at::kDouble);
    CHECK(max_abs(at::matmul(c, c.t()) - at::eye(n, at::kDouble)) < 1e-6);
  }
  CHECK(diloco::dct_basis(1).item<float>() == 1.0f);
}

TEST_CASE("dct transform agrees with the direct DCT-II and inverts", "[compress][dct]") {
  const auto shape = GENERATE(from_range(codec_shapes()));
  const std::int64_t chunk = GENERATE(64, 8);
  INFO("chunk " << chunk << " shape " << at::IntArrayRef(shape));
  diloco::DctCodec codec(chunk, 32, false);
  at::manual_seed(12);
  at::Tensor x = at::randn(shape);
  at::Tensor coef = codec.transform(x, false);
  at::Tensor ref = direct_dct(x, chunk);
  const double diff = max_abs(coef.to(at::kDouble) - ref);
  INFO("max difference from the direct DCT " << diff);
  CHECK(diff < 2e-5);
  CHECK(max_abs(codec.transform(coef, true) - x) < 1e-5);
  // Orthonormal: the energy of every tile, hence of the whole tensor, is kept.
  if (x.numel())
    CHECK(coef.pow(2).sum().item<double>() == Approx(x.pow(2).sum().item<double>()).epsilon(1e-5));
}

TEST_CASE("dct keeping every coefficient round-trips to 1e-5", "[compress][dct]") {
  const auto shape = GENERATE(from_range(codec_shapes()));
  const std::string chunk = GENERATE("64", "8", "16");
  INFO("chunk " << chunk << " shape " << at::IntArrayRef(shape));
  auto codec = make_codec_with("dct", {{"chunk", chunk}, {"k", "4096"}});
  at::manual_seed(13);
  at::Tensor x = at::randn(shape);
  at::Tensor y = decode_payload(*codec, encode_payload(*codec, x), x.sizes());
  const double err = max_abs(y - x);
  INFO("max error " << err << " bound " << codec->error_bound(x));
  CHECK(err < 1e-5);
  CHECK(err <= codec->error_bound(x));
}

TEST_CASE("dct keeps the k largest coefficients of every chunk", "[compress][dct]") {
  const auto shape = GENERATE(from_range(codec_shapes()));
  const auto params = GENERATE(std::make_tuple(32, 64, false), std::make_tuple(5, 8, false),
                               std::make_tuple(32, 64, true), std::make_tuple(3, 16, true));
  const auto [k, chunk, sign] = params;
  const std::string spec = "dct(chunk=" + std::to_string(chunk) + ",k=" + std::to_string(k) +
                           ",sign=" + (sign ? "true" : "false") + ")";
  INFO(spec << " shape " << at::IntArrayRef(shape));
  auto codec = make_codec_with("dct", {{"chunk", std::to_string(chunk)},
                                       {"k", std::to_string(k)},
                                       {"sign", sign ? "true" : "false"}});
  CHECK(codec->spec() == spec);
  CHECK(codec->aggregation() == diloco::Aggregation::kGathered);
  CHECK(codec->payload_dtype() == at::kByte);
  at::manual_seed(14);
  at::Tensor x = at::randn(shape);
  const auto buf = encode_payload(*codec, x);
  CHECK(static_cast<std::int64_t>(buf.size()) == formula_bytes(shape, k, chunk, sign));
  at::Tensor y = decode_payload(*codec, buf, x.sizes());
  // The decoded tensor's coefficients are the reference top-k of x's coefficients.
  at::Tensor expected = keep_topk(direct_dct(x, chunk), k, chunk, sign);
  const double diff = max_abs(direct_dct(y, chunk) - expected);
  INFO("max coefficient difference " << diff);
  CHECK(diff < 1e-4);
  const double err = max_abs(y - x);
  INFO("max error " << err << " bound " << codec->error_bound(x));
  CHECK(err <= codec->error_bound(x));
}

TEST_CASE("dct payload sizes follow the formula to the byte", "[compress][dct]") {
  const auto shape = GENERATE(from_range(codec_shapes()));
  const bool sign = GENERATE(false, true);
  auto codec = make_codec_with("dct", {{"sign", sign ? "true" : "false"}});
  CHECK(codec->payload_bytes(shape) == formula_bytes(shape, 32, 64, sign));
  // The figures quoted in dct.h.
  CHECK(make_codec_with("dct")->payload_bytes({1024, 1024}) == 45056);
  CHECK(make_codec_with("dct", {{"sign", "true"}})->payload_bytes({1024, 1024}) == 14336);
  CHECK(make_codec_with("dct")->payload_bytes({0, 3}) == 0);
}

TEST_CASE("dct rejects malformed payloads", "[compress][dct]") {
  auto codec = make_codec_with("dct");
  at::manual_seed(15);
  at::Tensor x = at::randn({64, 64});
  auto buf = encode_payload(*codec, x);
  at::Tensor y = at::empty_like(x);
  CHECK_THROWS_WITH(codec->decode(buf.data(), static_cast<std::int64_t>(buf.size()) - 1, y),
                    Contains("[codec dct]") && Contains("expected"));
  {
    auto dup = buf;  // second 12-bit index := first
    const std::uint32_t first = dup[0] | ((dup[1] & 0xF) << 8);
    dup[1] = static_cast<std::uint8_t>((dup[1] & 0x0F) | ((first & 0xF) << 4));
    dup[2] = static_cast<std::uint8_t>(first >> 4);
    CHECK_THROWS_WITH(decode_payload(*codec, dup, x.sizes()),
                      Contains("[codec dct]") && Contains("twice"));
  }
  {
    auto nan = buf;  // 32 indices * 12 bits = 48 bytes, then the values
    const float v = std::numeric_limits<float>::quiet_NaN();
    std::memcpy(nan.data() + 48 + 4 * 7, &v, 4);
    CHECK_THROWS_WITH(decode_payload(*codec, nan, x.sizes()), Contains("not finite"));
  }
  {
    // Finite coefficients whose inverse transform overflows float32.
    auto small = make_codec_with("dct", {{"chunk", "8"}, {"k", "8"}});
    at::Tensor v = at::randn({8});
    auto p = encode_payload(*small, v);
    for (int j = 0; j < 8; ++j) {
      const float big = FLT_MAX;
      std::memcpy(p.data() + 3 + 4 * j, &big, 4);
    }
    CHECK_THROWS_WITH(decode_payload(*small, p, v.sizes()),
                      Contains("[codec dct]") && Contains("overflows"));
  }
  {
    auto signed_codec = make_codec_with("dct", {{"sign", "true"}});
    auto p = encode_payload(*signed_codec, x);
    const float neg = -1.0f;
    std::memcpy(p.data() + 48, &neg, 4);
    CHECK_THROWS_WITH(decode_payload(*signed_codec, p, x.sizes()), Contains("scale"));
  }
  x[0][0] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(codec->encode(x, buf.data()),
                    Contains("[codec dct]") && Contains("non-finite"));
}

TEST_CASE("dct decodes random bytes to finite values or raises diloco::Error", "[compress][dct]") {
  const bool sign = GENERATE(false, true);
  const auto shape = GENERATE(from_range(codec_shapes()));
  auto codec = make_codec_with("dct", {{"sign", sign ? "true" : "false"}});
  const std::int64_t bytes = codec->payload_bytes(shape);
  std::mt19937 rng(21);
  for (int trial = 0; trial < 30; ++trial) {
    std::vector<std::uint8_t> junk(static_cast<std::size_t>(bytes));
    for (auto& b : junk) b = static_cast<std::uint8_t>(rng());
    at::Tensor y = at::empty(shape);
    try {
      codec->decode(junk.data(), bytes, y);
      CHECK(at::isfinite(y).all().item<bool>());
    } catch (const diloco::Error&) {
    }
  }
}

TEST_CASE("dct rejects bad parameters naming them and their range", "[compress][dct]") {
  CHECK(make_codec_with("dct")->spec() == "dct(chunk=64,k=32,sign=false)");
  CHECK_THROWS_WITH(make_codec_with("dct", {{"k", "0"}}),
                    Contains("k must") && Contains("[1, 4096]"));
  CHECK_THROWS_WITH(make_codec_with("dct", {{"chunk", "100"}}),
                    Contains("chunk") && Contains("power of two") && Contains("[8, 256]"));
  CHECK_THROWS_WITH(make_codec_with("dct", {{"sign", "maybe"}}),
                    Contains("sign") && Contains("false|true"));
  CHECK_THROWS_WITH(make_codec_with("dct", {{"topk", "3"}}),
                    Contains("unknown parameter") && Contains("topk"));
  CHECK_THROWS_AS(make_codec_with("dct", {{"chunk", "4"}}), diloco::OptionError);
}
