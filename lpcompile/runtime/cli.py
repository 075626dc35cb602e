"""`lpcompile run OUT_DIR --inputs x.npz [-o out.npz]` and `lpcompile bench OUT_DIR [--batch N]
[--seq L] [--warmup W] [--repeat R] [--json] [--profile [--profile-out FILE.json]]`: run a compiled
artifact without the compiler; `--profile` breaks a run down per op type and per kernel
(`runtime.profile`), as a table (JSON with --json, or written to a new FILE.json).

Bad input (no artifact, a corrupted one or one this CPU cannot run, unreadable or mismatched
inputs, an -o that cannot be written) exits with status 2 and one line on stderr, before anything
is written; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

EXIT_BAD_INPUT = 2
COMMANDS = ("run", "bench", "generate")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser(command: str) -> argparse.ArgumentParser:
    if command == "run":
        p = _Parser(prog="lpcompile run", description="Run a compiled artifact on inputs from an .npz file.")
        p.add_argument("artifact", help="output directory of `lpcompile MODEL ... --emit tvm`")
        p.add_argument("--inputs", required=True, help=".npz with one array per model input (by name)")
        p.add_argument("-o", "--output", help="write the outputs to this .npz")
    elif command == "generate":
        p = _Parser(prog="lpcompile generate", description="Generate token ids from a KV-cache step artifact.")
        p.add_argument("artifact", help="output directory of `lpcompile STEP.onnx ... --emit tvm` (models/kv_llama.py)")
        p.add_argument("--prompt-ids", required=True, help="comma-separated prompt token ids, e.g. 1,2,3")
        p.add_argument("--max-new-tokens", type=int, default=32)
        p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
        p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--onnxruntime", action="store_true", help="run the artifact's model.qdq.onnx in onnxruntime "
                       "(the reference) instead of the compiled library")
    else:
        p = _Parser(prog="lpcompile bench", description="Latency percentiles and throughput of a compiled artifact.")
        p.add_argument("artifact", help="output directory of `lpcompile MODEL ... --emit tvm`")
        p.add_argument("--inputs", help=".npz inputs (default: random inputs of --batch x --seq)")
        p.add_argument("--batch", type=int, default=1, help="size of a symbolic first dim (default 1)")
        p.add_argument("--seq", type=int, default=128, help="size of other symbolic dims (default 128)")
        p.add_argument("--warmup", type=int, default=5)
        p.add_argument("--repeat", type=int, default=50)
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        p.add_argument("--profile", action="store_true", help="time each kernel and op type (Relax VM instrument)")
        p.add_argument("--profile-out", metavar="FILE.json", help="with --profile: also write the profile here (a new file)")
        p.add_argument("--decode", action="store_true", help="a KV-cache step artifact: prefill and decode tok/s, "
                       "time to first token, peak memory (greedy over random prompt ids)")
        p.add_argument("--prompt-len", type=int, default=128, help="with --decode: prompt tokens (default 128)")
        p.add_argument("--new-tokens", type=int, default=64, help="with --decode: generated tokens (default 64)")
    return p


def _load_npz(path: str) -> dict:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read inputs {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _output_path(name: str) -> Path:
    """Where `run -o NAME` writes (numpy's rule: .npz appended when missing), checked now."""
    from lpcompile.runtime.tvm import ArtifactError

    path = Path(name if name.endswith(".npz") else name + ".npz")
    parent = path.parent
    if not parent.is_dir():
        raise ArtifactError(f"cannot write outputs to {path}: {parent} is not a directory")
    if path.is_dir():
        raise ArtifactError(f"cannot write outputs to {path}: it is a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot write outputs to {path}: {parent} is not writable")
    return path


def _new_json_path(name: str) -> Path:
    """Where --profile-out writes: a new file in a writable directory (nothing is overwritten)."""
    from lpcompile.runtime.tvm import ArtifactError

    path = Path(name)
    if path.exists():
        raise ArtifactError(f"--profile-out {path}: already exists (give a new file name)")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"--profile-out {path}: {path.parent} is not a writable directory")
    return path


def _write_new(path: Path, text: str) -> None:
    """Create `path` (refusing one that appeared meanwhile) and write `text` to it."""
    from lpcompile.runtime.tvm import ArtifactError

    try:
        with open(path, "x") as f:
            f.write(text)
    except OSError as e:
        raise ArtifactError(f"cannot write {path}: {e.strerror or type(e).__name__}") from None


def _save_npz(path: Path, arrays: dict) -> None:
    """Written beside `path` and renamed onto it: a failure leaves no partial file."""
    import numpy as np

    from lpcompile.runtime.tvm import ArtifactError

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        os.unlink(tmp)
        raise ArtifactError(f"cannot write outputs to {path}: {e.strerror or type(e).__name__}") from None
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def main(argv: list[str]) -> int:
    """argv: [command, args...] with command in COMMANDS."""
    command, rest = argv[0], argv[1:]
    args = _parser(command).parse_args(rest)
    from lpcompile.extras import MissingExtra, require

    try:  # artifacts run on TVM's runtime: one line naming the extra, before anything is read
        if not (command == "generate" and args.onnxruntime):
            require("tvm", "timing a compiled artifact" if command == "bench" else "running a compiled artifact")
    except MissingExtra as e:
        print(f"lpcompile {command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from lpcompile.runtime import load
    from lpcompile.runtime.tvm import ArtifactError

    try:
        if not Path(args.artifact).is_dir():
            raise ArtifactError(f"no such artifact directory: {args.artifact}")
        if command == "generate" or getattr(args, "decode", False):
            return _generate(command, args)
        output = _output_path(args.output) if command == "run" and args.output else None  # refused before running
        if command == "bench" and args.profile_out and not args.profile:
            raise ArtifactError("--profile-out needs --profile")
        profile_out = _new_json_path(args.profile_out) if command == "bench" and args.profile_out else None
        model = load(args.artifact)
        feeds = _load_npz(args.inputs) if args.inputs else None
        if command == "run":
            outputs = model.run(feeds)
            if output:
                _save_npz(output, outputs)
            for name, value in outputs.items():
                print(f"{name}: {value.dtype} {list(value.shape)}")
            return 0
        if args.batch < 1 or args.seq < 1 or args.repeat < 1 or args.warmup < 0:
            raise ArtifactError("--batch, --seq and --repeat must be positive, --warmup not negative")
        if args.profile:
            from lpcompile.runtime.profile import render

            result = model.profile(feeds, repeat=args.repeat, batch=args.batch, seq=args.seq)
            result = {"artifact": str(args.artifact), "format": model.manifest.get("format"),
                      "target": model.manifest.get("target"), "cpu": (model.manifest.get("cpu_features") or {}).get("cpu"),
                      **result}
            if profile_out:
                _write_new(profile_out, json.dumps(result, indent=2) + "\n")
            print(json.dumps(result) if args.json else render(result))
            return 0
        result = model.benchmark(feeds, warmup=args.warmup, repeat=args.repeat, batch=args.batch, seq=args.seq)
    except (ArtifactError, ValueError, KeyError, RuntimeError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"lpcompile {command}: error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"lpcompile {command}: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result))
    else:
        shapes = ", ".join(f"{k}{v}" for k, v in result["input_shapes"].items())
        print(f"{args.artifact}: {model.manifest.get('format')} on {model.manifest.get('target_kind')} ({shapes}): "
              f"p50 {result['p50_ms']:.3f} ms, p90 {result['p90_ms']:.3f} ms, p99 {result['p99_ms']:.3f} ms, "
              f"throughput {result['throughput_per_s']:.1f} samples/s over {result['repeat']} runs")
    return 0


def _generate(command: str, args) -> int:
    """`generate` (token ids streamed to stdout, one line) and `bench --decode`."""
    from lpcompile.runtime.generate import Generator, OrtStep, bench_decode, parse_token_ids

    if command == "generate":
        prompt = parse_token_ids(args.prompt_ids)
        if args.max_new_tokens < 1 or args.temperature < 0 or (args.top_k is not None and args.top_k < 1):
            raise ValueError("--max-new-tokens and --top-k must be positive, --temperature not negative")
        if args.onnxruntime:
            step = OrtStep(args.artifact)
        else:
            from lpcompile.runtime import load

            step = load(args.artifact)
        gen = Generator(step)
        vocab = _vocab(gen)
        if vocab and max(prompt) >= vocab:
            raise ValueError(f"--prompt-ids: token id {max(prompt)} is outside the vocabulary of {vocab}")
        for i, token in enumerate(gen.generate(prompt, args.max_new_tokens, temperature=args.temperature,
                                               top_k=args.top_k, seed=args.seed)):
            print(("," if i else "") + str(token), end="", flush=True)
        print()
        s = gen.stats.summary()
        print(f"{s['prompt_tokens']} prompt tokens, {s['generated_tokens']} generated: time to first token "
              f"{s['time_to_first_token_ms']:.1f} ms, decode {s['decode_tok_s'] or 0:.1f} tok/s", file=sys.stderr)
        return 0
    if args.prompt_len < 1 or args.new_tokens < 2 or args.repeat < 1:
        raise ValueError("--prompt-len must be positive, --new-tokens at least 2, --repeat positive")
    from lpcompile.runtime import load

    result = bench_decode(load(args.artifact), args.prompt_len, args.new_tokens, repeat=min(args.repeat, 3))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.artifact}: prompt {args.prompt_len}, {args.new_tokens} new tokens: prefill {result['prefill_tok_s']:.1f} "
              f"tok/s, decode {result['decode_tok_s']:.1f} tok/s, time to first token {result['time_to_first_token_ms']:.1f} ms, "
              f"peak memory {result['peak_rss_mb']:.0f} MB (KV cache {result['kv_cache_mb']:.1f} MB)")
    return 0


def _vocab(gen) -> int | None:
    manifest = getattr(getattr(gen.step, "model", None), "manifest", None)
    if manifest:
        shape = next((o["shape"] for o in manifest["outputs"] if o["name"] == gen.sig.logits), None)
        return shape[-1] if shape and isinstance(shape[-1], int) else None
    out = next((o for o in gen.step.session.get_outputs() if o.name == gen.sig.logits), None)
    return out.shape[-1] if out is not None and isinstance(out.shape[-1], int) else None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
