"""The TVM artifact: `model.so` + `manifest.json` in an output directory.

    manifest = export_artifact(qdq_proto, host_target(), "out/", report=compiled.report)

`model.so` is the exported Relax VM executable (code only). The manifest (its format is read by
`lpcompile.runtime.tvm`, which owns MANIFEST_VERSION) records the CPU features the code may use
and the sha256 of every file loading reads. The weights are the constants of
the lowered module, lifted into extra parameters of `main` after the model inputs and written
to `params.bin` (TVM's parameter format, any dtype) in the form the kernels read them: packed
int4 (eight per uint32), int8, fp8 bytes, and their float32 scales. The float copy of a
quantized weight is only there when a consumer other than a low-bit kernel needs it; the
manifest names every such layer ("float fallback" / "emulated") with the reason.

For CUDA the kernels are compiled at build time by nvcc into a fatbin for the target's arch
(`cuda0.fatbin`, ...; see `_cuda_binaries` for why it is next to the library, not inside it).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import onnx
import tvm

from lpcompile.backends.tvm.lower import LoweringReport, from_onnx
from lpcompile.backends.tvm.pipeline import build
from lpcompile.backends.tvm.target import cross_linker, is_cross
from lpcompile.runtime.cpu import library_features
from lpcompile.runtime.tvm import MANIFEST_VERSION, sha256_file

LIBRARY = "model.so"
PARAMS = "params.bin"
MANIFEST = "manifest.json"
LIFT_MIN_ELEMENTS = 16  # smaller constants (scalar scales, zero points) stay in the library

_ONNX_DTYPES = {v: onnx.helper.tensor_dtype_to_np_dtype(v).name for v in (
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64,
    onnx.TensorProto.INT32, onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.BOOL)}


def _value_info(v: onnx.ValueInfoProto) -> dict:
    t = v.type.tensor_type
    dims = []
    for d in t.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return {"name": v.name, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": dims}


def _cuda_modules(mod) -> list:
    found = [mod] if mod.kind == "cuda" else []
    for m in mod.imports:
        found += _cuda_modules(m)
    return found


def _cuda_binaries(ex, target: tvm.target.Target, out: Path) -> list[dict]:
    """Compile every CUDA module's source with nvcc into a fatbin for the target's arch, next
    to the library. TVM 0.27 keeps CUDA kernels as source in the exported library and compiles
    them when the library is loaded (its `tvm_callback_cuda_compile`, NVRTC by default); the
    runtime answers that callback with these prebuilt binaries instead (by source hash), so
    loading needs neither NVRTC nor nvcc."""
    from lpcompile.backends.tvm.kernels import nvcc_compile

    arch = str(target.attrs["arch"])
    binaries = []
    for i, m in enumerate(_cuda_modules(ex.mod)):
        source = m.inspect_source()
        binary = nvcc_compile(source, target, "fatbin")
        name = f"cuda{i}.fatbin"
        (out / name).write_bytes(binary)
        binaries.append({"file": name, "arch": arch, "source_sha256": hashlib.sha256(source.encode()).hexdigest(),
                         "bytes": len(binary)})
    return binaries


def _lift_constants(mod: tvm.IRModule) -> tuple[tvm.IRModule, dict[str, tvm.runtime.Tensor]]:
    """`main`'s constants (at least LIFT_MIN_ELEMENTS elements) as parameters after the inputs
    (attribute num_input = the number of inputs), and their values by parameter name."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Lift(PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.lifted: list[tuple[str, relax.Var, object]] = []

        def visit_generic_const_(self, op):
            if int(op.value.numpy().size) < LIFT_MIN_ELEMENTS:  # noqa: PLR2004
                return op
            for _, var, const in self.lifted:
                if const.same_as(op):
                    return var
            name = f"p{len(self.lifted)}"
            var = relax.Var(name, op.ty)
            self.lifted.append((name, var, op))
            return var

    func = mod["main"]
    lift = Lift(mod)
    body = lift.visit_expr(func.body)
    new = relax.Function(list(func.params) + [v for _, v, _ in lift.lifted], body, func.ret_ty, func.is_pure, func.attrs)
    mod["main"] = new.with_attr("num_input", len(func.params))
    return mod, {name: c.value for name, _, c in lift.lifted}


def _layer_records(proto: onnx.ModelProto, lowering: LoweringReport, report: dict | None) -> list[dict]:
    """One record per layer the QDQ model quantizes: its formats (from the compile report or
    the node metadata) and how the lowering ran it (`native` kernel, `emulated`, or
    `float fallback`, with the reason)."""
    from_meta = {}
    for node in proto.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        if "lpcompile.weight_format" in props or "lpcompile.activation_format" in props:
            layer = props.get("lpcompile.layer", node.name)
            from_meta[layer, node.op_type] = from_meta[layer] = {
                "node": node.name, "op": node.op_type,
                "weight_format": props.get("lpcompile.weight_format", "float32"),
                "activation_format": props.get("lpcompile.activation_format", "float32"),
            }
    layers = []
    # a layer is named by its weight: a table tied to the output projection is two layers of one
    # name (its Gather and its MatMul), told apart by op
    keys = [(l["name"], l["op"]) for l in report["layers"]] if report else [k for k in from_meta if isinstance(k, str)]
    for i, key in enumerate(keys):
        name = key[0] if report else key
        meta = from_meta.get(key) or from_meta.get(name) or {"node": name, "op": None, "weight_format": "float32",
                                                              "activation_format": "float32"}
        if report:
            rl = report["layers"][i]
            meta = {**meta, "op": rl["op"], "weight_format": rl["weight_format"], "activation_format": rl["activation_format"]}
        low = lowering.layers.get(meta["node"])
        rec = {"name": name, **meta}
        if low is None:
            rec.update(status="float fallback", kernel=None,
                       reason=f"no low-bit kernel for a quantized {meta['op']}: its weights were dequantized to "
                              "float32 at compile time and it runs in float")
        else:
            rec.update(kernel=low["kernel"], status=low["status"], reason=low.get("reason"))
            wants_act = meta["activation_format"] != "float32"
            if wants_act and low["activation"] == "float32":
                rec.update(status="emulated",
                           reason=low.get("reason") or f"{meta['activation_format']} activations are quantized and "
                                  "dequantized in float (Q/DQ emulation), the matmul reads float activations")
        layers.append(rec)
    return layers


def _bytes_by_dtype(params: dict) -> dict[str, int]:
    total: dict[str, int] = {}
    for arr in params.values():
        a = arr.numpy()
        total[str(arr.dtype)] = total.get(str(arr.dtype), 0) + int(a.nbytes)
    return total


def _machine(target: tvm.target.Target) -> str:
    host = target.host if target.kind.name == "cuda" and target.host is not None else target
    triple = str(host.attrs.get("mtriple", "")) if host.kind.name == "llvm" else ""
    return triple.split("-")[0] if triple else platform.machine()


def _cpu_features(target: tvm.target.Target) -> dict:
    """What the library's CPU code may use: the LLVM CPU name and the instruction-set extensions
    the target enables (for CUDA: of the generic host CPU the Relax VM glue is built for)."""
    host = target.host if target.kind.name == "cuda" and target.host is not None else target
    if host.kind.name != "llvm":
        return {"machine": _machine(target), "cpu": None, "features": []}
    features = tvm.target.codegen.llvm_get_cpu_features(host)
    return {"machine": _machine(target), "cpu": str(host.attrs.get("mcpu", "")) or "generic",
            "features": library_features(_machine(target), features)}


def export_artifact(
    qdq_model: onnx.ModelProto,
    target: tvm.target.Target,
    out_dir: str | os.PathLike,
    input_shapes: dict[str, list] | None = None,
    report: dict | None = None,
) -> dict:
    """Lower and build `qdq_model` for `target`; write model.so, params.bin and manifest.json
    into `out_dir` (which must exist). `input_shapes` pins input dims (else symbolic dims stay
    symbolic); `report` (the compile report) names the quantized layers. Returns the manifest."""
    out = Path(out_dir)
    if any(not n.name for n in qdq_model.graph.node):  # layers are told apart by node name
        named = onnx.ModelProto()
        named.CopyFrom(qdq_model)
        for i, n in enumerate(named.graph.node):
            n.name = n.name or f"{n.op_type}:{n.output[0] if n.output else i}"
        qdq_model = named
    t0 = time.perf_counter()
    mod, lowering = from_onnx(qdq_model, target, input_shapes)
    mod, params = _lift_constants(mod)
    t1 = time.perf_counter()
    ex = build(mod, target)
    cuda = _cuda_binaries(ex, target, out) if target.kind.name == "cuda" else None
    t2 = time.perf_counter()
    ex.export_library(str(out / LIBRARY), fcompile=cross_linker(target) if is_cross(target) else None)
    tvm.runtime.save_param_dict_to_file(params, str(out / PARAMS))
    t3 = time.perf_counter()
    layers = _layer_records(qdq_model, lowering, report)
    inputs = [_value_info(v) for v in qdq_model.graph.input
              if v.name not in {i.name for i in qdq_model.graph.initializer}]
    if input_shapes:
        for i in inputs:
            if i["name"] in input_shapes:
                i["shape"] = [int(d) if isinstance(d, int) else d for d in input_shapes[i["name"]]]
    manifest = {
        "version": MANIFEST_VERSION,
        "library": LIBRARY,
        "params": PARAMS,
        "param_names": list(params),  # main's parameters after the inputs, in order
        "params_bytes": (out / PARAMS).stat().st_size,
        "params_by_dtype": _bytes_by_dtype(params),
        "target": str(target),
        "target_kind": target.kind.name,
        "machine": _machine(target),  # the CPU architecture the library's code is for
        "device": "cuda" if target.kind.name == "cuda" else "cpu",
        "cuda_binaries": cuda,  # nvcc fatbins served to TVM's load-time CUDA compile callback
        "tvm_version": tvm.__version__,
        "inputs": inputs,
        "outputs": [_value_info(v) for v in qdq_model.graph.output],
        "format": report.get("format") if report else None,
        "layers": layers,
        "fallbacks": [{"name": l["name"], "status": l["status"], "reason": l["reason"]}
                      for l in layers if l["status"] != "native"],
        "lowering": {"fired": dict(lowering.fired), "refused": dict(lowering.refused)},
        "library_bytes": (out / LIBRARY).stat().st_size,
        "cpu_features": _cpu_features(target),  # loading refuses a CPU without them
        "sha256": {name: sha256_file(out / name)  # loading verifies what it reads
                   for name in (LIBRARY, PARAMS, *(b["file"] for b in cuda or []))},
        "seconds": {"lower": round(t1 - t0, 3), "build": round(t2 - t1, 3), "export": round(t3 - t2, 3)},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
