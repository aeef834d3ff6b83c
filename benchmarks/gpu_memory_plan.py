"""GPU memory planner benchmark (prepared for a CUDA machine): measured vs predicted peak CUDA memory and
step time for no checkpointing, the planned mix (none / offload / selective / full per block) and
checkpointing every block, under a budget below what no checkpointing needs; plus the largest batch that
fits the budget with and without a plan.

Same procedure as ``benchmarks/memory_plan.py`` (see its docstring) with CUDA defaults: ViT-B/16 at
224 px, batch 64, bf16 autocast (as ``lotus train`` uses on CUDA), activation offload profiled as a
fourth option, memory from ``torch.cuda.memory_allocated`` / ``max_memory_allocated``.

  python benchmarks/gpu_memory_plan.py                 # full run (~5-10 min on one H100)
  python benchmarks/gpu_memory_plan.py --quick         # smoke run
  python benchmarks/gpu_memory_plan.py --model vit_large_patch16_224 --batch 32

Writes gpu_memory_plan.json and gpu_memory_plan.md under --out's folder (default: $OUT, else ./bench_out).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import memory_plan  # noqa: E402
import torch  # noqa: E402

GPU_FULL = {
    "model": "vit_base_patch16_224",
    "img_size": 224,
    "patch_size": None,
    "depth": None,
    "batch": 64,
    "repeats": 5,
}
GPU_QUICK = {
    "model": "vit_base_patch16_224",
    "img_size": 224,
    "patch_size": None,
    "depth": 4,
    "batch": 32,
    "repeats": 3,
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available() and not {"-h", "--help"} & set(argv):
        print("error: gpu_memory_plan.py needs a CUDA device (use benchmarks/memory_plan.py on CPU)", file=sys.stderr)
        return 2
    out_dir = os.environ.get("OUT") or "bench_out"
    defaults = {"device": "cuda", "bf16": True, "out": os.path.join(out_dir, ""), "_bench_name": "gpu_memory_plan"}
    memory_plan.QUICK.update(GPU_QUICK)
    memory_plan.FULL.update(GPU_FULL)
    torch.backends.cuda.matmul.allow_tf32 = True
    return memory_plan.main(argv, defaults)


if __name__ == "__main__":
    sys.exit(main())
