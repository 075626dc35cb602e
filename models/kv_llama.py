"""The LLaMA-shaped decoder of models/llama.py as one KV-cache step graph, for generation.

One graph serves prefill and decode: it takes the new tokens and the keys/values of the tokens
already seen, and returns the next-token logits and the keys/values of the new tokens.

    inputs   input_ids [1, S] int64               S new tokens (the prompt, or one token)
             past_key_{i}, past_value_{i} [1, P, KV, D] float32 for each layer i (P >= 0 seen)
    outputs  logits [1, 1, vocab]                  for the last new token only
             present_key_{i}, present_value_{i} [1, S, KV, D]   the new tokens' keys/values

S and P are symbolic (`seq`, `past`); positions are P + arange(S), read from the shape of
`past_key_0` as exporters write it (Shape -> Gather -> Range), so the rotary tables are gathered
at the right positions. The cache layout is position-major ([1, P, KV, D]) so that the first P
positions of a preallocated [1, capacity, KV, D] buffer are one contiguous block: the runtime
(`lpcompile.runtime.generate`) hands that prefix to the graph without a copy and writes the
present keys/values into the buffer itself. Attention reads the past and the new keys separately
(scores of both are concatenated, never the cache), so the graph never copies the cache into a
larger tensor; grouped-query heads are served by viewing the queries as [KV, rep * S, D], never
by repeating the cache.

The weights are those of `models.llama.build_llama(config)`: the same seeded model as the
full-sequence graph, so a float reference, a GGUF copy (benchmarks/bench_decode.py) and the
compiled artifacts all hold one set of weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.llama import Llama, LlamaConfig, build_llama

__all__ = ["KVStep", "export_kv_step", "cache_names", "reference_generate", "float_step"]


def cache_names(n_layers: int) -> tuple[list[str], list[str]]:
    """(past input names, present output names), keys and values interleaved per layer."""
    past = [f"past_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]
    present = [f"present_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]
    return past, present


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class KVStep(nn.Module):
    """`Llama` weights, one step over new tokens with a key/value cache (see the module doc)."""

    def __init__(self, model: Llama):
        super().__init__()
        self.model = model
        c = model.config
        self.n_heads, self.n_kv, self.d = c.n_heads, c.n_kv_heads, c.head_dim

    def _attend(self, layer, x, cos, sin, past_k, past_v, mask):
        a = layer.attn
        s = x.shape[1]
        kv, rep, d = self.n_kv, self.n_heads // self.n_kv, self.d
        q = a.q_proj(x).view(1, s, self.n_heads, d)
        k = a.k_proj(x).view(1, s, kv, d)
        v = a.v_proj(x).view(1, s, kv, d)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # query head h = g * rep + r serves kv head g: [1, KV, rep * S, D]
        qg = q.view(1, s, kv, rep, d).permute(0, 2, 3, 1, 4).reshape(1, kv, rep * s, d)
        scale = 1.0 / math.sqrt(d)
        scores = torch.cat([torch.matmul(qg, past_k.permute(0, 2, 3, 1)),
                            torch.matmul(qg, k.permute(0, 2, 3, 1))], dim=-1) * scale
        p = past_k.shape[1]
        scores = scores.view(1, kv, rep, s, p + s) + mask
        probs = torch.softmax(scores, dim=-1).view(1, kv, rep * s, p + s)
        out = torch.matmul(probs[..., :p], past_v.permute(0, 2, 1, 3)) + torch.matmul(probs[..., p:p + s], v.permute(0, 2, 1, 3))
        out = out.view(1, kv, rep, s, d).permute(0, 3, 1, 2, 4).reshape(1, s, self.n_heads * d)
        return a.o_proj(out), k, v

    def forward(self, input_ids: torch.Tensor, past: tuple[torch.Tensor, ...]):
        m = self.model
        s = input_ids.shape[1]
        p = past[0].shape[1]
        pos = torch.arange(s, device=input_ids.device) + p
        cos = m.rope_cos[pos][None, :, None, :]
        sin = m.rope_sin[pos][None, :, None, :]
        keys = torch.arange(p + s, device=input_ids.device)
        mask = torch.where(keys[None, :] > pos[:, None], torch.tensor(float("-inf")), torch.tensor(0.0))
        x = m.embed_tokens(input_ids)
        presents = []
        for i, layer in enumerate(m.layers):
            h, k, v = self._attend(layer, layer.input_norm(x), cos, sin, past[2 * i], past[2 * i + 1], mask)
            x = x + h
            x = x + layer.mlp(layer.post_attn_norm(x))
            presents += [k, v]
        logits = m.lm_head(m.norm(x[:, s - 1:s, :]))  # closed slices: TVM cannot clamp an open end on a symbolic dim
        return (logits, *presents)


def _example(config: LlamaConfig, s: int = 3, p: int = 5):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, s), generator=g)
    past = tuple(torch.randn(1, p, config.n_kv_heads, config.head_dim, generator=g) for _ in range(2 * config.n_layers))
    return ids, past


def export_kv_step(config: LlamaConfig, path: str | Path) -> Path:
    """Write the KV-cache step graph of `build_llama(config)` to `path` (ONNX, opset 21, weights
    as external data beside it when large). `config.max_seq` is the largest context (P + S)."""
    path = Path(path)
    step = KVStep(build_llama(config)).eval()
    ids, past = _example(config)
    past_names, present_names = cache_names(config.n_layers)
    seq, ctx = torch.export.Dim("seq", min=1, max=config.max_seq), torch.export.Dim("past", min=0, max=config.max_seq)
    dynamic = ({1: seq}, tuple({1: ctx} for _ in past))
    with torch.no_grad():
        program = torch.onnx.export(step, (ids, past), dynamo=True, opset_version=21, dynamic_shapes=dynamic,
                                    input_names=["input_ids", *past_names], output_names=["logits", *present_names],
                                    verbose=False)
    program.save(str(path), external_data=config.hidden >= 1024)
    return path


@torch.no_grad()
def float_step(step: KVStep, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """One step of the float torch model (numpy in and out)."""
    out = step(torch.from_numpy(ids), tuple(torch.from_numpy(p) for p in past))
    return out[0].numpy(), [o.numpy() for o in out[1:]]


@torch.no_grad()
def reference_generate(config: LlamaConfig, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens of the float full-sequence model (no cache): the KV-cache graph's oracle."""
    model = build_llama(config)
    ids = list(prompt)
    for _ in range(new_tokens):
        logits = model(torch.tensor([ids]))[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@torch.no_grad()
def calibration_batches(config: LlamaConfig, samples: int = 4, prompt: int = 8, decode: int = 2, seed: int = 0) -> list[dict]:
    """Inputs of the step graph as generation feeds them, from the float model: for each of
    `samples` random prompts, the prefill (P = 0) and `decode` single-token steps after it (past
    keys/values as the model itself wrote them)."""
    step = KVStep(build_llama(config)).eval()
    rng = np.random.default_rng(seed)
    past_names, _ = cache_names(config.n_layers)
    batches = []
    for _ in range(samples):
        ids = rng.integers(0, config.vocab_size, (1, prompt)).astype(np.int64)
        past = [np.zeros((1, 0, config.n_kv_heads, config.head_dim), np.float32) for _ in past_names]
        for _ in range(1 + decode):
            batches.append({"input_ids": ids, **dict(zip(past_names, past))})
            logits, present = float_step(step, ids, past)
            past = [np.concatenate([a, b], axis=1) for a, b in zip(past, present)]
            ids = np.array([[int(logits[0, -1].argmax())]], np.int64)
    return batches
