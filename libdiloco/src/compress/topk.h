// Per-chunk top-k sparsification (SparseLoCo) over the chunked sparse payload format
// (compress/format/sparse_chunks.h, which the DCT codec reuses for its coefficients). Not a
// synchronizer and not error feedback: those wrap this codec (diloco/exchange/).
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "diloco/compress/codec.h"
#include "diloco/compress/codec_params.h"
#include "compress/format/sparse_chunks.h"

namespace diloco {

extern const char* const kTopkHelp;

// SparseLoCo (Sarfi et al., arXiv 2508.15706): keep the k largest-magnitude entries of every
// chunk, send their positions and (optionally quantized) values, all-gather and decode locally.
//
// Chunks, selection and the payload layout: compress/format/sparse_chunks.h.
//
// error_bound: max over chunks of (largest dropped |x| + value error), the value error being
//   fp32  0;
//   fp16  M_c 2^-11 + 2^-25 + max(0, M_c - 65504)     (M_c = max kept |x|; half an ulp, the
//         subnormal spacing, saturation);
//   2bit  max(m_c, M_c - m_c) (1 + 2^-20): a low value lies in [0, m_c) and its level in
//         [m_c/2, m_c); a high one in [m_c, M_c] and its level in [m_c, 2m_c) (s_c lies in
//         [3m_c/4, 3m_c/2]); the factor covers float rounding. (Scales are capped at
//         0.75 FLT_MAX so that (4/3)s_c stays finite; beyond |x| ~ 1e38 the bound does not hold.)
class TopkCodec : public Codec {
 public:
  enum class Values { kFp32, kFp16, kTwoBit };
  TopkCodec(std::int64_t k, std::int64_t chunk, std::int64_t vector_chunk, Values values);

  std::string spec() const override;
  Aggregation aggregation() const override { return Aggregation::kGathered; }
  at::ScalarType payload_dtype() const override { return at::kByte; }
  std::int64_t payload_bytes(c10::IntArrayRef shape) const override;
  void encode(const at::Tensor& x, std::uint8_t* out) override;
  void decode(const std::uint8_t* payload, std::int64_t bytes, at::Tensor& out) const override;
  double error_bound(const at::Tensor& x) const override;

 private:
  std::int64_t k_, chunk_, vector_chunk_;
  Values values_;
};

// Builds topk(k=64,chunk=64,vector_chunk=4096,values=fp32|fp16|2bit).
std::unique_ptr<Codec> make_topk_codec(CodecParams& params);

}  // namespace diloco
