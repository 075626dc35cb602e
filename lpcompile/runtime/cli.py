"""`lpcompile run OUT_DIR --inputs x.npz [-o out.npz]` and `lpcompile bench OUT_DIR [--batch N]
[--seq L] [--warmup W] [--repeat R] [--json]`: run a compiled artifact without the compiler.

Bad input (no artifact, unreadable or mismatched inputs) exits with status 2 and one line on
stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
COMMANDS = ("run", "bench")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser(command: str) -> argparse.ArgumentParser:
    if command == "run":
        p = _Parser(prog="lpcompile run", description="Run a compiled artifact on inputs from an .npz file.")
        p.add_argument("artifact", help="output directory of `lpcompile MODEL ... --emit tvm`")
        p.add_argument("--inputs", required=True, help=".npz with one array per model input (by name)")
        p.add_argument("-o", "--output", help="write the outputs to this .npz")
    else:
        p = _Parser(prog="lpcompile bench", description="Latency percentiles and throughput of a compiled artifact.")
        p.add_argument("artifact", help="output directory of `lpcompile MODEL ... --emit tvm`")
        p.add_argument("--inputs", help=".npz inputs (default: random inputs of --batch x --seq)")
        p.add_argument("--batch", type=int, default=1, help="size of a symbolic first dim (default 1)")
        p.add_argument("--seq", type=int, default=128, help="size of other symbolic dims (default 128)")
        p.add_argument("--warmup", type=int, default=5)
        p.add_argument("--repeat", type=int, default=50)
        p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _load_npz(path: str) -> dict:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read inputs {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def main(argv: list[str]) -> int:
    """argv: [command, args...] with command in COMMANDS."""
    command, rest = argv[0], argv[1:]
    args = _parser(command).parse_args(rest)
    from lpcompile.runtime import load
    from lpcompile.runtime.tvm import ArtifactError

    try:
        if not Path(args.artifact).is_dir():
            raise ArtifactError(f"no such artifact directory: {args.artifact}")
        model = load(args.artifact)
        feeds = _load_npz(args.inputs) if args.inputs else None
        if command == "run":
            outputs = model.run(feeds)
            if args.output:
                import numpy as np

                np.savez(args.output, **outputs)
            for name, value in outputs.items():
                print(f"{name}: {value.dtype} {list(value.shape)}")
            return 0
        if args.batch < 1 or args.seq < 1 or args.repeat < 1 or args.warmup < 0:
            raise ArtifactError("--batch, --seq and --repeat must be positive, --warmup not negative")
        result = model.benchmark(feeds, warmup=args.warmup, repeat=args.repeat, batch=args.batch, seq=args.seq)
    except (ArtifactError, ValueError, KeyError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"lpcompile {command}: error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps(result))
    else:
        shapes = ", ".join(f"{k}{v}" for k, v in result["input_shapes"].items())
        print(f"{args.artifact}: {model.manifest.get('format')} on {model.manifest.get('target_kind')} ({shapes}): "
              f"p50 {result['p50_ms']:.3f} ms, p90 {result['p90_ms']:.3f} ms, p99 {result['p99_ms']:.3f} ms, "
              f"throughput {result['throughput_per_s']:.1f} samples/s over {result['repeat']} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
