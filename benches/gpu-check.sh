#!/usr/bin/env bash
# The GPU check, run on a machine with an NVIDIA GPU, its driver, PyTorch and the CUDA 13
# libraries that PyTorch's wheels bring (cuBLAS, cuRAND, NVRTC):
#
#   bash benches/gpu-check.sh GPU_CHECK TRAIN OUT
#
# GPU_CHECK and TRAIN: `benches/examples/gpu-check/` and the `train` binary, built with
# `--features cuda` (docs/benchmarks.md, "GPU", says how they were built without a GPU).
# OUT: a folder for the logs and JSON. In order:
#   1. the GPU and driver (nvidia-smi), and which CUDA libraries the binaries load;
#   2. PyTorch's times of the benchmark rows on the GPU (torch_bench.py --device cuda);
#   3. gpu-check: CPU-vs-CUDA parity, then our rows on the GPU beside PyTorch's;
#   4. the default `train` run on the bundled digits with `--device cuda`.
# Each step runs under a time limit and the next runs whatever the last one did; the exit
# status is gpu-check's (non-zero when a parity comparison failed).
set -u
gpu_check=$1 train=$2 out=$3
mkdir -p "$out"

# Candle links CUDA's libraries dynamically; take them from PyTorch's wheels.
site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    found=$(find "$site/nvidia" /usr/local/cuda*/ -name "$lib" 2>/dev/null | head -1)
    [ -n "$found" ] && LD_LIBRARY_PATH=$(dirname "$found"):${LD_LIBRARY_PATH:-}
done
export LD_LIBRARY_PATH

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
ldd "$gpu_check" | grep -E "cuda|cublas|curand|nvrtc|not found" | tee -a "$out/gpu.txt"

PYTHONUNBUFFERED=1 timeout 150 python3 benches/torch_bench.py --device cuda --min-time 1 \
    --out "$out/torch-cuda.json" >"$out/torch-cuda.log" 2>&1
echo "torch_bench.py exit $?"
tail -n 5 "$out/torch-cuda.log"

timeout 240 "$gpu_check" --torch "$out/torch-cuda.json" --out "$out/gpu-check.json" 2>&1 \
    | tee "$out/gpu-check.log"
status=${PIPESTATUS[0]}
echo "gpu-check exit $status"

start=$(date +%s)
timeout 150 "$train" --device cuda --overwrite --out /tmp/train-cuda >"$out/train.log" 2>&1
echo "train --device cuda exit $? in $(( $(date +%s) - start )) s"
cp /tmp/train-cuda/metrics.jsonl "$out/train-metrics.jsonl"
tail -n 8 "$out/train.log"
exit "$status"
