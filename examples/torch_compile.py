"""lpcompile as a torch.compile backend: a small transformer block, INT4 weights (W4A16), run as
a TVM library on torch tensors. Without calibration data the first calls would run eagerly and
calibrate (options["calibration_calls"]); here the batches are given. Needs lpcompile[torch,tvm].
Usage: python examples/torch_compile.py"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lpcompile.integrations.torch as lpc_torch


class Block(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def main() -> None:
    lpc_torch.register()  # an installed lpcompile registers "lpcompile" through its entry point already
    torch.manual_seed(0)
    model = Block().eval()
    batches = [torch.randn(2, 16, 64) for _ in range(4)]
    compiled = torch.compile(model, backend="lpcompile", dynamic=False,
                             options={"format": "int4", "calibration": batches, "target": "llvm"})
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        y, ref = compiled(x), model(x)
    (piece,) = lpc_torch.pieces()
    cos = F.cosine_similarity(y.flatten(), ref.flatten(), dim=0).item()
    print(f"{piece.state}: {piece.report['totals']['layers_quantized']} int4 layers; cosine vs eager float {cos:.5f}")
    assert cos > 0.99, cos
    print("OK torch_compile")


if __name__ == "__main__":
    main()
