"""Load and run compiled artifacts without the compiler.

    model = lpcompile.runtime.load("out/")      # model.so + manifest.json (TVM Relax VM)
    y = model(x)                                # numpy or torch tensors, by position or name
    model.benchmark(warmup=5, repeat=50)        # p50/p90/p99 ms, throughput

Importing this package (or loading an artifact) imports neither lpcompile.passes nor the API
or CLI: a deployment needs TVM's runtime and numpy only.
"""

from __future__ import annotations


def load(out_dir, device=None):
    """The compiled model in `out_dir` as a callable (`lpcompile.runtime.tvm.TvmModel`)."""
    from lpcompile.runtime.tvm import TvmModel

    return TvmModel(out_dir, device=device)


__all__ = ["load"]
