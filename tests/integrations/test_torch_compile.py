"""torch.compile(backend="lpcompile") (lpcompile.integrations.torch): each FX graph dynamo hands
over is quantized by the compile pipeline and runs as a TVM artifact. Checked against eager torch
(float: the quantization error, bounded) and against onnxruntime on the same QDQ model (the
reference for the TVM numbers, tight)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tvm")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import lpcompile.integrations.torch as lt  # noqa: E402
from tests.conftest import ort_run  # noqa: E402


class Block(nn.Module):
    """A pre-norm transformer block: multi-head self-attention and a GELU MLP."""

    def __init__(self, d: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class SmallCnn(nn.Module):
    """Three convolutions, then (after a graph break) a linear head: two FX graphs."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32 * 8 * 8, 64)

    def forward(self, x):
        x = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        torch._dynamo.graph_break()
        return self.head(x.flatten(1))


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    lt.register()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _new_pieces(before):
    return [p for p in lt.pieces() if p.index >= before]


def test_transformer_block_int4_with_calibration_data():
    torch.manual_seed(0)
    model = Block().eval()
    batches = [torch.randn(2, 8, 64) for _ in range(4)]
    x = torch.randn(2, 8, 64)
    start = lt.CompiledPiece._count
    compiled = torch.compile(model, backend="lpcompile", dynamic=False,
                             options={"format": "int4", "calibration": batches, "target": "llvm"})
    with torch.no_grad():
        y, ref = compiled(x), model(x)
    (piece,) = _new_pieces(start)
    assert piece.state == "compiled" and piece.report["totals"]["layers_quantized"] == 4
    assert piece.report["format"] == "int4"
    # against eager float: int4 weights (blocks of 128 along K = 64/256) on random weights
    assert cosine(y, ref) > 0.995
    # against onnxruntime on the QDQ model lpcompile wrote: the TVM kernels compute the same graph
    (ort,) = ort_run(piece.compiled.qdq_model, {piece.input_names[0]: x.numpy()})
    np.testing.assert_allclose(y.numpy(), ort, rtol=0, atol=2e-5 * np.abs(ort).max())
    assert not np.allclose(ort, ref.numpy(), atol=1e-4)  # the weights really are quantized


@pytest.mark.slow  # two pieces, two TVM builds (~25 s)
def test_graph_break_pieces_calibrate_on_first_calls():
    """No calibration data: each piece runs eagerly on its first calls (exactly the float
    model), recording its inputs, then compiles with static int8 activation scales from them."""
    torch.manual_seed(1)
    model = SmallCnn().eval()
    xs = [torch.randn(1, 3, 16, 16) for _ in range(3)]
    start = lt.CompiledPiece._count
    compiled = torch.compile(model, backend="lpcompile", dynamic=False,
                             options={"format": "int8", "calibration_calls": 2})
    with torch.no_grad():
        for x in xs[:2]:
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)  # eager while calibrating
        pieces = _new_pieces(start)
        assert len(pieces) == 2 and all(p.state == "compiled" for p in pieces)
        y, ref = compiled(xs[2]), model(xs[2])
    assert cosine(y, ref) > 0.99
    head = next(p for p in pieces if p.report["totals"]["layers_quantized"] >= 1 and len(p.shapes[0]) == 4
                and p.shapes[0][1] == 32)
    assert head.report["format"] == "int8"


def test_refusals_are_one_line():
    model = nn.Linear(8, 8).eval()
    x = torch.randn(2, 8)
    with pytest.raises(Exception, match="unknown option.*bits.*known: format"):
        torch.compile(model, backend="lpcompile", options={"bits": 4})(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="static shapes only; pass dynamic=False"):
        torch.compile(model, backend="lpcompile", dynamic=True, options={"calibration_calls": 0})(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown format 'int3'|int3"):
        torch.compile(model, backend="lpcompile", options={"format": "int3"})(x)


def test_registered_by_entry_point_or_register():
    from importlib.metadata import entry_points

    assert "lpcompile" in torch._dynamo.list_backends()
    eps = entry_points(group="torch_dynamo_backends")
    if "lpcompile" in eps.names:  # an installed lpcompile (pip install -e . included)
        assert eps["lpcompile"].load() is lt.backend
