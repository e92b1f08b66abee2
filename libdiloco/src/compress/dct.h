// DCT + top-k compression (DeMo / DisTrO): keep the largest coefficients of an orthonormal DCT-II
// of every chunk. Only the transform is here; the chunking, selection and payload are top-k's
// (topk.h). Not DeMo's optimizer: its momentum buffer is this library's error feedback.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "compress/topk.h"
#include "diloco/compress/codec.h"
#include "diloco/compress/codec_params.h"

namespace diloco {

extern const char* const kDctHelp;

// DeMo (Peng, Quesnelle, Kingma, arXiv 2411.19870; reference code bloc97/DeMo): per chunk, an
// orthonormal DCT-II, keep the top-k coefficients by magnitude, send (indices, values),
// all-gather, and decode each island's payload by the inverse DCT of its sparse coefficients.
//
// Transform. Chunks are top-k's (topk.h) with chunk x chunk tiles for tensors of dim >= 2 and runs
// of `chunk` elements for the others. A tile X of h x w elements has coefficients
// Y = C_h X C_w^T, a run x of w elements y = C_w x (a 1 x w tile, C_1 = [1]), where
//   C_N[u][n] = sqrt(2/N) cos(pi (2n+1) u / (2N)), row u = 0 times 1/sqrt(2)
// is the orthonormal DCT-II basis of size N (edge tiles use the basis of their own size, so every
// chunk's transform is orthonormal and exactly invertible: X = C_h^T Y C_w). The transform is a
// batched at::matmul by the cached basis matrices; coefficient (u, v) of a tile sits at position
// u w + v.
//
// Payload: top-k's over the coefficients, values fp32 (K float32), or with sign=true one float32
// scale s_c = mean |kept coefficient| per chunk and K sign bits (1 = negative, 0 counts as
// positive), kept coefficients decoding to +-s_c. With C chunks, k_c = min(k, n_c),
// K = sum_c k_c, B = sum_c k_c ceil(log2 n_c):
//   payload_bytes = ceil(B/8) + 4K                     (sign=false)
//                 = ceil(B/8) + 4C + ceil(K/8)         (sign=true)
// 1024x1024 at the defaults (64x64 tiles, k=32): 12288 + 32768 = 45056 bytes (0.34 bits per
// parameter, 93x below fp32); sign=true: 12288 + 1024 + 1024 = 14336 bytes (0.11 bits, 293x).
//
// Decode throws diloco::Error for a malformed payload as top-k's does, and for coefficients whose
// inverse transform overflows float32. Encode throws for non-finite input.
//
// error_bound: the error of chunk c is C_h^T (Y - Y') C_w for the sent coefficients Y', and an
// orthonormal map cannot make any element larger than the vector's 2-norm, so
//   max over chunks of ( ||Y - Y'||_2 + 1e-5 ||X||_2 )
// where ||Y - Y'||_2^2 = sum of the dropped coefficients' squares (+ sum over kept ones of
// (|y| - s_c)^2 with sign=true) and the second term covers float32 rounding of the transforms.
class DctCodec : public Codec {
 public:
  DctCodec(std::int64_t chunk, std::int64_t k, bool sign);

  std::string spec() const override;
  Aggregation aggregation() const override { return Aggregation::kGathered; }
  at::ScalarType payload_dtype() const override { return at::kByte; }
  std::int64_t payload_bytes(c10::IntArrayRef shape) const override;
  void encode(const at::Tensor& x, std::uint8_t* out) override;
  void decode(const std::uint8_t* payload, std::int64_t bytes, at::Tensor& out) const override;
  double error_bound(const at::Tensor& x) const override;

  // The chunked DCT of x (forward) or its inverse, same shape as x, coefficients laid out in place
  // of their chunk's elements as described above. x: contiguous float32 on the CPU.
  at::Tensor transform(const at::Tensor& x, bool inverse) const;

 private:
  // The orthonormal DCT-II basis C_n, computed once per size in double and stored as float32.
  const at::Tensor& basis(std::int64_t n) const;

  std::int64_t chunk_, k_;
  bool sign_;
  SparseChunkCoder coder_;
  mutable std::mutex basis_mutex_;
  mutable std::map<std::int64_t, at::Tensor> basis_;
};

// The orthonormal DCT-II matrix of size n (float32, n x n), as defined above.
at::Tensor dct_basis(std::int64_t n);

// Builds dct(chunk=64,k=32,sign=false|true).
std::unique_ptr<Codec> make_dct_codec(CodecParams& params);

}  // namespace diloco
