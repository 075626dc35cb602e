"""lpcompile as a `torch.compile` backend (issue 15 item 2).

    model = torch.compile(model, backend="lpcompile", dynamic=False,
                          options={"format": "int4", "calibration": batches, "target": "llvm"})
    with torch.no_grad():
        y = model(x)

The backend is registered through torch's entry point group `torch_dynamo_backends` (an
installed lpcompile: `pip install 'lpcompile[torch,tvm]'`); from an uninstalled checkout call
`lpcompile.integrations.torch.register()` once, or pass `backend=lpcompile.integrations.torch.backend`.

Each FX graph dynamo hands over (every piece between graph breaks is one) becomes one compiled
piece: its parameters and buffers (graph inputs whose source is a module's `_parameters` /
`_buffers`, or any `nn.Parameter`) become the weights of the graph, the rest are its inputs; the
graph is exported to ONNX (`lpcompile.capture`), quantized by the same pipeline as
`lpcompile.compile` (the recipe `format`, calibrated), and built with TVM (`emit tvm`); the piece
then runs the TVM artifact on torch tensors (DLPack in and out, no copies).

Calibration (`options["calibration"]`): a list of batches of the piece's inputs (a tensor, a
tuple of tensors, or a dict by input name), used by every piece whose inputs have exactly these
shapes (the whole model when dynamo does not break the graph). A piece without fitting batches
**calibrates on its first `calibration_calls` calls** (default 4): during those calls it runs
eagerly (the float graph, so its outputs are the float model's), records its inputs, and
compiles at the end of the last one; every later call runs the compiled artifact. With
`calibration_calls: 0` a piece compiles on its first call without data (weight-only recipes
only; recipes with static activation scales then refuse with one line).

Limits (each refused with one line when met): static shapes only (pass `dynamic=False`, so a new
shape compiles a new piece instead of a symbolic one); CPU tensors and the `llvm` / `aarch64`
targets of this host; inference only (the outputs carry no autograd history, and the weights are
read once, when the piece compiles). Options: `format` (a recipe name, default "int4"),
`target` ("llvm"), `calibration`, `calibration_calls`, `rotate`, `exclude`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lpcompile.errors import LpcompileError
from lpcompile.extras import require

__all__ = ["backend", "register", "pieces", "CompiledPiece", "NAME"]

log = logging.getLogger(__name__)

NAME = "lpcompile"
OPTIONS = ("format", "target", "calibration", "calibration_calls", "rotate", "exclude")
DEFAULT_CALIBRATION_CALLS = 4
_PIECES: weakref.WeakSet = weakref.WeakSet()


class TorchCompileError(LpcompileError):
    """A graph or an option the torch.compile backend refuses (one line)."""


def register() -> None:
    """Register `backend` under the name "lpcompile" with torch._dynamo (what the entry point
    does for an installed lpcompile); idempotent."""
    require("torch", "lpcompile.integrations.torch")
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    existing = _COMPILER_FNS.get(NAME)  # (an installed lpcompile's entry point loads to this same function)
    if existing is backend:
        return
    if existing is not None:
        raise TorchCompileError(f"another torch.compile backend is registered as {NAME!r}: {existing!r}")
    register_backend(backend, name=NAME)


def pieces() -> list[CompiledPiece]:
    """The pieces this process has compiled or is calibrating (for inspection: their reports)."""
    return sorted(_PIECES, key=lambda p: p.index)


def _check_options(options: Mapping[str, Any] | None) -> dict:
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TorchCompileError(f"torch.compile(backend='lpcompile'): unknown option(s) {', '.join(unknown)}; "
                                f"known: {', '.join(OPTIONS)}")
    from lpcompile.recipes import get_recipe
    from lpcompile.targets import parse as parse_target

    options.setdefault("format", "int4")
    options.setdefault("target", "llvm")
    recipe = get_recipe(options["format"])  # one-line refusal of an unknown recipe
    target = parse_target(options["target"])
    target.check_formats(recipe.format_names(), recipe.name)
    if target.kind != "llvm":
        raise TorchCompileError(f"torch.compile(backend='lpcompile') runs the artifact in this process: target "
                                f"{options['target']!r} is not this CPU (use 'llvm')")
    calls = options.setdefault("calibration_calls", DEFAULT_CALIBRATION_CALLS)
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
        raise TorchCompileError(f"calibration_calls must be a whole number >= 0, got {calls!r}")
    return options


def backend(gm, example_inputs, options: Mapping[str, Any] | None = None):
    """The torch.compile backend: one `CompiledPiece` per FX graph dynamo hands over."""
    require("torch", "torch.compile(backend='lpcompile')")
    require("tvm", "torch.compile(backend='lpcompile')")
    return CompiledPiece(gm, list(example_inputs), _check_options(options))


def _static_input(node, value) -> bool:
    """A graph input that is a module's parameter or buffer (dynamo lifts them into inputs)."""
    import torch

    if isinstance(value, torch.nn.Parameter):
        return True
    grapharg = node.meta.get("grapharg")
    source = grapharg.source.name if grapharg is not None and getattr(grapharg, "source", None) is not None else ""
    source = source() if callable(source) else source
    return "._parameters[" in source or "._buffers[" in source


def _weights_as_attributes(gm, example_inputs):
    """A copy of `gm` whose parameter/buffer inputs are buffers of the module (so they export as
    initializers, the weights the pipeline quantizes); returns (module, positions of the
    remaining inputs)."""
    import torch
    import torch.fx as fx

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise TorchCompileError(f"graph has {len(placeholders)} inputs but dynamo gave {len(example_inputs)} examples")
    for node, value in zip(placeholders, example_inputs):
        if not isinstance(value, torch.Tensor):
            raise TorchCompileError(
                f"graph input {node.name} is a {type(value).__name__} (a symbolic size): lpcompile compiles static "
                "shapes only; pass dynamic=False to torch.compile")
        if any(not isinstance(d, int) for d in value.shape):
            raise TorchCompileError(f"graph input {node.name} has a symbolic shape {tuple(value.shape)}: lpcompile "
                                    "compiles static shapes only; pass dynamic=False to torch.compile")
        if value.device.type != "cpu":
            raise TorchCompileError(f"graph input {node.name} is on {value.device}: the lpcompile backend runs CPU tensors")
    module = torch.nn.Module()
    graph = fx.Graph()
    env: dict = {}
    user: list[int] = []
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if _static_input(node, value):
            name = f"w{i}_{node.name}".replace(".", "_")
            module.register_buffer(name, value.detach(), persistent=True)
            env[node] = graph.get_attr(name)
        else:
            env[node] = graph.placeholder(node.name)
            user.append(i)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    for name, sub in gm.named_children():
        module.add_module(name, sub)
    for name, attr in gm.__dict__.get("_buffers", {}).items():
        if name not in module._buffers:
            module.register_buffer(name, attr)
    for node in gm.graph.nodes:  # get_attr targets of the original graph (constants dynamo kept)
        if node.op == "get_attr" and not hasattr(module, node.target.split(".")[0]):
            setattr(module, node.target, getattr(gm, node.target))
    return fx.GraphModule(module, graph).eval(), user


class CompiledPiece:
    """One FX graph: calibrating (runs eagerly, records its inputs) until it compiles, then the
    TVM artifact. `report` is the compile report (`lpcompile.compile`), `artifact` the folder of
    the TVM artifact (a temporary folder of this process, removed with the piece)."""

    _count = 0

    def __init__(self, gm, example_inputs: list, options: dict):
        self.index = CompiledPiece._count
        CompiledPiece._count += 1
        self.gm = gm
        self.options = options
        self.module, self.user = _weights_as_attributes(gm, example_inputs)
        self.shapes = [tuple(example_inputs[i].shape) for i in self.user]
        self.collected: list[list[np.ndarray]] = []
        self.compiled = None  # the lpcompile.CompiledModel
        self.runtime = None  # lpcompile.runtime's TvmModel
        self.artifact: str | None = None
        self.input_names: list[str] = []
        self._out_spec = None
        batches = self._fitting_batches(options.get("calibration"))
        _PIECES.add(self)
        if batches is not None or options["calibration_calls"] == 0:
            self._compile(batches, [example_inputs[i] for i in self.user])
        else:
            log.info("lpcompile piece %d: calibrating on its first %d calls (eager until then)", self.index,
                     options["calibration_calls"])

    @property
    def state(self) -> str:
        return "compiled" if self.runtime is not None else "calibrating"

    @property
    def report(self) -> dict | None:
        return self.compiled.report if self.compiled is not None else None

    def _fitting_batches(self, calibration) -> list[list[np.ndarray]] | None:
        """The user's calibration batches as this piece's inputs, or None when they do not fit."""
        if calibration is None:
            return None
        if not isinstance(calibration, Sequence) or isinstance(calibration, (str, bytes)) or not calibration:
            raise TorchCompileError("options['calibration'] must be a non-empty list of batches (tensors, tuples of "
                                    "tensors, or dicts by input name)")
        out = []
        for batch in calibration:
            arrays = list(batch.values()) if isinstance(batch, Mapping) else (
                list(batch) if isinstance(batch, (tuple, list)) else [batch])
            arrays = [a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a) for a in arrays]
            if [tuple(a.shape) for a in arrays] != self.shapes:
                log.info("lpcompile piece %d: calibration batches do not fit its inputs %s; calibrating on calls",
                         self.index, self.shapes)
                return None
            out.append(arrays)
        return out

    def _compile(self, batches: list[list[np.ndarray]] | None, examples: list) -> None:
        import lpcompile

        model = lpcompile.capture(self.module, tuple(examples))
        self.input_names = [v.name for v in model.graph.inputs]
        if len(self.input_names) != len(self.user):
            raise TorchCompileError(f"the exported graph has {len(self.input_names)} inputs, the FX graph "
                                    f"{len(self.user)} (an input the graph does not use?)")
        feeds = None if batches is None else [dict(zip(self.input_names, b)) for b in batches]
        o = self.options
        self.compiled = lpcompile.compile(model, target=o["target"], format=o["format"], calibration=feeds,
                                          emit=("onnx", "tvm"), rotate=o.get("rotate"),
                                          exclude=tuple(o.get("exclude", ())))
        folder = tempfile.mkdtemp(prefix=f"lpcompile-torch-piece{self.index}-")
        weakref.finalize(self, shutil.rmtree, folder, True)
        self.artifact = folder + "/artifact"
        self.compiled.save(self.artifact)
        self.runtime = lpcompile.runtime.load(self.artifact)
        log.info("lpcompile piece %d compiled (%s, %s)", self.index, o["format"], o["target"])

    def __call__(self, *args):
        import torch
        import torch.utils._pytree as pytree

        if self.runtime is None:
            with torch.no_grad():
                out = self.gm(*args)
            self.collected.append([args[i].detach().cpu().numpy().copy() for i in self.user])
            if self._out_spec is None:
                self._out_spec = pytree.tree_flatten(out)[1]
            if len(self.collected) >= self.options["calibration_calls"]:
                self._compile(self.collected, [args[i] for i in self.user])
                self.collected = []
            return out
        for i, shape in zip(self.user, self.shapes):
            if tuple(args[i].shape) != shape:
                raise TorchCompileError(f"input shape {tuple(args[i].shape)} != compiled {shape} (static shapes only)")
        result = self.runtime(**{n: args[i] for n, i in zip(self.input_names, self.user)})
        outs = [result[n] for n in self.runtime.output_names] if isinstance(result, dict) else [result]
        if self._out_spec is None:
            with torch.no_grad():
                self._out_spec = pytree.tree_flatten(self.gm(*args))[1]
        if self._out_spec.num_leaves != len(outs):
            raise TorchCompileError(f"the graph returns {self._out_spec.num_leaves} values, its ONNX export {len(outs)}")
        return pytree.tree_unflatten(outs, self._out_spec)
