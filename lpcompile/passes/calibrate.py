"""calibrate: run the model in onnxruntime on calibration batches and record statistics of every
tensor that feeds a linear layer. An analysis: the graph is not rewritten.

Statistics are streaming — their memory does not depend on the number of batches: running
min/max, per-channel (last axis) absmax, a histogram of |x| that widens by merging bins when the
range grows, and, on request, the second-moment matrix XᵀX over the last axis (the Hessian that
GPTQ-style weight quantization needs).

The result is `model.meta["lpcompile.calibration"]` (a `Calibration`), and each recorded
value carries `lpcompile.absmax` in its metadata so a saved model keeps its ranges.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from lpcompile.calibration_data import CalibrationData
from lpcompile.formats import FloatFormat, IntFormat
from lpcompile.ir.patterns import conv_gram_key, conv_patches, find_linear_layers
from lpcompile.ir.run import OrtRunner

log = logging.getLogger(__name__)

CALIBRATION_KEY = "lpcompile.calibration"
_BINS = 2048


@dataclass
class TensorStats:
    """Streaming statistics of one tensor, channels on its last axis."""

    name: str
    channels: int
    count: int = 0  # rows (all axes but the last, over all batches)
    min: float = np.inf
    max: float = -np.inf
    channel_absmax: np.ndarray | None = None
    hist: np.ndarray = field(default_factory=lambda: np.zeros(_BINS, np.int64))
    hist_range: float = 0.0  # hist covers |x| in [0, hist_range)
    gram: np.ndarray | None = None  # XᵀX, float64 [C, C], when requested

    def update(self, x: np.ndarray, with_gram: bool) -> None:
        rows = x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False)
        self.count += rows.shape[0]
        self.min = min(self.min, float(rows.min()))
        self.max = max(self.max, float(rows.max()))
        cmax = np.abs(rows).max(axis=0)
        self.channel_absmax = cmax if self.channel_absmax is None else np.maximum(self.channel_absmax, cmax)
        absmax = float(cmax.max())
        if absmax >= self.hist_range:
            self._widen(absmax)
        self.hist += np.histogram(np.abs(rows), bins=_BINS, range=(0.0, self.hist_range))[0]
        if with_gram:
            r64 = rows.astype(np.float64)
            g = r64.T @ r64
            self.gram = g if self.gram is None else self.gram + g

    def _widen(self, absmax: float) -> None:
        """Grow the range by powers of two, merging pairs of bins, so old counts stay exact."""
        if self.hist_range == 0.0:
            self.hist_range = float(2.0 ** np.ceil(np.log2(max(absmax, 1e-30)) + 1e-9)) or 1e-30
            while self.hist_range <= absmax:
                self.hist_range *= 2
            return
        while self.hist_range <= absmax:
            self.hist = np.concatenate([self.hist.reshape(-1, 2).sum(axis=1), np.zeros(_BINS // 2, np.int64)])
            self.hist_range *= 2

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max))

    def percentile(self, p: float) -> float:
        """The p-th percentile of |x| (upper edge of the bin that reaches it)."""
        cum = np.cumsum(self.hist)
        if cum[-1] == 0:
            return 0.0
        idx = int(np.searchsorted(cum, cum[-1] * p / 100.0))
        return min(self.absmax, (idx + 1) * self.hist_range / _BINS)

    def mse_clip(self, fmt: IntFormat | FloatFormat, candidates: int = 100) -> float:
        """The clipping threshold c minimising the expected squared error of symmetric
        quantization of |x| with scale c / max_finite, estimated on the histogram."""
        width = self.hist_range / _BINS
        centers = (np.arange(_BINS) + 0.5) * width
        weights = self.hist.astype(np.float64)
        keep = weights > 0
        centers, weights = centers[keep], weights[keep]
        if not len(centers):
            return 0.0
        best, best_err = self.absmax, np.inf
        for c in np.linspace(self.absmax, self.absmax / candidates, candidates):
            scale = c / fmt.max_finite
            q = fmt.quantize(centers / scale) * scale
            err = float((weights * (centers - q) ** 2).sum())
            if err < best_err:
                best, best_err = float(c), err
        return best


@dataclass
class Calibration:
    """What `Calibrate` measured: statistics per tensor name, and where the data came from."""

    stats: dict[str, TensorStats]
    source: str
    is_random: bool
    num_samples: int
    seconds: float


@dataclass(frozen=True)
class Calibrate(ir.passes.InPlacePass):
    """Record statistics of every linear layer's float input on `data` (an analysis pass).

    `gram_for`: names of tensors whose XᵀX is needed (GPTQ); `None` records it for all.
    """

    data: CalibrationData
    batch_size: int = 8
    gram_for: frozenset[str] | None = frozenset()
    progress: Callable[[int, int], None] | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        start = time.perf_counter()
        names, conv_inputs, conv_grams = [], set(), []
        for layer in find_linear_layers(model.graph):
            if layer.activation is not None and layer.activation.name not in names:
                names.append(layer.activation.name)
            if layer.kind == "conv" and layer.activation is not None:  # XᵀX over the last axis is not a conv's:
                conv_inputs.add(layer.activation.name)  # its patches' is, under its own key
                if self.gram_for is None or layer.activation.name in self.gram_for:
                    conv_grams.append(layer)
        runner = OrtRunner(model, extra=names)
        stats: dict[str, TensorStats] = {}
        total = self.data.num_samples
        done = 0
        for batch in self.data.batches(self.batch_size):
            outputs = runner.run(batch)
            for name in names:
                x = outputs[name]
                if name not in stats:
                    stats[name] = TensorStats(name, int(x.shape[-1]))
                want_gram = (self.gram_for is None or name in self.gram_for) and name not in conv_inputs
                stats[name].update(x, want_gram)
            for layer in conv_grams:
                patches = conv_patches(layer, outputs[layer.activation.name])
                if patches is not None:
                    key = conv_gram_key(layer)
                    stats.setdefault(key, TensorStats(key, layer.in_features)).update(patches, True)
            done += len(next(iter(batch.values())))
            if self.progress:
                self.progress(done, total)
        for name, st in stats.items():
            value = _find_value(model.graph, name)
            if value is not None:
                value.metadata_props["lpcompile.absmax"] = f"{st.absmax:.9g}"
        model.meta[CALIBRATION_KEY] = Calibration(
            stats, self.data.label, self.data.is_random, done, time.perf_counter() - start
        )
        log.info("calibrate: %d tensors over %d samples from %s", len(stats), done, self.data.label)
        return ir.passes.PassResult(model, modified=False)


def _find_value(graph: ir.Graph, name: str) -> ir.Value | None:
    for node in graph:
        for out in node.outputs:
            if out.name == name:
                return out
    for value in graph.inputs:
        if value.name == name:
            return value
    return None
