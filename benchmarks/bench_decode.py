"""Decode speed against llama.cpp on the same weights (issue 13 item 3), side by side, interleaved.

One LLaMA-shaped model (models/llama.py, seeded random weights) is
- exported as a KV-cache step graph (models/kv_llama.py) and compiled by lpcompile (int4, int8) to
  TVM artifacts run by `lpcompile.runtime.generate`;
- written as a GGUF (the `gguf` package; q/k rows permuted as llama.cpp's own HF converter does,
  since llama.cpp rotates adjacent pairs and the model rotates halves) and quantized by llama.cpp's
  quantizer (`llama_model_quantize`: Q4_0, Q8_0), run by `llama-cpp-python`.
The F32 GGUF's greedy tokens are checked against the float torch model first (the same model).

Each engine lives in its own process (its peak memory is its own); rounds alternate between the
engines so that a load change on the machine hits all of them alike. Per engine: prefill tok/s
(prompt of --prompt tokens), decode tok/s (--new tokens, greedy), time to first token, peak RSS,
weight bytes read per decoded token (all weights but the embedding table) and that as a fraction
of the bandwidth limit (copy bandwidth / weight bytes per token; copy bandwidth measured here
with numpy, STREAM-style: bytes read + written).

    flock /tmp/lpcompile-bench.lock .venv/bin/python benchmarks/bench_decode.py [--size small|issue]

`--size issue` is the issue's 0.5 B model (hidden 2048, 8 layers, 16 heads, FFN 5632, vocab 32000);
`small` (default) halves the widths (hidden 1024, FFN 2816), same depth, heads and vocab.
Writes benchmarks/results/bench_decode_<size>.json. Needs `pip install -e .[llm-bench]`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
from lpcompile.runtime.cpu import cpu_name as _cpu

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    "issue": dict(vocab_size=32000, hidden=2048, intermediate=5632, n_layers=8, n_heads=16, n_kv_heads=16),
    "small": dict(vocab_size=32000, hidden=1024, intermediate=2816, n_layers=8, n_heads=16, n_kv_heads=16),
}
LLAMA_FTYPES = {"Q4_0": 2, "Q8_0": 7}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q4_0, _Q8_0


def _config(size: str, max_seq: int):
    from models.llama import LlamaConfig

    return LlamaConfig(**SIZES[size], max_seq=max_seq)


# --- building -------------------------------------------------------------------------------------

def write_gguf(model, config, path: Path) -> None:
    """The torch model's weights as an F32 llama GGUF, with a placeholder SentencePiece-style
    vocabulary (the benchmark feeds token ids; no text is tokenized)."""
    import gguf

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(config.max_seq)
    w.add_embedding_length(config.hidden)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.intermediate)
    w.add_rope_dimension_count(config.head_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_layer_norm_rms_eps(config.rms_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    tokens += [f"\u2581t{i}" for i in range(config.vocab_size - len(tokens))]
    types += [1] * (config.vocab_size - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def permute(weight, heads):  # halves -> adjacent pairs (llama.cpp's convert_hf_to_gguf does the same)
        out, inp = weight.shape
        return weight.reshape(heads, 2, out // heads // 2, inp).swapaxes(1, 2).reshape(out, inp)

    w.add_tensor("token_embd.weight", sd["embed_tokens.weight"])
    for i in range(config.n_layers):
        p = f"layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_norm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "attn.q_proj.weight"], config.n_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "attn.k_proj.weight"], config.n_kv_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attn_norm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_gguf(src: Path, dst: Path, ftype: int, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src.name} -> {dst.name}) returned {rc}")


def build(work: Path, size: str, max_seq: int, formats: list[str], threads: int) -> dict:
    """Everything the engines load, built once into `work` (kept: a rerun reuses it)."""
    import torch

    import lpcompile
    from models.kv_llama import calibration_batches, export_kv_step
    from models.llama import build_llama

    config = _config(size, max_seq)
    work.mkdir(parents=True, exist_ok=True)
    seconds = {}
    torch.manual_seed(0)
    if not (work / "f32.gguf").exists() or not (work / "step.onnx").exists():
        model = build_llama(config)
        t = time.perf_counter()
        write_gguf(model, config, work / "f32.gguf.tmp")
        os.replace(work / "f32.gguf.tmp", work / "f32.gguf")
        seconds["gguf_write"] = time.perf_counter() - t
        del model
        t = time.perf_counter()
        export_kv_step(config, work / "step.onnx")
        seconds["export"] = time.perf_counter() - t
    for fmt in formats:
        if not (work / fmt / "manifest.json").exists():
            t = time.perf_counter()
            cal = calibration_batches(config, samples=2, prompt=16, decode=1)
            lpcompile.compile(str(work / "step.onnx"), format=fmt, calibration=cal, emit=("onnx", "tvm")).save(work / fmt)
            seconds[f"lpcompile_{fmt}"] = time.perf_counter() - t
    for name, ftype in LLAMA_FTYPES.items():
        if not (work / f"{name}.gguf").exists():
            t = time.perf_counter()
            quantize_gguf(work / "f32.gguf", work / f"{name}.gguf", ftype, threads)
            seconds[f"llama_quantize_{name}"] = time.perf_counter() - t
    return {k: round(v, 1) for k, v in seconds.items()}


# --- engines (one process each) -------------------------------------------------------------------

def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _llama_worker(conn, path: str, threads: int, n_ctx: int):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                          logits_all=False, verbose=False)
    vocab = llm.n_vocab()

    def last_logits():  # without logits_all, 0.3.36 keeps no scores: llama.cpp's own buffer (the last token's row)
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

    while (msg := conn.recv()) is not None:
        prompt, new = msg
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tokens = [int(np.argmax(last_logits()))]
        t1 = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([tokens[-1]])
            tokens.append(int(np.argmax(last_logits())))
        t2 = time.perf_counter()
        conn.send({"prefill_tok_s": len(prompt) / (t1 - t0), "decode_tok_s": (new - 1) / (t2 - t1),
                   "time_to_first_token_ms": 1e3 * (t1 - t0), "tokens": tokens, "peak_rss_mb": _peak_rss_mb()})


def _lpcompile_worker(conn, path: str, threads: int):
    os.environ["TVM_NUM_THREADS"] = str(threads)
    from lpcompile import runtime
    from lpcompile.runtime.generate import Generator

    gen = Generator(runtime.load(path))
    while (msg := conn.recv()) is not None:
        prompt, new = msg
        tokens = list(gen.generate(prompt, new))
        s = gen.stats.summary()
        conn.send({"prefill_tok_s": s["prefill_tok_s"], "decode_tok_s": s["decode_tok_s"],
                   "time_to_first_token_ms": s["time_to_first_token_ms"], "tokens": tokens,
                   "cache_write_us_per_token": s["cache_write_us_per_token"],
                   "kv_cache_mb": gen.cache.nbytes / 2**20, "peak_rss_mb": _peak_rss_mb()})


def copy_bandwidth(mb: int = 512, repeat: int = 5) -> float:
    """bytes/s of a large numpy copy (read + write counted), best of `repeat`."""
    a = np.ones(mb << 18, np.float32)
    b = np.empty_like(a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(repeat))
    return 2 * a.nbytes / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes_per_token(engine: str, path: Path) -> int:
    """Bytes of every weight a decoded token reads (all but the embedding table: one row of it)."""
    if engine.startswith("llama.cpp"):
        import gguf

        return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors if t.name != "token_embd.weight")
    import tvm

    manifest = json.loads((path / "manifest.json").read_text())
    params = tvm.runtime.load_param_dict_from_file(str(path / manifest.get("params", "params.bin")))
    embed = [n for n in params if "embed" in n]
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for n, v in params.items() if n not in embed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default="int4,int8")
    ap.add_argument("--work", default=str(ROOT / "benchmarks/.work/bench_decode"),
                    help="where the GGUFs and artifacts are built (reused when present)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    formats = args.formats.split(",")
    work = Path(args.work) / args.size
    max_seq = args.prompt + args.new
    built = build(work, args.size, max_seq, formats, args.threads)
    config = _config(args.size, max_seq)
    prompt = np.random.default_rng(0).integers(3, config.vocab_size, args.prompt).tolist()

    ctx = mp.get_context("spawn")
    engines = {f"llama.cpp {q}": (work / f"{q}.gguf", _llama_worker, (args.threads, max_seq)) for q in LLAMA_FTYPES}
    engines.update({f"lpcompile {f}": (work / f, _lpcompile_worker, (args.threads,)) for f in formats})

    # the same model: llama.cpp's F32 greedy tokens against the float torch model's
    check = {}
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_llama_worker, args=(child, str(work / "f32.gguf"), args.threads, max_seq))
    proc.start()
    parent.send((prompt, 16))
    f32_tokens = parent.recv()["tokens"]
    parent.send(None)
    proc.join()
    from models.kv_llama import reference_generate

    torch_tokens = reference_generate(config, prompt, 16)
    check = {"llama_cpp_f32_tokens": f32_tokens, "torch_float_tokens": torch_tokens,
             "agree": sum(a == b for a, b in zip(f32_tokens, torch_tokens)) / 16}
    print("same model check:", check, flush=True)

    procs, pipes = {}, {}
    for name, (path, fn, extra) in engines.items():
        parent, child = ctx.Pipe()
        procs[name] = ctx.Process(target=fn, args=(child, str(path), *extra))
        procs[name].start()
        pipes[name] = parent
    runs = {name: [] for name in engines}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name in engines:
            pipes[name].send((prompt, args.new))
            res = pipes[name].recv()
            if r:
                runs[name].append(res)
            print(r, name, {k: v for k, v in res.items() if k != "tokens"}, flush=True)
    for name in engines:
        pipes[name].send(None)
        procs[name].join()

    bandwidth = copy_bandwidth()
    table = {}
    for name, (path, _, _) in engines.items():
        rs = runs[name]
        wb = weight_bytes_per_token(name, path)
        decode = float(np.median([x["decode_tok_s"] for x in rs]))
        table[name] = {
            "prefill_tok_s": float(np.median([x["prefill_tok_s"] for x in rs])),
            "decode_tok_s": decode,
            "time_to_first_token_ms": float(np.median([x["time_to_first_token_ms"] for x in rs])),
            "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
            "weight_bytes_per_token": wb,
            "bandwidth_limit_tok_s": bandwidth / wb,
            "fraction_of_bandwidth_limit": decode * wb / bandwidth,
            "decode_tok_s_runs": [x["decode_tok_s"] for x in rs],
            **({"cache_write_us_per_token": float(np.median([x["cache_write_us_per_token"] for x in rs]))}
               if "cache_write_us_per_token" in rs[0] else {}),
            "tokens": rs[-1]["tokens"][:16],
        }
    ratios = {}
    for fmt, q in (("int4", "Q4_0"), ("int8", "Q8_0")):
        a, b = table.get(f"lpcompile {fmt}"), table.get(f"llama.cpp {q}")
        if a and b:
            ratios[f"{fmt}/{q}"] = {k: a[k] / b[k] for k in ("decode_tok_s", "prefill_tok_s", "peak_rss_mb")}
    result = {
        "model": {"size": args.size, **SIZES[args.size], "params": _params(config)},
        "prompt_tokens": args.prompt, "new_tokens": args.new, "threads": args.threads, "rounds": args.rounds,
        "cpu": _cpu(), "load_average_1m": os.getloadavg()[0], "copy_bandwidth_gb_s": bandwidth / 1e9,
        "same_model_check": check, "build_seconds": built, "engines": table, "ratios": ratios,
    }
    out = Path(args.out or ROOT / f"benchmarks/results/bench_decode_{args.size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: {kk: round(vv, 3) if isinstance(vv, float) else vv for kk, vv in v.items() if kk != "tokens"}
                      for k, v in table.items()}, indent=1))
    print("ratios", json.dumps(ratios))
    return 0


def _params(config) -> int:
    d, f, v, L = config.hidden, config.intermediate, config.vocab_size, config.n_layers
    kv = config.n_kv_heads * config.head_dim
    return 2 * v * d + L * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + d




if __name__ == "__main__":
    raise SystemExit(main())
