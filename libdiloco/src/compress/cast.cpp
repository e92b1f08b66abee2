// fp32 and fp16 casts (see cast.h). The loops work on raw bits with branch-free selects so that
// the compiler vectorizes them with plain SSE2 integer ops (no F16C needed).
#include "compress/cast.h"

#include <ATen/Tensor.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "compress/codec_checks.h"
#include "diloco/errors.h"

namespace diloco {

const char* const kFp32Help = "fp32: no compression, float32 summed by all-reduce (32 bits/param)";
const char* const kFp16Help =
    "fp16: IEEE half, round to nearest even, |x| > 65504 saturates; summed by all-reduce "
    "(16 bits/param)";

namespace {

std::string prefix(const char* codec) { return std::string("[codec '") + codec + "'] "; }

void check_size(const char* codec, std::int64_t bytes, std::int64_t expected, std::int64_t n) {
  if (bytes != expected) {
    throw Error(prefix(codec) + "malformed payload: " + std::to_string(bytes) +
                " bytes, expected " + std::to_string(expected) + " for " + std::to_string(n) +
                " elements");
  }
}

constexpr std::uint32_t kF32ExpMask = 0x7f800000u;

std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// float -> binary16 bits, round to nearest even, |x| saturated at 65504 (x finite). After F.
// Giesen's branch-free "float_to_half_fast3_rtne", with the inf/NaN branch replaced by a clamp.
// Clamping and selecting on integers (masks rather than float selects) is what lets GCC
// vectorize the loop around it.
inline std::uint16_t half_from_float(float x) {
  constexpr std::uint32_t kMaxHalf = 0x477fe000u;   // 65504.f
  constexpr std::uint32_t kMinNormal = 0x38800000u;  // 2^-14, the smallest normal half
  constexpr std::uint32_t kHalfF = 0x3f000000u;      // 0.5f
  const std::uint32_t u = float_bits(x);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  std::uint32_t au = u & 0x7fffffffu;
  au = au < kMaxHalf ? au : kMaxHalf;
  // Subnormal half: adding 0.5 puts the half's 10 mantissa bits at the bottom of the float's
  // mantissa, and the float adder rounds to nearest even for us.
  const std::uint32_t sub = float_bits(bits_float(au) + 0.5f) - kHalfF;
  // Normal: rebias the exponent (-112 << 23), add 0xfff plus the lowest kept bit (ties to even),
  // cut 13 bits.
  const std::uint32_t norm = (au - 0x38000000u + 0xfffu + ((au >> 13) & 1u)) >> 13;
  const std::uint32_t is_sub = 0u - static_cast<std::uint32_t>(au < kMinNormal);
  return static_cast<std::uint16_t>((sub & is_sub) | (norm & ~is_sub) | sign);
}

// binary16 bits -> float bits, exact; `special` is set for an infinite or NaN half (whose result
// is then meaningless: the caller throws).
inline std::uint32_t float_from_half(std::uint32_t h, std::uint32_t& special) {
  constexpr std::uint32_t kShiftedExp = 0x7c00u << 13;
  const std::uint32_t em = (h & 0x7fffu) << 13;
  const std::uint32_t exp = em & kShiftedExp;
  const std::uint32_t norm = em + 0x38000000u;  // exponent + (127 - 15)
  // Subnormal half (exp 0): give it the implicit bit of 2^-14 and subtract 2^-14 again in float,
  // which renormalizes exactly.
  const std::uint32_t sub = float_bits(bits_float(norm + (1u << 23)) - bits_float(0x38800000u));
  special |= exp == kShiftedExp ? 1u : 0u;
  const std::uint32_t is_sub = 0u - static_cast<std::uint32_t>(exp == 0);
  return (sub & is_sub) | (norm & ~is_sub) | ((h & 0x8000u) << 16);
}

}  // namespace

// ---- fp32 ----

std::int64_t Fp32Codec::payload_bytes(c10::IntArrayRef shape) const {
  return 4 * c10::multiply_integers(shape);
}

void Fp32Codec::encode(const at::Tensor& x, std::uint8_t* out) {
  check_cpu_float("fp32", x, "input");
  std::memcpy(out, x.data_ptr<float>(), static_cast<std::size_t>(x.numel()) * 4);
}

void Fp32Codec::decode(const std::uint8_t* payload, std::int64_t bytes, at::Tensor& out) const {
  check_cpu_float("fp32", out, "output");
  const std::int64_t n = out.numel();
  check_size("fp32", bytes, 4 * n, n);
  float* y = out.data_ptr<float>();
  // Copy and test the exponent bits in one pass; the payload may be unaligned inside a bucket.
  std::uint32_t special = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    std::uint32_t u;
    std::memcpy(&u, payload + 4 * i, 4);
    special |= (u & kF32ExpMask) == kF32ExpMask ? 1u : 0u;
    std::memcpy(y + i, &u, 4);
  }
  if (special) {
    const std::int64_t i = std::find_if(y, y + n, [](float v) { return !std::isfinite(v); }) - y;
    throw Error(prefix("fp32") + "malformed payload: element " + std::to_string(i) + " of " +
                std::to_string(n) + " is not finite (did the sum overflow?)");
  }
}

// ---- fp16 ----

std::int64_t Fp16Codec::payload_bytes(c10::IntArrayRef shape) const {
  return 2 * c10::multiply_integers(shape);
}

void Fp16Codec::encode(const at::Tensor& x, std::uint8_t* out) {
  check_cpu_float("fp16", x, "input");
  const std::int64_t n = x.numel();
  const float* in = x.data_ptr<float>();
  std::uint32_t special = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    special |= (float_bits(in[i]) & kF32ExpMask) == kF32ExpMask ? 1u : 0u;
    const std::uint16_t h = half_from_float(in[i]);
    std::memcpy(out + 2 * i, &h, 2);
  }
  if (special) {
    const std::int64_t i =
        std::find_if(in, in + n, [](float v) { return !std::isfinite(v); }) - in;
    throw Error(prefix("fp16") + "cannot encode a non-finite input (element " +
                std::to_string(i) + " is " + std::to_string(in[i]) + ")");
  }
}

void Fp16Codec::decode(const std::uint8_t* payload, std::int64_t bytes, at::Tensor& out) const {
  check_cpu_float("fp16", out, "output");
  const std::int64_t n = out.numel();
  check_size("fp16", bytes, 2 * n, n);
  float* y = out.data_ptr<float>();
  std::uint32_t special = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    std::uint16_t h;
    std::memcpy(&h, payload + 2 * i, 2);
    y[i] = bits_float(float_from_half(h, special));
  }
  if (special) {
    std::int64_t i = 0;
    for (; i < n; ++i) {
      std::uint16_t h;
      std::memcpy(&h, payload + 2 * i, 2);
      if ((h & 0x7c00u) == 0x7c00u) break;
    }
    throw Error(prefix("fp16") + "malformed payload: element " + std::to_string(i) + " of " +
                std::to_string(n) + " is an fp16 inf or NaN (did the sum overflow 65504?)");
  }
}

double Fp16Codec::error_bound(const at::Tensor& x) const {
  check_cpu_float("fp16", x, "input");
  const float* in = x.data_ptr<float>();
  float m = 0.f;
  for (std::int64_t i = 0; i < x.numel(); ++i) m = std::max(m, std::fabs(in[i]));
  const double md = m;
  return md * std::ldexp(1.0, -11) + std::ldexp(1.0, -25) + std::max(0.0, md - 65504.0);
}

std::unique_ptr<Codec> make_fp32_codec(CodecParams& params) {
  params.reject_unknown();
  return std::make_unique<Fp32Codec>();
}

std::unique_ptr<Codec> make_fp16_codec(CodecParams& params) {
  params.reject_unknown();
  return std::make_unique<Fp16Codec>();
}

}  // namespace diloco
