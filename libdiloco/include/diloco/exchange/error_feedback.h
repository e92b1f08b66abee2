// Error feedback as a layer over any exchange (EF-SGD, Karimireddy et al. 2019):
//   p = delta + beta * e;   the inner exchange sends p;   e <- p - sent
// where `sent` is what this island's own contribution decodes to (the inner exchange subtracts
// it through ExchangeRequest::subtract_sent): for a codec its own payload decoded, for the
// requantizing ring the island's own quantize-dequantize (the ring's re-quantization of partial
// sums at later hops is not fed back), for PowerSGD P^ Q_i^T. One float32 residual per parameter
// (1x the parameters more memory), kept across outer steps and saved with the exchange's state.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "diloco/exchange/exchange.h"

namespace diloco {

class ErrorFeedback final : public Exchange {
 public:
  // beta in [0, 1] (OptionError otherwise).
  ErrorFeedback(std::unique_ptr<Exchange> inner, double beta);

  std::string spec() const override;
  PendingExchange start(Group& group, ExchangeRequest request, CommThread& comm) override;
  std::int64_t payload_bytes(const std::vector<at::Tensor>& views) const override {
    return inner_->payload_bytes(views);
  }
  const std::vector<at::Tensor>& residuals() const override { return residuals_; }
  void clear_residuals() override {
    residuals_.clear();  // zeros again at the next start()
    inner_->clear_residuals();
  }
  const Codec* codec() const override { return inner_->codec(); }
  bool sees_contributions() const override { return inner_->sees_contributions(); }
  const Exchange& inner() const { return *inner_; }
  double beta() const { return beta_; }
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

 private:
  std::unique_ptr<Exchange> inner_;
  double beta_;
  std::vector<at::Tensor> residuals_;
};

}  // namespace diloco
