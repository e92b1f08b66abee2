// FP4 E3M0 (see fp4.h). Encoding is eight float compares per element against exact per-block
// thresholds; decoding builds each float from the scale's bits by lowering its exponent. Both
// loops are branch-free and vectorize with baseline SSE2.
#include "compress/fp4.h"

#include <ATen/Tensor.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "compress/codec_checks.h"
#include "diloco/errors.h"

namespace diloco {

const char* const kFp4Help =
    "fp4(block=256): Streaming DiLoCo's FP4 E3M0 (sign + 3 exponent bits), magnitudes "
    "max|x| * 2^-6..2^0 per block (4.125 bits/param at block=256)";

namespace {

constexpr const char* kName = "fp4";
constexpr std::int32_t kExpMask = 0x7f800000;
// Below this scale s 2^-6 is subnormal and decoding needs a table of rounded magnitudes.
constexpr float kMinArithmeticScale = 0x1p-120f;

// The smallest float >= v (v >= 0 in float range): |x| >= v exactly iff |x| >= this.
float float_at_least(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) < v) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// The seven thresholds of fp4.h for scale s > 0.
std::array<float, 7> thresholds(float s) {
  std::array<float, 7> t;
  t[0] = float_at_least(std::ldexp(static_cast<double>(s), -7));
  for (int k = 2; k <= 7; ++k) {
    t[k - 1] = float_at_least(0.75 * std::ldexp(static_cast<double>(s), k - 7));
  }
  return t;
}

// Codes of one block, one per int32 of q (narrowing to bytes inside this loop would cost more
// than the compares; pack() narrows once). Eight compares: e counts the thresholds <= |x|, and
// the sign bit is set exactly when e > 0 and x < 0, i.e. when x <= -T_1.
void quantize(const float* x, std::int64_t len, const std::array<float, 7>& t, std::int32_t* q) {
  const float t1 = t[0], t2 = t[1], t3 = t[2], t4 = t[3], t5 = t[4], t6 = t[5], t7 = t[6];
  const float neg_t1 = -t1;
  for (std::int64_t i = 0; i < len; ++i) {
    const float a = std::fabs(x[i]);
    q[i] = (a >= t1 ? 1 : 0) + (a >= t2 ? 1 : 0) + (a >= t3 ? 1 : 0) + (a >= t4 ? 1 : 0) +
           (a >= t5 ? 1 : 0) + (a >= t6 ? 1 : 0) + (a >= t7 ? 1 : 0) + (x[i] <= neg_t1 ? 8 : 0);
  }
}

// Two codes per byte, the first in the low nibble; q holds an even count (zero-padded).
void pack(const std::int32_t* q, std::int64_t bytes, std::uint8_t* out) {
  for (std::int64_t b = 0; b < bytes; ++b) {
    out[b] = static_cast<std::uint8_t>(q[2 * b] | (q[2 * b + 1] << 4));
  }
}

// The float bits of code c in a block of scale bits sb: s 2^(e-7) is s with its exponent field
// lowered by 7 - e, exact while s 2^-6 is a normal float (s >= 2^-120; decode() checks).
inline std::uint32_t code_bits(std::uint32_t c, std::uint32_t sb) {
  const std::uint32_t e = c & 7u;
  const std::uint32_t mag = e != 0 ? sb - ((7u - e) << 23) : 0u;
  return mag | ((c & 8u) << 28);
}

// Decodes a block of `pairs` full bytes by exponent arithmetic; nonzero return: a "-0" code.
std::uint32_t unpack_normal(const std::uint8_t* in, std::int64_t pairs, std::uint32_t sb,
                            float* y) {
  std::uint32_t bad = 0;
  for (std::int64_t b = 0; b < pairs; ++b) {
    const std::uint32_t v = in[b];
    bad |= ((v & 0xfu) == 8u ? 1u : 0u) | ((v >> 4) == 8u ? 1u : 0u);
    const std::uint32_t lo = code_bits(v & 0xfu, sb), hi = code_bits(v >> 4, sb);
    std::memcpy(y + 2 * b, &lo, 4);
    std::memcpy(y + 2 * b + 1, &hi, 4);
  }
  return bad;
}

// The same through a table of correctly rounded magnitudes, for scales whose small magnitudes
// are subnormal (s < 2^-120) and for s = 0.
std::uint32_t unpack_table(const std::uint8_t* in, std::int64_t pairs, float s, float* y) {
  std::array<float, 16> lut;
  lut[0] = lut[8] = 0.f;  // 8 is "-0": flagged below
  for (int e = 1; e < 8; ++e) {
    lut[e] = static_cast<float>(std::ldexp(static_cast<double>(s), e - 7));
    lut[e + 8] = -lut[e];
  }
  std::uint32_t bad = 0;
  for (std::int64_t b = 0; b < pairs; ++b) {
    const std::uint8_t v = in[b];
    bad |= ((v & 0xf) == 8 ? 1u : 0u) | ((v >> 4) == 8 ? 1u : 0u);
    y[2 * b] = lut[v & 0xf];
    y[2 * b + 1] = lut[v >> 4];
  }
  return bad;
}

}  // namespace

Fp4Codec::Fp4Codec(std::int64_t block) : block_(block) {
  if (block < 32 || block > 4096 || (block & (block - 1)) != 0) {
    throw OptionError("[codec 'fp4'] block must be a power of two in [32, 4096], got '" +
                      std::to_string(block) + "'");
  }
}

std::int64_t Fp4Codec::payload_bytes(c10::IntArrayRef shape) const {
  const std::int64_t n = c10::multiply_integers(shape);
  const std::int64_t rem = n % block_;
  return (n / block_) * block_payload_bytes(block_) + (rem ? block_payload_bytes(rem) : 0);
}

void Fp4Codec::encode(const at::Tensor& x, std::uint8_t* out) {
  check_cpu_float(kName, x, "input");
  const std::int64_t n = x.numel();
  const float* in = x.data_ptr<float>();
  std::vector<std::int32_t> q(static_cast<std::size_t>(block_) + 2, 0);
  for (std::int64_t start = 0, j = 0; start < n; start += block_, ++j) {
    const std::int64_t len = std::min(block_, n - start);
    const float* xb = in + start;
    const std::int32_t amax_bits = abs_max_bits(xb, len);
    if (amax_bits >= kExpMask) {
      const std::int64_t i = std::find_if(xb, xb + len, [](float v) { return !std::isfinite(v); }) - xb;
      throw Error("[codec 'fp4'] cannot encode a non-finite input (element " +
                  std::to_string(start + i) + ", block " + std::to_string(j) + ")");
    }
    float s;
    std::memcpy(&s, &amax_bits, 4);
    std::memcpy(out, &s, 4);
    out += 4;
    if (s == 0.f) {
      std::fill(q.begin(), q.begin() + len, 0);
    } else {
      quantize(xb, len, thresholds(s), q.data());
    }
    q[len] = 0;  // the high nibble of an odd block's last byte
    const std::int64_t code_bytes = (len + 1) / 2;
    pack(q.data(), code_bytes, out);
    out += code_bytes;
  }
}

void Fp4Codec::decode(const std::uint8_t* payload, std::int64_t bytes, at::Tensor& out) const {
  check_cpu_float(kName, out, "output");
  const std::int64_t n = out.numel();
  const std::int64_t expected = payload_bytes(out.sizes());
  if (bytes != expected) {
    throw Error("[codec 'fp4'] malformed payload: " + std::to_string(bytes) +
                " bytes, expected " + std::to_string(expected) + " for " + std::to_string(n) +
                " elements in blocks of " + std::to_string(block_));
  }
  float* y = out.data_ptr<float>();
  const std::uint8_t* in = payload;
  for (std::int64_t start = 0, j = 0; start < n; start += block_, ++j) {
    const std::int64_t len = std::min(block_, n - start);
    const std::int64_t code_bytes = (len + 1) / 2;
    float s;
    std::memcpy(&s, in, 4);
    in += 4;
    const auto bad_block = [&](const std::string& what) {
      return Error("[codec 'fp4'] malformed payload: block " + std::to_string(j) + " (elements " +
                   std::to_string(start) + ".." + std::to_string(start + len - 1) + "): " + what);
    };
    if (!std::isfinite(s)) throw bad_block("scale " + std::to_string(s) + " is not finite");
    if (std::signbit(s)) throw bad_block("scale " + std::to_string(s) + " is negative");
    // The full bytes go through one vectorized loop; an odd block's last code on its own.
    float* yb = y + start;
    const std::int64_t pairs = len / 2;
    std::uint32_t sb;
    std::memcpy(&sb, &s, 4);
    const bool normal = s >= kMinArithmeticScale;  // also false for s = 0
    std::uint32_t bad =
        normal ? unpack_normal(in, pairs, sb, yb) : unpack_table(in, pairs, s, yb);
    if (len & 1) {
      const std::uint8_t v = in[pairs];
      if (v >> 4) throw bad_block("the padding nibble of the last byte is not zero");
      float last[2];
      bad |= normal ? unpack_normal(in + pairs, 1, sb, last) : unpack_table(in + pairs, 1, s, last);
      yb[len - 1] = last[0];
    }
    if (bad) throw bad_block("code 0b1000 (negative zero) is not a valid code");
    in += code_bytes;
  }
}

double Fp4Codec::error_bound(const at::Tensor& x) const {
  check_cpu_float(kName, x, "input");
  const std::int64_t n = x.numel();
  const float* in = x.data_ptr<float>();
  double bound = 0.0;
  for (std::int64_t start = 0; start < n; start += block_) {
    const std::int32_t amax_bits = abs_max_bits(in + start, std::min(block_, n - start));
    if (amax_bits >= kExpMask) return std::numeric_limits<double>::infinity();
    float s;
    std::memcpy(&s, &amax_bits, 4);
    bound = std::max(bound, static_cast<double>(s) / 4);
  }
  return bound + std::ldexp(1.0, -149);
}

std::unique_ptr<Codec> make_fp4_codec(CodecParams& params) {
  const std::int64_t block = params.get_power_of_two("block", 256, 32, 4096);
  params.reject_unknown();
  return std::make_unique<Fp4Codec>(block);
}

}  // namespace diloco
