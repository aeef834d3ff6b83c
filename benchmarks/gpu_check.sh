#!/usr/bin/env bash
# One prepared GPU check (for a CUDA machine such as an H100/H200): installs Lotus, runs the CUDA tests,
# then the GPU benchmarks, writing everything under $OUT (default ./gpu_out). A few minutes in all.
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
pip install -q -e ".[test]" > "$OUT/install.log" 2>&1 || { echo "install failed"; tail -20 "$OUT/install.log"; exit 1; }
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
# CUDA tests (they skip on CPU machines)
python -m pytest -q tests/test_pruning_cuda.py -k "cuda or semi or sparse" 2>&1 | tail -30 > "$OUT/cuda_tests.txt"
tail -3 "$OUT/cuda_tests.txt"
# 2:4 vs dense on ViT-B shapes and end-to-end ViT-B inference
timeout 300 python benchmarks/gpu_sparse.py --out "$OUT" 2>&1 | tail -40
# memory planner: predicted vs measured peak CUDA memory and step time
timeout 200 python benchmarks/gpu_memory_plan.py --out "$OUT" 2>&1 | tail -30
# LOTUS under torchrun on CUDA (nccl, one rank per GPU, at most 2): dynamic data pruning + thinning vs dense
timeout 420 python benchmarks/lotus_distributed.py --device cuda --nproc 2 --seeds 0 1 --out-dir "$OUT" 2>&1 | tail -12
ls -la "$OUT"
