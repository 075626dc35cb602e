"""`lpcompile MODEL --target T --format F [-o OUT_DIR] [--calibration SRC] [--exclude PATTERN]...`

Writes OUT_DIR (default `<model-stem>.lpc/`) atomically: model.qdq.onnx, report.json, report.md
and, by default (`--emit onnx,tvm`), the compiled code: model.so, params.bin, manifest.json
(`--emit onnx`: the QDQ model alone).
`lpcompile run OUT_DIR --inputs x.npz [-o out.npz]` / `lpcompile bench OUT_DIR [--batch N] [--seq L]`
run such an artifact (lpcompile.runtime.cli; the compiler is not imported).
Bad input exits with status 2 and one line on stderr; nothing is left behind.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from lpcompile import extras, goals, targets
from lpcompile.errors import LpcompileError
from lpcompile.output import check_output_dir

EXIT_BAD_INPUT = 2


class _Progress:
    """One self-overwriting line per stage on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, stream=sys.stderr, quiet: bool = False):
        self.stream, self.quiet = stream, quiet
        self.tty = stream.isatty()
        self.last: tuple[str, float] = ("", 0.0)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        final = done >= total
        if not final and stage == self.last[0] and now - self.last[1] < (0.1 if self.tty else 2.0):
            return
        self.last = (stage, now)
        pct = 100.0 * done / total if total else 100.0
        line = f"{stage}: {done}/{total} ({pct:.0f}%)"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line too (argparse prints the whole usage block by default)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"lpcompile: error: {message} (see lpcompile --help)\n")


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _smooth_arg(text: str) -> str | float:
    if text in ("auto", "off"):
        return text
    try:
        alpha = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, off or an alpha in [0, 1], got {text!r}") from None
    if not 0.0 <= alpha <= 1.0:
        raise argparse.ArgumentTypeError(f"alpha must lie in [0, 1], got {text!r}")
    return alpha


DEFAULT_EMIT = ("onnx", "tvm")


def _sparsity_arg(text: str) -> str:
    from lpcompile.errors import FormatError
    from lpcompile.passes.sparsify import SparsityPattern

    try:
        return str(SparsityPattern.parse(text))
    except FormatError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from lpcompile.api import EMITS
    from lpcompile.recipes import RECIPES

    from importlib import metadata

    import lpcompile

    try:
        version = metadata.version("lpcompile")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        version = lpcompile.__version__
    p = _Parser(
        prog="lpcompile",
        description="Quantize an ONNX model to INT4/INT8/FP8 and compile it for a target. Compiled artifacts "
        "are used by two more commands (they do not import the compiler): `lpcompile run OUT_DIR --inputs "
        "x.npz [-o out.npz]` runs one, `lpcompile bench OUT_DIR [--batch N] [--seq L]` times it "
        "(`lpcompile run --help`, `lpcompile bench --help`).",
        epilog="formats: " + "; ".join(f"{r.name} = {r.description}" for r in RECIPES.values())
        + "; auto = per-layer formats chosen by measured sensitivity (writes plan.json and select.png)",
    )
    p.add_argument("--version", action="version", version=f"lpcompile {version}")
    p.add_argument("model", help="an .onnx file (external data next to it is fine)")
    p.add_argument("--target", default="llvm", help=targets.HELP)
    p.add_argument("--format", default="int4", choices=[*RECIPES, "auto"],
                   help="quantization recipe (default int4), or auto: a per-layer choice under --budget / --min-cosine")
    for flag, (_, metavar, text) in goals.FLAGS.items():  # one goal at a time (lpcompile.goals)
        p.add_argument(flag, type=float, metavar=metavar, help=f"--format auto: {text}")
    p.add_argument("--latency-tokens", type=int, metavar="M",
                   help="--format auto: rows (tokens) at which layers with a dynamic row count are timed "
                        "(default 1, a decode step; an encoder over sentences: their typical length)")
    p.add_argument("--cosine-stat", choices=["mean", "p5", "min"], default=None,
                   help="--min-cosine: the per-sample cosine statistic that must reach C: mean (default), p5 (the "
                        "5th percentile) or min (the worst held-out sample)")
    p.add_argument("--plan", metavar="FILE",
                   help="--format auto: a plan.json to reuse (alone) or whose pins to respect (with a goal)")
    p.add_argument("-o", "--output", help="output directory (default: <model-stem>.lpc next to the model): new, empty, or a "
                   "previous lpcompile output, which it replaces when the new one is complete")
    p.add_argument("--calibration", help="an .npz file (arrays named after the model inputs, first axis = samples), "
                   "a directory of them, or random:N for a smoke run")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="keep layers matching PATTERN (fnmatch on layer names; :first / :last for the first/last "
                        "linear layer) in float; repeatable")
    p.add_argument("--rotate", choices=["auto", "online", "fold", "off"], default=None,
                   help="Hadamard rotations against activation outliers (default: auto for recipes with "
                        "<= 8-bit activations or 4-bit weights, else off)")
    p.add_argument("--smooth", type=_smooth_arg, default=None, metavar="auto|off|ALPHA",
                   help="SmoothQuant: migrate activation outliers into the weights, alpha searched per site (auto) "
                        "or fixed (0..1); recipes that quantize activations only")
    p.add_argument("--awq", choices=["off", "scale", "clip", "auto"], default="off",
                   help="activation-aware weight quantization with GPTQ: per-channel scaling searched on the "
                        "calibration data (scale), each group's clipping by its output error (clip), or both (auto)")
    p.add_argument("--sparsity", type=_sparsity_arg, default=None, metavar="N:M|RATIO",
                   help="prune every dense linear layer (2:4, 4:8 along the input axis, or a share such as 0.5), "
                        "error-compensated on the calibration data and jointly with the recipe's rounding; "
                        "append :wanda or :magnitude for the cheap criteria")
    p.add_argument("--quantize-attention", choices=["off", "int8", "fp8"], default="off",
                   help="quantize both inputs of activation x activation matmuls (attention scores and context) "
                        "with static per-tensor scales; int8 runs as an int8 x int8 -> int32 product in TVM")
    p.add_argument("--emit", default=None,
                   help=f"comma-separated outputs ({', '.join(EMITS)}); default {','.join(DEFAULT_EMIT)}: the QDQ model "
                        "and the TVM artifact for the target (a compiler's command compiles); onnx: the QDQ model alone")
    p.add_argument("--qdq-functions", action="store_true",
                   help="keep lpcompile's functions (ai.lpcompile Hadamard, PerTokenQDQ_*) in model.qdq.onnx, the form "
                        "its own TVM lowering matches; default: the portable form onnxruntime and OpenVINO run as they are")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="samples per onnxruntime run during calibration")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("-v", "--verbose", action="store_true", help="log what every pass did")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("run", "bench", "generate"):  # artifacts: no compiler imported
        from lpcompile.runtime.cli import main as runtime_main

        return runtime_main(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    progress = _Progress(quiet=args.quiet)
    try:
        from lpcompile.api import compile as lp_compile

        model = Path(args.model)
        if not model.is_file():
            raise LpcompileError(f"no such model file: {model}")
        out = Path(args.output) if args.output else model.with_name(model.stem + ".lpc")
        check_output_dir(out, _inputs(model, args.calibration, args.plan))  # before any work
        if args.emit is None:  # the default compiles code for the target: TVM is needed, said before any work
            emit = DEFAULT_EMIT
            if not extras.installed("tvm"):
                raise extras.MissingExtra(f"compiling code for --target {args.target} (the default --emit "
                                          f"{','.join(DEFAULT_EMIT)}) needs {extras.install_hint('tvm')}; "
                                          "--emit onnx writes the QDQ model alone")
        else:
            emit = tuple(e.strip() for e in args.emit.split(",") if e.strip())
        result = lp_compile(
            model,
            target=args.target,
            format=args.format,
            calibration=args.calibration,
            exclude=args.exclude,
            emit=emit,
            batch_size=args.batch_size,
            progress=progress,
            rotate=args.rotate,
            goal=goals.from_flags(vars(args), args.latency_tokens),
            plan=args.plan,
            smooth=args.smooth,
            awq=args.awq,
            sparsity=args.sparsity,
            quantize_attention=args.quantize_attention,
        )
        result.save(out, portable=not args.qdq_functions)
    except LpcompileError as e:
        print(f"lpcompile: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("lpcompile: interrupted", file=sys.stderr)
        return 130
    for warning in result.report.get("warnings", []):  # said even with --quiet
        print(f"lpcompile: warning: {warning}", file=sys.stderr)
    if not args.quiet:
        print(_summary(out, result.report), file=sys.stdout)
    return 0


# A model file this big holds its weights inline (external-data models are small graphs): its
# external data files are not looked for, which would mean parsing it twice.
EXTERNAL_DATA_SCAN_BYTES = 64 << 20


def _inputs(model: Path, calibration: str | None, plan: str | None) -> list[Path]:
    """The files an output directory may not be or hold: the model, its external data files (names
    read from the graph without loading the data), the calibration data and the plan."""
    import onnx

    paths = [model]
    if model.stat().st_size < EXTERNAL_DATA_SCAN_BYTES:
        try:
            proto = onnx.load(str(model), load_external_data=False)
            paths += [model.parent / e.value for t in proto.graph.initializer for e in t.external_data
                      if e.key == "location"]
        except Exception:  # an unreadable model is reported by the compile, with its reason
            pass
    paths += [Path(p) for p in (calibration, plan) if p and not p.startswith("random:")]
    return paths


def _summary(out: Path, report: dict) -> str:
    t = report["totals"]
    ratio = t["weight_bytes"] / t["weight_bytes_fp32"] if t["weight_bytes_fp32"] else float("nan")
    cos = t["output_cosine"]
    sq = t["output_sqnr_db"]
    from lpcompile.report.render import model_ratio

    measured = (f"output cosine {cos:.5f}, SQNR {sq:.1f} dB" if cos is not None and sq is not None
                else "output error not meaningful (see the warnings)" if report.get("warnings")
                else "error not measured (no calibration data)")
    smoke = " [smoke run on random inputs]" if (report.get("calibration") or {}).get("is_random") else ""
    sel = report.get("select")
    latency = sel["achieved"].get("latency_us") if sel else None
    auto = (f"; {sel['achieved']['avg_weight_bits']:.3f} bits/weight"
            + (f", kernels {latency:.1f} us at {sel['latency']['tokens']} tokens" if latency is not None else "")
            + (f", goal met: {sel['achieved']['budget_met']}" if sel["achieved"]["budget_met"] is not None
               else f", plan reused ({sel['budget'].get('kind', 'no goal')})")
            + (f", rotation {sel['rotation_chosen']} (better of auto/off)" if sel.get("rotation_chosen") else "")
            if sel else "")
    whole = model_ratio(t)
    whole = f", whole model {whole:.3f}x" if whole is not None else ""
    held = (report.get("measured_on") or {}).get("held_out")
    measured += " on held-out calibration samples" if held and cos is not None else ""
    return (f"{out}: {report['format']} for {report['target']}: {t['layers_quantized']} layers, weights "
            f"{t['weight_bytes'] / 1e6:.2f} MB ({ratio:.3f}x fp32{whole}), {measured}{auto}{smoke}")


if __name__ == "__main__":
    sys.exit(main())
