// Muon: momentum SGD whose update is orthogonalized by a Newton-Schulz iteration, as an inner
// optimizer for DiLoCo islands (MuLoCo, arXiv 2505.23725: Muon inside, Nesterov SGD outside).
//
// Terms (Jordan et al. 2024, "Muon: an optimizer for hidden layers"): for a weight matrix W
// (m x n; tensors of more dimensions are viewed as size(0) x rest) with gradient G,
//   B <- mu * B + G                              momentum buffer, starts at 0
//   U <- G + mu * B (nesterov)  or  B            the direction
//   O <- NS_k(U)                                 the nearest semi-orthogonal matrix, approximately:
//        X <- U / (||U||_F + 1e-7), transposed when m > n;
//        k times: A <- X X^T;  X <- a X + (b A + c A A) X,  (a, b, c) = (3.4445, -4.7750, 2.0315)
//   W <- W * (1 - lr * weight_decay)             decoupled weight decay
//   W <- W - lr * s * O                          s = sqrt(max(1, m / n)) ("spectral"), or
//                                                s = 0.2 * sqrt(max(m, n)) ("match_adamw": the
//                                                update's RMS matches AdamW's, so AdamW's lr and
//                                                weight decay carry over; Moonlight, 2502.16982)
// Muon is for matrices: vectors (biases, norms) and, by convention, embeddings and the output
// head go to AdamW. A parameter with fewer than 2 dimensions is refused with an OptionError.
// The iteration runs in float32 whatever the parameter's dtype.
#pragma once

#include <torch/optim/optimizer.h>

#include <cstdint>
#include <string>
#include <vector>

namespace diloco {

struct MuonOptions : public torch::optim::OptimizerCloneableOptions<MuonOptions> {
  explicit MuonOptions(double lr = 0.02) : lr_(lr) {}
  TORCH_ARG(double, lr);                       // > 0; Jordan et al.: 0.02 with "spectral"
  TORCH_ARG(double, momentum) = 0.95;          // [0, 1)
  TORCH_ARG(bool, nesterov) = true;
  TORCH_ARG(double, weight_decay) = 0.0;       // >= 0, decoupled
  TORCH_ARG(std::int64_t, ns_steps) = 5;       // Newton-Schulz iterations, [1, 100]
  TORCH_ARG(std::string, scale) = "spectral";  // "spectral" or "match_adamw"

 public:
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }
  // Throws diloco::OptionError naming the option and its range.
  void validate() const;
};

struct MuonParamState : public torch::optim::OptimizerCloneableParamState<MuonParamState> {
  TORCH_ARG(torch::Tensor, momentum_buffer);

 public:
  // One parameter's state on its own (diloco::optimizer_state_digest hashes it).
  void serialize(torch::serialize::OutputArchive& archive) const override;
  void serialize(torch::serialize::InputArchive& archive) override;
};

class Muon : public torch::optim::Optimizer {
 public:
  // Throws OptionError for bad options or a parameter with fewer than 2 dimensions.
  explicit Muon(std::vector<torch::optim::OptimizerParamGroup> param_groups,
                MuonOptions defaults = MuonOptions());
  explicit Muon(std::vector<at::Tensor> params, MuonOptions defaults = MuonOptions());

  at::Tensor step(LossClosure closure = nullptr) override;
  // The momentum buffers, by the parameters' order in the groups (checkpoints).
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
};

// One Muon update of `param` (and of its momentum buffer `buffer`, zeros at first) in place:
// Muon::step calls it for every parameter, and so does the Python optimizer diloco.Muon.
void muon_update(at::Tensor param, const at::Tensor& grad, at::Tensor buffer,
                 const MuonOptions& options);

// The Newton-Schulz orthogonalization above (float32, `steps` iterations), for tests and users.
at::Tensor newton_schulz_orthogonalize(const at::Tensor& matrix, std::int64_t steps = 5);

}  // namespace diloco
