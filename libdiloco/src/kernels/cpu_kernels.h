// Fused single-pass CPU loops over flat float32 buffers, for the hot paths of an outer step.
//
// Each loop walks its buffers once in blocks that stay in L1 (Eigen array expressions per
// block), instead of a chain of ATen ops that each sweep memory. They are not a general tensor
// library: contiguous float32 only; callers fall back to ATen for anything else.
#pragma once

#include <cstdint>
#include <functional>

namespace diloco {
namespace kernels {

// local <- global - local (the pseudo-gradient, written over the model's storage).
// Returns true when every result is finite.
bool pseudo_gradient_inplace(float* local, const float* global, std::int64_t n);

// Index of the first NaN or infinity, or -1 when all are finite.
std::int64_t first_nonfinite(const float* x, std::int64_t n);

// The blocks the fused loops walk, in elements: 2048 floats per buffer, so that four buffers fit
// in a 32 KiB L1 data cache.
constexpr std::int64_t kBlock = 2048;

// Sees a block of a buffer just written (it is still in L1): the state hash of an outer step.
using BlockVisitor = std::function<void(const float* data, std::int64_t n)>;

// torch.optim.SGD's update with d = delta_sum * scale, then write_back <- global.
// write_back may alias delta_sum. A block of kBlock elements whose delta_sum holds a NaN or an
// infinity is not applied (global and momentum keep their values there); returns the index of the
// first such element, or -1. `visit`, when given, sees each block of the new global weights and
// then of the momentum (when mu != 0), block after block.
std::int64_t outer_sgd(float* global, float* momentum, const float* delta_sum, float* write_back,
                       std::int64_t n, float scale, float lr, float mu, bool nesterov,
                       const BlockVisitor* visit = nullptr);

}  // namespace kernels
}  // namespace diloco
