"""A LLaMA-shaped decoder in plain torch (no `transformers` dependency).

Shape of the network (as in LLaMA 2/3): token embedding -> n_layers x [RMSNorm -> RoPE
self-attention with grouped-query heads and a causal mask -> residual add -> RMSNorm ->
SwiGLU MLP (gate, up, down) -> residual add] -> final RMSNorm -> lm_head.  The forward pass
runs over the full sequence (no KV cache) and returns logits [batch, seq, vocab_size].

Weights are drawn from a seeded generator (`LlamaConfig.seed`) at realistic scales: linear
weights ~ N(0, 1/fan_in) (the spread of trained LLaMA matrices), the attention output and MLP
down projections additionally divided by sqrt(2 * n_layers) (GPT-2 style residual scaling),
embeddings ~ N(0, 1), RMSNorm weights ~ 1 + N(0, 0.05).

Outlier channels
----------------
Trained LLMs have a handful of hidden channels whose activations in the residual stream are
20-100x larger than the rest ("LLM.int8()", "Massive activations in LLMs"); they are what makes
per-tensor activation quantization fail and what SmoothQuant / Hadamard rotation address.
With `outlier_channels = k > 0` and `outlier_scale = s`, the k fixed channels
`outlier_channel_indices(config)` are planted in the *residual stream*: their embedding columns
hold s * (2 + 0.6 * N(0, 1)) with a fixed sign per channel (massive activations behave like a
token-dependent bias; an ordinary channel is N(0, 1), whose max over a few hundred tokens is
~3), and the rows of every attention-output / down projection that write those channels are
multiplied by s (so what the layers add to them stays proportionally large and the outliers
persist through depth, as in real models).  Because RMSNorm divides every channel of a token by
the same scalar, the inputs of q/k/v, gate/up and lm_head inherit the per-channel ratio.
Measured on 256 random tokens with `with_outliers()` (k=4, s=50): max|x| of an outlier channel
over the median channel's max|x| is 35-57 in every such input of `tiny()` and `small()` (the
largest ordinary channel is < 2.1x the median); the inputs of o_proj/down_proj carry no
outliers.  The norm weights stay ordinary (1 + N(0, 0.05)), so folding them into the next
linear layer does *not* remove the outliers (they live in the residual stream, not in the norm
scales), and the linear weights stay flat (outlier columns are not shrunk), as SmoothQuant
observed for real LLMs.  Consequence of a small hidden size: the 4 outlier channels carry
96-99% of the energy of those linear inputs.

RMSNorm is written as ``x * rsqrt(mean(x^2) + eps) * weight``.  torch 2.13's dynamo ONNX exporter
at opset 21 emits it as primitive ops: Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul ->
Mul (ONNX's RMSNormalization exists only from opset 23; canonicalization must recognise the
primitive pattern).  Linear layers on 3-D activations export as MatMul (+ Add when biased; the
LLaMA linears here have no bias, so they are plain MatMul with a pre-transposed [in, out]
initializer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

__all__ = [
    "LlamaConfig",
    "RMSNorm",
    "Llama",
    "build_llama",
    "outlier_channel_indices",
    "linear_inputs",
]


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 512
    hidden: int = 256
    intermediate: int = 688
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    max_seq: int = 128
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    outlier_channels: int = 0
    outlier_scale: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.hidden % self.n_heads:
            raise ValueError(f"hidden={self.hidden} is not a multiple of n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if (self.hidden // self.n_heads) % 2:
            raise ValueError("head dim must be even for RoPE")
        if not 0 <= self.outlier_channels <= self.hidden:
            raise ValueError(f"outlier_channels={self.outlier_channels} out of range")
        if self.outlier_channels and self.outlier_scale <= 0:
            raise ValueError("outlier_channels > 0 needs outlier_scale > 0")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @classmethod
    def tiny(cls, **overrides) -> "LlamaConfig":
        """~1.6 M parameters: vocab 512, hidden 256, 2 layers, 4 heads (2 KV heads). For tests."""
        return replace(cls(), **overrides)

    @classmethod
    def small(cls, **overrides) -> "LlamaConfig":
        """~130 M parameters: vocab 8192, hidden 1024, intermediate 2816, 8 layers, 16 heads
        (4 KV heads). For benchmarks."""
        base = cls(
            vocab_size=8192,
            hidden=1024,
            intermediate=2816,
            n_layers=8,
            n_heads=16,
            n_kv_heads=4,
            max_seq=512,
        )
        return replace(base, **overrides)

    def with_outliers(self, channels: int = 4, scale: float = 50.0) -> "LlamaConfig":
        return replace(self, outlier_channels=channels, outlier_scale=scale)


def outlier_channel_indices(config: LlamaConfig) -> list[int]:
    """The fixed hidden channels that carry outliers (spread over the hidden dimension,
    deterministic, independent of the seed)."""
    k = config.outlier_channels
    if k == 0:
        return []
    # Spread, odd-looking positions (not multiples of a block size, so they do not all land on
    # the same column of a 32/64/128 block).
    step = config.hidden // k
    return [(i * step + 7 + 13 * i) % config.hidden for i in range(k)]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rope_tables(config: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    pos = torch.arange(config.max_seq, dtype=torch.float64)
    freqs = torch.outer(pos, inv_freq)  # [max_seq, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [max_seq, d]
    return emb.cos().float(), emb.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        h, kv = config.hidden, config.n_kv_heads * config.head_dim
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, kv, bias=False)
        self.v_proj = nn.Linear(h, kv, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x, cos, sin, mask):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:  # grouped-query attention: each KV head serves `rep` query heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim)) + mask
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden, config.intermediate, bias=False)
        self.up_proj = nn.Linear(config.hidden, config.intermediate, bias=False)
        self.down_proj = nn.Linear(config.intermediate, config.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_norm = RMSNorm(config.hidden, config.rms_eps)
        self.attn = Attention(config)
        self.post_attn_norm = RMSNorm(config.hidden, config.rms_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.input_norm(x), cos, sin, mask)
        return x + self.mlp(self.post_attn_norm(x))


class Llama(nn.Module):
    """input_ids [batch, seq] int64 (seq <= config.max_seq) -> logits [batch, seq, vocab] float32."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.hidden, config.rms_eps)
        self.lm_head = nn.Linear(config.hidden, config.vocab_size, bias=False)
        cos, sin = _rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        _init_weights(self, config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        cos = self.rope_cos[:s]
        sin = self.rope_sin[:s]
        pos = torch.arange(s, device=input_ids.device)
        mask = torch.where(
            pos[None, :] > pos[:, None],
            torch.tensor(float("-inf"), dtype=x.dtype),
            torch.tensor(0.0, dtype=x.dtype),
        )
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


@torch.no_grad()
def _init_weights(model: Llama, config: LlamaConfig) -> None:
    g = torch.Generator().manual_seed(config.seed)

    def normal_(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=g) * std)

    out_scale = 1.0 / math.sqrt(2 * config.n_layers)
    normal_(model.embed_tokens.weight, 1.0)
    for layer in model.layers:
        for name, lin in [
            ("q", layer.attn.q_proj),
            ("k", layer.attn.k_proj),
            ("v", layer.attn.v_proj),
            ("o", layer.attn.o_proj),
            ("gate", layer.mlp.gate_proj),
            ("up", layer.mlp.up_proj),
            ("down", layer.mlp.down_proj),
        ]:
            std = 1.0 / math.sqrt(lin.in_features)
            if name in ("o", "down"):
                std *= out_scale
            normal_(lin.weight, std)
        for norm in (layer.input_norm, layer.post_attn_norm):
            norm.weight.copy_(1.0 + 0.05 * torch.randn(config.hidden, generator=g))
    model.norm.weight.copy_(1.0 + 0.05 * torch.randn(config.hidden, generator=g))
    normal_(model.lm_head.weight, 1.0 / math.sqrt(config.hidden))

    idx = outlier_channel_indices(config)
    if idx:
        s = float(config.outlier_scale)
        # Fixed sign per channel (massive activations act like a bias), magnitude varying with
        # the token: s * (2 + 0.6 * N(0, 1)), i.e. about s times the typical max|x| (~2-3) of an
        # ordinary unit-variance channel.
        sign = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(len(idx))])
        mag = 2.0 + 0.6 * torch.randn(config.vocab_size, len(idx), generator=g)
        model.embed_tokens.weight[:, idx] = s * sign * mag
        for layer in model.layers:
            layer.attn.o_proj.weight[idx, :] *= s
            layer.mlp.down_proj.weight[idx, :] *= s


def build_llama(config: LlamaConfig | None = None) -> Llama:
    """A LLaMA-shaped decoder with seeded weights, in eval mode. Default: `LlamaConfig.tiny()`."""
    model = Llama(config if config is not None else LlamaConfig.tiny())
    return model.eval()


@torch.no_grad()
def linear_inputs(model: Llama, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run `model` on `input_ids` and return the input activation of every linear layer,
    flattened to [tokens, in_features], keyed by module name (e.g. "layers.0.attn.q_proj")."""
    found: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            def hook(m, args, _name=name):
                found[_name] = args[0].reshape(-1, args[0].shape[-1]).detach().clone()
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        model(input_ids)
    finally:
        for h in hooks:
            h.remove()
    return found
