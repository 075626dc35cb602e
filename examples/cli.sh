#!/bin/sh
# The command line: a float ONNX model -> INT4 (W4A16) QDQ ONNX + a TVM library for this CPU,
# then the library run on inputs and benchmarked. Usage: examples/cli.sh [WORK_DIR]
set -eu
work=${1:-$(mktemp -d)}
here=$(dirname "$0")
python "$here/tiny_model.py" "$work"                       # mlp.onnx, calib.npz
lpcompile "$work/mlp.onnx" --target llvm --format int4 --calibration "$work/calib.npz" \
          --emit onnx,tvm -o "$work/mlp.lpc"                # model.qdq.onnx, model.so, report.md, plan.json
lpcompile run "$work/mlp.lpc" --inputs "$work/calib.npz" -o "$work/out.npz"
lpcompile bench "$work/mlp.lpc" --batch 8
echo "outputs: $work/out.npz; report: $work/mlp.lpc/report.md"
