"""Inference timings of benchmark runs: each run's final model loaded and timed round robin on fixed threads,
the result kept in the run folder (``inference.json``) so a rerun reports the same img/s."""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from lotus.config_upgrade import load_saved_config
from lotus.data import build_datasets
from lotus.models import create_model, resolve_img_size
from lotus.safe_io import atomic_write_text
from lotus.weights import read_state_dict

__all__ = ["load_inference", "measure_inference"]


def load_inference(run_dir: str) -> tuple[torch.nn.Module, torch.Tensor, dict]:
    """The run's final model (eval mode), a val batch of up to 256 images, and its params, nonzeros and
    forward FLOPs/img."""
    cfg = load_saved_config(os.path.join(run_dir, "config.yaml"))
    img = resolve_img_size(cfg.model)
    data = build_datasets(cfg.data, img, cfg.model.in_chans, model_cfg=cfg.model)
    cfg.model.pretrained = False
    cfg.model.checkpoint = os.path.join(run_dir, "last.safetensors")
    model = create_model(cfg.model, data.num_classes, data.in_chans, img).eval()
    sd = read_state_dict(cfg.model.checkpoint)
    x = (
        data.val.get_batch(torch.arange(min(256, len(data.val))))[0]
        if hasattr(data.val, "get_batch")
        else torch.stack([data.val[i][0] for i in range(min(256, len(data.val)))])
    )
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(x[:1])
    return (
        model,
        x,
        {
            "params": sum(p.numel() for p in model.parameters()),
            "nonzero": int(sum(int((v != 0).sum()) for v in sd.values() if v.is_floating_point())),
            "flops_per_img": float(fc.get_total_flops()),
        },
    )


def measure_inference(results: list[Any], repeats: int, threads: int = 1) -> list[list[dict]]:
    """Per config, per run: params, nonzeros, FLOPs/img and inference img/s (median of ``repeats`` timed
    forwards of the batch on ``threads`` threads). The models of one seed are loaded together and timed round
    robin, so a change in machine load hits every config alike rather than the ones measured at that moment."""
    out: list[list[dict]] = [[{} for _ in r.runs] for r in results]
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k in range(max((len(r.runs) for r in results), default=0)):
            todo = []
            for i, r in enumerate(results):
                if k < len(r.runs):
                    kept = _kept_inference(r.runs[k], repeats, threads)
                    if kept is not None:
                        out[i][k] = kept
                    else:
                        todo.append(i)
            loaded = [(i, *load_inference(results[i].runs[k])) for i in todo]
            times: dict[int, list[float]] = {i: [] for i, *_ in loaded}
            with torch.inference_mode():
                for _, model, x, _ in loaded:
                    model(x)  # warm-up
                for _ in range(repeats):
                    for i, model, x, _ in loaded:
                        t0 = time.perf_counter()
                        model(x)
                        times[i].append(time.perf_counter() - t0)
            for i, _, x, info in loaded:
                out[i][k] = {**info, "img_per_s": len(x) / statistics.median(times[i])}
                _keep_inference(results[i].runs[k], out[i][k], repeats, threads)
    finally:
        torch.set_num_threads(prev)
    return out


def _inference_key(run_dir: str, repeats: int, threads: int) -> dict:
    weights = os.path.join(run_dir, "last.safetensors")
    return {"repeats": repeats, "threads": threads, "weights_mtime_ns": os.stat(weights).st_mtime_ns}


def _kept_inference(run_dir: str, repeats: int, threads: int) -> dict | None:
    """The run's stored inference timing (``inference.json``) when it was measured the same way on the same
    weights; a rerun of the benchmark then reports the same img/s instead of re-timing."""
    path = os.path.join(run_dir, "inference.json")
    try:
        with open(path) as f:
            kept = json.load(f)
        return kept["result"] if kept.get("key") == _inference_key(run_dir, repeats, threads) else None
    except (OSError, ValueError, KeyError):
        return None


def _keep_inference(run_dir: str, result: dict, repeats: int, threads: int) -> None:
    atomic_write_text(
        os.path.join(run_dir, "inference.json"),
        json.dumps({"key": _inference_key(run_dir, repeats, threads), "result": result}),
    )
