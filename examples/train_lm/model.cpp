// train_lm's transformer (see model.h). Not a reference implementation of GPT-2: sizes, init and
// layout follow it loosely, enough to train well for a few hundred steps on a CPU.
#include "model.h"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace train_lm {

CausalSelfAttentionImpl::CausalSelfAttentionImpl(std::int64_t d_model, std::int64_t heads,
                                                 std::int64_t max_len)
    : heads_(heads) {
  if (heads < 1 || d_model % heads != 0) {
    throw std::invalid_argument("heads (" + std::to_string(heads) + ") must divide d_model (" +
                                std::to_string(d_model) + ")");
  }
  qkv_ = register_module("qkv", torch::nn::Linear(d_model, 3 * d_model));
  proj_ = register_module("proj", torch::nn::Linear(d_model, d_model));
  // A buffer, not a parameter: it follows the module to its device but is never trained or
  // exchanged between islands.
  future_ =
      register_buffer("future", torch::ones({max_len, max_len}, torch::kBool).triu(/*diagonal=*/1));
}

torch::Tensor CausalSelfAttentionImpl::forward(const torch::Tensor& x) {
  const auto batch = x.size(0);
  const auto time = x.size(1);
  const auto channels = x.size(2);
  const auto head_dim = channels / heads_;

  auto split_heads = [&](const torch::Tensor& t) {
    return t.view({batch, time, heads_, head_dim}).transpose(1, 2);  // [B, H, T, D]
  };
  auto qkv = qkv_->forward(x).chunk(3, /*dim=*/-1);
  auto q = split_heads(qkv[0]);
  auto k = split_heads(qkv[1]);
  auto v = split_heads(qkv[2]);

  auto scores = torch::matmul(q, k.transpose(-2, -1)) * (1.0 / std::sqrt(double(head_dim)));
  auto mask = future_.slice(0, 0, time).slice(1, 0, time);
  scores = scores.masked_fill(mask, -std::numeric_limits<float>::infinity());
  auto y = torch::matmul(torch::softmax(scores, /*dim=*/-1), v);  // [B, H, T, D]
  y = y.transpose(1, 2).contiguous().view({batch, time, channels});
  return proj_->forward(y);
}

BlockImpl::BlockImpl(std::int64_t d_model, std::int64_t heads, std::int64_t max_len) {
  ln1_ = register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d_model})));
  attn_ = register_module("attn", CausalSelfAttention(d_model, heads, max_len));
  ln2_ = register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d_model})));
  fc_ = register_module("fc", torch::nn::Linear(d_model, 4 * d_model));
  proj_ = register_module("proj", torch::nn::Linear(4 * d_model, d_model));
}

torch::Tensor BlockImpl::forward(const torch::Tensor& x) {
  auto h = x + attn_->forward(ln1_->forward(x));
  return h + proj_->forward(torch::gelu(fc_->forward(ln2_->forward(h))));
}

std::vector<torch::nn::Linear> BlockImpl::residual_projections() {
  return {attn_->out_projection(), proj_};
}

GptImpl::GptImpl(const GptConfig& config) : config_(config) {
  token_embedding_ =
      register_module("token_embedding", torch::nn::Embedding(config.vocab_size, config.d_model));
  position_embedding_ =
      register_module("position_embedding", torch::nn::Embedding(config.seq_len, config.d_model));
  auto blocks = register_module("blocks", torch::nn::ModuleList());
  for (std::int64_t i = 0; i < config.layers; ++i) {
    blocks_.emplace_back(config.d_model, config.heads, config.seq_len);
    blocks->push_back(blocks_.back());
  }
  ln_f_ =
      register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({config.d_model})));
  // Untied from the token embedding: a shared tensor would appear under two names, and the
  // synchronizers expect each parameter once.
  head_ = register_module("head", torch::nn::Linear(config.d_model, config.vocab_size));
  if (config.init == "gpt2") {
    init_weights();
  } else if (config.init != "default") {
    throw std::invalid_argument("init must be gpt2 or default, not " + config.init);
  }
}

void GptImpl::init_weights() {
  // GPT-2's scheme: N(0, 0.02) everywhere, with the layers that add into the residual stream
  // scaled by 1/sqrt(2 * layers) so the stream's variance does not grow with depth.
  constexpr double kStd = 0.02;
  torch::NoGradGuard no_grad;
  for (auto& module : modules(/*include_self=*/false)) {
    if (auto* linear = module->as<torch::nn::Linear>()) {
      torch::nn::init::normal_(linear->weight, 0.0, kStd);
      if (linear->bias.defined()) torch::nn::init::zeros_(linear->bias);
    } else if (auto* embedding = module->as<torch::nn::Embedding>()) {
      torch::nn::init::normal_(embedding->weight, 0.0, kStd);
    }
  }
  const double residual_std = kStd / std::sqrt(2.0 * double(config_.layers));
  for (auto& block : blocks_) {
    for (auto& projection : block->residual_projections()) {
      torch::nn::init::normal_(projection->weight, 0.0, residual_std);
    }
  }
}

torch::Tensor GptImpl::forward(const torch::Tensor& tokens) {
  const auto time = tokens.size(1);
  TORCH_CHECK(time <= config_.seq_len, "sequence of ", time, " tokens is longer than seq_len ",
              config_.seq_len);
  auto positions =
      torch::arange(time, torch::TensorOptions().dtype(torch::kLong).device(tokens.device()));
  auto x = token_embedding_->forward(tokens) + position_embedding_->forward(positions);
  for (auto& block : blocks_) x = block->forward(x);
  return head_->forward(ln_f_->forward(x));
}

std::int64_t GptImpl::parameter_count() const {
  std::int64_t count = 0;
  for (const auto& p : parameters()) count += p.numel();
  return count;
}

torch::Tensor language_model_loss(Gpt& model, const torch::Tensor& inputs,
                                  const torch::Tensor& targets) {
  auto logits = model->forward(inputs);
  return torch::nn::functional::cross_entropy(logits.view({-1, logits.size(-1)}),
                                              targets.view({-1}));
}

}  // namespace train_lm
