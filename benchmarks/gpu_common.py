"""What the GPU scripts (gpu_kernels, gpu_models, gpu_probe) share: the command line of their two
steps (`build DIR` here, where TVM's compiler is; `run DIR` on the GPU machine) and the target
an `--arch` names (a CUDA arch, or `llvm` to try a build on this CPU)."""

from __future__ import annotations

import argparse


def two_step_parser(doc: str, output: str | None = None):
    """(parser, build subparser, run subparser), each step taking DIR; `run` writes `-o` (default
    `output`) where one is given."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    build, run = sub.add_parser("build"), sub.add_parser("run")
    build.add_argument("dir")
    build.add_argument("--arch", default="sm_90", help="a CUDA arch, or llvm to build for this CPU")
    run.add_argument("dir")
    if output is not None:
        run.add_argument("-o", "--output", default=output)
    return p, build, run


def target_for(arch: str):
    from lpcompile.backends.tvm.target import resolve

    return resolve(arch if arch == "llvm" else f"cuda:{arch}")
