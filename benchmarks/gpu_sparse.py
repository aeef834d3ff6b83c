"""2:4 semi-structured sparsity vs dense on a CUDA GPU (prepared for H100/H200-class machines).

Measures, side by side in one run on the same GPU:
  1. Linear layers of ViT-B/L shapes (qkv, proj, fc1, fc2) at batch x 197 tokens, per dtype (bf16, fp16) and
     backend (CUTLASS, cuSPARSELt): forward time dense vs ``torch.sparse`` semi-structured, plus the numerical
     error of the sparse result.
  2. Training step of one layer (forward + backward): dense ``nn.Linear`` vs ``pruning.SemiSparseLinear`` (sparse
     forward kernel, dense backward with masked weight gradient) -- our 2:4 sparse-training path.
  3. End-to-end ViT-B/16 inference (timm, random init, 224 px): dense vs 2:4 (``prune_`` + ``to_semi_structured_``),
     converting all legal layers and, separately, only those the per-shape probe finds faster.

Writes gpu_sparse.json and gpu_sparse.md under --out (a folder; default: $OUT, else ./bench_out) and prints the tables.

  python benchmarks/gpu_sparse.py                 # full run (~3-6 min on an H100)
  python benchmarks/gpu_sparse.py --quick         # smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import add_harness_args, out_path, write_results  # noqa: E402

SHAPES = {  # name: (out_features, in_features)
    "vit_b.qkv": (2304, 768),
    "vit_b.proj": (768, 768),
    "vit_b.fc1": (3072, 768),
    "vit_b.fc2": (768, 3072),
    "vit_l.qkv": (3072, 1024),
    "vit_l.proj": (1024, 1024),
    "vit_l.fc1": (4096, 1024),
    "vit_l.fc2": (1024, 4096),
}


def cuda_time_ms(fn: Callable[[], Any], warmup: int, iters: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean time of ``iters`` calls, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    res = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        res.append(start.elapsed_time(end) / iters)
    return statistics.median(res)


def two_four(w: torch.Tensor) -> torch.Tensor:
    from pruning.mask_scores import nm_mask

    return w * nm_mask(w.abs().float(), 2, 4).to(w.dtype)


def bench_linear(args: argparse.Namespace, backends: list[str], dtypes: list[torch.dtype]) -> list[dict]:
    from pruning.semi_structured import _compress

    rows = []
    shapes = {k: v for k, v in SHAPES.items() if not args.quick or k.startswith("vit_b")}
    for batch in args.batches:
        tokens = batch * 197
        for dtype in dtypes:
            for backend in backends:
                for name, (out_f, in_f) in shapes.items():
                    row: dict[str, Any] = {
                        "layer": name,
                        "shape": f"{out_f}x{in_f}",
                        "tokens": tokens,
                        "dtype": str(dtype).removeprefix("torch."),
                        "backend": backend,
                    }
                    try:
                        x = torch.randn(tokens, in_f, device="cuda", dtype=dtype)
                        w = two_four(torch.randn(out_f, in_f, device="cuda", dtype=dtype))
                        b = torch.randn(out_f, device="cuda", dtype=dtype)
                        ws = _compress(w, backend)
                        ref = F.linear(x, w, b)
                        err = ((F.linear(x, ws, b) - ref).float().abs().max() / ref.float().abs().max()).item()
                        with torch.no_grad():
                            d = cuda_time_ms(lambda: F.linear(x, w, b), args.warmup, args.iters, args.repeats)
                            s = cuda_time_ms(lambda: F.linear(x, ws, b), args.warmup, args.iters, args.repeats)
                        flops = 2 * tokens * out_f * in_f
                        row.update(
                            dense_ms=d,
                            sparse_ms=s,
                            speedup=d / s,
                            rel_err=err,
                            dense_tflops=flops / d / 1e9,
                            sparse_eff_tflops=flops / s / 1e9,
                        )
                    except Exception as e:  # noqa: BLE001 - record and go on: one failing case must not lose the rest
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    rows.append(row)
                    print(_row_line(row), flush=True)
    return rows


def bench_train_step(args: argparse.Namespace, backends: list[str], dtypes: list[torch.dtype]) -> list[dict]:
    """Forward+backward of one layer: dense nn.Linear vs SemiSparseLinear (sparse fwd, dense bwd, masked grad)."""
    from pruning.mask_scores import nm_mask
    from pruning.semi_structured import SemiSparseLinear

    rows = []
    names = ["vit_b.fc1", "vit_b.fc2"] if args.quick else [k for k in SHAPES if k.endswith(("fc1", "fc2", "qkv"))]
    batch = args.batches[-1]
    tokens = batch * 197
    for dtype in dtypes:
        for backend in backends:
            for name in names:
                out_f, in_f = SHAPES[name]
                row: dict[str, Any] = {
                    "layer": name,
                    "shape": f"{out_f}x{in_f}",
                    "tokens": tokens,
                    "dtype": str(dtype).removeprefix("torch."),
                    "backend": backend,
                }
                try:
                    dense = nn.Linear(in_f, out_f, device="cuda", dtype=dtype)
                    mask = nm_mask(dense.weight.detach().abs().float(), 2, 4)
                    sparse = SemiSparseLinear.from_linear(
                        nn.Linear(in_f, out_f, device="cuda", dtype=dtype), mask, backend
                    )
                    x = torch.randn(batch, 197, in_f, device="cuda", dtype=dtype, requires_grad=True)
                    g = torch.randn(batch, 197, out_f, device="cuda", dtype=dtype)
                    assert sparse._kernel_ok(x), "SemiSparseLinear would not use the sparse kernel"

                    def step(mod: nn.Module) -> Callable[[], None]:
                        def run() -> None:
                            mod.weight.grad = None
                            x.grad = None
                            mod(x).backward(g)

                        return run

                    d = cuda_time_ms(step(dense), args.warmup, args.iters, args.repeats)
                    s = cuda_time_ms(step(sparse), args.warmup, args.iters, args.repeats)
                    with torch.no_grad():
                        fd = cuda_time_ms(lambda: dense(x), args.warmup, args.iters, args.repeats)
                        fs = cuda_time_ms(lambda: sparse(x), args.warmup, args.iters, args.repeats)
                    sparse.weight.grad = None
                    sparse(x).backward(g)
                    masked_ok = bool((sparse.weight.grad[~sparse.weight_mask] == 0).all())
                    row.update(
                        dense_fwd_ms=fd,
                        sparse_fwd_ms=fs,
                        fwd_speedup=fd / fs,
                        dense_step_ms=d,
                        sparse_step_ms=s,
                        step_speedup=d / s,
                        grad_masked=masked_ok,
                    )
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(row)
                print(_row_line(row), flush=True)
    return rows


def bench_vit(args: argparse.Namespace, dtypes: list[torch.dtype]) -> list[dict]:
    """End-to-end timm ViT-B/16 inference: dense vs 2:4 kernels (all legal layers / probe-selected layers)."""
    import timm

    import pruning
    from pruning.mask_scores import is_nm_sparse

    rows = []
    name = args.vit
    for dtype in dtypes:
        for batch in args.batches:
            row: dict[str, Any] = {"model": name, "batch": batch, "dtype": str(dtype).removeprefix("torch.")}
            try:
                torch.manual_seed(0)
                dense = timm.create_model(name, pretrained=False).cuda().to(dtype).eval()
                x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype)
                models = {"dense": dense}
                for mode in ("masked", "all", "probe"):
                    m = timm.create_model(name, pretrained=False).cuda().to(dtype).eval()
                    m.load_state_dict(dense.state_dict())
                    pruning.prune_(m, pruning.SemiStructuredConfig(kernels="off"))
                    pruning.make_permanent(m)  # masked dense: 2:4 zeros, dense kernels
                    if mode != "masked":
                        cands = {
                            f
                            for f, mod in m.named_modules()
                            if isinstance(mod, nn.Linear)
                            and is_nm_sparse(mod.weight, 2, 4)
                            and not f.startswith("head")
                        }
                        t0 = time.perf_counter()
                        rep = pruning.to_semi_structured_(
                            m, filter_fn=lambda mod, f, c=cands: f in c, probe=mode == "probe", probe_tokens=batch * 197
                        )
                        row[f"{mode}_convert_s"] = time.perf_counter() - t0
                        row[f"{mode}_converted"] = len(rep["converted"])
                        row[f"{mode}_skipped"] = len(rep["skipped"])
                        row["backend"] = rep["backend"]
                    models[mode] = m
                with torch.no_grad():
                    ref = models["masked"](x).float()
                    for k, m in models.items():
                        row[f"{k}_ms"] = cuda_time_ms(
                            lambda m=m: m(x), args.warmup, max(args.iters // 5, 3), args.repeats
                        )
                        if k in ("all", "probe"):  # kernels vs the same 2:4 weights run densely
                            out = m(x).float()
                            row[f"{k}_rel_err"] = ((out - ref).abs().max() / ref.abs().max()).item()
                            row[f"{k}_top1_agree"] = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
                for k in ("all", "probe"):
                    row[f"{k}_speedup"] = row["dense_ms"] / row[f"{k}_ms"]
                row["images_per_s_dense"] = batch / row["dense_ms"] * 1000
                row["images_per_s_best"] = batch / min(row["all_ms"], row["probe_ms"]) * 1000
                del models, dense
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                traceback.print_exc()
            rows.append(row)
            print(_row_line(row), flush=True)
    return rows


def _row_line(row: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_harness_args(p, "gpu_sparse", quick="few shapes, one batch size, short timing loops")
    p.set_defaults(out=os.path.join(os.environ.get("OUT") or "bench_out", ""))  # a folder: gpu_check.sh passes $OUT
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes (x197 tokens); default 32 128 (quick: 64)")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"], choices=["bfloat16", "float16"])
    p.add_argument("--vit", default="vit_base_patch16_224", help="timm model for the end-to-end test")
    p.add_argument("--skip", nargs="*", default=[], choices=["linear", "train", "vit"])
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: gpu_sparse.py needs a CUDA GPU (2:4 kernels do not exist on CPU)", file=sys.stderr)
        return 2
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        print(f"error: GPU sm_{major}{minor} has no 2:4 sparse tensor cores (need sm_80+)", file=sys.stderr)
        return 2
    args.batches = args.batches or ([64] if args.quick else [32, 128])
    args.warmup, args.iters, args.repeats = (5, 20, 3) if args.quick else (10, 50, 5)
    dtypes = [getattr(torch, d) for d in (args.dtypes[:1] if args.quick else args.dtypes)]
    backends = ["cutlass"] + (["cusparselt"] if torch.backends.cusparselt.is_available() else [])
    env = {
        "gpu": torch.cuda.get_device_name(),
        "capability": f"sm_{major}{minor}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cusparselt": torch.backends.cusparselt.is_available(),
        "cusparselt_version": getattr(torch.backends.cusparselt, "version", lambda: None)(),
        "python": platform.python_version(),
        "quick": args.quick,
        "batches": args.batches,
        "timing": {"warmup": args.warmup, "iters": args.iters, "repeats": args.repeats},
    }
    print(json.dumps(env), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    results: dict[str, Any] = {"env": env}
    stages = [
        ("linear", lambda: bench_linear(args, backends, dtypes)),
        ("train", lambda: bench_train_step(args, backends, dtypes)),
        ("vit", lambda: bench_vit(args, dtypes)),
    ]
    for key, fn in stages:
        if key in args.skip:
            continue
        t0 = time.perf_counter()
        results[key] = fn()
        results[f"{key}_seconds"] = time.perf_counter() - t0
        _write(out_path(args), results, args.quick)  # after every stage: a timeout still leaves what was measured
    md = _write(out_path(args), results, args.quick)
    print("\n" + md)
    return 0


def _table(rows: list[dict], cols: list[str]) -> str:
    from pruning.report import markdown_table

    return markdown_table([{c: r.get(c, r.get("error") if c == cols[-1] else None) for c in cols} for r in rows], cols)


def _write(out: str, results: dict, quick: bool) -> str:
    env = results["env"]
    parts = [
        f"# 2:4 semi-structured vs dense on {env['gpu']} ({env['capability']}, torch {env['torch']}, "
        f"CUDA {env['cuda']}, cuSPARSELt {env['cusparselt_version']})",
        "",
    ]
    if "linear" in results:
        parts += [
            "## Linear forward (F.linear, x197 tokens per image)",
            "",
            _table(
                results["linear"],
                ["layer", "shape", "tokens", "dtype", "backend", "dense_ms", "sparse_ms", "speedup", "rel_err"],
            ),
            "",
        ]
    if "train" in results:
        parts += [
            "## One layer, forward and forward+backward: nn.Linear vs pruning.SemiSparseLinear",
            "",
            _table(
                results["train"],
                [
                    "layer",
                    "shape",
                    "tokens",
                    "dtype",
                    "backend",
                    "dense_fwd_ms",
                    "sparse_fwd_ms",
                    "fwd_speedup",
                    "dense_step_ms",
                    "sparse_step_ms",
                    "step_speedup",
                    "grad_masked",
                ],
            ),
            "",
        ]
    if "vit" in results:
        parts += [
            "## End-to-end inference (timm, random init, 224 px)",
            "",
            _table(
                results["vit"],
                [
                    "model",
                    "batch",
                    "dtype",
                    "backend",
                    "dense_ms",
                    "masked_ms",
                    "all_ms",
                    "all_speedup",
                    "all_converted",
                    "probe_ms",
                    "probe_speedup",
                    "probe_converted",
                    "all_rel_err",
                ],
            ),
            "",
            "dense: unpruned; masked: the same 2:4 weights on dense kernels; all: every legal layer on 2:4 "
            "kernels; probe: only layers the per-shape probe found faster. Speedups are vs dense.",
            "",
        ]
    md = "\n".join(parts)
    write_results(out, results, md, quick=quick, echo=False)
    return md


if __name__ == "__main__":
    sys.exit(main())
