// train_lm's model: a small GPT-style decoder-only transformer over bytes (vocab 256).
//
// Token + learned position embedding, pre-LayerNorm blocks of causal multi-head self-attention
// and a GELU MLP, a final LayerNorm and an untied output head. No dropout: the runs are short
// and the data is plentiful relative to the model.
//
// It is not a general transformer library: no KV cache, no generation, no mixed precision. The
// attention is written out (matmul + masked softmax) because LibTorch 1.13 has no fused kernel.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

namespace train_lm {

struct GptConfig {
  std::int64_t vocab_size = 256;  // byte-level
  std::int64_t d_model = 96;
  std::int64_t layers = 2;
  std::int64_t heads = 4;     // must divide d_model
  std::int64_t seq_len = 64;  // the longest context the position embedding covers
  // "gpt2": N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers); "default": the
  // modules' own (LibTorch's, as PyTorch's): embeddings N(0, 1), Linear kaiming-uniform.
  std::string init = "gpt2";
};

class CausalSelfAttentionImpl : public torch::nn::Module {
 public:
  CausalSelfAttentionImpl(std::int64_t d_model, std::int64_t heads, std::int64_t max_len);
  torch::Tensor forward(const torch::Tensor& x);  // [B, T, C] -> [B, T, C]

  torch::nn::Linear& out_projection() { return proj_; }

 private:
  std::int64_t heads_;
  torch::nn::Linear qkv_{nullptr};
  torch::nn::Linear proj_{nullptr};
  torch::Tensor future_;  // [max_len, max_len] bool, true where a query would see the future
};
TORCH_MODULE(CausalSelfAttention);

class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(std::int64_t d_model, std::int64_t heads, std::int64_t max_len);
  torch::Tensor forward(const torch::Tensor& x);

  // The two layers that write into the residual stream (their init is scaled down).
  std::vector<torch::nn::Linear> residual_projections();

 private:
  torch::nn::LayerNorm ln1_{nullptr};
  CausalSelfAttention attn_{nullptr};
  torch::nn::LayerNorm ln2_{nullptr};
  torch::nn::Linear fc_{nullptr};
  torch::nn::Linear proj_{nullptr};
};
TORCH_MODULE(Block);

class GptImpl : public torch::nn::Module {
 public:
  explicit GptImpl(const GptConfig& config);
  // tokens: [B, T] int64 with T <= seq_len; returns logits [B, T, vocab_size].
  torch::Tensor forward(const torch::Tensor& tokens);

  const GptConfig& config() const { return config_; }
  std::int64_t parameter_count() const;

 private:
  void init_weights();

  GptConfig config_;
  torch::nn::Embedding token_embedding_{nullptr};
  torch::nn::Embedding position_embedding_{nullptr};
  std::vector<Block> blocks_;
  torch::nn::LayerNorm ln_f_{nullptr};
  torch::nn::Linear head_{nullptr};
};
TORCH_MODULE(Gpt);

// Mean next-byte cross-entropy of `model` on a batch: inputs and targets are [B, T] int64.
torch::Tensor language_model_loss(Gpt& model, const torch::Tensor& inputs,
                                  const torch::Tensor& targets);

}  // namespace train_lm
