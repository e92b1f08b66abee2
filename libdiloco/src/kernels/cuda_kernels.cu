// Fused CUDA kernels (see cuda_kernels.h).
//
// Bit-identity with the CPU rests on three things: every float operation is an explicitly
// rounded intrinsic (__fmul_rn, __fadd_rn, __fsub_rn, __fdiv_rn), which nvcc never contracts into
// a fused multiply-add, in the CPU's order; subnormals are kept (the codec's smallest scale is
// 2^-149), so CMake compiles this file with -ftz=false (after any user flags, so that
// --use_fast_math cannot turn it on); and ties round to even (rintf, like the CPU's 1.5 * 2^23
// trick for |t| <= 127).
#include <cuda_runtime_api.h>

#include <string>

#include "diloco/errors.h"
#include "kernels/cuda_kernels.h"

namespace diloco {
namespace kernels {
namespace cuda {
namespace {

// Elements per outer-SGD block, as kBlock in cpu_kernels.cpp: non-finite sums skip whole blocks
// of this size, so both devices skip the same elements.
constexpr int kOuterBlock = 2048;
constexpr int kOuterThreads = 256;
constexpr int kOuterPerThread = kOuterBlock / kOuterThreads;
constexpr int kCodecThreads = 256;
constexpr int kExpMask = 0x7f800000;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw Error(std::string("[cuda_kernels] ") + what + ": " + cudaGetErrorName(e) + ": " +
                cudaGetErrorString(e));
  }
}

cudaStream_t as_stream(void* stream) {
  return static_cast<cudaStream_t>(stream);
}

void reset_word(std::uint64_t* word, void* stream) {
  check(cudaMemsetAsync(word, 0xff, sizeof(std::uint64_t), as_stream(stream)), "reset status word");
}

__device__ void report_min(std::uint64_t* word, std::uint64_t v) {
  atomicMin(reinterpret_cast<unsigned long long*>(word), static_cast<unsigned long long>(v));
}

// The CPU's outer step over one 2048-element block per thread block. Each thread keeps its
// elements of d in registers between the finiteness vote and the update, so write_back may
// alias delta_sum: no element is written before the whole block has been read.
__global__ void outer_sgd_kernel(float* global, float* momentum, const float* delta_sum,
                                 float* write_back, std::int64_t n, float scale, float lr, float mu,
                                 bool nesterov, std::uint64_t* first_bad) {
  __shared__ int bad_at;  // first non-finite offset in this block, kOuterBlock when none
  const std::int64_t start = static_cast<std::int64_t>(blockIdx.x) * kOuterBlock;
  const int len = static_cast<int>(n - start < kOuterBlock ? n - start : kOuterBlock);
  if (threadIdx.x == 0) bad_at = kOuterBlock;
  __syncthreads();
  float d[kOuterPerThread];
  int my_bad = kOuterBlock;
#pragma unroll
  for (int k = 0; k < kOuterPerThread; ++k) {
    const int i = static_cast<int>(threadIdx.x) + k * kOuterThreads;
    d[k] = i < len ? __fmul_rn(delta_sum[start + i], scale) : 0.f;
    if (i < len && !isfinite(d[k]) && my_bad == kOuterBlock) my_bad = i;
  }
  if (my_bad < kOuterBlock) atomicMin(&bad_at, my_bad);
  __syncthreads();
  if (bad_at < kOuterBlock) {  // not finite: keep this block's state, restore the model
    if (threadIdx.x == 0) report_min(first_bad, static_cast<std::uint64_t>(start + bad_at));
#pragma unroll
    for (int k = 0; k < kOuterPerThread; ++k) {
      const int i = static_cast<int>(threadIdx.x) + k * kOuterThreads;
      if (i < len) write_back[start + i] = global[start + i];
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < kOuterPerThread; ++k) {
    const int i = static_cast<int>(threadIdx.x) + k * kOuterThreads;
    if (i >= len) continue;
    const std::int64_t e = start + i;
    float g = global[e];
    if (mu == 0.f) {
      g = __fsub_rn(g, __fmul_rn(lr, d[k]));
    } else {
      const float m = __fadd_rn(__fmul_rn(momentum[e], mu), d[k]);  // buf.mul_(mu).add_(grad)
      momentum[e] = m;
      if (nesterov) {
        g = __fsub_rn(g, __fmul_rn(lr, __fadd_rn(d[k], __fmul_rn(m, mu))));
      } else {
        g = __fsub_rn(g, __fmul_rn(lr, m));
      }
    }
    global[e] = g;
    write_back[e] = g;
  }
}

// Max of v over the thread block (blockDim.x a multiple of 32, at most 1024); a barrier.
__device__ int block_max(int v) {
  __shared__ int warp_max[32];
  __shared__ int result;
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = static_cast<int>(threadIdx.x) / 32;
  if (threadIdx.x % 32 == 0) warp_max[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    int m = warp_max[0];
    for (int w = 1; w < static_cast<int>(blockDim.x) / 32; ++w) m = max(m, warp_max[w]);
    result = m;
  }
  __syncthreads();
  return result;
}

// The CPU's block_scale(): max|x| / qmax, the smallest subnormal if that underflows, one ulp
// lower if qmax s would overflow.
__device__ float block_scale(float amax, float qmax) {
  float s = __fdiv_rn(amax, qmax);
  if (s == 0.f && amax > 0.f) s = __int_as_float(1);
  if (!isfinite(__fmul_rn(s, qmax))) s = nextafterf(s, 0.f);
  return s;
}

// The CPU's quantize_nearest() for one element of a finite block with s > 0.
__device__ int quantize_nearest(float x, float s, float qmax) {
  float t = __fdiv_rn(x, s);
  t = t > -qmax ? t : -qmax;
  t = t < qmax ? t : qmax;
  return static_cast<int>(rintf(t));
}

__device__ std::int64_t full_block_bytes(std::int64_t block, int bits) {
  return 4 + block * bits / 8;
}

// One thread block per quantization block: the block is read once into shared memory while its
// max |x| is taken (as the bits of a non-negative float, like abs_max_bits() on the CPU), then
// each thread writes whole payload bytes, packing 8 / bits codes little-endian.
__global__ void blockwise_int_encode_kernel(const float* x, std::int64_t n, int bits, int block,
                                            std::uint8_t* payload, std::uint64_t* first_nonfinite) {
  extern __shared__ float xs[];
  const std::int64_t start = static_cast<std::int64_t>(blockIdx.x) * block;
  const int len = static_cast<int>(n - start < block ? n - start : block);
  int m = 0;
  for (int i = static_cast<int>(threadIdx.x); i < len; i += static_cast<int>(blockDim.x)) {
    const float v = x[start + i];
    xs[i] = v;
    m = max(m, __float_as_int(v) & 0x7fffffff);
  }
  m = block_max(m);
  if (m >= kExpMask) {  // NaN or infinity: report the first, write nothing
    for (int i = static_cast<int>(threadIdx.x); i < len; i += static_cast<int>(blockDim.x)) {
      if (!isfinite(xs[i])) {
        report_min(first_nonfinite, static_cast<std::uint64_t>(start + i));
        break;  // later elements of this thread have larger indices
      }
    }
    return;
  }
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  const float s = block_scale(__int_as_float(m), qmax);
  std::uint8_t* out =
      payload + static_cast<std::int64_t>(blockIdx.x) * full_block_bytes(block, bits);
  if (threadIdx.x < 4) {
    out[threadIdx.x] =
        static_cast<std::uint8_t>(static_cast<unsigned>(__float_as_int(s)) >> (8 * threadIdx.x));
  }
  const int per_byte = 8 / bits;
  const int code_bytes = (len * bits + 7) / 8;
  const unsigned mask = (1u << bits) - 1u;
  for (int b = static_cast<int>(threadIdx.x); b < code_bytes; b += static_cast<int>(blockDim.x)) {
    unsigned byte = 0;
    for (int k = 0; k < per_byte; ++k) {
      const int i = b * per_byte + k;
      // Padding codes past the end of a partial block, and every code of an all-zero block, are 0.
      const int q = (i < len && s != 0.f) ? quantize_nearest(xs[i], s, qmax) : 0;
      byte |= (static_cast<unsigned>(q) & mask) << (k * bits);
    }
    out[4 + b] = static_cast<std::uint8_t>(byte);
  }
}

// The CPU decoder's checks and q * s for one block per thread block.
__global__ void blockwise_int_decode_kernel(const std::uint8_t* payload, std::int64_t n, int bits,
                                            int block, float* y, std::uint64_t* first_fault) {
  const std::int64_t j = blockIdx.x;
  const std::int64_t start = j * block;
  const int len = static_cast<int>(n - start < block ? n - start : block);
  const std::uint8_t* in = payload + j * full_block_bytes(block, bits);
  const unsigned scale_bits = static_cast<unsigned>(in[0]) | (static_cast<unsigned>(in[1]) << 8) |
                              (static_cast<unsigned>(in[2]) << 16) |
                              (static_cast<unsigned>(in[3]) << 24);
  const float s = __uint_as_float(scale_bits);
  const int qmax = (1 << (bits - 1)) - 1;
  PayloadFault fault{};
  if (!isfinite(s)) {
    fault = PayloadFault::kScaleNotFinite;
  } else if (signbit(s)) {
    fault = PayloadFault::kScaleNegative;
  } else if (!isfinite(__fmul_rn(s, static_cast<float>(qmax)))) {
    fault = PayloadFault::kScaleOverflows;
  }
  if (fault != PayloadFault{}) {
    if (threadIdx.x == 0)
      report_min(first_fault,
                 (static_cast<std::uint64_t>(j) << 3) | static_cast<std::uint64_t>(fault));
    return;
  }
  const int per_byte = 8 / bits;
  const int code_bytes = (len * bits + 7) / 8;
  const int tail_bits = (len * bits) % 8;
  bool bad_code = false;
  bool bad_padding = false;
  for (int b = static_cast<int>(threadIdx.x); b < code_bytes; b += static_cast<int>(blockDim.x)) {
    const unsigned byte = in[4 + b];
    for (int k = 0; k < per_byte; ++k) {
      const int i = b * per_byte + k;
      if (i >= len) break;
      // Sign extension: the field moved to the top of a 32-bit int, shifted back arithmetically.
      const int q = static_cast<int>(byte << (32 - bits * (k + 1))) >> (32 - bits);
      bad_code |= q == -qmax - 1;
      y[start + i] = __fmul_rn(static_cast<float>(q), s);
    }
    if (b == code_bytes - 1 && tail_bits != 0 && (byte >> tail_bits) != 0) bad_padding = true;
  }
  if (bad_code) {
    report_min(first_fault, (static_cast<std::uint64_t>(j) << 3) |
                                static_cast<std::uint64_t>(PayloadFault::kCodeOutOfRange));
  }
  if (bad_padding) {
    report_min(first_fault, (static_cast<std::uint64_t>(j) << 3) |
                                static_cast<std::uint64_t>(PayloadFault::kPaddingNotZero));
  }
}

void check_codec_args(int bits, std::int64_t block) {
  if ((bits != 8 && bits != 4 && bits != 2) || block < 32 || block > 4096 ||
      (block & (block - 1)) != 0) {
    throw Error("[cuda_kernels] blockwise int codec: bits " + std::to_string(bits) + ", block " +
                std::to_string(block) +
                " (expected bits 8, 4 or 2 and block a power of two in [32, 4096])");
  }
}

unsigned grid_size(std::int64_t n, std::int64_t per_block, const char* what) {
  const std::int64_t blocks = (n + per_block - 1) / per_block;
  if (blocks > 0x7fffffff) {
    throw Error(std::string("[cuda_kernels] ") + what + ": " + std::to_string(n) +
                " elements need more than 2^31 - 1 thread blocks");
  }
  return static_cast<unsigned>(blocks);
}

}  // namespace

void outer_sgd_async(float* global, float* momentum, const float* delta_sum, float* write_back,
                     std::int64_t n, float scale, float lr, float mu, bool nesterov,
                     std::uint64_t* first_bad, void* stream) {
  reset_word(first_bad, stream);
  if (n <= 0) return;
  const unsigned grid = grid_size(n, kOuterBlock, "outer_sgd");
  outer_sgd_kernel<<<grid, kOuterThreads, 0, as_stream(stream)>>>(
      global, momentum, delta_sum, write_back, n, scale, lr, mu, nesterov, first_bad);
  check(cudaGetLastError(), "outer_sgd launch");
}

std::int64_t blockwise_int_payload_bytes(std::int64_t n, int bits, std::int64_t block) {
  const std::int64_t rem = n % block;
  return (n / block) * (4 + block * bits / 8) + (rem ? 4 + (rem * bits + 7) / 8 : 0);
}

void blockwise_int_encode_async(const float* x, std::int64_t n, int bits, std::int64_t block,
                                std::uint8_t* payload, std::uint64_t* first_nonfinite,
                                void* stream) {
  check_codec_args(bits, block);
  reset_word(first_nonfinite, stream);
  if (n <= 0) return;
  const unsigned grid = grid_size(n, block, "blockwise int encode");
  const int threads = block < kCodecThreads ? static_cast<int>(block) : kCodecThreads;
  const std::size_t shared = static_cast<std::size_t>(block) * sizeof(float);  // at most 16 KiB
  blockwise_int_encode_kernel<<<grid, threads, shared, as_stream(stream)>>>(
      x, n, bits, static_cast<int>(block), payload, first_nonfinite);
  check(cudaGetLastError(), "blockwise int encode launch");
}

void blockwise_int_decode_async(const std::uint8_t* payload, std::int64_t n, int bits,
                                std::int64_t block, float* y, std::uint64_t* first_fault,
                                void* stream) {
  check_codec_args(bits, block);
  reset_word(first_fault, stream);
  if (n <= 0) return;
  const unsigned grid = grid_size(n, block, "blockwise int decode");
  const std::int64_t code_bytes = block * bits / 8;  // at least 8
  const int threads =
      code_bytes < kCodecThreads ? static_cast<int>((code_bytes + 31) / 32 * 32) : kCodecThreads;
  blockwise_int_decode_kernel<<<grid, threads, 0, as_stream(stream)>>>(
      payload, n, bits, static_cast<int>(block), y, first_fault);
  check(cudaGetLastError(), "blockwise int decode launch");
}

void copy_async(void* dst, const void* src, std::size_t bytes, void* stream) {
  if (bytes == 0) return;
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, as_stream(stream)), "copy");
}

std::uint64_t read_status(const std::uint64_t* word, void* stream) {
  std::uint64_t v = kNoReport;
  check(cudaMemcpyAsync(&v, word, sizeof(v), cudaMemcpyDeviceToHost, as_stream(stream)),
        "read status word");
  check(cudaStreamSynchronize(as_stream(stream)), "synchronize");
  return v;
}

}  // namespace cuda
}  // namespace kernels
}  // namespace diloco
