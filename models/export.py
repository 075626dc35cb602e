"""Export the models of this package to ONNX, with calibration and evaluation inputs.

Python::

    export_onnx(module, example_inputs, path, dynamic_axes=None, opset=21,
                input_names=None, output_names=None) -> onnx_ir.Model

CLI::

    python -m models.export {llama-tiny,llama-small,mlp,cnn,minilm} OUT.onnx [--outliers]

writes OUT.onnx, OUT.calib.npz (calibration inputs) and OUT.eval.npz (held-out inputs): one
array per model input, named like the ONNX input, first axis = samples.  minilm: the
tokenized calibration / evaluation sentences of `models.sentences`, padded to `--seq` (64)
tokens (`input_ids`, `attention_mask`, int64); llama: seeded random token ids [n, `--seq`]
(`input_ids`); mlp / cnn: seeded N(0, 1) inputs (`x`).  Calibration and evaluation samples
come from different seeds / sentences.

What torch 2.13's dynamo exporter emits (opset 21, exporter's default optimization on;
checked on this stack):

- nn.Linear on a 2-D input: one ``Gemm`` (transB=1, weight [out, in]).  On a 3-D input:
  ``MatMul`` with the weight stored transposed [in, out] (no Transpose node), plus ``Add`` for
  the bias.  So both forms reach the passes; canonicalization must treat them as one.
- nn.LayerNorm: ``LayerNormalization`` (axis=-1) in one node.
- RMSNorm: no single op at opset 21 (ONNX ``RMSNormalization`` is opset 23).  The hand-written
  ``x * rsqrt(mean(x^2) + eps) * w`` of models.llama becomes Pow -> ReduceMean -> Add -> Sqrt ->
  Reciprocal -> Mul -> Mul; torch's own nn.RMSNorm gives the same chain with Mul(x, x) in
  place of Pow.  At opset 23 the exporter's optimizer fuses *both* into ``RMSNormalization``.
- nn.GELU: the ``Gelu`` op (opset 20+), attribute approximate="none" (or "tanh").
- SiLU: Sigmoid -> Mul.  torch.rsqrt: Sqrt -> Reciprocal.  F.normalize: ReduceL2 -> Clip -> Div
  (via Expand).  Attention (eager/explicit): MatMul, Softmax, MatMul.
- MiniLM (BERT, eager attention): 36 weight MatMul+Add linears, 13 LayerNormalization, 6 Gelu,
  6 Softmax, 12 activation x activation MatMuls; input_ids / attention_mask [batch, seq] int64
  -> embeddings [batch, 384].

Dynamic axes are given per input name, e.g. ``{"input_ids": {0: "batch", 1: "seq"}}`` (a list of
axes is accepted too; they are then named ``<input>_<axis>``); the names become the symbolic
dimension names in the ONNX graph.  Initializers are embedded in the .onnx file (external
data only for models over 1.5 GB).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

__all__ = ["export_onnx", "MODEL_NAMES", "build", "main"]

MODEL_NAMES = ("llama-tiny", "llama-small", "mlp", "cnn", "minilm")

_EXTERNAL_DATA_BYTES = int(1.5 * 2**30)


def _forward_arg_names(module: torch.nn.Module, n: int) -> list[str]:
    params = [
        p
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    names = [p.name for p in params[:n]]
    return names + [f"input_{i}" for i in range(len(names), n)]


def _dynamic_shapes(
    dynamic_axes: Mapping[str, Any] | None, names: Sequence[str], example_inputs: tuple
) -> tuple | None:
    if not dynamic_axes:
        return None
    unknown = set(dynamic_axes) - set(names)
    if unknown:
        raise ValueError(f"dynamic_axes names {sorted(unknown)} are not model inputs {list(names)}")
    shapes = []
    for name, x in zip(names, example_inputs):
        axes = dynamic_axes.get(name)
        if axes is None:
            shapes.append(None)
            continue
        if not isinstance(axes, Mapping):
            axes = {int(a): f"{name}_{int(a)}" for a in axes}
        rank = x.dim()
        dims = {}
        for axis, dim_name in axes.items():
            axis = int(axis)
            if not -rank <= axis < rank:
                raise ValueError(f"dynamic axis {axis} out of range for input {name!r} of rank {rank}")
            dims[axis % rank] = str(dim_name)
        shapes.append(dims)
    return tuple(shapes)


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints and known-harmless warnings."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_onnx(
    module: torch.nn.Module,
    example_inputs: tuple,
    path: str | os.PathLike,
    dynamic_axes: dict | None = None,
    opset: int = 21,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
):
    """Export `module` with torch.onnx.export(dynamo=True) and save it to `path`.

    example_inputs: tuple of tensors, positional arguments of `module.forward`.
    dynamic_axes: {input_name: {axis: dim_name}} (or {input_name: [axes]}); input names are
    `input_names` if given, else the names of forward's parameters.
    Returns the exported `onnx_ir.Model` (what was saved)."""
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    names = list(input_names) if input_names is not None else _forward_arg_names(module, len(example_inputs))
    if len(names) != len(example_inputs):
        raise ValueError(f"{len(names)} input names for {len(example_inputs)} example inputs")
    module = module.eval()
    with _quiet():
        program = torch.onnx.export(
            module,
            example_inputs,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=_dynamic_shapes(dynamic_axes, names, example_inputs),
            input_names=names,
            output_names=list(output_names) if output_names is not None else None,
            verbose=False,
        )
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise RuntimeError("torch.onnx.export returned no program")
    n_bytes = sum(
        p.numel() * p.element_size() for p in list(module.parameters()) + list(module.buffers())
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet():
        program.save(str(path), external_data=n_bytes > _EXTERNAL_DATA_BYTES)
    return program.model


# ---------------------------------------------------------------------------------------------
# CLI: model builders + calibration / evaluation data


def _normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def build(
    name: str,
    *,
    outliers: bool = False,
    seq: int | None = None,
    n_calib: int = 128,
    n_eval: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the CLI writes, before writing it: {"module", "example_inputs", "input_names",
    "output_names", "dynamic_axes", "calib": {name: array}, "eval": {name: array}}."""
    if outliers and not name.startswith("llama"):
        raise ValueError("--outliers applies to the llama models only")
    if name.startswith("llama"):
        from .llama import LlamaConfig, build_llama

        cfg = LlamaConfig.tiny() if name == "llama-tiny" else LlamaConfig.small()
        if outliers:
            cfg = cfg.with_outliers()
        seq = seq or 32
        if seq > cfg.max_seq:
            raise ValueError(f"--seq {seq} exceeds the model's max_seq {cfg.max_seq}")
        module = build_llama(cfg)
        rng_c = np.random.default_rng(seed + 1000)
        rng_e = np.random.default_rng(seed + 2000)
        return {
            "module": module,
            "example_inputs": (torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed)),),
            "input_names": ["input_ids"],
            "output_names": ["logits"],
            "dynamic_axes": {"input_ids": {0: "batch", 1: "seq"}},
            "calib": {"input_ids": rng_c.integers(0, cfg.vocab_size, (n_calib, seq), dtype=np.int64)},
            "eval": {"input_ids": rng_e.integers(0, cfg.vocab_size, (n_eval, seq), dtype=np.int64)},
        }
    if name in ("mlp", "cnn"):
        from .small import CNN_INPUT_SHAPE, MLP_INPUT_SHAPE, build_cnn, build_mlp

        module = build_mlp(seed) if name == "mlp" else build_cnn(seed)
        shape = MLP_INPUT_SHAPE if name == "mlp" else CNN_INPUT_SHAPE
        return {
            "module": module,
            "example_inputs": (torch.from_numpy(_normal(seed, (2, *shape))),),
            "input_names": ["x"],
            "output_names": ["y"],
            "dynamic_axes": {"x": {0: "batch"}},
            "calib": {"x": _normal(seed + 1000, (n_calib, *shape))},
            "eval": {"x": _normal(seed + 2000, (n_eval, *shape))},
        }
    if name == "minilm":
        from .minilm import load_minilm, tokenize
        from .sentences import calib_sentences, eval_sentences

        seq = seq or 64
        module, tokenizer = load_minilm()
        example = tokenize(tokenizer, ["An example sentence to trace the model.", "Short one."])
        return {
            "module": module,
            "example_inputs": (torch.from_numpy(example["input_ids"]), torch.from_numpy(example["attention_mask"])),
            "input_names": ["input_ids", "attention_mask"],
            "output_names": ["embeddings"],
            "dynamic_axes": {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
            "calib": tokenize(tokenizer, calib_sentences(), pad_to=seq),
            "eval": tokenize(tokenizer, eval_sentences(), pad_to=seq),
        }
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def write_length_buckets(tokens: dict[str, np.ndarray], directory: Path) -> int:
    """Token batches grouped by true length, unpadded, one .npz per length in `directory`.

    Padding rows are real rows to the model: calibrating on 64-token padded sentences of ~15
    tokens would make most statistics (ranges, XᵀX) describe padding. Returns the file count."""
    directory.mkdir(parents=True, exist_ok=True)
    lengths = tokens["attention_mask"].sum(axis=1)
    for length in sorted(set(lengths.tolist())):
        rows = lengths == length
        np.savez(directory / f"len{length:03d}.npz", **{k: v[rows][:, :length] for k, v in tokens.items()})
    return len(set(lengths.tolist()))


def _sidecar(path: Path, kind: str) -> Path:
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    return path.with_name(f"{stem}.{kind}.npz")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.export",
        description="Export a model of lpcompile's models/ package to ONNX, with OUT.calib.npz and OUT.eval.npz.",
    )
    parser.add_argument("model", choices=MODEL_NAMES)
    parser.add_argument("out", type=Path, help="output .onnx path")
    parser.add_argument("--outliers", action="store_true", help="llama only: plant outlier channels (4 channels, 50x)")
    parser.add_argument("--opset", type=int, default=21)
    parser.add_argument("--seq", type=int, default=None, help="tokens per sample in the npz files (llama 32, minilm 64)")
    parser.add_argument("--n-calib", type=int, default=128, help="calibration samples (minilm: all 222 sentences)")
    parser.add_argument("--n-eval", type=int, default=64, help="evaluation samples (minilm: all 224 sentences)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        spec = build(
            args.model, outliers=args.outliers, seq=args.seq, n_calib=args.n_calib, n_eval=args.n_eval, seed=args.seed
        )
        t1 = time.perf_counter()
        export_onnx(
            spec["module"],
            spec["example_inputs"],
            args.out,
            spec["dynamic_axes"],
            opset=args.opset,
            input_names=spec["input_names"],
            output_names=spec["output_names"],
        )
        t2 = time.perf_counter()
        calib_path, eval_path = _sidecar(args.out, "calib"), _sidecar(args.out, "eval")
        np.savez(calib_path, **spec["calib"])
        np.savez(eval_path, **spec["eval"])
        if "attention_mask" in spec["calib"]:
            buckets = write_length_buckets(spec["calib"], args.out.with_name(calib_path.name[: -len(".npz")]))
    except Exception as e:  # one-line reason, non-zero exit
        print(f"models.export: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in spec["calib"].items())
    print(f"wrote {args.out} (built in {t1 - t0:.1f} s, exported in {t2 - t1:.1f} s)")
    print(f"wrote {calib_path} ({shapes}) and {eval_path}")
    if "attention_mask" in spec["calib"]:
        print(f"wrote {calib_path.with_suffix('')}/ ({buckets} files of unpadded sentences grouped by length)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
