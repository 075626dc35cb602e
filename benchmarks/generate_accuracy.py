"""Generation accuracy per recipe (issue 13 item 5): the LLaMA-shaped decoder's KV-cache step graph
(models/kv_llama.py) compiled for every recipe; over a 256-token greedy continuation of the float
model, each compiled artifact is fed the same tokens one at a time through its KV cache and its
next-token distribution is compared with the float model's: mean/max KL(float || quantized) per
token and top-1 agreement. The artifact's own greedy tokens are also checked against onnxruntime
running its QDQ graph token by token (first divergence, if any).

    .venv/bin/python benchmarks/generate_accuracy.py [--formats int4,w4a8,int8,fp8] [--new 256]

Writes benchmarks/results/generate_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import lpcompile  # noqa: E402
from lpcompile import runtime  # noqa: E402
from lpcompile.runtime.generate import Generator, KVCache, OrtStep, TvmStep  # noqa: E402
from models.kv_llama import calibration_batches, export_kv_step  # noqa: E402
from models.llama import LlamaConfig, build_llama  # noqa: E402


def forced_logits(step, tokens: list[int], prompt_len: int) -> np.ndarray:
    """Next-token logits after each of tokens[prompt_len - 1:-1], fed through the step's cache."""
    cache = KVCache(step.sig, len(tokens))
    out = []
    logits, present = step(np.array([tokens[:prompt_len]], np.int64), cache.views())
    cache.append(present)
    out.append(logits)
    for t in tokens[prompt_len:-1]:
        logits, present = step(np.array([[t]], np.int64), cache.views())
        cache.append(present)
        out.append(logits)
    return np.stack(out)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="int4,w4a8,int8,fp8")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/generate_accuracy.json"))
    args = ap.parse_args()
    config = LlamaConfig.tiny(max_seq=args.prompt + args.new)
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, config.vocab_size, args.prompt).tolist()
    model = build_llama(config)
    with torch.no_grad():  # the float continuation and its logits (full sequence, no cache)
        ids = list(prompt)
        for _ in range(args.new):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        ref = model(torch.tensor([ids]))[0, args.prompt - 1 : -1].numpy()
    ref_lp = log_softmax(ref)
    result = {"model": {"config": config.__dict__, "params": sum(p.numel() for p in model.parameters())},
              "prompt_tokens": args.prompt, "continuation_tokens": args.new, "cpu": platform.processor() or platform.machine(),
              "recipes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        step_onnx = export_kv_step(config, Path(tmp) / "step.onnx")
        cal = calibration_batches(config, samples=4)
        for fmt in args.formats.split(","):
            t0 = time.perf_counter()
            out = Path(tmp) / fmt
            lpcompile.compile(str(step_onnx), format=fmt, calibration=cal, emit=("onnx", "tvm")).save(out)
            build_s = time.perf_counter() - t0
            tvm_step = TvmStep(runtime.load(out))
            lp = log_softmax(forced_logits(tvm_step, ids, args.prompt))
            kl = (np.exp(ref_lp) * (ref_lp - lp)).sum(-1)
            top1 = float((lp.argmax(-1) == ref_lp.argmax(-1)).mean())
            # greedy from the artifact against onnxruntime on the same QDQ graph
            got = list(Generator(tvm_step).generate(prompt, args.new))
            want = list(Generator(OrtStep(out)).generate(prompt, args.new))
            diverge = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
            row = {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1_agreement": top1,
                   "greedy_equals_onnxruntime": got == want, "first_divergence_from_onnxruntime": diverge,
                   "build_s": round(build_s, 1)}
            result["recipes"][fmt] = row
            print(fmt, row, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    raise SystemExit(main())
