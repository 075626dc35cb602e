"""lpcompile inside other compiler flows (each module needs its extra; none is imported here):

    lpcompile.integrations.torch   the torch.compile backend "lpcompile" (lpcompile[torch,tvm])
    lpcompile.integrations.tvm     the QDQ -> fused-kernel lowering as Relax passes (lpcompile[tvm])

The onnx_ir pass manager takes `lpcompile.passes` as they are; onnx-graphsurgeon graphs convert at
the API edge (`lpcompile.ir.load_model`, `lpcompile.ir.to_graphsurgeon`); MLIR output is
`lpcompile.backends.mlir` (`--emit mlir`). `examples/` has one script per surface.
"""
