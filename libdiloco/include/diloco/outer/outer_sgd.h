// The outer optimizer of DiLoCo: SGD with optional (Nesterov) momentum on the global weights,
// fed the averaged pseudo-gradient as its gradient.
//
// Terms (DiLoCo, Douillard et al. 2023, arXiv 2311.08105, Alg. 1):
//   theta      the global weights, identical on every island after each outer step;
//   delta      the pseudo-gradient: theta - theta_local, averaged over the islands;
//   outer step theta <- OuterOpt(theta, delta).
//
// The update is torch.optim.SGD's (dampening 0, no weight decay), step for step:
//   b <- mu * b + delta                   (b starts at 0, so the first step gives b = delta)
//   g <- delta + mu * b   if nesterov,    g <- b   otherwise
//   theta <- theta - lr * g
// lr = 1 and mu = 0 is plain averaging of the islands' weights (FedAvg).
// State: one momentum buffer the size of the parameters (none when mu = 0).
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>

namespace diloco {

struct OuterSGDOptions {
  double lr = 0.7;        // DiLoCo Table 5 / §3: outer Nesterov lr 0.7
  double momentum = 0.9;  // DiLoCo: Nesterov momentum 0.9; range [0, 1)
  bool nesterov = true;

  // Throws OptionError naming the option and its allowed range.
  void validate() const;
  // Plain averaging of the islands' weights: lr 1, no momentum.
  static OuterSGDOptions averaging();
};

class OuterSGD {
 public:
  explicit OuterSGD(OuterSGDOptions options = {});

  const OuterSGDOptions& options() const { return options_; }

  // Allocates the momentum buffer like `global` (float32). Called once per parameter buffer.
  at::Tensor make_state(const at::Tensor& global) const;

  // One outer step over a flat float32 buffer, fused in one pass where all buffers are
  // contiguous float32 on the CPU (or on one CUDA device, when built with the CUDA kernels):
  //   delta  = delta_sum * delta_scale          (delta_scale = 1/N turns a sum into a mean)
  //   momentum, global updated as above
  //   write_back <- global (the model's own storage; it may alias delta_sum)
  // `momentum` is ignored when options().momentum == 0. `write_back` may have another dtype or
  // device than `global` (it is then converted).
  // Non-finite sums never reach the state: a block of delta_sum holding a NaN or an infinity is
  // skipped (the fused CPU and CUDA kernels skip 2048-element blocks, the ATen path the whole
  // call), and the index of the first such element is returned; -1 when all was applied.
  // `visit`, when given, is called with each 2048-element block of the new global weights, then
  // of the new momentum (when momentum != 0), block after block, in host memory: on the fused CPU
  // path while the block is still in cache, on the others from host copies afterwards, in the same
  // order.
  using BlockVisitor = std::function<void(const float* data, std::int64_t n)>;
  std::int64_t step(at::Tensor& global, at::Tensor& momentum, const at::Tensor& delta_sum,
                    double delta_scale, at::Tensor& write_back,
                    const BlockVisitor* visit = nullptr) const;

 private:
  bool fused_on_cpu(const at::Tensor& global, const at::Tensor& momentum,
                    const at::Tensor& delta_sum, const at::Tensor& write_back) const;
  std::int64_t apply(at::Tensor& global, at::Tensor& momentum, const at::Tensor& delta_sum,
                     double delta_scale, at::Tensor& write_back, const BlockVisitor* visit) const;
  OuterSGDOptions options_;
};

}  // namespace diloco
