// PowerSGD (Vogels, Karimireddy & Jaggi, NeurIPS 2019, arXiv 1905.13727, Alg. 1 and 2): each
// matrix-shaped pseudo-gradient M (n x m, a tensor of shape [n, ...] seen as n rows) is sent as
// a rank-r product P Q^T, with one step of subspace iteration per outer step, warm-started from
// the previous outer step's Q.
//
// Per outer step, with error feedback (recommended: "powersgd(rank=4)+ef"):
//   M_i = delta_i + beta * e_i                     (island i)
//   P_i = M_i Q;            P = all-reduce sum P_i  (round 1)
//   P^ = orthonormalize(P)                         (Gram-Schmidt, the same on every rank)
//   Q_i = M_i^T P^;         Q = all-reduce sum Q_i  (round 2)
//   result = P^ Q^T = sum_i P^ P^^T M_i            (the sum over islands of what each sent)
//   e_i <- M_i - P^ Q_i^T                          (what island i's own contribution lost;
//                                                   the error_feedback.h layer keeps e_i)
//   Q is kept for the next outer step (warm start).
// Q starts from N(0, 1) entries drawn from a generator seeded with `seed` and the tensor's index,
// so every island starts from the same Q without exchanging it; a column that became zero (a
// zero pseudo-gradient) is drawn again the same way.
//
// Tensors with fewer than two dimensions, or for which r (n + m) >= n m, are not worth
// factoring: they travel uncompressed in round 1. Payload per island: 4 bytes x (sum over factored
// tensors of r (n + m) + elements of the others), in two all-reduces (P and vectors, then Q).
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "diloco/compress/codec_params.h"
#include "diloco/exchange/exchange.h"

namespace diloco {

class PowerSGD final : public Exchange {
 public:
  struct Options {
    std::int64_t rank = 4;    // r, in [1, 1024]
    std::uint64_t seed = 0;   // seed of the initial Q, the same on every island
    // Reads "powersgd(rank=R,seed=S)"; throws OptionError naming the parameter and its range.
    static Options from_params(CodecParams& params);
  };
  static constexpr const char* kHelp =
      "powersgd(rank=4, seed=0): rank-r factors P Q^T per matrix, warm-started power iteration, "
      "two all-reduces; vectors uncompressed (Vogels et al. 2019; use with +ef)";

  explicit PowerSGD(Options options);

  std::string spec() const override;
  // Both rounds run as one job on the communication thread.
  PendingExchange start(Group& group, ExchangeRequest request, CommThread& comm) override;
  std::int64_t payload_bytes(const std::vector<at::Tensor>& views) const override;
  // The warm-start factors and the outer-step count (which seeds redrawn columns).
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  // Whether a tensor of this shape is sent as factors (else uncompressed).
  bool factored(c10::IntArrayRef shape) const;
  // The warm-start factor Q of view i (m x r), undefined for unfactored views or before sum().
  const at::Tensor& q(std::size_t i) const { return q_.at(i); }

 private:
  void check_shapes(const std::vector<at::Tensor>& views);
  void run(Group& group, const ExchangeRequest& request) override;
  void redraw_zero_columns(std::size_t i);

  Options options_;
  std::int64_t outer_steps_ = 0;
  std::vector<std::vector<std::int64_t>> shapes_;  // of the views of the first exchange
  std::vector<at::Tensor> q_;
};

}  // namespace diloco
