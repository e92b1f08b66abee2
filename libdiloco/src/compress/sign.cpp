// Scaled sign codec (see sign.h).
#include "compress/sign.h"

#include <ATen/ATen.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <sstream>

#include "compress/codec_checks.h"
#include "diloco/errors.h"

namespace diloco {

const char* const kSignHelp =
    "sign: scaled sign, (|x|_1/d) sign(x), 1 bit per element + one float32, all-gathered";

namespace {

std::int64_t numel_of(c10::IntArrayRef shape) {
  std::int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

// The scale as encode() computes it: the L1 norm in double, so that large tensors do not lose
// the small elements' contribution.
double l1_mean(const float* x, std::int64_t d) {
  double sum = 0;
  for (std::int64_t i = 0; i < d; ++i) sum += std::fabs(x[i]);
  return d ? sum / static_cast<double>(d) : 0.0;
}

}  // namespace

std::int64_t SignCodec::payload_bytes(c10::IntArrayRef shape) const {
  return 4 + (numel_of(shape) + 7) / 8;
}

void SignCodec::encode(const at::Tensor& x, std::uint8_t* out) {
  check_cpu_float("sign", x, "encode input");
  const float* p = x.data_ptr<float>();
  const std::int64_t d = x.numel();
  const double mean = l1_mean(p, d);
  if (!std::isfinite(mean) || mean > FLT_MAX) {
    std::ostringstream s;
    s << "[codec sign] input of shape " << x.sizes() << " has a non-finite or overflowing L1 mean "
      << mean;
    throw Error(s.str());
  }
  const float scale = static_cast<float>(mean);
  std::memcpy(out, &scale, 4);
  std::uint8_t* bits = out + 4;
  const std::int64_t full = d / 8;
  for (std::int64_t b = 0; b < full; ++b) {
    const float* q = p + 8 * b;
    std::uint8_t byte = 0;
    for (int j = 0; j < 8; ++j) byte |= static_cast<std::uint8_t>((q[j] < 0) << j);
    bits[b] = byte;
  }
  if (d % 8) {
    std::uint8_t byte = 0;
    for (std::int64_t j = 0; j < d % 8; ++j)
      byte |= static_cast<std::uint8_t>((p[8 * full + j] < 0) << j);
    bits[full] = byte;
  }
}

void SignCodec::decode(const std::uint8_t* payload, std::int64_t bytes, at::Tensor& out) const {
  check_cpu_float("sign", out, "decode output");
  const std::int64_t d = out.numel(), expected = payload_bytes(out.sizes());
  if (bytes != expected) {
    std::ostringstream s;
    s << "[codec sign] payload of " << bytes << " bytes for shape " << out.sizes() << ", expected "
      << expected;
    throw Error(s.str());
  }
  float scale;
  std::memcpy(&scale, payload, 4);
  if (!std::isfinite(scale) || scale < 0) {
    std::ostringstream s;
    s << "[codec sign] malformed payload: scale " << scale << " is not a finite number >= 0";
    throw Error(s.str());
  }
  const std::uint8_t* bits = payload + 4;
  float* o = out.data_ptr<float>();
  // A set bit becomes the float sign bit of the scale: no branch per element.
  std::uint32_t s;
  std::memcpy(&s, &scale, 4);
  for (std::int64_t i = 0; i < d; ++i) {
    const std::uint32_t v = s | (static_cast<std::uint32_t>((bits[i >> 3] >> (i & 7)) & 1) << 31);
    std::memcpy(o + i, &v, 4);
  }
}

double SignCodec::error_bound(const at::Tensor& x) const {
  check_cpu_float("sign", x, "error_bound input");
  const float* p = x.data_ptr<float>();
  double max_abs = 0;
  for (std::int64_t i = 0; i < x.numel(); ++i)
    max_abs = std::max(max_abs, static_cast<double>(std::fabs(p[i])));
  return max_abs + static_cast<float>(l1_mean(p, x.numel()));
}

std::unique_ptr<Codec> make_sign_codec(CodecParams& params) {
  params.reject_unknown();
  return std::make_unique<SignCodec>();
}

}  // namespace diloco
