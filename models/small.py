"""Small seeded models for fast tests: an MLP and a CNN.

`build_mlp()`: x [batch, 64] -> Linear(64, 256) -> GELU -> Linear(256, 256) -> GELU ->
Linear(256, 10) -> [batch, 10].  On 2-D inputs torch 2.13's dynamo exporter (opset 21) emits each
Linear as one `Gemm` (transB=1, weight kept [out, in]) and GELU as the ONNX `Gelu` op
(approximate="none"; `Gelu` exists since opset 20).

`build_cnn()`: x [batch, 3, 32, 32] -> [Conv3x3(3->16) -> BatchNorm -> ReLU -> MaxPool2] ->
[Conv3x3(16->32) -> BatchNorm -> ReLU -> MaxPool2] -> [Conv3x3(32->64) -> BatchNorm -> ReLU] ->
global average pool -> Linear(64, 10) -> [batch, 10].  BatchNorm running statistics and affine
parameters are seeded random (not the identity).  The exporter's optimizer folds each eval-mode
BatchNorm into the preceding Conv, so the ONNX graph holds only Conv (with bias), Relu, MaxPool,
ReduceMean (the global pool) and Gemm; no BatchNormalization node reaches lpcompile.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["build_mlp", "build_cnn", "MLP_INPUT_SHAPE", "CNN_INPUT_SHAPE"]

MLP_INPUT_SHAPE = (64,)
CNN_INPUT_SHAPE = (3, 32, 32)


def _reinit(module: nn.Module, seed: int) -> None:
    """Seeded Kaiming-style weights, small biases; BatchNorm stats/affine drawn at random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.05)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1.0 + 0.1 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=g))


def build_mlp(seed: int = 0, in_features: int = 64, hidden: int = 256, out_features: int = 10) -> nn.Module:
    """3-layer MLP with GELU, input [batch, in_features], eval mode."""
    model = nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.GELU(),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Linear(hidden, out_features),
    )
    _reinit(model, seed)
    return model.eval()


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(3, 16),
            nn.MaxPool2d(2),
            *block(16, 32),
            nn.MaxPool2d(2),
            *block(32, 64),
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.fc(h.mean(dim=(2, 3)))


def build_cnn(seed: int = 0, num_classes: int = 10) -> nn.Module:
    """Small CNN, input [batch, 3, 32, 32], eval mode."""
    model = SmallCNN(num_classes)
    _reinit(model, seed)
    return model.eval()
