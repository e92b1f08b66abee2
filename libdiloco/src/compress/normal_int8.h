// INTELLECT-1's int8 codebook for pseudo-gradients: uniform bins over mean +- 6 standard
// deviations of the whole tensor, exchanged by a ring reduce-scatter that re-quantizes per hop.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <memory>
#include <string>

#include "diloco/compress/codec.h"
#include "diloco/compress/codec_params.h"

namespace diloco {

extern const char* const kInt8NormalHelp;

// int8_normal: INTELLECT-1 (Jaghouar et al., arXiv 2412.01152), int8 quantization of the
// pseudo-gradients: they are close to normal, so 256 equal bins over [mu - 6 sigma, mu + 6 sigma]
// hold nearly all of them. (As far as we know prime's implementation also ships a table of the
// mean value per bin; here a bin decodes to its centre, so mu and sigma are the whole header.)
//
// Format: mu and sigma as two little-endian float32 (8 bytes), then one byte per element, the
// bin index c in [0, 255] in the tensor's order. mu and sigma are the mean and the population
// standard deviation (divide by n) of the whole tensor, rounded to float.
// With lo = mu - 6 sigma and w = 12 sigma / 256 (evaluated in double from the float mu, sigma):
//   encode  c = clamp(floor((x - lo) / w), 0, 255)   (values outside clamp to the end bins;
//            the division is a float32 multiply by 1/w, see error_bound)
//   decode  x^ = float(lo + (c + 1/2) w)             (the centre of bin c)
// mu and sigma come from one pass of sums shifted by the first element (so |mu| >> sigma loses
// no precision), float partial sums of 32 terms added in double: relative error ~1e-5 in sigma,
// which only moves the bins, never the bound below. The test checks them against ATen's mean and
// std. sigma is capped so that |mu| + 6 sigma
// <= FLT_MAX (data beyond ~5e37 only; the values outside then clamp). When 1/w overflows float32
// (sigma = 0: a constant tensor, one element, no elements; or sigma < ~6e-38) every code is 128,
// which decodes to mu + w/2.
// payload_bytes = 8 + n; payload_dtype at::kByte; aggregation kRingRequantized.
//
// error_bound = w/2 + max(0, max x - (lo + 256 w), lo - min x) + slack, the clamp excess being
// how far the extreme values lie outside the 256 bins, and slack = 2^-21 (|mu| + 6 sigma + max|x|)
// covering float32 rounding of lo, of x - lo, of the scaled index and of the decoded centre (with
// |mu| >> sigma the rounding of x - lo can move a value by part of a bin); in the all-128 case
// above it adds 6 sigma.
//
// Decode throws diloco::Error naming the codec for a payload of the wrong size or a mu or sigma
// that is not finite, a negative (sign bit set) sigma, or a mu +- 6 sigma that overflows float32.
// Encode throws diloco::Error for a non-finite input. Every byte is a valid bin.
class NormalInt8Codec : public Codec {
 public:
  std::string spec() const override { return "int8_normal"; }
  Aggregation aggregation() const override { return Aggregation::kRingRequantized; }
  at::ScalarType payload_dtype() const override { return at::kByte; }
  std::int64_t payload_bytes(c10::IntArrayRef shape) const override;
  void encode(const at::Tensor& x, std::uint8_t* out) override;
  void decode(const std::uint8_t* payload, std::int64_t bytes, at::Tensor& out) const override;
  double error_bound(const at::Tensor& x) const override;
};

// Builds "int8_normal" (no parameters).
std::unique_ptr<Codec> make_int8_normal_codec(CodecParams& params);

}  // namespace diloco
