"""Optional dependencies, each asked for by name before any work (issue 15 item 5).

    require("tvm", "--emit tvm")      # MissingExtra: "--emit tvm needs apache-tvm: pip install 'lpcompile[tvm]'"

A step that needs one calls `require` where its arguments are checked, so a missing package is one
line (exit 2 at the CLI) instead of a traceback after the work; `installed` asks without importing
(steps a run did not ask for never import these packages). Imports nothing but the standard
library: the runtime (`lpcompile run` / `bench`) uses it too.
"""

from __future__ import annotations

import importlib.util

from lpcompile.errors import LpcompileError

# module -> (the PyPI distribution, the lpcompile extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "tvm": ("apache-tvm", "tvm"),
    "torch": ("torch", "torch"),
    "openvino": ("openvino", "openvino"),
    "torch_mlir": ("torch-mlir", "mlir"),  # MLIR output (lpcompile.backends.mlir)
}


class MissingExtra(LpcompileError):
    """An optional dependency a requested step needs is not installed."""


def installed(module: str) -> bool:
    """Whether `module` can be imported, asked without importing it (an import hook that refuses
    it counts as missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def install_hint(module: str) -> str:
    dist, extra = EXTRAS[module]
    return f"{dist}: pip install 'lpcompile[{extra}]'"


def missing_reason(module: str) -> str | None:
    """"<dist> is not installed (pip install 'lpcompile[<extra>]')", or None when it is."""
    if installed(module):
        return None
    dist, extra = EXTRAS[module]
    return f"{dist} is not installed (pip install 'lpcompile[{extra}]')"


def require(module: str, what: str) -> None:
    """Raise `MissingExtra` ("<what> needs <dist>: pip install 'lpcompile[<extra>]'") unless
    `module` is installed."""
    if not installed(module):
        raise MissingExtra(f"{what} needs {install_hint(module)}")
