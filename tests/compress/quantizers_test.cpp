// The quantizer codecs fp32, fp16, int8/int4/int3/int2, int8_normal and fp4: round trips within the
// documented bound, payload sizes from an independently written formula, the fast kernels against
// plain ATen reference implementations (bit for bit), unbiased stochastic rounding, malformed
// payloads and bad parameters.
#include <ATen/ATen.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "compress/blockwise_int.h"
#include "compress/cast.h"
#include "compress/fp4.h"
#include "compress/normal_int8.h"
#include "compress/spec_parse.h"
#include "diloco/compress/registry.h"
#include "diloco/errors.h"
#include "support/catch.h"
#include "support/codec_helpers.h"

using Catch::Matchers::Contains;

namespace {

std::string name_of(const std::string& spec) {
  return diloco::parse_spec(spec).first;
}

const std::vector<std::vector<std::int64_t>>& shapes() {
  static const std::vector<std::vector<std::int64_t>> s = {{},     {1},      {7},      {255},
                                                           {256},  {1000},   {64, 65}, {3, 5, 7}};
  return s;
}

const char* const kSpecs[] = {"fp32",
                              "fp16",
                              "int8",
                              "int4",
                              "int3",
                              "int2",
                              "int8(block=32,rounding=stochastic,seed=7)",
                              "int3(block=32,rounding=stochastic,seed=5)",
                              "int4(block=4096,rounding=stochastic)",
                              "int2(block=64)",
                              "int3(clip=2)",
                              "int2(block=64,rounding=stochastic,seed=3,clip=1.25)",
                              "int4(clip=2.5)",
                              "int8_normal",
                              "fp4",
                              "fp4(block=32)"};
const char* const kNearestSpecs[] = {"fp16",           "int8",           "int4",
                                     "int3",           "int2",           "int8(block=32)",
                                     "int3(block=32)", "int2(block=4096)", "int8_normal",
                                     "fp4",            "fp4(block=32)",  "int3(clip=2)",
                                     "int2(clip=1.25)", "int4(block=32,clip=2.5)"};

// Test data of the given shape: 0 normal, 1 normal with a large outlier (beyond fp16's range),
// 2 all zeros, 3 subnormal magnitudes, 4 a large mean with a small spread.
at::Tensor data(const std::vector<std::int64_t>& shape, int kind, std::uint64_t seed = 1) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::Tensor x = at::randn(shape, gen);
  if (kind == 1 && x.numel() > 0) x.view({-1})[x.numel() / 3] = 1e5;
  if (kind == 2) x.zero_();
  if (kind == 3) x.mul_(1e-40);
  if (kind == 4) x = x * 0.01 + 50;
  return x.contiguous();
}

// Encodes (into a guarded buffer: an encoder must write exactly payload_bytes) and decodes.
at::Tensor round_trip(diloco::Codec& codec, const at::Tensor& x,
                      std::vector<std::uint8_t>* payload = nullptr) {
  auto buf = diloco_test::encode_payload(codec, x);
  at::Tensor y = diloco_test::decode_payload(codec, buf, x.sizes());
  if (payload) *payload = std::move(buf);
  return y;
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return a.numel() ? (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>() : 0.0;
}

// The message of the E thrown by f, or a text that no matcher accepts.
template <typename E = diloco::Error, typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  return "<nothing thrown>";
}

template <typename T>
void append(std::vector<std::uint8_t>& v, const T& value) {
  const auto* p = reinterpret_cast<const std::uint8_t*>(&value);
  v.insert(v.end(), p, p + sizeof(T));
}

// ---- ATen reference implementations: whole-tensor ops, no raw loops over elements ----

struct Reference {
  std::vector<std::uint8_t> payload;
  at::Tensor decoded;
};

// Codes (int32 tensor, values fit in `bits`) as one little-endian bit stream: code i in bits
// i*bits .. i*bits+bits-1, bit t of the stream in bit t % 8 of byte t / 8, zero-padded to a byte.
void append_packed(std::vector<std::uint8_t>& out, const at::Tensor& codes, int bits) {
  const at::Tensor c = codes.to(at::kInt).reshape({-1, 1});
  at::Tensor stream =
      c.bitwise_right_shift(at::arange(bits, at::kInt)).bitwise_and(1).reshape({-1});
  const std::int64_t padded = (stream.numel() + 7) / 8 * 8;
  stream = at::constant_pad_nd(stream, {0, padded - stream.numel()}, 0).reshape({-1, 8});
  const at::Tensor weights = at::tensor({1, 2, 4, 8, 16, 32, 64, 128}, at::kInt);
  at::Tensor bytes = (stream * weights).sum(1).to(at::kByte).contiguous();
  const std::uint8_t* p = bytes.data_ptr<std::uint8_t>();
  out.insert(out.end(), p, p + bytes.numel());
}

Reference ref_fp16(const at::Tensor& x) {
  at::Tensor h = x.clamp(-65504, 65504).to(at::kHalf).contiguous();
  Reference r;
  const auto* p = reinterpret_cast<const std::uint8_t*>(h.data_ptr<at::Half>());
  r.payload.assign(p, p + 2 * h.numel());
  r.decoded = h.to(at::kFloat);
  return r;
}

Reference ref_blockwise(const at::Tensor& x, int bits, std::int64_t block, double clip) {
  const int qmax = (1 << (bits - 1)) - 1;
  at::Tensor flat = x.reshape({-1});
  Reference r;
  r.decoded = at::empty_like(flat);
  for (std::int64_t start = 0; start < flat.numel(); start += block) {
    const std::int64_t len = std::min(block, flat.numel() - start);
    at::Tensor xb = flat.narrow(0, start, len);
    at::Tensor amax = xb.abs().max();
    if (clip > 0) {
      // The top code stands for min(max|x|, clip rms), rms in double rounded to float.
      const double rms = xb.to(at::kDouble).square().mean().sqrt().item<double>();
      amax = at::minimum(amax, at::scalar_tensor(static_cast<float>(clip * rms), at::kFloat));
    }
    float s = (amax / qmax).item<float>();
    // The documented edge cases of the scale.
    if (s == 0.f && amax.item<float>() > 0.f) s = std::numeric_limits<float>::denorm_min();
    if (!std::isfinite(s * qmax)) s = std::nextafter(s, 0.f);
    const at::Tensor st = at::scalar_tensor(s, at::kFloat);
    at::Tensor q = s == 0.f ? at::zeros_like(xb) : at::round(xb / st).clamp(-qmax, qmax);
    // Decoded from the integer codes (a float code could be -0).
    q = q.to(at::kInt);
    r.decoded.narrow(0, start, len).copy_(q.to(at::kFloat) * st);
    append(r.payload, s);
    append_packed(r.payload, q, bits);
  }
  r.decoded = r.decoded.view(x.sizes());
  return r;
}

// With mu and sigma taken from the fast path's header (summation order is not specified).
Reference ref_int8_normal(const at::Tensor& x, float mu, float sigma) {
  const double lo = static_cast<double>(mu) - 6.0 * static_cast<double>(sigma);
  const double w = static_cast<double>(sigma) * 12.0 / 256.0;
  const float lo_f = static_cast<float>(lo);
  const float inv_w_f = w > 0 ? static_cast<float>(1.0 / w) : 0.f;
  at::Tensor codes;
  if (!(w > 0) || !std::isfinite(inv_w_f)) {
    codes = at::full(x.sizes(), 128, at::kLong);
  } else {
    codes = at::floor((x - lo_f) * inv_w_f).clamp(0, 255).to(at::kLong);
  }
  Reference r;
  append(r.payload, mu);
  append(r.payload, sigma);
  at::Tensor b = codes.to(at::kByte).contiguous().view({-1});
  r.payload.insert(r.payload.end(), b.data_ptr<std::uint8_t>(), b.data_ptr<std::uint8_t>() + b.numel());
  r.decoded = ((codes.to(at::kDouble) + 0.5) * w + lo).to(at::kFloat);
  return r;
}

Reference ref_fp4(const at::Tensor& x, std::int64_t block) {
  at::Tensor flat = x.reshape({-1});
  Reference r;
  r.decoded = at::empty_like(flat);
  for (std::int64_t start = 0; start < flat.numel(); start += block) {
    const std::int64_t len = std::min(block, flat.numel() - start);
    at::Tensor xb = flat.narrow(0, start, len);
    const float s = xb.abs().max().item<float>();
    // Nearest magnitude in exact (double) arithmetic, ties up: count the midpoints <= |x|.
    const at::Tensor a = xb.abs().to(at::kDouble);
    at::Tensor e = at::zeros({len}, at::kLong);
    if (s > 0) {
      e = e + (a >= std::ldexp(static_cast<double>(s), -7)).to(at::kLong);
      for (int k = 2; k <= 7; ++k) {
        e = e + (a >= 0.75 * std::ldexp(static_cast<double>(s), k - 7)).to(at::kLong);
      }
    }
    const at::Tensor neg = (xb < 0).logical_and(e > 0);
    const at::Tensor mag = at::where(e > 0, at::pow(2.0, (e - 7).to(at::kDouble)) * s,
                                     at::zeros({len}, at::kDouble));
    r.decoded.narrow(0, start, len).copy_(at::where(neg, -mag, mag).to(at::kFloat));
    append(r.payload, s);
    append_packed(r.payload, e + neg.to(at::kLong) * 8, 4);
  }
  r.decoded = r.decoded.view(x.sizes());
  return r;
}

Reference reference(const std::string& spec, diloco::Codec& codec, const at::Tensor& x,
                    const std::vector<std::uint8_t>& fast_payload) {
  const std::string name = name_of(spec);
  if (name == "fp16") return ref_fp16(x);
  if (name == "int8_normal") {
    float mu, sigma;
    std::memcpy(&mu, fast_payload.data(), 4);
    std::memcpy(&sigma, fast_payload.data() + 4, 4);
    if (x.numel() > 0) {
      // The header itself: close to ATen's statistics.
      const double m = x.mean().item<double>(), sd = x.std(/*unbiased=*/false).item<double>();
      CHECK(std::fabs(mu - m) <= 1e-6 * (std::fabs(m) + sd) + 1e-30);
      CHECK(std::fabs(sigma - sd) <= 1e-5 * sd + 1e-6 * std::fabs(m) + 1e-30);
    }
    return ref_int8_normal(x, mu, sigma);
  }
  if (name == "fp4") return ref_fp4(x, dynamic_cast<diloco::Fp4Codec&>(codec).block());
  auto& b = dynamic_cast<diloco::BlockwiseIntCodec&>(codec);
  return ref_blockwise(x, b.bits(), b.block(), b.clip());
}

// Values that sit exactly on rounding ties and range edges of each codec, on top of a block
// maximum that makes the step sizes exact powers of two.
at::Tensor tie_data(const std::string& spec) {
  std::vector<float> v;
  const std::string name = name_of(spec);
  if (name == "fp16") {
    v = {1.f + std::ldexp(1.f, -11), 1.f + 3 * std::ldexp(1.f, -11), -(1.f + std::ldexp(1.f, -11)),
         std::ldexp(1.f, -25), 3 * std::ldexp(1.f, -25), std::ldexp(1.f, -24), std::ldexp(1.f, -26),
         std::ldexp(1.f, -14) - std::ldexp(1.f, -26), 65504.f, 65519.f, 65520.f, -65536.f, 1e6f,
         -1e30f, 2049.f, 2051.f, 0.f, -0.f, 1e-8f, 6.1e-5f};
  } else if (name == "fp4") {
    // 32 values of scale 1 with every threshold exactly (ties go up) and just below it.
    v = {1.f, -1.f, 0.75f, -0.75f, std::nextafter(0.75f, 0.f), 0.375f, 0.1875f, 0.09375f, 0.046875f,
         0.0234375f, std::ldexp(1.f, -7), std::nextafter(std::ldexp(1.f, -7), 0.f), 0.f, -0.f,
         1e-30f, -0.5f, 0.6f, std::nextafter(0.375f, 0.f), std::nextafter(0.1875f, 0.f),
         -std::nextafter(0.09375f, 0.f), std::nextafter(0.046875f, 0.f),
         std::nextafter(0.0234375f, 0.f)};
    v.resize(32, 0.25f);
    // Then 32 whose scale has a full mantissa, so that 3/4 s is not a float.
    const float s = 1.f + std::ldexp(1.f, -23);
    v.push_back(s);
    for (int i = 0; i < 31; ++i) v.push_back(std::nextafter(0.75f * s, i % 2 ? 0.f : 2.f));
  } else if (name == "int8_normal") {
    v = {0.f, 1.f, -1.f, 6.f, -6.f, 5.999f, -6.001f, 100.f, 0.5f, 0.25f};
  } else {
    const auto b = diloco::make_codec(spec);
    const int qmax = (1 << (dynamic_cast<diloco::BlockwiseIntCodec&>(*b).bits() - 1)) - 1;
    // Runs of 32 (the smallest block), each led by qmax s with s = 1/4, then half-steps
    // (k + 1/2) s: ties, which go to the even code.
    int k = -qmax;
    for (int run = 0; run < 8; ++run) {
      v.push_back(qmax * 0.25f);
      for (int i = 0; i < 31; ++i) {
        v.push_back((k + 0.5f) * 0.25f);
        k = k + 1 < qmax ? k + 1 : -qmax;
      }
    }
    v.back() = -0.f;
  }
  return at::tensor(v, at::kFloat);
}

}  // namespace

TEST_CASE("quantizers round-trip within their documented bound", "[compress][quantizers]") {
  const std::string spec = GENERATE(from_range(std::begin(kSpecs), std::end(kSpecs)));
  const auto& shape = shapes()[GENERATE(range(0, 8))];
  const int kind = GENERATE(range(0, 5));
  INFO("codec " << spec << " shape " << at::IntArrayRef(shape) << " data kind " << kind);
  auto codec = diloco::make_codec(spec);
  const at::Tensor x = data(shape, kind);
  const at::Tensor y = round_trip(*codec, x);
  CHECK(y.sizes() == x.sizes());
  const double err = max_abs_diff(x, y);
  const double bound = codec->error_bound(x);
  INFO("max error " << err << " bound " << bound);
  CHECK(err <= bound);
  if (x.numel()) CHECK(at::isfinite(y).all().item<bool>());
  if (kind == 2 && name_of(spec) != "int8_normal") CHECK(at::equal(y, x));
  if (name_of(spec) == "fp32") CHECK(at::equal(y, x));
}

TEST_CASE("the bounds are reached by worst-case inputs", "[compress][quantizers]") {
  // int8: s = 1, 2.5 sits half a step from both neighbours.
  {
    auto c = diloco::make_codec("int8");
    const at::Tensor x = at::tensor({127.f, 2.5f, -3.5f});
    const double err = max_abs_diff(x, round_trip(*c, x));
    CHECK(err == 0.5);
    CHECK(c->error_bound(x) == Approx(0.5).epsilon(1e-4));
  }
  // fp4: just below 3/4 s goes down to s/2.
  {
    auto c = diloco::make_codec("fp4");
    const at::Tensor x = at::tensor({1.f, std::nextafter(0.75f, 0.f)});
    const double err = max_abs_diff(x, round_trip(*c, x));
    CHECK(err == Approx(0.25).epsilon(1e-6));
    CHECK(c->error_bound(x) == Approx(0.25).epsilon(1e-6));
  }
  // int2(clip=1): one value a among 31 zeros in a block of 32: top = a / sqrt(32), and a
  // decodes to top.
  {
    auto c = diloco::make_codec("int2(block=32,clip=1)");
    at::Tensor x = at::zeros({32});
    x[5] = 8.f;
    const double err = max_abs_diff(x, round_trip(*c, x));
    CHECK(err == Approx(8.0 - 8.0 / std::sqrt(32.0)).epsilon(1e-6));
    CHECK(c->error_bound(x) == Approx(err).epsilon(1e-6));
    CHECK(c->error_bound(x) >= err);
  }
  // fp16: a tie at 1 + 2^-11 rounds to even (1).
  {
    auto c = diloco::make_codec("fp16");
    const at::Tensor x = at::tensor({1.f + std::ldexp(1.f, -11)});
    const double err = max_abs_diff(x, round_trip(*c, x));
    CHECK(err == std::ldexp(1.0, -11));
    CHECK(c->error_bound(x) == Approx(std::ldexp(1.0, -11)).epsilon(1e-3));
  }
}

// The mean squared error of the uniform quantizer with levels -qmax..qmax times top/qmax, for a
// standard normal variable: the integral of (x - Q(x))^2 phi(x) over [-12, 12] by the midpoint
// rule (J. Max, "Quantizing for minimum distortion", IRE Trans. Inf. Theory 6, 1960).
double normal_quantizer_mse(double top, int qmax) {
  const std::int64_t n = 2400000;
  const double dx = 24.0 / n;
  const at::Tensor x = (at::arange(n, at::kDouble) + 0.5) * dx - 12.0;
  const double step = top / qmax;
  const at::Tensor q = at::round(x / step).clamp(-qmax, qmax) * step;
  const at::Tensor phi = at::exp(-x.square() / 2) / std::sqrt(2 * M_PI);
  return ((x - q).square() * phi).sum().item<double>() * dx;
}

TEST_CASE("clip puts the top code where a normal block's error is least", "[compress][quantizers]") {
  // Normal data in blocks of 256: the block rms estimates sigma (within about 4%), so clip = c
  // quantizes nearly as the uniform quantizer with top level c sigma. The least-error top levels
  // for 3, 7 and 15 levels: 1.22, 1.95 and 2.47 sigma.
  struct Case {
    const char* bits;
    int qmax;
    double best_top;
  };
  const Case c = GENERATE(Case{"int2", 1, 1.22}, Case{"int3", 3, 1.95}, Case{"int4", 7, 2.47});
  INFO("codec " << c.bits);
  const at::Tensor x = data({1 << 18}, 0, 11);
  const auto mse = [&](const std::string& spec) {
    auto codec = diloco::make_codec(spec);
    return (round_trip(*codec, x) - x).to(at::kDouble).square().mean().item<double>();
  };
  const double best = normal_quantizer_mse(c.best_top, c.qmax);
  const double clipped = mse(std::string(c.bits) + "(clip=" + std::to_string(c.best_top) + ")");
  const double unclipped = mse(c.bits);
  INFO("clipped " << clipped << " unclipped " << unclipped << " least error " << best);
  // The best top level is a minimum: a little lower or higher costs more.
  CHECK(normal_quantizer_mse(c.best_top * 0.9, c.qmax) > best);
  CHECK(normal_quantizer_mse(c.best_top * 1.1, c.qmax) > best);
  CHECK(clipped == Approx(best).epsilon(0.03));
  // Max-scaled codes put the top level near 2.9 sigma, the block's largest value, and lose:
  // int2 3.4x the error, int3 1.9x, int4 1.2x.
  CHECK(unclipped > 1.15 * clipped);
  if (c.qmax == 1) CHECK(unclipped > 3 * clipped);
  if (c.qmax == 3) CHECK(unclipped > 1.7 * clipped);
}

TEST_CASE("payload sizes follow the formulas exactly", "[compress][quantizers]") {
  const std::string spec = GENERATE(from_range(std::begin(kSpecs), std::end(kSpecs)));
  const auto& shape = shapes()[GENERATE(range(0, 8))];
  INFO("codec " << spec << " shape " << at::IntArrayRef(shape));
  auto codec = diloco::make_codec(spec);
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  const std::string name = name_of(spec);
  std::int64_t expected = 0;
  if (name == "fp32") {
    expected = 4 * n;
    CHECK(codec->payload_dtype() == at::kFloat);
    CHECK(codec->aggregation() == diloco::Aggregation::kSummable);
  } else if (name == "fp16") {
    expected = 2 * n;
    CHECK(codec->payload_dtype() == at::kHalf);
    CHECK(codec->aggregation() == diloco::Aggregation::kSummable);
  } else {
    CHECK(codec->payload_dtype() == at::kByte);
    CHECK(codec->aggregation() == diloco::Aggregation::kRingRequantized);
    if (name == "int8_normal") {
      expected = 8 + n;
    } else {
      const int bits = name == "fp4" ? 4 : std::stoi(name.substr(3));
      const std::int64_t block = name == "fp4" ? dynamic_cast<diloco::Fp4Codec&>(*codec).block()
                                               : dynamic_cast<diloco::BlockwiseIntCodec&>(*codec).block();
      // Block by block: a float scale, then the codes rounded up to whole bytes.
      for (std::int64_t start = 0; start < n; start += block) {
        const std::int64_t len = std::min(block, n - start);
        expected += 4 + (len * bits + 7) / 8;
      }
    }
  }
  CHECK(codec->payload_bytes(shape) == expected);
  // And the encoder writes exactly that many (round_trip checks the guard bytes).
  round_trip(*codec, data(shape, 0));
}

TEST_CASE("documented sizes of 2^20 elements", "[compress][quantizers]") {
  const std::vector<std::int64_t> shape = {1 << 20};
  CHECK(diloco::make_codec("int8")->payload_bytes(shape) == 1064960);
  CHECK(diloco::make_codec("int4")->payload_bytes(shape) == 540672);
  CHECK(diloco::make_codec("int3")->payload_bytes(shape) == 409600);
  CHECK(diloco::make_codec("int2")->payload_bytes(shape) == 278528);
  CHECK(diloco::make_codec("fp4")->payload_bytes(shape) == 540672);
  CHECK(diloco::make_codec("int8_normal")->payload_bytes(shape) == (1 << 20) + 8);
}

TEST_CASE("the fast kernels equal the ATen reference bit for bit", "[compress][quantizers]") {
  const std::string spec = GENERATE(from_range(std::begin(kNearestSpecs), std::end(kNearestSpecs)));
  const int which = GENERATE(range(0, 10));
  auto codec = diloco::make_codec(spec);
  // Every shape with normal, outlier and subnormal data, plus the ties of this codec.
  at::Tensor x;
  if (which < 8) {
    x = data(shapes()[which], which % 2 ? 1 : 0, 17 + which);
  } else if (which == 8) {
    x = data({3, 333}, 3, 5);
  } else {
    x = tie_data(spec);
  }
  INFO("codec " << spec << " input " << which << " shape " << x.sizes());
  std::vector<std::uint8_t> payload;
  const at::Tensor y = round_trip(*codec, x, &payload);
  const Reference ref = reference(spec, *codec, x, payload);
  CHECK(payload == ref.payload);
  CHECK(y.sizes() == ref.decoded.sizes());
  // Bitwise: compare the float bits so that -0 and +0 differ.
  const bool same = y.numel() == 0 ||
                    std::memcmp(y.data_ptr<float>(), ref.decoded.contiguous().data_ptr<float>(),
                                4 * static_cast<std::size_t>(y.numel())) == 0;
  CHECK(same);
  if (!same) {
    const at::Tensor yb = y.view(at::kInt).reshape({-1});
    const at::Tensor rb = ref.decoded.contiguous().view(at::kInt).reshape({-1});
    const std::int64_t i = (yb != rb).nonzero()[0].item<std::int64_t>();
    FAIL_CHECK("first differing element " << i << ": fast " << y.view({-1})[i].item<float>()
                                          << " reference " << ref.decoded.view({-1})[i].item<float>());
  }
}

TEST_CASE("stochastic rounding is unbiased", "[compress][quantizers]") {
  const std::string base = GENERATE("int8", "int4", "int3", "int2");
  INFO("codec " << base);
  const int trials = 2000;
  const at::Tensor x = data({64}, 0, 99);
  at::Tensor sum = at::zeros({64}, at::kDouble), sumsq = at::zeros({64}, at::kDouble);
  for (int seed = 0; seed < trials; ++seed) {
    auto codec = diloco::make_codec(
        base + "(block=32,rounding=stochastic,seed=" + std::to_string(seed) + ")");
    const at::Tensor y = round_trip(*codec, x).to(at::kDouble);
    sum += y;
    sumsq += y * y;
  }
  const at::Tensor mean = sum / trials;
  const at::Tensor var = (sumsq - sum * sum / trials) / (trials - 1);
  const at::Tensor se = (var.clamp_min(0) / trials).sqrt();
  const at::Tensor dev = mean - x.to(at::kDouble);
  // Elements that are exactly on a level (the block maxima) never move.
  const at::Tensor fixed = se < 1e-12;
  CHECK((dev.abs() <= 1e-6 * x.abs().to(at::kDouble)).logical_or(fixed.logical_not()).all().item<bool>());
  const at::Tensor z = at::where(fixed, at::zeros_like(dev), dev / se.clamp_min(1e-300));
  INFO("largest |z| " << z.abs().max().item<double>());
  // The mean deviation over the vector is within 3 standard errors; single elements within 4.5
  // (64 independent elements make one beyond 3 likely, beyond 4.5 not).
  const double pooled = dev.sum().item<double>() / se.pow(2).sum().sqrt().item<double>();
  CHECK(std::fabs(pooled) <= 3.0);
  CHECK((z.abs() <= 4.5).all().item<bool>());
  CHECK((z.abs() > 3.0).sum().item<std::int64_t>() <= 3);
  // Not vacuous: stochastic decodes do vary.
  CHECK(fixed.logical_not().sum().item<std::int64_t>() >= 60);
}

TEST_CASE("stochastic rounding is deterministic per instance and seed", "[compress][quantizers]") {
  const at::Tensor x = data({1000}, 0, 3);
  auto a = diloco::make_codec("int4(rounding=stochastic,seed=42)");
  auto b = diloco::make_codec("int4(rounding=stochastic,seed=42)");
  auto c = diloco::make_codec("int4(rounding=stochastic,seed=43)");
  std::vector<std::uint8_t> pa1, pa2, pb1, pc1;
  round_trip(*a, x, &pa1);
  round_trip(*a, x, &pa2);
  round_trip(*b, x, &pb1);
  round_trip(*c, x, &pc1);
  CHECK(pa1 == pb1);  // same seed, same stream
  CHECK(pa1 != pa2);  // the generator moves on between calls
  CHECK(pa1 != pc1);
}

TEST_CASE("malformed payloads raise diloco::Error naming the codec", "[compress][quantizers]") {
  const std::string spec = GENERATE("fp32", "fp16", "int8", "int4", "int3", "int2", "int8_normal", "fp4");
  const std::string tag = "[codec '" + spec + "']";
  INFO("codec " << spec);
  auto codec = diloco::make_codec(spec);
  const bool blockwise = spec != "fp32" && spec != "fp16" && spec != "int8_normal";
  // 301 elements: a full block of 256 and a partial one of 45 (odd: padding bits for 4 and 2).
  const at::Tensor x = data({301}, 0, 8);
  std::vector<std::uint8_t> good;
  round_trip(*codec, x, &good);
  const std::int64_t bytes = static_cast<std::int64_t>(good.size());
  at::Tensor y = at::empty_like(x);
  const auto decode = [&](std::vector<std::uint8_t> p) {
    return error_of([&] { codec->decode(p.data(), static_cast<std::int64_t>(p.size()), y); });
  };
  const auto put_float = [](std::vector<std::uint8_t>& p, std::size_t at, float v) {
    std::memcpy(p.data() + at, &v, 4);
  };
  const int bits = spec == "int8" ? 8 : spec == "int3" ? 3 : spec == "int2" ? 2 : 4;
  const std::size_t block1 = blockwise ? 4 + 256 * bits / 8 : 0;  // offset of block 1's scale

  SECTION("wrong sizes") {
    CHECK_THAT(decode({good.begin(), good.end() - 1}),
               Contains(tag) && Contains(std::to_string(bytes - 1) + " bytes"));
    auto longer = good;
    longer.push_back(0);
    CHECK_THAT(decode(longer), Contains(tag) && Contains(std::to_string(bytes + 1) + " bytes, expected " + std::to_string(bytes)));
    CHECK_THAT(decode({}), Contains(tag));
  }
  SECTION("NaN scale or header") {
    auto p = good;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    if (spec == "fp16") {
      const std::uint16_t h = 0x7e00;
      std::memcpy(p.data() + 10, &h, 2);
      CHECK_THAT(decode(p), Contains(tag) && Contains("element 5"));
    } else if (spec == "fp32") {
      put_float(p, 20, nan);
      CHECK_THAT(decode(p), Contains(tag) && Contains("element 5"));
    } else if (spec == "int8_normal") {
      put_float(p, 0, nan);
      CHECK_THAT(decode(p), Contains(tag) && Contains("not finite"));
      p = good;
      put_float(p, 4, std::numeric_limits<float>::infinity());
      CHECK_THAT(decode(p), Contains(tag) && Contains("not finite"));
    } else {
      put_float(p, block1, nan);
      CHECK_THAT(decode(p), Contains(tag) && Contains("block 1") && Contains("not finite"));
    }
  }
  SECTION("negative scale") {
    auto p = good;
    if (blockwise) {
      put_float(p, block1, -1.f);
      CHECK_THAT(decode(p), Contains(tag) && Contains("block 1") && Contains("negative"));
      put_float(p, block1, -0.f);
      CHECK_THAT(decode(p), Contains(tag) && Contains("block 1") && Contains("negative"));
    } else if (spec == "int8_normal") {
      put_float(p, 4, -1.f);
      CHECK_THAT(decode(p), Contains(tag) && Contains("negative"));
      put_float(p, 4, 1e38f);  // mu + 6 sigma overflows
      CHECK_THAT(decode(p), Contains(tag) && Contains("overflows"));
    }
  }
  SECTION("out-of-range code") {
    auto p = good;
    if (spec == "fp16") {
      const std::uint16_t inf = 0x7c00;
      std::memcpy(p.data() + 6, &inf, 2);
      CHECK_THAT(decode(p), Contains(tag) && Contains("element 3"));
    } else if (spec == "fp32") {
      put_float(p, 12, -std::numeric_limits<float>::infinity());
      CHECK_THAT(decode(p), Contains(tag) && Contains("element 3"));
    } else if (blockwise) {
      // -128 for int8, nibble 8 (-8, or fp4's "-0") for int4 and fp4, 0b10 (-2) for int2, and
      // 0b100 (-4) for int3 (code 24 of the block: the lowest 3 bits of its 10th code byte).
      if (spec == "int3") {
        p[block1 + 4 + 9] = static_cast<std::uint8_t>((p[block1 + 4 + 9] & 0xf8) | 0x04);
      } else {
        p[block1 + 4 + 7] = spec == "int8" ? 0x80 : spec == "int2" ? 0x20 : 0x80;
      }
      CHECK_THAT(decode(p), Contains(tag) && Contains("block 1") &&
                                (spec == "fp4" ? Contains("negative zero") : Contains("out of range")));
      if (spec != "int8") {
        // Padding bits of the partial block's last byte.
        p = good;
        p.back() |= 0x80;
        CHECK_THAT(decode(p), Contains(tag) && Contains("block 1") && Contains("padding"));
      }
      // Large but finite scale: int codes times it would overflow.
      if (spec != "fp4" && spec != "int2") {
        p = good;
        put_float(p, 0, 3e38f);
        CHECK_THAT(decode(p), Contains(tag) && Contains("block 0") && Contains("overflows"));
      }
    }
  }
  SECTION("random bytes decode to finite values or raise diloco::Error") {
    std::mt19937 rng(11);
    for (int trial = 0; trial < 300; ++trial) {
      // Mostly the right size, sometimes a random one.
      const std::int64_t size = trial % 5 == 4 ? static_cast<std::int64_t>(rng() % (2 * bytes + 2)) : bytes;
      std::vector<std::uint8_t> junk(static_cast<std::size_t>(size));
      for (auto& b : junk) b = static_cast<std::uint8_t>(rng());
      if (trial % 3 == 0 && size == bytes && blockwise) {
        // Plausible scales, so that the codes get checked too.
        put_float(junk, 0, 0.5f);
        put_float(junk, block1, 0.25f);
      }
      if (trial % 3 == 0 && size == bytes && spec == "int8_normal") {
        put_float(junk, 0, 0.f);
        put_float(junk, 4, 1.f);
      }
      try {
        codec->decode(junk.data(), size, y);
        CHECK(at::isfinite(y).all().item<bool>());
      } catch (const diloco::Error& e) {
        CHECK_THAT(std::string(e.what()), Contains(tag));
      }
    }
  }
}

TEST_CASE("non-finite input is an error when encoding", "[compress][quantizers]") {
  const std::string spec = GENERATE("fp16", "int8", "int4(rounding=stochastic)", "int3", "int2", "int8_normal", "fp4");
  INFO("codec " << spec);
  auto codec = diloco::make_codec(spec);
  at::Tensor x = data({500}, 0);
  x[300] = GENERATE(std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity());
  std::vector<std::uint8_t> buf(static_cast<std::size_t>(codec->payload_bytes(x.sizes())));
  CHECK_THAT(error_of([&] { codec->encode(x, buf.data()); }),
             Contains("[codec '" + name_of(spec) + "']") && Contains("non-finite") && Contains("300"));
}

TEST_CASE("specs spell out every parameter and rebuild an equal codec", "[compress][quantizers]") {
  CHECK(diloco::make_codec("int8")->spec() == "int8(block=256,rounding=nearest,seed=0)");
  CHECK(diloco::make_codec("int2(seed=9,rounding=stochastic,block=64)")->spec() ==
        "int2(block=64,rounding=stochastic,seed=9)");
  CHECK(diloco::make_codec("fp4")->spec() == "fp4(block=256)");
  CHECK(diloco::make_codec("fp16")->spec() == "fp16");
  CHECK(diloco::make_codec("fp32")->spec() == "fp32");
  CHECK(diloco::make_codec("int8_normal")->spec() == "int8_normal");
  CHECK(diloco::make_codec("int3(clip=1.95)")->spec() ==
        "int3(block=256,rounding=nearest,seed=0,clip=1.95)");
  CHECK(diloco::make_codec("int3(clip=0)")->spec() == "int3(block=256,rounding=nearest,seed=0)");
  const std::string spec = GENERATE(from_range(std::begin(kSpecs), std::end(kSpecs)));
  auto a = diloco::make_codec(spec);
  auto b = diloco::make_codec(a->spec());
  CHECK(b->spec() == a->spec());
  // Equal codecs: same payload for the same input (stochastic ones start from the same seed).
  const at::Tensor x = data({777}, 0);
  std::vector<std::uint8_t> pa, pb;
  round_trip(*a, x, &pa);
  round_trip(*b, x, &pb);
  CHECK(pa == pb);
}

TEST_CASE("bad parameters are OptionErrors naming the parameter and its range", "[compress][quantizers]") {
  using diloco::OptionError;
  const std::string name = GENERATE("int8", "int4", "int3", "int2", "fp4");
  INFO("codec " << name);
  const std::string tag = "[codec '" + name + "']";
  CHECK_THAT(error_of<OptionError>([&] { diloco::make_codec(name + "(block=100)"); }),
             Contains(tag) && Contains("block") && Contains("power of two in [32, 4096]") &&
                 Contains("'100'"));
  CHECK_THAT(error_of<OptionError>([&] { diloco::make_codec(name + "(block=8192)"); }),
             Contains(tag) && Contains("block") && Contains("[32, 4096]") && Contains("'8192'"));
  CHECK_THAT(error_of<OptionError>([&] { diloco::make_codec(name + "(block=16)"); }),
             Contains("block") && Contains("[32, 4096]"));
  CHECK_THAT(
      error_of<OptionError>([&] { diloco::make_codec(name + "(bogus=1)"); }),
      Contains(tag) && Contains("unknown parameter") && Contains("bogus") && Contains("block"));
  if (name != "fp4") {
    CHECK_THAT(error_of<OptionError>([&] { diloco::make_codec(name + "(rounding=up)"); }),
               Contains(tag) && Contains("rounding") && Contains("nearest|stochastic") &&
                   Contains("'up'"));
    CHECK_THAT(error_of<OptionError>([&] { diloco::make_codec(name + "(seed=-1)"); }),
               Contains("seed") && Contains("[0, 4294967295]"));
    // One message for every bad clip, from the spec and from the constructor alike.
    const std::string clip_range = "clip must be 0 (off) or a number in [0.5, 64], got '";
    for (const std::string bad : {"-1", "65", "0.25", "nan", "two"}) {
      CHECK_THAT(error_of<OptionError>([&] { diloco::make_codec(name + "(clip=" + bad + ")"); }),
                 Contains(tag) && Contains(clip_range + bad + "'"));
    }
    CHECK_THAT(error_of<OptionError>([&] {
                 diloco::BlockwiseIntCodec(4, 256, diloco::BlockwiseIntCodec::Rounding::kNearest,
                                           0, 65.0);
               }),
               Contains(clip_range + "65'"));
  } else {
    CHECK_THAT(error_of<OptionError>([&] { diloco::make_codec("fp4(rounding=nearest)"); }),
               Contains("unknown parameter") && Contains("rounding"));
  }
}

TEST_CASE("parameterless codecs reject any parameter", "[compress][quantizers]") {
  const std::string name = GENERATE("fp32", "fp16", "int8_normal");
  CHECK_THAT(
      error_of<diloco::OptionError>([&] { diloco::make_codec(name + "(block=256)"); }),
      Contains("[codec '" + name + "']") && Contains("unknown parameter") && Contains("block"));
}
