// Streaming DiLoCo's 4-bit floating point E3M0 for outer gradients, exchanged by a ring
// reduce-scatter that re-quantizes per hop.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <memory>
#include <string>

#include "diloco/compress/codec.h"
#include "diloco/compress/codec_params.h"

namespace diloco {

extern const char* const kFp4Help;

// fp4: Streaming DiLoCo (Douillard et al., "Streaming DiLoCo with overlapping communication",
// arXiv 2501.18512): outer gradients in FP4 E3M0, a sign bit and 3 exponent bits with
// no mantissa, accumulated in float32. The paper leaves the scaling open; here every block of
// `block` elements (a power of two in [32, 4096]; the last block holds the rest) has the float32
// scale s = max|x| of the block, so the largest element is exact.
//
// Format. Code nibble = (sign << 3) | e, e in 0..7: e = 0 is 0 (its sign bit is always 0; the
// nibble 0b1000, "-0", is malformed), e = 1..7 is +-s 2^(e-7), i.e. the magnitudes
// {0, s/64, s/32, s/16, s/8, s/4, s/2, s}. Encoding rounds |x| to the nearest magnitude in linear
// distance, ties toward the larger: e = number of thresholds T_k <= |x| among
// T_1 = s 2^-7 (between 0 and s/64) and T_k = (3/4) s 2^(k-7), k = 2..7 (between s 2^(k-8) and
// s 2^(k-7)); the thresholds are exact (computed in double, compared as the smallest float >=
// them), so ties are decided exactly. Block j is its scale (4 bytes, little-endian binary32),
// then its codes, two per byte, the first in the low nibble; the high nibble of the last byte of
// an odd-length block is 0. An all-zero block has s = 0 and zero codes.
// payload_bytes = sum over blocks of (4 + ceil(len_j / 2))
//              = floor(n / block) (4 + block / 2) + (r ? 4 + ceil(r / 2) : 0),  r = n mod block;
// 4.125 bits per element at block=256 (7.76x smaller than fp32).
//
// Error bound. Per element |x^ - x| <= max(s 2^-7, |x| / 3): below s/64 the error is at most half
// the first gap, s/128; for |x| in [s 2^(k-1), s 2^k] (k = -5..0) it is at most half the gap,
// s 2^(k-2), which is at most |x| / 3 with equality at the midpoint |x| = (3/4) s 2^k. Over a
// block the worst case is the top gap: s/4, at |x| = 3s/4 (|x| / 3 reaches s/3 only where the
// error is 0, at |x| = s). error_bound = max over blocks of s_j / 4, plus 2^-149 for the rounding
// of s 2^(e-7) where that is subnormal (s < 2^-120); encode and decode are otherwise exact.
//
// Decode throws diloco::Error naming the codec and the block for a payload of the wrong size, a
// scale that is NaN, infinite or negative (sign bit set), a "-0" code, or a nonzero padding
// nibble. Encode throws diloco::Error for a non-finite input.
class Fp4Codec : public Codec {
 public:
  explicit Fp4Codec(std::int64_t block);

  std::string spec() const override { return "fp4(block=" + std::to_string(block_) + ")"; }
  Aggregation aggregation() const override { return Aggregation::kRingRequantized; }
  at::ScalarType payload_dtype() const override { return at::kByte; }
  std::int64_t payload_bytes(c10::IntArrayRef shape) const override;
  void encode(const at::Tensor& x, std::uint8_t* out) override;
  void decode(const std::uint8_t* payload, std::int64_t bytes, at::Tensor& out) const override;
  double error_bound(const at::Tensor& x) const override;

  std::int64_t block() const { return block_; }

 private:
  static std::int64_t block_payload_bytes(std::int64_t len) { return 4 + (len + 1) / 2; }

  std::int64_t block_;
};

// Builds fp4(block=256).
std::unique_ptr<Codec> make_fp4_codec(CodecParams& params);

}  // namespace diloco
