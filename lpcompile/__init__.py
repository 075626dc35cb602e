"""lpcompile: a low-precision compiler for ONNX and PyTorch models.

    import lpcompile
    art = lpcompile.compile("model.onnx", target="llvm", format="int4", calibration="calib.npz")
    art.save("model.lpc"); art.report["totals"]

Submodules: `formats` (numeric formats and QuantSpec), `plan` (what each layer gets), `goals`
(what `--format auto` optimises), `pipeline` (the passes compile runs), `targets`, `passes`
(onnx_ir passes), `ir`, `runtime`. Importing the package is cheap: the compiler parts load on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["capture", "compile", "formats", "passes", "runtime", "ir", "errors", "goals", "plan", "pipeline", "targets",
           "LpcompileError"]

from lpcompile.errors import LpcompileError


def __getattr__(name: str):
    if name in ("capture", "compile", "CompiledModel"):
        return getattr(importlib.import_module("lpcompile.api"), name)
    if name in ("formats", "passes", "runtime", "ir", "errors", "recipes", "report", "goals", "plan", "pipeline",
                "targets"):
        return importlib.import_module(f"lpcompile.{name}")
    raise AttributeError(f"module 'lpcompile' has no attribute {name!r}")
