// Fused CUDA kernels for the hot paths of an outer step, on raw device pointers: the outer
// (Nesterov) SGD update and the blockwise int8/int4/int2 codec with round-to-nearest-even.
//
// They compute exactly what the CPU paths compute (kernels/cpu_kernels.cpp and
// compress/blockwise_int.cpp): same float32 operations in the same order, no contraction into
// fused multiply-adds, so results and payloads are bit-identical to the CPU's. This header is
// plain C++ (no CUDA headers): streams are passed as `void*` holding a cudaStream_t. Built only
// when LibTorch has CUDA (libdiloco/CMakeLists.txt); callers guard their use with
// DILOCO_WITH_CUDA_KERNELS. Launchers are asynchronous on `stream` unless stated otherwise and
// throw diloco::Error when the CUDA runtime reports an error. Not a tensor library: contiguous
// float32 only.
#pragma once

#include <cstddef>
#include <cstdint>

namespace diloco {
namespace kernels {
namespace cuda {

// The value a status word holds when nothing was reported.
constexpr std::uint64_t kNoReport = ~std::uint64_t{0};

// torch.optim.SGD's update with d = delta_sum * scale, then write_back <- global, as
// kernels::outer_sgd on the CPU. write_back may alias delta_sum; momentum may be null when
// mu == 0. A block of 2048 elements (the CPU's kBlock) in which some d is NaN or infinite is not
// applied: global and momentum keep their values there and write_back receives global. The index
// of the first such d is atomically min-ed into the device word *first_bad, which the launcher
// first sets to kNoReport.
void outer_sgd_async(float* global, float* momentum, const float* delta_sum, float* write_back,
                     std::int64_t n, float scale, float lr, float mu, bool nesterov,
                     std::uint64_t* first_bad, void* stream);

// Bytes of a blockwise int payload (the format of compress/blockwise_int.h).
std::int64_t blockwise_int_payload_bytes(std::int64_t n, int bits, std::int64_t block);

// Encodes x[0..n) into the device buffer payload (blockwise_int_payload_bytes bytes) with
// round-to-nearest-even, one thread block per quantization block. bits is 8, 4 or 2; block a
// power of two in [32, 4096]. A block holding a NaN or an infinity gets no payload; the index of
// the first such element is min-ed into the device word *first_nonfinite (set to kNoReport first).
void blockwise_int_encode_async(const float* x, std::int64_t n, int bits, std::int64_t block,
                                std::uint8_t* payload, std::uint64_t* first_nonfinite,
                                void* stream);

// What decode found wrong with a block, in the order the CPU decoder checks.
enum class PayloadFault : std::uint64_t {
  kScaleNotFinite = 1,
  kScaleNegative = 2,
  kScaleOverflows = 3,  // qmax * scale is not finite
  kCodeOutOfRange = 4,  // a code of -qmax-1
  kPaddingNotZero = 5,
};

// Decodes a device payload into y[0..n). Each faulty block min-s (block << 3) | fault into the
// device word *first_fault (set to kNoReport first), so the word names the first faulty block and
// its first fault in the CPU's order; y is then unspecified.
void blockwise_int_decode_async(const std::uint8_t* payload, std::int64_t n, int bits,
                                std::int64_t block, float* y, std::uint64_t* first_fault,
                                void* stream);

// Copies between host and device memory in stream order (cudaMemcpyDefault).
void copy_async(void* dst, const void* src, std::size_t bytes, void* stream);

// Copies a device status word to the host and waits for the stream: synchronous.
std::uint64_t read_status(const std::uint64_t* word, void* stream);

}  // namespace cuda
}  // namespace kernels
}  // namespace diloco
