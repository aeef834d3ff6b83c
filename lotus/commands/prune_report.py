"""``lotus prune``'s outputs: the report (report.json / report.md, printed too), the sparsity sweep, and the
device a timing ran on."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import TYPE_CHECKING, Any

from lotus.commands import prune_recover
from lotus.errors import LotusError

if TYPE_CHECKING:  # annotations only: torch is imported when the command runs
    import torch
    from torch import nn

__all__ = ["device_name", "run_sweep", "write_report"]


def device_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_sweep(
    args: argparse.Namespace,
    model: nn.Module,
    name: str,
    bundle: Any,
    device: torch.device,
    dtype: torch.dtype,
    classes_ok: bool,
) -> int:
    from lotus.commands.prune_inputs import accuracy
    from pruning.masks import make_filter
    from pruning.sweep import essential_sparsity_sweep, save_sweep, sweep_markdown

    if not classes_ok:
        raise LotusError(
            f"--sweep: the model has {getattr(model, 'num_classes', '?')} classes but the data has "
            f"{bundle.num_classes}; pass a --checkpoint trained on this data"
        )
    keep = make_filter(model, include_head=args.include_head, include_patch_embed=args.include_patch_embed)
    t0 = time.perf_counter()
    result = essential_sparsity_sweep(
        model,
        lambda m: accuracy(m, bundle, device, dtype, args.max_eval),
        step=args.sweep_step,
        max_sparsity=args.max_sparsity,
        scope=args.scope or "layer",
        tolerance=args.tolerance,
        filter_fn=keep,
    )
    result.update(
        model=name,
        seconds=time.perf_counter() - t0,
        source=args.checkpoint or ("pretrained" if args.pretrained else "random init"),
    )
    paths = save_sweep(result, args.out, title=f"Essential sparsity: {name}")
    print(sweep_markdown(result))
    print(f"\nwrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0


def write_report(args: argparse.Namespace, report: dict) -> int:
    from lotus.safe_io import atomic_write_text
    from pruning.report import format_report

    text = format_report(report)
    blocks = report.get("blocks")
    if blocks:
        from pruning.report import markdown_table

        rows = [{"block": b, **w} for b, w in blocks.items()]
        text += "\n\n" + markdown_table(rows)
        text += f"\n\nparams {report['params_before']} -> {report['params_after']}"
        text += "".join(f"\nnote: {n}" for n in report.get("rounded") or [])
    if report.get("speedup"):
        lo, hi = report["speedup_range"]
        text += (
            f"\nlatency speed-up (batch {args.batch_size}, {report['device']}): {report['speedup']:.2f}x, "
            f"median of {report['latency_rounds']} interleaved rounds (range {lo:.2f}-{hi:.2f}x)"
        )
    elif report["after"].get("latency"):
        text += "\nlatency speed-up: not reported (no sparse kernel on this device)"
    if report.get("recovery"):
        text += "\n\n" + prune_recover.markdown(report)
    header = f"# lotus prune: {report['model_name']} ({report['method']})\n\n"
    json_path, md_path = os.path.join(args.out, "report.json"), os.path.join(args.out, "report.md")
    atomic_write_text(json_path, json.dumps(report, indent=2, default=str))
    atomic_write_text(md_path, header + text + "\n")
    print(header + text)
    print(f"\nwrote {', '.join(map(str, report['files'].values()))}, {json_path}, {md_path}")
    return 0
