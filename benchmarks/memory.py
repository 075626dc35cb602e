"""Peak memory of a compile, stage by stage: peak resident set size (VmHWM, anonymous and
file-backed pages together, what the machine has to hold) of each stage of `lpcompile.compile`
and of saving the result, each compile in a fresh process.

    python -m models.export minilm build/minilm.onnx
    python benchmarks/memory.py build/minilm.onnx --format int4 --calibration build/minilm.calib
    python benchmarks/memory.py --synthetic-gb 8.5 --workdir /tmp/lpc-mem --format int4   # LLaMA-shaped, external data
    python benchmarks/memory.py ... -o benchmarks/results/memory.json   # appends/replaces this row

How a stage's peak is taken: at each stage boundary the process's high-water mark is read from
/proc/self/status (VmHWM) and reset to the current RSS (writing "5" to /proc/self/clear_refs),
so each number is the most the process held during that stage (weights, copies, onnxruntime
sessions and all). Stages are compile()'s own (capture, load calibration, measure), each pass
of its pipeline, "copy" (whatever runs between the end of the pipeline's set-up and its first
pass: the working copy of the model), and "save" (the QDQ model written to disk). Linux only.

`--synthetic-gb N` writes a LLaMA-shaped decoder of about N GB of fp32 weights with external
data (`models.synthetic_llama`), layer by layer, so building it needs no more memory than its
largest tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (VmHWM, VmRSS, RssAnon, RssFile)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class StageMeter:
    """Peak RSS per stage: `mark(name)` closes the stage that was running and starts `name`."""

    def __init__(self):
        self.current = "start"
        self.peaks: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.t = time.perf_counter()
        self.resettable = _reset_peak()

    def mark(self, name: str) -> None:
        peak = _status("VmHWM") / 2**20
        now = time.perf_counter()
        self.peaks[self.current] = max(self.peaks.get(self.current, 0.0), round(peak, 1))
        self.seconds[self.current] = round(self.seconds.get(self.current, 0.0) + now - self.t, 3)
        self.t = now
        _reset_peak()
        self.current = name


def instrument(meter: StageMeter):
    """Marks at compile()'s stages and around each pass of its pipeline (monkeypatching only the
    timers, so the same script measures any version of the code)."""
    import lpcompile.api as api

    stage_cls = api._Stage
    enter, exit_ = stage_cls.__enter__, stage_cls.__exit__

    def _enter(self):
        meter.mark(self.name)
        return enter(self)

    def _exit(self, *exc):
        meter.mark(f"after {self.name}")
        return exit_(self, *exc)

    stage_cls.__enter__, stage_cls.__exit__ = _enter, _exit

    from lpcompile.pipeline import Pipeline, pass_name

    call = Pipeline.call

    def _call(self, model):
        passes = self.passes
        wrapped = []
        for p in passes:
            wrapped.append(_Measured(p, pass_name(p), meter))
        self.passes = wrapped
        try:
            return call(self, model)
        finally:
            self.passes = passes

    Pipeline.call = _call


class _Measured:
    """A pass that marks the meter before and after it runs (named as the pass it wraps)."""

    def __init__(self, inner, name: str, meter: StageMeter):
        self.inner, self.name_in_pipeline, self.meter = inner, name, meter

    def __getattr__(self, key):
        return getattr(self.inner, key)

    def __call__(self, model):
        self.meter.mark(self.name_in_pipeline)
        try:
            return self.inner(model)
        finally:
            self.meter.mark(f"after {self.name_in_pipeline}")


def child(args) -> dict:
    """One compile in this process, measured."""
    meter = StageMeter()
    import lpcompile

    instrument(meter)
    base = _status("VmRSS") / 2**20
    kwargs = dict(format=args.format, calibration=args.calibration)
    if args.budget is not None:
        from lpcompile.goals import Bits

        kwargs["goal"] = Bits(args.budget)
    start = time.perf_counter()
    meter.mark("capture")  # compile() starts with its checks, then capture
    art = lpcompile.compile(args.model, **kwargs)
    meter.mark("save")
    out = Path(tempfile.mkdtemp(prefix="lpc-mem-out-", dir=args.workdir)) / "out"
    art.save(out)
    meter.mark("end")
    total = time.perf_counter() - start
    sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    import shutil

    shutil.rmtree(out.parent)
    # "after X" segments are the glue between stages; a stage and its glue are reported together
    stages: dict[str, float] = {}
    order: list[str] = []
    for name, peak in meter.peaks.items():
        if name == "start":
            continue
        key = name.removeprefix("after ")
        if name.startswith("after "):
            key = _glue_name(key)
        if key not in stages:
            order.append(key)
        stages[key] = max(stages.get(key, 0.0), peak)
    # (getrusage's ru_maxrss is no help here: the resets lower it too)
    return {
        "model": str(args.model), "format": args.format, "calibration": args.calibration,
        "peak_rss_mb": max(stages.values()),
        "rss_after_imports_mb": round(base, 1),
        "stages_peak_rss_mb": {k: stages[k] for k in order},
        "stages_seconds": {k.removeprefix("after "): v for k, v in meter.seconds.items() if not k.startswith("after ")},
        "seconds": round(total, 1), "output_bytes": sizes, "per_stage_reset": meter.resettable,
    }


def _glue_name(stage: str) -> str:
    # what runs after a stage before the next one starts
    return {"load calibration": "copy", "capture": "capture", "measure": "measure"}.get(stage, stage)


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="an .onnx file (or use --synthetic-gb)")
    p.add_argument("--format", default="int4")
    p.add_argument("--calibration")
    p.add_argument("--budget", type=float, help="with --format auto: average weight bits")
    p.add_argument("--synthetic-gb", type=float, help="build a LLaMA-shaped model of about this many GB of fp32 weights")
    p.add_argument("--workdir", default=None, help="where synthetic models and outputs go (default: a temp dir)")
    p.add_argument("--label", default=None, help="the row's name in the JSON (default: model name + format)")
    p.add_argument("-o", "--output", help="a JSON file: this run is added under its label")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lpc-mem-"))
    workdir.mkdir(parents=True, exist_ok=True)
    extra = {}
    if args.synthetic_gb:
        sys.path.insert(0, str(REPO))
        from models.synthetic_llama import config_for_gb, write_synthetic_llama

        cfg = config_for_gb(args.synthetic_gb)
        path = workdir / f"llama_{args.synthetic_gb:g}gb.onnx"
        if not path.exists():
            t = time.perf_counter()
            info = write_synthetic_llama(path, cfg)
            extra["build_seconds"] = round(time.perf_counter() - t, 1)
        else:
            from models.synthetic_llama import describe

            info = describe(path, cfg)
        extra["synthetic"] = info
        args.model = str(path)
    if not args.model:
        p.error("give a model or --synthetic-gb")
    cmd = [sys.executable, __file__, args.model, "--format", args.format, "--workdir", str(workdir), "--child"]
    if args.calibration:
        cmd += ["--calibration", args.calibration]
    if args.budget is not None:
        cmd += ["--budget", str(args.budget)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"compile failed:\n{r.stderr[-4000:]}")
    result = {**json.loads(r.stdout.strip().splitlines()[-1]), **extra}
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    result["commit"] = git.stdout.strip()
    result["machine"] = machine()
    label = args.label or f"{Path(args.model).stem} {args.format}"
    print(json.dumps({label: result}, indent=1))
    if args.output:
        out = Path(args.output)
        rows = json.loads(out.read_text()) if out.exists() else {}
        rows[label] = result
        out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
