"""Training-loop overhead: Lotus' Trainer vs a bare hand-written PyTorch loop, side by side.

Same model, batch size, data (digits tensors in memory, no augmentation), optimiser and thread count;
runs are interleaved (bare, lotus, lotus+recipe, bare, ...) so machine noise hits all alike. Reported:
median train images/s over epochs after the first, per-repeat ratios (median, range) of lotus/bare
(target >= 0.95: recipe options off cost nothing) and of lotus+EMA+mixup / lotus (target: overhead
<= 10 %). ``--compile`` instead compares ``train.compile: true`` with eager on the same model (step-time
ratio, and the compile time = the first epoch's extra seconds).

    python benchmarks/loop_overhead.py               # full
    python benchmarks/loop_overhead.py --compile     # torch.compile vs eager (CPU: inductor, C++ compiler)
    python benchmarks/loop_overhead.py --quick       # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import add_harness_args, args_dict, md_table, out_path, write_results  # noqa: E402
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
        "train": {
            "epochs": args.epochs,
            "warmup_epochs": 0.0,
            "grad_clip": 1.0,
            "seed": 0,
            "eval_every": args.epochs,
            "threads": args.threads,
        },
    }


RECIPE = {"mixup": {"enabled": True, "mixup_alpha": 0.8, "cutmix_alpha": 1.0}, "ema": {"enabled": True, "eval": False}}


def bare_loop(cfg) -> list[float]:
    """What a user would write by hand: shuffle, slice, forward, loss, backward, clip, step."""
    torch.manual_seed(0)
    data = build_datasets(cfg.data, cfg.model.img_size)
    model = create_model(cfg.model, data.num_classes, data.in_chans, cfg.model.img_size)
    opt = build_optimizer(cfg.optim, model)
    x_all, y_all = data.train.get_batch(torch.arange(len(data.train)))[:2]
    bs, rates = cfg.data.batch_size, []
    model.train()
    for _ in range(cfg.train.epochs):
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


def _ratio_stats(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def compare_compile(args) -> None:
    eager_cfg = config_from_dict(make_cfg(args))
    comp = make_cfg(args)
    comp["train"]["compile"] = True
    comp_cfg = config_from_dict(comp)
    eager, compiled, first_extra = [], [], []
    for _ in range(args.repeats):
        e, c = lotus_loop(eager_cfg), lotus_loop(comp_cfg)
        eager += e[1:]
        compiled += c[1:]
        n = 1437 - round(1437 * 0.2)  # train images per epoch (digits, 20 % held out)
        first_extra.append(n / c[0] - n / e[0])
    ratios = [c / e for c, e in zip(compiled, eager)]
    rows = [
        ["eager", round(statistics.median(eager), 1)],
        ["torch.compile", round(statistics.median(compiled), 1)],
        ["speed ratio compile/eager, per epoch (median, range)", _ratio_stats(ratios)],
        ["compile time: first epoch extra seconds (median)", round(statistics.median(first_extra), 1)],
    ]
    table = md_table(["loop", "train img/s (median)"], rows)
    write_results(
        out_path(args),
        {"args": args_dict(args), "eager": eager, "compiled": compiled, "ratios": ratios, "compile_s": first_extra},
        table,
        quick=args.quick,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lotus_vit_tiny")
    ap.add_argument("--img-size", type=int, default=16)
    ap.add_argument("--patch-size", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    add_harness_args(ap, "loop_overhead", quick="smoke run: lotus_vit_micro, 2 epochs, 1 repeat")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every loop (fixed: fair comparison)")
    ap.add_argument("--compile", action="store_true", help="compare train.compile: true with eager instead")
    args = ap.parse_args()
    if args.quick:
        args.model, args.epochs, args.repeats, args.patch_size = "lotus_vit_micro", 2, 1, 4
    torch.set_num_threads(args.threads)
    if args.compile:
        args._bench_name = "loop_compile"  # the default --out of the compile comparison
        return compare_compile(args)
    cfg = config_from_dict(make_cfg(args))
    recipe_cfg = config_from_dict({**make_cfg(args), **RECIPE})
    bare, lot, rec, r_lotus, r_recipe = [], [], [], [], []
    for _ in range(args.repeats):
        b, l_, r = bare_loop(cfg)[1:], lotus_loop(cfg)[1:], lotus_loop(recipe_cfg)[1:]
        bare += b
        lot += l_
        rec += r
        r_lotus.append(statistics.median(l_) / statistics.median(b))
        r_recipe.append(statistics.median(r) / statistics.median(l_))
    b, l_ = statistics.median(bare), statistics.median(lot)
    rows = [
        ["bare PyTorch loop", round(b, 1)],
        ["lotus Trainer", round(l_, 1)],
        ["lotus Trainer + EMA + mixup/cutmix", round(statistics.median(rec), 1)],
        ["ratio lotus/bare, per repeat (median, range)", _ratio_stats(r_lotus)],
        ["ratio (lotus + EMA + mixup)/lotus, per repeat", _ratio_stats(r_recipe)],
    ]
    table = md_table(["loop", "train img/s (median)"], rows)
    write_results(
        out_path(args),
        {
            "args": args_dict(args),
            "bare": bare,
            "lotus": lot,
            "lotus_recipe": rec,
            "ratio": l_ / b,
            "ratios_lotus_bare": r_lotus,
            "ratios_recipe_lotus": r_recipe,
        },
        table,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
