// Error feedback over any exchange (see error_feedback.h).
#include "diloco/exchange/error_feedback.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include "diloco/errors.h"

namespace diloco {

ErrorFeedback::ErrorFeedback(std::unique_ptr<Exchange> inner, double beta)
    : inner_(std::move(inner)), beta_(beta) {
  if (!inner_) throw OptionError("[compression] error feedback needs an exchange to wrap");
  if (!(beta >= 0.0 && beta <= 1.0)) {
    throw OptionError("[compression] ef beta must be in [0, 1], got " + std::to_string(beta));
  }
}

std::string ErrorFeedback::spec() const {
  return inner_->spec() + "+ef(beta=" + std::to_string(beta_) + ")";
}

PendingExchange ErrorFeedback::start(Group& group, ExchangeRequest request, CommThread& comm) {
  at::NoGradGuard no_grad;
  if (request.produce) {
    request.produce(0, request.flat.numel());
    request.produce = nullptr;
  }
  if (residuals_.empty()) {
    for (const auto& v : request.views) residuals_.push_back(at::zeros_like(v));
  }
  if (residuals_.size() != request.views.size()) {
    throw Error("[compression] error feedback keeps one residual per tensor: " +
                std::to_string(residuals_.size()) + " tensors before, " +
                std::to_string(request.views.size()) + " now (pass the same tensors every time)");
  }
  for (std::size_t i = 0; i < request.views.size(); ++i) {
    at::Tensor v = request.views[i];
    v.add_(residuals_[i], beta_);  // p = delta + beta * e, in place
    residuals_[i].copy_(v);        // e <- p; the inner exchange subtracts what it sent
  }
  request.subtract_sent = residuals_;
  return inner_->start(group, std::move(request), comm);
}

void ErrorFeedback::save(torch::serialize::OutputArchive& archive) const {
  archive.write("spec", c10::IValue(spec()));
  archive.write("residuals", c10::IValue(static_cast<std::int64_t>(residuals_.size())));
  for (std::size_t i = 0; i < residuals_.size(); ++i) {
    archive.write("residual." + std::to_string(i), residuals_[i]);
  }
  torch::serialize::OutputArchive inner;
  inner_->save(inner);
  archive.write("inner", inner);
}

void ErrorFeedback::load(torch::serialize::InputArchive& archive) {
  check_saved_spec(archive);
  c10::IValue count;
  archive.read("residuals", count);
  std::vector<at::Tensor> residuals(static_cast<std::size_t>(count.toInt()));
  for (std::size_t i = 0; i < residuals.size(); ++i) {
    archive.read("residual." + std::to_string(i), residuals[i]);
    if (i < residuals_.size() && residuals_[i].sizes() != residuals[i].sizes()) {
      throw Error("[compression] error-feedback residual " + std::to_string(i) + " has shape " +
                  c10::str(residuals[i].sizes()) + " in the saved state, " +
                  c10::str(residuals_[i].sizes()) + " here");
    }
  }
  torch::serialize::InputArchive inner;
  archive.read("inner", inner);
  inner_->load(inner);
  residuals_ = std::move(residuals);
}

}  // namespace diloco
