// The two summable casts: fp32 (no compression) and fp16. Their payloads are plain arrays that an
// all-reduce adds as they are, so they need no ring of re-quantization.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <memory>
#include <string>

#include "diloco/compress/codec.h"
#include "diloco/compress/codec_params.h"

namespace diloco {

extern const char* const kFp32Help;
extern const char* const kFp16Help;

// fp32: the identity, what plain DiLoCo (Douillard et al., arXiv 2311.08105) sends.
//
// Format: the n elements as little-endian IEEE binary32, in the tensor's (contiguous) order.
// payload_bytes = 4n; payload_dtype at::kFloat; aggregation kSummable.
// error_bound = 0 (decode returns the input bit for bit).
// Decode throws diloco::Error for a payload of the wrong size or an element that is infinite or
// NaN (an all-reduce whose sum overflowed); encode copies whatever it is given.
class Fp32Codec : public Codec {
 public:
  std::string spec() const override { return "fp32"; }
  Aggregation aggregation() const override { return Aggregation::kSummable; }
  at::ScalarType payload_dtype() const override { return at::kFloat; }
  std::int64_t payload_bytes(c10::IntArrayRef shape) const override;
  void encode(const at::Tensor& x, std::uint8_t* out) override;
  void decode(const std::uint8_t* payload, std::int64_t bytes, at::Tensor& out) const override;
  double error_bound(const at::Tensor& /*x*/) const override { return 0.0; }
};

// fp16: a cast to IEEE binary16, as in mixed-precision all-reduce (Micikevicius et al., "Mixed
// Precision Training", arXiv 1710.03740), which half-precision DiLoCo exchanges reuse.
//
// Format: the n elements as little-endian IEEE binary16, rounded to nearest, ties to even
// (subnormal halves included). |x| > 65504 (the largest half) saturates to +-65504 rather than
// becoming infinity, because one outlier must not turn the whole all-reduced sum into inf.
// payload_bytes = 2n; payload_dtype at::kHalf; aggregation kSummable (the all-reduce adds halves).
// error_bound = M 2^-11 + 2^-25 + max(0, M - 65504), M = max |x|: half an ulp of a normal half
// is at most |x| 2^-11, the subnormal spacing is 2^-24 (half of it 2^-25), and a saturated value
// is off by its excess over 65504.
// Encode throws diloco::Error for a non-finite input; decode throws for a payload of the wrong
// size or a half that is infinite or NaN (an all-reduce whose sum overflowed fp16).
class Fp16Codec : public Codec {
 public:
  std::string spec() const override { return "fp16"; }
  Aggregation aggregation() const override { return Aggregation::kSummable; }
  at::ScalarType payload_dtype() const override { return at::kHalf; }
  std::int64_t payload_bytes(c10::IntArrayRef shape) const override;
  void encode(const at::Tensor& x, std::uint8_t* out) override;
  void decode(const std::uint8_t* payload, std::int64_t bytes, at::Tensor& out) const override;
  double error_bound(const at::Tensor& x) const override;
};

// Build "fp32" and "fp16" (neither has parameters; any given is an OptionError).
std::unique_ptr<Codec> make_fp32_codec(CodecParams& params);
std::unique_ptr<Codec> make_fp16_codec(CodecParams& params);

}  // namespace diloco
