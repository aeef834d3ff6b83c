"""Training-loop overhead: Lotus' Trainer vs a bare hand-written PyTorch loop, side by side.

Same model, batch size, data (digits tensors in memory, no augmentation) and optimiser; runs are
interleaved (bare, lotus, bare, lotus, ...) so machine noise hits both alike. Reported: median train
images/s over epochs after the first, and the ratio lotus/bare (target >= 0.95).

    python benchmarks/loop_overhead.py               # full
    python benchmarks/loop_overhead.py --quick       # smoke run
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import md_table, write_results  # noqa: E402

from lotus.config import config_from_dict  # noqa: E402
from lotus.data import build_datasets  # noqa: E402
from lotus.models import create_model  # noqa: E402
from lotus.optim import build_optimizer  # noqa: E402
from lotus.training import Trainer  # noqa: E402


def make_cfg(args) -> dict:
    return {
        "model": {"name": args.model, "img_size": args.img_size, "patch_size": args.patch_size},
        "data": {"name": "digits", "batch_size": args.batch_size},
        "optim": {"name": "adamw", "lr": 1e-3},
        "train": {"epochs": args.epochs, "warmup_epochs": 0.0, "grad_clip": 1.0, "seed": 0, "eval_every": args.epochs},
    }


def bare_loop(cfg) -> list[float]:
    """What a user would write by hand: shuffle, slice, forward, loss, backward, clip, step."""
    torch.manual_seed(0)
    data = build_datasets(cfg.data, cfg.model.img_size)
    model = create_model(cfg.model, data.num_classes, data.in_chans, cfg.model.img_size)
    opt = build_optimizer(cfg.optim, model)
    x_all, y_all = data.train.get_batch(torch.arange(len(data.train)))[:2]
    bs, rates = cfg.data.batch_size, []
    model.train()
    for epoch in range(cfg.train.epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(y_all))
        for s in range(0, len(perm), bs):
            idx = perm[s : s + bs]
            x, y = data.train.get_batch(idx)[:2]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        rates.append(len(perm) / (time.perf_counter() - t0))
    return rates


def lotus_loop(cfg) -> list[float]:
    t = Trainer(cfg, write=False, quiet=True)
    rates: list[float] = []
    from lotus.callbacks import Callback

    class Rec(Callback):
        def on_epoch_end(self, trainer, epoch, metrics):
            rates.append(metrics["throughput"])

    t.callbacks.append(Rec())
    t.fit()
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lotus_vit_tiny")
    ap.add_argument("--img-size", type=int, default=16)
    ap.add_argument("--patch-size", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if args.quick:
        args.model, args.epochs, args.repeats, args.patch_size = "lotus_vit_micro", 2, 1, 4
    cfg = config_from_dict(make_cfg(args))
    bare, lot = [], []
    for _ in range(args.repeats):
        bare += bare_loop(cfg)[1:]
        lot += lotus_loop(cfg)[1:]
    b, l_ = statistics.median(bare), statistics.median(lot)
    rows = [["bare PyTorch loop", round(b, 1)], ["lotus Trainer", round(l_, 1)], ["ratio lotus/bare", round(l_ / b, 3)]]
    table = md_table(["loop", "train img/s (median)"], rows)
    write_results(None if args.quick else args.out, "loop_overhead",
                  {"args": vars(args), "bare": bare, "lotus": lot, "ratio": l_ / b}, table)


if __name__ == "__main__":
    main()
