"""train_lm.py's model: the same small GPT-style byte-level transformer as the C++ example
(examples/train_lm/model.cpp), layer for layer and name for name, so a Python island and a C++
island hold the same parameters ("blocks.0.attn.qkv.weight", ...) and can train together.

Token + learned position embedding, pre-LayerNorm blocks of causal multi-head self-attention and a
GELU MLP, a final LayerNorm and an untied output head; GPT-2's initialisation (init="gpt2") or
PyTorch's module defaults (init="default"), as the C++ model's --init. The forward pass is
written op for op as the C++ one (matmul + masked softmax attention). It is not a general
transformer library: no KV cache, no dropout, no generation.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


INITS = ("gpt2", "default")


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model, heads, max_len):
        super().__init__()
        if heads < 1 or d_model % heads != 0:
            raise ValueError("heads (%d) must divide d_model (%d)" % (heads, d_model))
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        # A buffer, not a parameter: never trained. Constant, so every island holds the same one
        # (DiLoCo keeps buffers consistent across islands anyway, as the C++ model's).
        self.register_buffer(
            "future", torch.ones(max_len, max_len, dtype=torch.bool).triu(diagonal=1),
            persistent=False)

    def forward(self, x):  # [B, T, C] -> [B, T, C]
        batch, time, channels = x.shape
        head_dim = channels // self.heads

        def split_heads(t):
            return t.view(batch, time, self.heads, head_dim).transpose(1, 2)  # [B, H, T, D]

        q, k, v = (split_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))
        mask = self.future[:time, :time]
        scores = scores.masked_fill(mask, float("-inf"))
        y = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, H, T, D]
        y = y.transpose(1, 2).contiguous().view(batch, time, channels)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, d_model, heads, max_len):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, max_len)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        h = x + self.attn(self.ln1(x))
        return h + self.proj(F.gelu(self.fc(self.ln2(h))))


class GPT(nn.Module):
    """tokens [B, T] int64 (T <= seq_len) -> logits [B, T, vocab_size]."""

    def __init__(self, vocab_size=256, d_model=96, layers=2, heads=4, seq_len=64, init="gpt2"):
        super().__init__()
        if init not in INITS:
            raise ValueError("init must be one of %s, not %r" % (", ".join(INITS), init))
        self.seq_len = seq_len
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, seq_len) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        # Untied from the token embedding: the synchronizers expect each parameter once.
        self.head = nn.Linear(d_model, vocab_size)
        # "default" keeps what the modules drew when built: embeddings N(0, 1), Linear
        # kaiming-uniform weights and uniform biases, LayerNorm gains 1 (LibTorch's are the same).
        if init == "gpt2":
            self._init_weights(layers)

    @torch.no_grad()
    def _init_weights(self, layers):
        # GPT-2: N(0, 0.02), the layers writing into the residual stream scaled by
        # 1/sqrt(2 * layers) so that the stream's variance does not grow with depth.
        std = 0.02
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
        for block in self.blocks:
            for projection in (block.attn.proj, block.proj):
                nn.init.normal_(projection.weight, 0.0, std / math.sqrt(2.0 * layers))

    def forward(self, tokens):
        time = tokens.size(1)
        if time > self.seq_len:
            raise ValueError("sequence of %d tokens is longer than seq_len %d"
                             % (time, self.seq_len))
        positions = torch.arange(time, dtype=torch.long, device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def language_model_loss(model, inputs, targets):
    """Mean next-byte cross-entropy; inputs and targets are [B, T] int64."""
    logits = model(inputs)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
