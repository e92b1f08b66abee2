// Small pieces every CPU codec shares: the check that a tensor is contiguous float32 on the CPU,
// and a vectorizable max |x| over a block. Not a codec and not part of the public API.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <string>

namespace diloco {

// Throws diloco::Error("[codec 'NAME'] WHAT must be a contiguous float32 CPU tensor, got ...").
void check_cpu_float(const std::string& codec, const at::Tensor& t, const char* what);

// The same for a codec that also runs on CUDA tensors (blockwise int with CUDA kernels built):
// throws "... must be a contiguous float32 CPU or CUDA tensor, got ...".
void check_cpu_or_cuda_float(const std::string& codec, const at::Tensor& t, const char* what);

// max |x| of a block as the bits of a non-negative float: for those, integer order is float
// order, and inf/NaN compare above every finite value (>= 0x7f800000), so one integer max
// (which vectorizes, unlike a float max without -ffast-math) also says whether the block is finite.
std::int32_t abs_max_bits(const float* x, std::int64_t len);

}  // namespace diloco
