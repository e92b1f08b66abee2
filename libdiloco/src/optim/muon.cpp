// Muon (see muon.h for the update and its terms).
#include "diloco/optim/muon.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <algorithm>
#include <cmath>

#include "diloco/errors.h"

namespace diloco {
namespace {

constexpr double kA = 3.4445, kB = -4.7750, kC = 2.0315;

void check_parameters(const std::vector<torch::optim::OptimizerParamGroup>& groups) {
  for (const auto& g : groups) {
    static_cast<const MuonOptions&>(g.options()).validate();
    for (const auto& p : g.params()) {
      if (p.dim() < 2) {
        throw OptionError("[Muon] a parameter of shape " + std::string(c10::str(p.sizes())) +
                          " has fewer than 2 dimensions; Muon takes matrices: give biases, "
                          "norms (and usually embeddings and the output head) to AdamW");
      }
    }
  }
}

}  // namespace

void MuonOptions::validate() const {
  if (!(lr() > 0.0)) throw OptionError("[Muon] lr must be > 0, got " + std::to_string(lr()));
  if (!(momentum() >= 0.0 && momentum() < 1.0)) {
    throw OptionError("[Muon] momentum must be in [0, 1), got " + std::to_string(momentum()));
  }
  if (!(weight_decay() >= 0.0)) {
    throw OptionError("[Muon] weight_decay must be >= 0, got " + std::to_string(weight_decay()));
  }
  if (ns_steps() < 1 || ns_steps() > 100) {
    throw OptionError("[Muon] ns_steps must be in [1, 100], got " + std::to_string(ns_steps()));
  }
  if (scale() != "spectral" && scale() != "match_adamw") {
    throw OptionError("[Muon] scale must be 'spectral' or 'match_adamw', got '" + scale() + "'");
  }
}

at::Tensor newton_schulz_orthogonalize(const at::Tensor& matrix, std::int64_t steps) {
  at::Tensor x = matrix.reshape({matrix.size(0), -1}).to(at::kFloat);
  const bool tall = x.size(0) > x.size(1);
  if (tall) x = x.t();
  x = x / (x.norm() + 1e-7);
  for (std::int64_t k = 0; k < steps; ++k) {
    const at::Tensor a = at::mm(x, x.t());
    const at::Tensor b = kB * a + kC * at::mm(a, a);
    x = kA * x + at::mm(b, x);
  }
  if (tall) x = x.t();
  return x.reshape(matrix.sizes());
}

Muon::Muon(std::vector<torch::optim::OptimizerParamGroup> param_groups, MuonOptions defaults)
    : Optimizer(std::move(param_groups), std::make_unique<MuonOptions>(defaults)) {
  check_parameters(param_groups_);
}

Muon::Muon(std::vector<at::Tensor> params, MuonOptions defaults)
    : Muon({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

at::Tensor Muon::step(LossClosure closure) {
  at::NoGradGuard no_grad;
  at::Tensor loss;
  if (closure) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  for (auto& group : param_groups_) {
    const auto& o = static_cast<const MuonOptions&>(group.options());
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      const at::Tensor& g = p.grad();
      auto& slot = state_[c10::guts::to_string(p.unsafeGetTensorImpl())];
      if (!slot) {
        auto s = std::make_unique<MuonParamState>();
        s->momentum_buffer(at::zeros_like(g, at::MemoryFormat::Preserve));
        slot = std::move(s);
      }
      muon_update(p, g, static_cast<MuonParamState&>(*slot).momentum_buffer(), o);
    }
  }
  return loss;
}

void muon_update(at::Tensor param, const at::Tensor& grad, at::Tensor buffer,
                 const MuonOptions& o) {
  at::NoGradGuard no_grad;
  buffer.mul_(o.momentum()).add_(grad);
  const at::Tensor u = o.nesterov() ? grad.add(buffer, o.momentum()) : buffer;
  const at::Tensor update = newton_schulz_orthogonalize(u, o.ns_steps());
  const double m = static_cast<double>(param.size(0));
  const double n = static_cast<double>(param.numel() / param.size(0));
  const double s = o.scale() == "spectral" ? std::sqrt(std::max(1.0, m / n))
                                           : 0.2 * std::sqrt(std::max(m, n));
  if (o.weight_decay() != 0.0) param.mul_(1.0 - o.lr() * o.weight_decay());
  param.add_(update.to(param.scalar_type()), -o.lr() * s);
}

void MuonParamState::serialize(torch::serialize::OutputArchive& archive) const {
  archive.write("momentum_buffer", momentum_buffer());
}

void MuonParamState::serialize(torch::serialize::InputArchive& archive) {
  at::Tensor buffer;
  archive.read("momentum_buffer", buffer);
  momentum_buffer(buffer);
}

void Muon::save(torch::serialize::OutputArchive& archive) const {
  std::int64_t k = 0;
  for (const auto& group : param_groups_) {
    for (const auto& p : group.params()) {
      auto it = state_.find(c10::guts::to_string(p.unsafeGetTensorImpl()));
      if (it != state_.end()) {
        archive.write("momentum_buffer." + std::to_string(k),
                      static_cast<const MuonParamState&>(*it->second).momentum_buffer());
      }
      ++k;
    }
  }
  archive.write("parameters", c10::IValue(k));
}

void Muon::load(torch::serialize::InputArchive& archive) {
  c10::IValue count;
  archive.read("parameters", count);
  std::int64_t k = 0;
  for (const auto& group : param_groups_) k += static_cast<std::int64_t>(group.params().size());
  if (count.toInt() != k) {
    throw Error("[Muon] the saved state is of " + std::to_string(count.toInt()) +
                " parameters, this optimizer has " + std::to_string(k));
  }
  k = 0;
  for (const auto& group : param_groups_) {
    for (const auto& p : group.params()) {
      at::Tensor buffer;
      if (archive.try_read("momentum_buffer." + std::to_string(k), buffer)) {
        auto s = std::make_unique<MuonParamState>();
        s->momentum_buffer(buffer.to(p.device()));
        state_[c10::guts::to_string(p.unsafeGetTensorImpl())] = std::move(s);
      }
      ++k;
    }
  }
}

}  // namespace diloco
