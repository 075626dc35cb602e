"""lpcompile's QDQ -> fused-kernel lowering as Relax passes, for a TVM user's own pipeline
(issue 15 item 3).

    import tvm, onnx
    from tvm.relax.frontend import onnx as relax_onnx
    import lpcompile.integrations.tvm as lpt

    target = lpt.host_target()                                   # this CPU, its features detected
    mod = relax_onnx.from_onnx(onnx.load("model.lpc/model.qdq.onnx"))   # TVM's own importer
    ex = tvm.compile(mod, target, relax_pipeline=lpt.passes(target))
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())

`passes(target)` is a `tvm.transform.Sequential`: `lower_qdq(target)` (below), then lpcompile's
CPU build pipeline (`backends.tvm.pipeline.cpu_pipeline`: TVM's cpu_generic passes with fast
erf/exp and a schedule step after fusion; for CUDA targets TVM's default pipeline). A flow that
has its own pipeline (MLC-style) inserts `lower_qdq(target)` where its graph still holds
`R.dequantize` / `R.quantize`, before legalization.

`lower_qdq(target)` rewrites, in any Relax module, what TVM's ONNX importer makes of a QDQ model:

    R.matmul(x, R.dequantize(constant q, constant scale, constant zp, axis))   (or its permute_dims)
        -> one call_tir to lpcompile's quantized_matmul kernel, weights repacked at compile time
    R.matmul(R.dequantize(R.quantize(x, s, zp)), <quantized weight>)          (static int8 / uint8)
        -> the integer kernel taking x in its quantized form (int8 x int8 -> int32, requantized)

with the same converters and kernel rules as lpcompile's own TVM backend; other Q/DQ become
lpcompile's elementwise Q/DQ kernels (the ONNX semantics). The kernels are PrimFuncs of the
module (`call_tir`), scheduled already (`tirx.is_scheduled`); lpcompile's own artifact compiles
the CPU kernels as a separate module instead (TVM 0.27 moves a relax-built kernel's local
buffers to heap workspace; not measured here for these passes).

TVM 0.27's importer refuses int4/uint4, blocked and float8 Q/DQ (see ENVIRONMENT.md), i.e. every
recipe but `w8a16` and `int8`; for those models `from_onnx(model, target)` (lpcompile's importer,
the same lowering done while importing) gives the Relax module, and `passes(target)` builds it.
"""

from __future__ import annotations

from lpcompile.extras import require

require("tvm", "lpcompile.integrations.tvm")

import onnx  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.relax.expr_functor import PyExprMutator, mutator  # noqa: E402

from lpcompile.backends.tvm.lower import LoweringReport  # noqa: E402
from lpcompile.backends.tvm.lower.context import _ACTIVE, _Context  # noqa: E402
from lpcompile.backends.tvm.lower.importer import QdqImporter  # noqa: E402
from lpcompile.backends.tvm.lower.linear import _lower_linear  # noqa: E402
from lpcompile.backends.tvm.lower.qdq import DequantizeLinear, QuantizeLinear  # noqa: E402
from lpcompile.backends.tvm.pipeline import cpu_pipeline  # noqa: E402
from lpcompile.backends.tvm.target import host_target  # noqa: E402

__all__ = ["passes", "lower_qdq", "from_onnx", "host_target", "last_report"]

_DQ, _Q = tvm.ir.Op.get("relax.dequantize"), tvm.ir.Op.get("relax.quantize")
_MATMUL, _PERMUTE = tvm.ir.Op.get("relax.matmul"), tvm.ir.Op.get("relax.permute_dims")
_LAST: list[LoweringReport] = []


def last_report() -> LoweringReport | None:
    """What the last lowering (`from_onnx`, or a `lower_qdq` run that found something) fired and
    refused (and why), per pattern."""
    return _LAST[-1] if _LAST else None


def _context(target: tvm.target.Target, bb: relax.BlockBuilder) -> _Context:
    ctx = _Context(target, bb)
    ctx.separate = False  # kernels live in the module: the user's tvm.compile builds everything
    return ctx


@mutator
class _LowerQdq(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target):
        super().__init__(mod)
        self.ctx = _context(target, self.builder_)

    def _known(self, x):
        """x, or the value it aliases, as the converters remembered it (a re-emitted binding of
        a converter's result is an alias of it)."""
        seen = x
        while isinstance(seen, relax.Var):
            if seen in self.ctx.weights or seen in self.ctx.acts or seen in self.ctx.pending_q:
                return seen
            seen = self.lookup_binding(seen)
        return x

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op):
            return call
        token = _ACTIVE.set(self.ctx)
        try:
            if call.op.same_as(_DQ) or call.op.same_as(_Q):
                x, scale, zp = self._known(call.args[0]), call.args[1], call.args[2]
                attrs = {"axis": int(call.attrs.axis)}
                if call.op.same_as(_DQ):
                    return DequantizeLinear._lower(self.builder_, [x, scale, zp], attrs, None, None)
                return QuantizeLinear._lower(self.builder_, [x, scale, zp], attrs, None, None)
            if call.op.same_as(_MATMUL) and call.attrs.out_dtype in ("", "void", None, "float32"):
                a, b = self._known(call.args[0]), call.args[1]
                transposed = False
                bound = self.lookup_binding(b) if isinstance(b, relax.Var) else None
                if isinstance(bound, relax.Call) and bound.op.same_as(_PERMUTE) and bound.attrs.axes is None:
                    b, transposed = bound.args[0], True
                b = self._known(b)
                if b in self.ctx.weights:
                    out = _lower_linear(self.ctx, a, b, transposed=transposed, pattern="R.matmul")
                    if out is not None:
                        return out
        finally:
            _ACTIVE.reset(token)
        return call


def lower_qdq(target: tvm.target.Target) -> tvm.transform.Pass:
    """The Relax pass: R.dequantize / R.quantize around R.matmul -> lpcompile's kernels (see the
    module docstring). `last_report()` says what fired and what was refused."""

    @tvm.transform.module_pass(opt_level=0, name="lpcompile.LowerQDQ")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        lowering = _LowerQdq(mod, target)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                lowering.builder_.update_func(gv, lowering.visit_expr(func))
        report = lowering.ctx.report
        if report.fired or report.refused or not _LAST:  # (a module from_onnx lowered keeps its report)
            _LAST[:] = [report]
        return relax.transform.DeadCodeElimination()(lowering.builder_.finalize())

    return _pass


def passes(target: tvm.target.Target) -> tvm.transform.Sequential:
    """`lower_qdq(target)` then lpcompile's build pipeline for the target: the whole
    `relax_pipeline=` of a `tvm.compile` call."""
    tail = cpu_pipeline(target) if target.kind.name == "llvm" else relax.pipeline.get_default_pipeline(target)
    return tvm.transform.Sequential([lower_qdq(target), tail], name="lpcompile")


def from_onnx(model, target: tvm.target.Target, shape_dict: dict[str, list] | None = None) -> tvm.IRModule:
    """A QDQ ONNX model (path or ModelProto) as a Relax module with lpcompile's kernels as
    PrimFuncs of the module (for the recipes TVM's own importer refuses: int4, blocked, float8,
    lpcompile's functions); build it with `tvm.compile(mod, target, relax_pipeline=passes(target))`."""
    proto = onnx.load(model) if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__") else model
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    importer = QdqImporter(shape_dict or {}, "float32")
    ctx = _context(target, importer.bb)
    token = _ACTIVE.set(ctx)
    try:
        mod = importer.from_onnx(proto.graph, opset)
    finally:
        _ACTIVE.reset(token)
    _LAST[:] = [ctx.report]
    return relax.transform.DeadCodeElimination()(mod)
