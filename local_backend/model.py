"""The transformer (Llama family: Llama, Mistral, Qwen2, Qwen3), reading top to bottom.

Tokens are packed: ``x`` is [total_tokens, hidden], and every token carries the KV
slot of its sequence and its position in it, so prefill tokens of new requests and
decode tokens of running ones share one forward pass.

Every reduction (matmul, RMSNorm, attention, log-softmax) and every transcendental
elementwise op (SiLU) goes through ``ops``; what is left is gathers, exact IEEE
adds/multiplies and a RoPE table computed once, so switching ``ops`` switches the
numerics of the whole forward pass. Module and parameter names follow Hugging Face
checkpoints, so weights load by name.
"""

from __future__ import annotations

import torch
from torch import nn

from local_backend.config import ModelConfig
from local_backend.kernels import Ops
from local_backend.kv_cache import KVCache


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class RotaryTable:
    """cos/sin for every position, computed once: a lookup is batch-invariant, while
    a cos() over a batch-shaped tensor may round its tail elements differently."""

    def __init__(self, config: ModelConfig, max_len: int, dtype: torch.dtype, device: torch.device | str):
        inv_freq = config.rope.inv_freq(config.head_dim)
        freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)  # [max_len, head_dim], halves layout
        self.cos = angles.cos().to(dtype=dtype, device=device)
        self.sin = angles.sin().to(dtype=dtype, device=device)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] rotated by each token's position."""
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        c = config
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, c.qkv_bias)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                cache: KVCache, rope: RotaryTable, ops: Ops) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = ops.linears(x, [(p.weight, p.bias) for p in (self.q_proj, self.k_proj, self.v_proj)])
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):  # Qwen3: normalise each head before RoPE
            q = self.q_norm(q.reshape(-1, self.head_dim), ops).view_as(q)
            k = self.k_norm(k.reshape(-1, self.head_dim), ops).view_as(k)
        q, k = rope.apply(q, positions), rope.apply(k, positions)
        # The cache holds each token's own K/V before attention reads it, in prefill
        # and decode alike, so both take the same path through the kernel.
        cache.write(self.layer, slots, positions, k, v)
        out = ops.attention(q, cache.k[self.layer], cache.v[self.layer], slots, positions,
                            self.head_dim ** -0.5)
        return self.o_proj(out.reshape(T, -1), ops)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        gate, up = ops.linears(x, [(self.gate_proj.weight, None), (self.up_proj.weight, None)])
        return self.down_proj(ops.silu_mul(gate, up), ops)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, slots, positions, cache, rope, ops):
        x = x + self.self_attn(self.input_layernorm(x, ops), slots, positions, cache, rope, ops)
        return x + self.mlp(self.post_attention_layernorm(x, ops), ops)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # An empty weight (no random init): the loader assigns the checkpoint's, and
        # nn.init under a meta device would import torch's compiler stack (about 1 s).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _freeze=True,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.rope: RotaryTable | None = None  # set by the engine once max_len is known

    def forward(self, token_ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                cache: KVCache, ops: Ops, decode_only: bool = False) -> torch.Tensor:
        """Packed tokens [T] -> final hidden states [T, hidden]; writes their K/V into ``cache``.
        ``decode_only``: each token is its sequence's only one in this pass (see pass_memo)."""
        from local_backend.kernels.pass_memo import one_plan_per_pass

        x = self.embed_tokens(token_ids)
        with one_plan_per_pass(decode_only):  # attention plans its tiles once, not once per layer
            for layer in self.layers:
                x = layer(x, slots, positions, cache, self.rope, ops)
        return self.norm(x, ops)

    def linear_layers(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight, bias) of every matmul of a pass, the logits' too (kernel warm-ups)."""
        layers = [(m.weight, m.bias) for m in self.modules() if isinstance(m, Linear)]
        if self.config.tie_word_embeddings:
            layers.append((self.embed_tokens.weight, None))
        return layers

    def logits(self, hidden: torch.Tensor, ops: Ops) -> torch.Tensor:
        """Hidden states [R, hidden] -> logits [R, vocab]: only the rows that are sampled."""
        weight = self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return ops.linear(hidden, weight)
