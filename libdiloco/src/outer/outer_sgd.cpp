// Outer SGD with (Nesterov) momentum (see outer_sgd.h).
#include "diloco/outer/outer_sgd.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <sstream>

#include "diloco/errors.h"
#include "kernels/cpu_kernels.h"

#ifdef DILOCO_WITH_CUDA_KERNELS
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/cuda_kernels.h"
#endif

namespace diloco {

void OuterSGDOptions::validate() const {
  if (!(lr > 0.0) || !std::isfinite(lr)) {
    std::ostringstream m;
    m << "[OuterSGD] outer lr must be a finite number > 0, got " << lr;
    throw OptionError(m.str());
  }
  if (!(momentum >= 0.0 && momentum < 1.0)) {
    std::ostringstream m;
    m << "[OuterSGD] outer momentum must be in [0, 1), got " << momentum;
    throw OptionError(m.str());
  }
}

OuterSGDOptions OuterSGDOptions::averaging() {
  OuterSGDOptions o;
  o.lr = 1.0;
  o.momentum = 0.0;
  o.nesterov = false;
  return o;
}

OuterSGD::OuterSGD(OuterSGDOptions options) : options_(options) { options_.validate(); }

at::Tensor OuterSGD::make_state(const at::Tensor& global) const {
  if (options_.momentum == 0.0) return at::Tensor();
  return at::zeros_like(global, global.options().dtype(at::kFloat));
}

namespace {
bool fusable(const at::Tensor& t) {
  return t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous();
}

#ifdef DILOCO_WITH_CUDA_KERNELS
// Contiguous float32 on the CUDA device `device`: the fused CUDA kernel (same math and same
// 2048-element skipping as the CPU loop, so both devices give bit-identical results).
bool cuda_fusable(const at::Tensor& t, const at::Device& device) {
  return t.defined() && t.device() == device && t.scalar_type() == at::kFloat && t.is_contiguous();
}
#endif
}  // namespace

std::int64_t OuterSGD::step(at::Tensor& global, at::Tensor& momentum, const at::Tensor& delta_sum,
                            double delta_scale, at::Tensor& write_back,
                            const BlockVisitor* visit) const {
  const std::int64_t bad = apply(global, momentum, delta_sum, delta_scale, write_back, visit);
  if (visit != nullptr && !fused_on_cpu(global, momentum, delta_sum, write_back)) {
    // The order of the fused loop's visits, from host copies.
    const at::Tensor g = global.to(at::kCPU, at::kFloat).contiguous();
    const bool with_momentum = options_.momentum != 0.0;
    const at::Tensor m =
        with_momentum ? momentum.to(at::kCPU, at::kFloat).contiguous() : at::Tensor();
    for (std::int64_t i = 0; i < g.numel(); i += kernels::kBlock) {
      const std::int64_t len = std::min(kernels::kBlock, g.numel() - i);
      (*visit)(g.data_ptr<float>() + i, len);
      if (with_momentum) (*visit)(m.data_ptr<float>() + i, len);
    }
  }
  return bad;
}

bool OuterSGD::fused_on_cpu(const at::Tensor& global, const at::Tensor& momentum,
                            const at::Tensor& delta_sum, const at::Tensor& write_back) const {
  return fusable(global) && fusable(delta_sum) && fusable(write_back) &&
         (options_.momentum == 0.0 || fusable(momentum));
}

std::int64_t OuterSGD::apply(at::Tensor& global, at::Tensor& momentum, const at::Tensor& delta_sum,
                             double delta_scale, at::Tensor& write_back,
                             const BlockVisitor* visit) const {
  const double mu = options_.momentum;
  const bool need_momentum = mu != 0.0;
  TORCH_CHECK(global.numel() == delta_sum.numel() && global.numel() == write_back.numel(),
              "[OuterSGD] buffer sizes differ: global ", global.numel(), ", delta ",
              delta_sum.numel(), ", write_back ", write_back.numel());
  if (fused_on_cpu(global, momentum, delta_sum, write_back)) {
    return kernels::outer_sgd(global.data_ptr<float>(), need_momentum ? momentum.data_ptr<float>() : nullptr,
                       delta_sum.data_ptr<float>(), write_back.data_ptr<float>(), global.numel(),
                       static_cast<float>(delta_scale), static_cast<float>(options_.lr),
                       static_cast<float>(mu), options_.nesterov, visit);
  }
#ifdef DILOCO_WITH_CUDA_KERNELS
  const at::Device device = global.device();
  if (device.is_cuda() && cuda_fusable(global, device) && cuda_fusable(delta_sum, device) &&
      cuda_fusable(write_back, device) && (!need_momentum || cuda_fusable(momentum, device))) {
    const c10::cuda::CUDAGuard guard(device);
    void* stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
    at::Tensor word = at::empty({1}, global.options().dtype(at::kLong));
    auto* first_bad = reinterpret_cast<std::uint64_t*>(word.data_ptr<std::int64_t>());
    kernels::cuda::outer_sgd_async(global.data_ptr<float>(),
                                   need_momentum ? momentum.data_ptr<float>() : nullptr,
                                   delta_sum.data_ptr<float>(), write_back.data_ptr<float>(),
                                   global.numel(), static_cast<float>(delta_scale),
                                   static_cast<float>(options_.lr), static_cast<float>(mu),
                                   options_.nesterov, first_bad, stream);
    const std::uint64_t bad = kernels::cuda::read_status(first_bad, stream);
    return bad == kernels::cuda::kNoReport ? -1 : static_cast<std::int64_t>(bad);
  }
#endif
  // Any device or dtype: the same update as a few ATen ops.
  if (!at::isfinite(delta_sum).all().item<bool>()) {
    const std::int64_t bad =
        at::logical_not(at::isfinite(delta_sum.reshape({-1}))).nonzero()[0][0].item<std::int64_t>();
    write_back.copy_(global);
    return bad;
  }
  at::Tensor d = delta_sum.to(global.options()).mul(delta_scale);
  if (!need_momentum) {
    global.sub_(d, options_.lr);
  } else {
    momentum.mul_(mu).add_(d);
    if (options_.nesterov) {
      global.sub_(d.add(momentum, mu), options_.lr);
    } else {
      global.sub_(momentum, options_.lr);
    }
  }
  write_back.copy_(global);
  return -1;
}

}  // namespace diloco
