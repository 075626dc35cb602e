"""TVM backend: lowers lpcompile's QDQ ONNX graphs to native low-bit code (LLVM CPUs, CUDA).

`kernels` holds the TIR/TE compute definitions (one per low-precision matmul family, shared by
every target) and their per-target schedules; `target` builds the TVM targets we support.
Importing this package does not import TVM; its submodules do.
"""
