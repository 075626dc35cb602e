"""A LLaMA-shaped decoder of any size, written straight to an ONNX file with external data.

Building a multi-GB model through torch (models/llama.py + torch.onnx.export) holds every weight
in memory at least twice; this writes the graph with `onnx.helper` and streams random weights
into the `.data` file one tensor at a time, so building it needs no more memory than its largest
tensor. Used by benchmarks/memory.py and tests/test_memory.py to show that compiling stays
bounded by the largest layer, not by the model.

The graph is a pre-norm decoder: token embedding (Gather), per layer RMSNorm (decomposed, as
torch exports it at opset 21) -> q/k/v projections -> multi-head softmax attention (no mask, no
RoPE: the shapes and the linear layers are what matter here) -> o projection -> residual,
RMSNorm -> SiLU-gated MLP (gate, up, down) -> residual; a final RMSNorm and the LM head.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 21
ALIGN = 4096


@dataclass(frozen=True)
class SyntheticLlama:
    hidden: int = 4096
    ffn: int = 11008
    layers: int = 9
    heads: int = 32
    vocab: int = 32000
    seed: int = 0

    @property
    def params(self) -> int:
        d, f = self.hidden, self.ffn
        return 2 * self.vocab * d + self.layers * (4 * d * d + 3 * d * f + 2 * d) + d

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.params

    @property
    def largest_tensor_bytes(self) -> int:
        return 4 * max(self.vocab * self.hidden, self.hidden * self.ffn, self.hidden * self.hidden)


def config_for_gb(gb: float, seed: int = 0) -> SyntheticLlama:
    """About `gb` GB (1e9 bytes) of fp32 weights: LLaMA-7B widths (4096 / 11008) from 3 GB up,
    narrower below (1024 / 2816), as many layers as fit (at least one)."""
    base = SyntheticLlama(seed=seed) if gb >= 3 else SyntheticLlama(hidden=1024, ffn=2816, heads=16, seed=seed)
    per_layer = SyntheticLlama(**{**asdict(base), "layers": 1}).fp32_bytes - SyntheticLlama(**{**asdict(base), "layers": 0}).fp32_bytes
    fixed = SyntheticLlama(**{**asdict(base), "layers": 0}).fp32_bytes
    layers = max(1, round((gb * 1e9 - fixed) / per_layer))
    return SyntheticLlama(**{**asdict(base), "layers": layers})


def describe(path: str | Path, cfg: SyntheticLlama) -> dict:
    return {"path": str(path), **asdict(cfg), "params": cfg.params, "fp32_gb": round(cfg.fp32_bytes / 1e9, 3),
            "largest_tensor_mb": round(cfg.largest_tensor_bytes / 2**20, 1)}


def write_synthetic_llama(path: str | Path, cfg: SyntheticLlama) -> dict:
    """Write the model to `path` and its weights to `path`.data; returns `describe(...)`."""
    path = Path(path)
    data_name = path.name + ".data"
    rng = np.random.default_rng(cfg.seed)
    d, f, h = cfg.hidden, cfg.ffn, cfg.heads
    nodes, inits = [], []
    counter = iter(range(1 << 30))

    def fresh(prefix: str) -> str:
        return f"{prefix}_{next(counter)}"

    def node(op, inputs, **attrs):
        out = fresh(op.lower())
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(name, array):
        inits.append(onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    with open(path.parent / data_name, "wb") as data:

        def weight(name, shape, std):
            """A random fp32 weight streamed to the data file, referenced as external data."""
            offset = -data.tell() % ALIGN
            data.write(b"\0" * offset)
            offset = data.tell()
            rows = shape[0]
            step = max(1, (64 << 20) // (4 * int(np.prod(shape[1:]))))
            for r in range(0, rows, step):  # in 64 MB slices: never more than that in memory
                chunk = rng.standard_normal((min(step, rows - r), *shape[1:]), dtype=np.float32)
                chunk *= std
                data.write(chunk.tobytes())
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(data.tell() - offset))):
                t.external_data.add(key=k, value=v)
            inits.append(t)
            return name

        axes = const("axes_last", np.array([-1], np.int64))
        eps = const("rms_eps", np.array(1e-5, np.float32))
        head_shape = const("head_shape", np.array([0, 0, h, d // h], np.int64))
        flat_shape = const("flat_shape", np.array([0, 0, d], np.int64))
        attn_scale = const("attn_scale", np.array(1.0 / np.sqrt(d // h), np.float32))

        def rmsnorm(x, name):
            gamma = const(name, (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32))
            sq = node("Mul", [x, x])
            mean = node("ReduceMean", [sq, axes], keepdims=1)
            inv = node("Reciprocal", [node("Sqrt", [node("Add", [mean, eps])])])
            return node("Mul", [node("Mul", [x, inv]), gamma])

        def linear(x, name, k, n):
            return node("MatMul", [x, weight(name, (k, n), 1.0 / np.sqrt(k))])

        x = node("Gather", [weight("embed_tokens", (cfg.vocab, d), 0.02), "input_ids"], axis=0)
        for i in range(cfg.layers):
            p = f"layers.{i}"
            hn = rmsnorm(x, f"{p}.input_layernorm")
            q = node("Transpose", [node("Reshape", [linear(hn, f"{p}.q_proj", d, d), head_shape])], perm=[0, 2, 1, 3])
            k = node("Transpose", [node("Reshape", [linear(hn, f"{p}.k_proj", d, d), head_shape])], perm=[0, 2, 3, 1])
            v = node("Transpose", [node("Reshape", [linear(hn, f"{p}.v_proj", d, d), head_shape])], perm=[0, 2, 1, 3])
            probs = node("Softmax", [node("Mul", [node("MatMul", [q, k]), attn_scale])], axis=-1)
            ctx = node("Reshape", [node("Transpose", [node("MatMul", [probs, v])], perm=[0, 2, 1, 3]), flat_shape])
            x = node("Add", [x, linear(ctx, f"{p}.o_proj", d, d)])
            hn = rmsnorm(x, f"{p}.post_attention_layernorm")
            gate = linear(hn, f"{p}.gate_proj", d, f)
            act = node("Mul", [node("Mul", [gate, node("Sigmoid", [gate])]), linear(hn, f"{p}.up_proj", d, f)])
            x = node("Add", [x, linear(act, f"{p}.down_proj", f, d)])
        logits = linear(rmsnorm(x, "norm"), "lm_head", d, cfg.vocab)
        nodes[-1].output[0] = "logits"

    graph = helper.make_graph(
        nodes, "synthetic_llama",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", cfg.vocab])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="models.synthetic_llama")
    model.ir_version = 10
    model.metadata_props.add(key="synthetic_llama", value=json.dumps(asdict(cfg)))
    onnx.save(model, str(path))
    return describe(path, cfg)
