"""Dynamic shapes as exporters write them, through the TVM backend (issue 11 item 1).

A decoder exported with symbolic batch and sequence computes its shapes at run time:
`Reshape(Add(1, Squeeze(Shape(ids))), [1])`, position ids from `Range(0, seq)`, causal masks,
GQA repeats with `Expand`, rotary tables gathered by position. One artifact per (model, recipe)
is built and run at two sequence lengths and two batch sizes, against onnxruntime on the same
saved QDQ model; every quantized layer must run on a native kernel. A golden graph covers each
shape form on its own (symbolic scalar, symbolic vector, a shape computed as a tensor).

Weight-only recipes differ from onnxruntime by fp32 summation order only. Where activations are
quantized, a value within fp32 noise of a rounding boundary may round the other way in one
runtime: there TVM must be as far from the float model as onnxruntime is, and much closer to
onnxruntime than either is to float (as in test_whole_models)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

pytest.importorskip("tvm")
pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import lpcompile  # noqa: E402
from lpcompile import runtime  # noqa: E402
from lpcompile.backends.tvm.lower import compile_model  # noqa: E402
from models import hf_tiny  # noqa: E402
from tests.backends.test_tvm_kernels import TARGET  # noqa: E402
from tests.conftest import ort_run  # noqa: E402

WEIGHT_ONLY = ("int4", "w8a16")
# Layers allowed off the native kernels, by the start of the manifest's reason: a known gap each,
# stated in the issue note. Depthwise convolutions (ConvNeXt, MobileNet) run taps x weights
# dequantized in the graph (no native kernel yet); everything else must be native.
KNOWN_EMULATED = ("depthwise",)
SIZES = {"decoder": [(2, 5), (3, 11)], "convnet": [(1, 0), (3, 0)]}  # (batch, length) run from one artifact


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(1 - ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> path of the float model, captured once per module."""
    paths = {}

    def get(name: str):
        if name not in paths:
            path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
            onnx.save(ir.to_proto(hf_tiny.capture(name)), path)
            paths[name] = path
        return paths[name]

    return get


def build_and_compare(src, name: str, fmt: str, out, feeds=None) -> list[dict]:
    """Compile `src` with `fmt`, save, load; run both sizes against onnxruntime on the QDQ model.
    `feeds(rng, batch, length)`: inputs (default: `hf_tiny.feeds` for `name`)."""
    rng = np.random.default_rng(0)
    feeds = feeds or (lambda rng, batch, length=8: hf_tiny.feeds(name, rng, batch, length))
    calibration = [feeds(rng, 1) for _ in range(8)]
    lpcompile.compile(str(src), format=fmt, calibration=calibration, emit=("onnx", "tvm")).save(out)
    manifest = json.loads((out / "manifest.json").read_text())
    not_native = [(l["name"], l["op"], l["status"], l["reason"]) for l in manifest["layers"] if l["status"] != "native"
                  and not (l["status"] == "emulated" and str(l["reason"]).startswith(KNOWN_EMULATED))]
    assert not not_native, f"{name} {fmt}: {not_native}"
    assert manifest["layers"], "no quantized layer reached the manifest"
    model = runtime.load(out)
    qdq, flt = onnx.load(out / "model.qdq.onnx"), onnx.load(src)
    rows = []
    kind = "convnet" if name in hf_tiny.IMAGES else "decoder"
    for batch, length in SIZES[kind]:
        inputs = feeds(rng, batch, length)
        got = model.run(inputs)[model.output_names[0]]
        ref = ort_run(qdq, inputs)[0]
        assert got.shape == ref.shape, (got.shape, ref.shape)
        err = float(np.abs(got - ref).max())
        row = {"batch": batch, "length": length, "max_abs_diff": err, "ref_max": float(np.abs(ref).max())}
        if fmt in WEIGHT_ONLY:
            # fp32 summation order only; a deep CNN adds it up over its layers (MobileNetV2, 53
            # layers, 17 depthwise convs summed tap by tap in float: 1.67e-5 and 1.72e-5 of 1.59)
            rel = 3e-5 if kind == "convnet" else 1e-5
            assert err <= rel * row["ref_max"] + 1e-6, (name, fmt, row)
        else:
            base = ort_run(flt, inputs)[0]
            tvm_ort, tvm_flt, ort_flt = _cosine_distance(got, ref), _cosine_distance(got, base), _cosine_distance(ref, base)
            row.update(tvm_vs_ort=tvm_ort, ort_vs_float=ort_flt)
            assert tvm_ort <= 0.5 * ort_flt + 1e-7, (name, fmt, row)
            assert abs(tvm_flt - ort_flt) <= 0.1 * ort_flt + 1e-5, (name, fmt, row)
        rows.append(row)
    return rows


@pytest.mark.parametrize("name,fmt", [("llama-gqa", "int4"), ("llama-gqa", "int8"), ("gpt2", "int4"), ("gpt2", "int8")])
def test_dynamic_decoder(exported, tmp_path, name, fmt):
    rows = build_and_compare(exported(name), name, fmt, tmp_path / "out")
    print(f"\n{name} {fmt}: {rows}")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8", "w4a8"])
@pytest.mark.parametrize("name", hf_tiny.NAMES)
def test_dynamic_every_recipe(exported, tmp_path, name, fmt):
    rows = build_and_compare(exported(name), name, fmt, tmp_path / "out")
    print(f"\n{name} {fmt}: {rows}")


class AttentionBlock(torch.nn.Module):
    """A plain attention block as people write it: views by (batch, seq), rotary tables indexed
    by `arange(seq)`, grouped key/value heads repeated with `expand`, a `triu` causal mask."""

    def __init__(self, d: int = 64, heads: int = 4, kv_heads: int = 2, max_len: int = 128):
        super().__init__()
        self.h, self.kvh, self.dh = heads, kv_heads, d // heads
        self.q, self.o = torch.nn.Linear(d, d), torch.nn.Linear(d, d)
        self.k, self.v = torch.nn.Linear(d, kv_heads * self.dh), torch.nn.Linear(d, kv_heads * self.dh)
        inv = 1.0 / (10000 ** (torch.arange(0, self.dh, 2).float() / self.dh))
        angles = torch.outer(torch.arange(max_len).float(), inv)
        self.register_buffer("cos", torch.cat([angles, angles], -1).cos())
        self.register_buffer("sin", torch.cat([angles, angles], -1).sin())

    def rotate(self, x, pos):
        half = self.dh // 2
        return x * self.cos[pos][None, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * self.sin[pos][None, None]

    def forward(self, x):
        b, n, d = x.shape
        pos = torch.arange(n)
        q = self.rotate(self.q(x).view(b, n, self.h, self.dh).transpose(1, 2), pos)
        k = self.rotate(self.k(x).view(b, n, self.kvh, self.dh).transpose(1, 2), pos)
        v = self.v(x).view(b, n, self.kvh, self.dh).transpose(1, 2)
        g = self.h // self.kvh
        k = k[:, :, None].expand(b, self.kvh, g, n, self.dh).reshape(b, self.h, n, self.dh)
        v = v[:, :, None].expand(b, self.kvh, g, n, self.dh).reshape(b, self.h, n, self.dh)
        mask = torch.triu(torch.full((n, n), float("-inf")), 1)
        a = torch.softmax(q @ k.transpose(-1, -2) / self.dh**0.5 + mask, -1) @ v
        return self.o(a.transpose(1, 2).reshape(b, n, d))


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_captured_attention_block(tmp_path, fmt):
    """`lpcompile.capture(module, dynamic=["batch", "seq"])` on a plain attention block."""
    torch.manual_seed(0)
    src = tmp_path / "attn.onnx"
    onnx.save(ir.to_proto(lpcompile.capture(AttentionBlock(), (torch.randn(2, 8, 64),), dynamic=["batch", "seq"])), src)
    name = onnx.load(src).graph.input[0].name

    def feeds(rng, batch, length=8):
        return {name: rng.standard_normal((batch, length, 64)).astype(np.float32)}

    rows = build_and_compare(src, "attention", fmt, tmp_path / "out", feeds)
    print(f"\nattention block {fmt}: {rows}")


# --- each shape form on its own: a float graph, imported and built, against onnxruntime ------------

SHAPE_ARITHMETIC = """<ir_version: 10, opset_import: ["" : 21]>
shapes (float[B,S,8] x) => (float[B,S,8] y, float[S,S] mask, float[B,S,8] z) {
    zero = Constant <value = int64 {0}> ()
    one = Constant <value = int64 {1}> ()
    one1 = Constant <value = int64[1] {1}> ()
    zero1 = Constant <value = int64[1] {0}> ()
    eight = Constant <value = int64[1] {8}> ()
    rows = Constant <value = int64[2] {-1, 8}> ()
    shp = Shape(x)
    s = Gather <axis = 0> (shp, one)
    s1 = Reshape(s, one1)
    s_plus = Add(s, one)
    s_vec = Reshape(s_plus, one1)
    pos = Range(zero, s, one)
    posf = Cast <to = 1> (pos)
    shape3 = Concat <axis = 0> (one1, s1, one1)
    pos3 = Reshape(posf, shape3)
    b = Slice(shp, zero1, one1)
    full = Concat <axis = 0> (b, s1, eight)
    wide = Expand(pos3, full)
    y = Add(x, wide)
    ss = Concat <axis = 0> (s1, s1)
    ones = ConstantOfShape <value = float[1] {1.0}> (ss)
    mask = Trilu <upper = 0> (ones)
    as_float = Cast <to = 1> (shp)
    computed = Cast <to = 7> (as_float)
    flat = Reshape(x, rows)
    back = Reshape(flat, computed)
    extra = Cast <to = 1> (s_vec)
    z = Add(back, extra)
}"""


def test_shape_arithmetic_golden():
    """A symbolic scalar reshaped to a vector, Range over it, Concat/Slice of dims feeding
    Reshape and Expand, a Trilu mask over ConstantOfShape, and a shape that reaches Reshape as a
    tensor computed at run time (Cast of Shape there and back): one build, two sizes."""
    model = onnx.parser.parse_model(SHAPE_ARITHMETIC)
    onnx.checker.check_model(model, full_check=True)
    ex, _ = compile_model(model, TARGET)
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    for b, s in ((2, 3), (1, 7)):
        x = rng.standard_normal((b, s, 8)).astype(np.float32)
        got = [o.numpy() for o in vm["main"](tvm.runtime.tensor(x))]
        ref = ort_run(model, {"x": x})
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)


RANGES = """<ir_version: 10, opset_import: ["" : 21]>
ranges (float[B,S] x) => (int64[N] up, int64[M] down) {
    one = Constant <value = int64 {1}> ()
    two = Constant <value = int64 {2}> ()
    three = Constant <value = int64 {3}> ()
    minus_two = Constant <value = int64 {-2}> ()
    shp = Shape(x)
    s = Gather <axis = 0> (shp, one)
    up = Range(two, s, three)
    down = Range(s, one, minus_two)
}"""


def test_range_over_symbolic_scalars():
    """Integer Range over a symbolic scalar keeps ONNX's length max(ceil((limit - start) / delta), 0),
    empty ranges and negative steps included."""
    import tvm
    from tvm import relax

    model = onnx.parser.parse_model(RANGES)
    vm = relax.VirtualMachine(compile_model(model, TARGET)[0], tvm.cpu())
    for s in (1, 2, 3, 8):
        x = np.zeros((2, s), np.float32)
        got = [o.numpy() for o in vm["main"](tvm.runtime.tensor(x))]
        for g, r in zip(got, ort_run(model, {"x": x})):
            np.testing.assert_array_equal(g, r)


SHAPES_AS_TENSORS = """<ir_version: 10, opset_import: ["" : 21]>
g (float[B,S,8] x) => (float[B,S,8] y, float[B,S,8] z, int64[3] full) {
    zero1 = Constant <value = int64[1] {0}> ()
    two1 = Constant <value = int64[1] {2}> ()
    ones = Constant <value = int64[2] {1, 1}> ()
    eight = Constant <value = int64[1] {8}> ()
    flat_shape = Constant <value = int64[2] {-1, 8}> ()
    shp = Shape(x)
    bs = Slice(shp, zero1, two1)
    bs2 = Mul(bs, ones)
    computed = Concat <axis = 0> (bs2, eight)
    y = Reshape(x, computed)
    full = Concat <axis = 0> (bs, eight)
    flat = Reshape(x, flat_shape)
    back = Reshape(flat, full)
    z = Add(back, x)
}"""


def test_shape_values_read_as_tensors():
    """A shape value read by an op TVM only runs on tensors (`Mul(Slice(Shape(x)), c)`) or
    returned by the graph is held as a tensor; a Reshape by a tensor computed from it works, and
    one by the same value where it is also a graph output keeps its symbolic dims (`back + x`
    broadcasts without a run-time shape)."""
    import tvm
    from tvm import relax

    model = onnx.parser.parse_model(SHAPES_AS_TENSORS)
    vm = relax.VirtualMachine(compile_model(model, TARGET)[0], tvm.cpu())
    rng = np.random.default_rng(0)
    for b, s in ((2, 3), (1, 5)):
        x = rng.standard_normal((b, s, 8)).astype(np.float32)
        got = [o.numpy() for o in vm["main"](tvm.runtime.tensor(x))]
        for g, r in zip(got, ort_run(model, {"x": x})):
            np.testing.assert_array_equal(g, r)
