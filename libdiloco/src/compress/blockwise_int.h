// Blockwise symmetric integer quantizers int8, int4, int3 and int2, exchanged by a ring
// reduce-scatter that re-quantizes at every hop (diloco/exchange/).
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <memory>
#include <string>

#include "diloco/compress/codec.h"
#include "diloco/compress/codec_params.h"

namespace diloco {

extern const char* const kInt8Help;
extern const char* const kInt4Help;
extern const char* const kInt3Help;
extern const char* const kInt2Help;

// Blockwise absmax quantization (Dettmers et al., "8-bit Optimizers via Block-wise
// Quantization", arXiv 2110.02861, with a linear instead of their dynamic-tree code): int8 as in
// the quantized all-reduce of INTELLECT-1 (arXiv 2412.01152) and PCCL (arXiv 2505.14065), int4
// and int2 as lower-precision variants (SparseLoCo, arXiv 2508.15706, sends 2-bit values), int3
// between them (7 levels: at a fixed byte budget, a third more rounds than int4).
//
// Format. The tensor is flattened (row-major) and cut into blocks of `block` elements (a power of
// two in [32, 4096]); the last block holds the remaining len = n mod block elements when that is
// not 0. With bits b in {8, 4, 3, 2} and qmax = 2^(b-1) - 1 (127, 7, 3, 1), block j has the
// float32 scale s_j = top_j / qmax (0 for an all-zero block) and codes
//   nearest:     q = clamp(round_half_even(x / s_j), -qmax, qmax)
//   stochastic:  q = clamp(floor(x / s_j + u), -qmax, qmax),  u uniform in [0, 1)
// where top_j = max|x| by default (clip=0), so that no value is clipped. With clip = c > 0,
// top_j = min(max|x|, float(c rms_j)), rms_j = sqrt(sum x^2 / len_j) summed in double in element
// order: values beyond top_j decode to +-top_j. Why: the maximum of 256 normal values lies near
// 2.9 sigma, so max-scaled int3 spaces its 7 levels about 1 sigma apart, while the uniform 7-level
// quantizer of least mean squared error for a normal variable puts its top level at 1.95 sigma
// (J. Max, "Quantizing for minimum distortion", 1960), halving the error; for int2 (3 levels) the
// best top level is 1.22 sigma, for int4 (15 levels) about 2.5 sigma. The decoder needs nothing
// more: clip changes the scales, not the format.
// Stochastic rounding is unbiased (E[q s_j] = x) for |x| <= top_j. The uniforms come from a
// counter-based generator, so that they vectorize with the rounding: the k-th block the codec
// encodes (counting across encode() calls, a partial last block counting whole) takes stream
// positions c = k * block + i for its elements i, and element c gets
//   h = mix32(0x9e3779b9 * uint32(c) ^ mix32(seed ^ 0x9e3779b9 * uint32(c >> 32) ^ 0x85ebca6b))
//   (products modulo 2^32),
//   u = (h >> 8) 2^-24,
// with mix32 the lowbias32 integer hash (x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15;
// x *= 0x846ca68b; x ^= x >> 16). A codec instance is deterministic, and two instances with the
// same seed produce the same payloads for the same inputs.
// Block j is laid out as its scale (4 bytes, little-endian binary32) followed by its codes in
// two's complement, as one little-endian bit stream: code i in bits b i .. b i + b - 1 of the
// stream, stream bit t in bit t mod 8 of byte t / 8. So int8 is one code per byte; int4 two per
// byte, the first in the low nibble; int2 four per byte, the first in the lowest two bits; int3
// eight per three bytes, codes straddling bytes. Unused bits of a block's last byte are 0.
// Decoded values are q s_j.
//
// payload_bytes = sum over blocks of (4 + ceil(len_j b / 8))
//              = floor(n / block) (4 + block b / 8) + (r ? 4 + ceil(r b / 8) : 0),  r = n mod block.
// At block=256 that is 8.125, 4.125, 3.125 and 2.125 bits per element for int8, int4, int3, int2:
// 3.94x, 7.76x, 10.2x and 15.1x smaller than fp32 (2^20 elements: 1,064,960 / 540,672 / 409,600 /
// 278,528 bytes). CUDA tensors are encoded and decoded by kernels of their device, except int3's,
// clipped and stochastically rounded encodes, which go through a copy to the CPU (the payload a
// CPU tensor gives).
//
// Edge cases of the scale: when max|x| > 0 but max|x| / qmax underflows to 0 the scale is the
// smallest subnormal 2^-149; when qmax s_j would overflow (max|x| near FLT_MAX) s_j is lowered by
// one ulp. Neither arises unless max|x| < 2e-43 or max|x| > 3.4e38 (1 - 2^-24).
//
// error_bound = max over blocks of s_j (1/2 + qmax 2^-22) for nearest rounding, s_j (1 + qmax
// 2^-22) for stochastic, plus qmax 2^-148: half a step (a whole step), plus a margin for the
// float32 rounding of x / s_j, of q s_j and of s_j itself (each a relative 2^-24, at most 2^-150
// absolute for a subnormal scale), so the bound holds for the float arithmetic as computed. With
// clip, a block's term is at least max|x| - qmax s_j + s_j qmax 2^-22, the clipped excess.
//
// Decode throws diloco::Error naming the codec and the block for a payload of the wrong size, a
// scale that is NaN, infinite, negative (sign bit set) or so large that qmax s overflows, a code
// of -qmax-1 (-128, -8, -4, -2: the encoder never writes them), or nonzero padding bits. Encode
// throws diloco::Error for a non-finite input.
class BlockwiseIntCodec : public Codec {
 public:
  enum class Rounding { kNearest, kStochastic };
  // clip: 0 (scale from max|x|) or in [kMinClip, kMaxClip].
  static constexpr double kMinClip = 0.5;
  static constexpr double kMaxClip = 64.0;
  BlockwiseIntCodec(int bits, std::int64_t block, Rounding rounding, std::uint32_t seed,
                    double clip = 0.0);

  std::string spec() const override;
  Aggregation aggregation() const override { return Aggregation::kRingRequantized; }
  at::ScalarType payload_dtype() const override { return at::kByte; }
  std::int64_t payload_bytes(c10::IntArrayRef shape) const override;
  void encode(const at::Tensor& x, std::uint8_t* out) override;
  void decode(const std::uint8_t* payload, std::int64_t bytes, at::Tensor& out) const override;
  double error_bound(const at::Tensor& x) const override;

  int bits() const { return bits_; }
  std::int64_t block() const { return block_; }
  Rounding rounding() const { return rounding_; }
  double clip() const { return clip_; }
  std::uint64_t stream_position() const override { return drawn_; }
  void set_stream_position(std::uint64_t position) override { drawn_ = position; }

 private:
  std::string name() const;  // "int8"
  // The value the top code stands for in a block: max|x|, or min(max|x|, clip rms) when clipped.
  float block_top(const float* x, std::int64_t len, float amax) const;
  std::int64_t block_payload_bytes(std::int64_t len) const { return 4 + (len * bits_ + 7) / 8; }

  int bits_;
  int qmax_;
  std::int64_t block_;
  Rounding rounding_;
  std::uint32_t seed_;
  double clip_;
  std::uint64_t drawn_ = 0;  // elements of the stochastic stream used so far
};

// Builds int<bits>(block=256,rounding=nearest|stochastic,seed=0,clip=0) for bits in {8, 4, 3, 2}.
std::unique_ptr<Codec> make_blockwise_int_codec(int bits, CodecParams& params);

}  // namespace diloco
