// Scaled sign compression of a whole tensor. Not error feedback: sign is biased and is meant to be
// wrapped by it ("sign+ef", diloco/exchange/).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "diloco/compress/codec.h"
#include "diloco/compress/codec_params.h"

namespace diloco {

extern const char* const kSignHelp;

// Scaled sign (signSGD with a magnitude, as in EF-SignSGD, Karimireddy et al. 2019): a tensor of
// d elements becomes x -> (|x|_1 / d) sign(x), with sign(0) = +1 (also for -0) so that every
// element costs exactly one bit and the decoder never has to tell zero apart.
//
// Payload: the scale s = |x|_1 / d as a little-endian float32 (the L1 norm summed in double; 0
// for d = 0), then ceil(d/8) bytes of sign bits, element i in bit i % 8 of byte i / 8, 1 meaning
// negative, the padding bits of the last byte zero.
//   payload_bytes = 4 + ceil(d/8)         (d = numel, 1 for a 0-d tensor)
// 1024x1024: 4 + 131072 = 131076 bytes, 1.00003 bits per parameter (32x below fp32).
// Aggregation kGathered: payloads of different scales do not add.
//
// Decode throws diloco::Error for a payload of the wrong size or a negative or non-finite scale;
// encode throws for non-finite input (its L1 norm would be non-finite).
// error_bound: max|x| + s (each |x_i - (+-s)| is at most |x_i| + s).
class SignCodec : public Codec {
 public:
  std::string spec() const override { return "sign"; }
  Aggregation aggregation() const override { return Aggregation::kGathered; }
  at::ScalarType payload_dtype() const override { return at::kByte; }
  std::int64_t payload_bytes(c10::IntArrayRef shape) const override;
  void encode(const at::Tensor& x, std::uint8_t* out) override;
  void decode(const std::uint8_t* payload, std::int64_t bytes, at::Tensor& out) const override;
  double error_bound(const at::Tensor& x) const override;
};

// Builds sign (no parameters).
std::unique_ptr<Codec> make_sign_codec(CodecParams& params);

}  // namespace diloco
