"""select: choose a format per linear layer under a goal. An analysis: the graph is not changed;
the result is a `Plan` (`lpcompile.plan`; model.meta["lpcompile.plan"]) that `Quantize` applies.

Three steps, each measured rather than guessed:

1. Sensitivity. For every layer and every candidate the pass measures
   - the *layer-local* error: SQNR of the layer's output x·W when only its weights (or only its
     input) are quantized, in numpy on input rows captured once from calibration data, and
   - the *end-to-end* error: the model output's noise-to-signal ratio (NSR = 1/SQNR) and cosine
     loss (1 - mean cosine per sample) when only that layer is quantized, in onnxruntime.
   No session is rebuilt per measurement: in one session every weight is an overridable input
   (an initializer that is also a graph input, so only the weight under test is fed); in one
   session per activation candidate every layer input passes `Where(selector, QDQ(x), x)` with a
   per-layer boolean selector input (default false: float). Each measurement is one batched
   run per calibration batch; the float reference outputs are computed once.
2. Cost. Weight bits per layer per candidate, including scales and zero points (exactly what the
   quantized initializers store); activation bits per element; formats the target cannot run
   natively are flagged "emulated" (or dropped, `allow_emulated=False`). Kernel latency is the
   backend's measurement on the target (`backends.tvm.latency`, cached per kernel shape), which
   the pass receives as data (`LatencyCosts`): microseconds of each layer's kernels per option
   at a given token count; options with no native kernel there have none and are not candidates
   under a latency budget; embedding tables (gathers, not matmuls) cost 0.
3. Solver (the goal's, `lpcompile.goals`, over `lpcompile.solver`). Small output errors of different layers add up (their noises are nearly
   independent), so the model's NSR is predicted by Σ NSR_i and its cosine loss by Σ loss_i.
   Choosing one option per layer to minimise Σ NSR_i subject to Σ bits_i <= budget is a
   multiple-choice knapsack, solved exactly by dynamic programming over costs rounded *up* to
   1/resolution of the budget (so the solution always meets the budget). A latency budget is the
   same knapsack over the layers' kernel microseconds (Σ µs_i <= budget, costs rounded up to
   budget/4096: at most one unit per layer is lost to rounding). `min_cosine` solves the dual:
   fewest bits with Σ loss_i <= 1 - C (the caller verifies on data and tightens).

FP8 exponent bits: per layer the local SQNR of the ExMy family (E2M5, E3M4, E4M3, E5M2; "FP8
Quantization: The Power of the Exponent") is measured for the weights (per-channel, absmax scale)
and the input (per-tensor, MSE clip); the deployable split (E4M3 or E5M2) with the better local
SQNR is the layer's FP8 candidate, and the plan records the best ExMy and the gap to it, next to
the input's outlier severity (kurtosis, largest/median channel max).
"""

from lpcompile.passes.select.choose import Select
from lpcompile.passes.select.costs import (
    DEPLOYABLE_FP8, EMBEDDING_CANDIDATES, WEIGHT_CANDIDATES, LatencyCosts, _e2e, _measured, option_key,
)
from lpcompile.passes.select.sensitivity import EXMY, fake_quantize_activation, measure_sensitivity
from lpcompile.plan import spec_text

__all__ = ["Select", "LatencyCosts", "option_key", "spec_text", "measure_sensitivity", "fake_quantize_activation",
           "WEIGHT_CANDIDATES", "EMBEDDING_CANDIDATES", "DEPLOYABLE_FP8", "EXMY", "_e2e", "_measured"]
