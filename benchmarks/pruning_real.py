"""Pruning a trained ViT on real data (Fashion-MNIST): Lotus vs Torch-Pruning, structured and 2:4, recovered alike.

The starting model per seed: a Pre-LN timm ViT (patch 4 at 28 px = 49 tokens, width 64, depth 4, 4 heads of
16) trained by ``lotus train`` on configs/fashion_op.yaml's recipe with SOAP (8 000 class-stratified training
images, 14 epochs; the 5 000 held-out validation images and the 10 000 test images as in every Fashion-MNIST
run). Each method then prunes a copy of it and recovers with the same budget: 2 epochs (1/7 of the original
epochs; the teacher's forward passes included, under 20 % of its CPU time) of the same loop at lr 5e-4,
distilling from the dense model (``distill.alpha`` 0.5):

* Lotus structured (``pruning.prune_structured``, first-order Taylor importance from 8 calibration batches),
  25 % and 50 % of the heads and MLP neurons of every block;
* Torch-Pruning at 50 % (its timm ViT recipe: ``num_heads`` per qkv, heads and MLP neurons only, Taylor
  importance from the same batches): the same parameter count as Lotus 50 %;
* 2:4 masks (``SemiStructuredConfig``), magnitude and Wanda scores (masked dense weights on CPU).

Reported per seed: test accuracy of the dense model, right after pruning and after recovery; params (nonzero
for masks); the recovery's CPU seconds as a share of the dense training's; inference img/s (1 thread,
batch 256, median of interleaved rounds, with the spread). On CPU 2:4 masks have no sparse kernel, so no
speed-up is claimed for them. Writes ``benchmarks/results/pruning_real.{json,md}``::

    python benchmarks/pruning_real.py            # 3 seeds (about 40 minutes of 2 cores)
    python benchmarks/pruning_real.py --quick    # smoke run (1 seed, tiny data)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import add_harness_args, args_dict, machine, md_table, out_path, write_results  # noqa: E402

from lotus.safe_io import atomic_write_text  # noqa: E402

METHODS = ("lotus_structured_25", "lotus_structured_50", "tp_structured_50", "2:4_magnitude", "2:4_wanda")
MODEL = ["model.block=pre_ln", "model.kwargs.embed_dim=64", "model.kwargs.num_heads=4", "optim.name=soap"]


def _sets(args: argparse.Namespace) -> list[str]:
    return (
        MODEL
        + [f"data.limit_train={args.train_size}", "train.threads=1", "output.report=false"]
        + (["data.val_size=500"] if args.quick else [])
    )


def _calib(trainer, batches: int) -> list:
    import torch

    g = torch.Generator().manual_seed(trainer.cfg.train.seed + 1000)
    idx = torch.randperm(len(trainer.train_set), generator=g)[: batches * 64]
    return [trainer.train_set.get_batch(idx[i : i + 64])[:2] for i in range(0, len(idx), 64)]


def recover(method: str, dense_dir: str, seed: int, args: argparse.Namespace) -> dict:
    """Prune the dense model of ``dense_dir`` with ``method`` at fit start, then recover; the record."""
    import torch
    from pruning_vs_torch_pruning import n_params, prune_torch_pruning
    from safetensors.torch import load_file

    from lotus.callbacks import Callback
    from lotus.config import load_config
    from lotus.training import Trainer
    from pruning import SemiStructuredConfig, StructuredConfig, prune_

    torch.set_num_threads(1)
    run = os.path.join(args.runs, "recover", method.replace(":", "-"), f"seed{seed}")
    done = os.path.join(run, "record.json")
    if os.path.isfile(done) and os.path.isfile(os.path.join(run, "summary.json")):  # finished earlier: reuse
        with open(done) as f:
            return json.load(f)
    record: dict = {"seed": seed, "method": method}
    teacher = os.path.join(dense_dir, "last.safetensors")

    class PruneAtStart(Callback):
        def on_fit_start(self, trainer) -> None:
            model = trainer.model
            model.load_state_dict(load_file(teacher))
            calib = _calib(trainer, args.calib_batches)
            t0 = time.process_time()
            if method.startswith("lotus_structured"):
                ratio = int(method.rsplit("_", 1)[1]) / 100
                prune_(model, StructuredConfig(heads=ratio, mlp=ratio, importance="taylor"), calib)
            elif method.startswith("tp_structured"):
                prune_torch_pruning(model, int(method.rsplit("_", 1)[1]) / 100, "taylor", calib, calib[0][0][:1])
            else:
                prune_(model, SemiStructuredConfig(score=method.split("_")[1], kernels="off"), calib)
            record["prune_cpu_s"] = time.process_time() - t0
            trainer.rebuild_optimizer()
            record["test_pruned"] = trainer.evaluate(dataset=trainer.data.test)["val_acc"]
            record["params"] = n_params(model)
            record["nonzero"] = _nonzero(model)

    overrides = _sets(args) + [
        f"train.seed={seed}",
        f"train.epochs={args.recover_epochs}",
        "train.warmup_epochs=0",
        "optim.lr=5e-4",
        "distill.enabled=true",
        f"distill.teacher={teacher}",
        "distill.alpha=0.5",
        "output.save_best=false",
    ]
    cfg = load_config(str(ROOT / "configs" / "fashion_op.yaml"), overrides)
    summary = Trainer(cfg, callbacks=[PruneAtStart()], run_dir=run, quiet=True, force=True).fit()
    record.update(test_recovered=summary["test_acc"], recover_cpu_s=summary["cpu_s"], run=run)
    atomic_write_text(done, json.dumps(record))
    return record


def _nonzero(model) -> int:
    """Nonzero entries of the weights a forward uses (masked where a parametrization masks them)."""
    from torch.nn.utils import parametrize

    n = 0
    for mod in model.modules():
        if isinstance(mod, parametrize.ParametrizationList):
            continue  # its ``original`` is counted through the parametrized module below
        names = {name for name, _ in mod.named_parameters(recurse=False)}
        if parametrize.is_parametrized(mod):
            names |= set(mod.parametrizations.keys())
        n += sum(int((getattr(mod, name) != 0).sum()) for name in names)
    return n


def inference(records: list[dict], rounds: int) -> dict[str, tuple[float, float, float]]:
    """img/s (median, min, max over interleaved rounds) of each method's recovered seed-0 model, 1 thread."""
    import torch

    from lotus.bench_inference import load_inference

    torch.set_num_threads(1)
    models = {}
    for r in records:
        if r["seed"] == records[0]["seed"] and r["method"] not in models:
            model, x, _ = load_inference(r["run"])
            models[r["method"]] = (model, x)
    samples: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m, x in models.values():
            m(x)  # warm-up
        for k in range(rounds):
            for name in list(models) if k % 2 == 0 else list(reversed(models)):
                m, x = models[name]
                t0 = time.perf_counter()
                m(x)
                samples[name].append(len(x) / (time.perf_counter() - t0))
    return {k: (statistics.median(v), min(v), max(v)) for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-size", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=14, help="dense training epochs")
    ap.add_argument("--recover-epochs", type=int, default=2)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side, 1 thread each")
    ap.add_argument("--runs", default=None, help="run folders (git-ignored; finished dense runs are reused)")
    add_harness_args(ap, "pruning_real", seeds=[0, 1, 2], quick="smoke run: 1 seed, 1 000 images, 2+1 epochs")
    args = ap.parse_args()
    os.chdir(ROOT)
    if args.quick:
        args.seeds, args.train_size, args.epochs, args.recover_epochs, args.calib_batches = (
            args.seeds[:1],
            1000,
            2,
            1,
            2,
        )
    args.runs = args.runs or ("bench/pruning_real_quick" if args.quick else "bench/pruning_real")
    from lotus.bench import run_bench

    t0 = time.time()
    dense = run_bench(
        [("configs/fashion_op.yaml", ["name=dense"])],
        args.seeds,
        os.path.join(args.runs, "dense"),
        overrides=_sets(args) + [f"train.epochs={args.epochs}"],
        jobs=args.jobs,
    )[0]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    dense_rows = []
    for seed, d in zip(args.seeds, dense.runs):
        with open(os.path.join(d, "summary.json")) as f:
            s = json.load(f)
        dense_rows.append({"seed": seed, "test": s["test_acc"], "cpu_s": s["cpu_s"], "params": s["params"], "run": d})
    tasks = [(m, r["run"], r["seed"]) for r in dense_rows for m in METHODS]
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        records = [f.result() for f in [pool.submit(recover, m, d, s, args) for m, d, s in tasks]]
    by_seed = {r["seed"]: r for r in dense_rows}
    for r in records:
        r["recover_share"] = r["recover_cpu_s"] / by_seed[r["seed"]]["cpu_s"]
        r["drop_pp"] = (r["test_recovered"] - by_seed[r["seed"]]["test"]) * 100
    speed = inference(
        [{"seed": args.seeds[0], "method": "dense", "run": dense_rows[0]["run"]}] + records,
        rounds=5 if args.quick else 15,
    )
    rows, summary = [], []
    dense_test = [r["test"] for r in dense_rows]
    rows.append(
        [
            "dense (start)",
            f"{dense_rows[0]['params'] / 1e3:.1f}",
            "-",
            f"{statistics.fmean(dense_test) * 100:.2f}",
            "-",
            "-",
            "-",
            "{:.0f} ({:.0f}-{:.0f})".format(*speed["dense"]),
        ]
    )
    for m in METHODS:
        sel = [r for r in records if r["method"] == m]
        drops = [r["drop_pp"] for r in sel]
        rec = {
            "method": m,
            "params": sel[0]["params"],
            "nonzero": sel[0]["nonzero"],
            "test_pruned": [r["test_pruned"] for r in sel],
            "test_recovered": [r["test_recovered"] for r in sel],
            "drop_pp_per_seed": drops,
            "recover_share": statistics.fmean(r["recover_share"] for r in sel),
            "img_per_s": speed[m],
        }
        summary.append(rec)
        kernel = " (masked dense: no sparse kernel on CPU)" if m.startswith("2:4") else ""
        rows.append(
            [
                m,
                f"{sel[0]['params'] / 1e3:.1f}" + (f" ({sel[0]['nonzero'] / 1e3:.1f} nonzero)" if kernel else ""),
                ", ".join(f"{v * 100:.2f}" for v in rec["test_pruned"]),
                ", ".join(f"{v * 100:.2f}" for v in rec["test_recovered"]),
                f"{statistics.median(drops):+.2f} ({min(drops):+.2f} to {max(drops):+.2f})",
                f"{rec['recover_share']:.1%}",
                f"{statistics.fmean(r['prune_cpu_s'] for r in sel):.2f}",
                "{:.0f} ({:.0f}-{:.0f})".format(*speed[m]) + kernel,
            ]
        )
    lp = {r["seed"]: r["test_recovered"] for r in records if r["method"] == "lotus_structured_50"}
    tp = {r["seed"]: r["test_recovered"] for r in records if r["method"] == "tp_structured_50"}
    wins = sum(lp[s] >= tp[s] for s in lp)
    s50 = next(x for x in summary if x["method"] == "lotus_structured_50")
    s50_met = statistics.median(s50["drop_pp_per_seed"]) >= -1.0 and s50["recover_share"] <= 0.2
    verdict = [
        f"- Structured 50 % (Lotus) within 1.0 pp of the dense model after recovery: median "
        f"{statistics.median(s50['drop_pp_per_seed']):+.2f} pp, recovery {s50['recover_share']:.0%} of the "
        f"original training ({'met' if s50_met else 'MISSED'}).",
        f"- Lotus >= Torch-Pruning at 50 % after the same recovery in {wins} of {len(lp)} seeds "
        f"({'met' if wins == len(lp) else 'MISSED'}).",
    ]
    command = (
        "python benchmarks/pruning_real.py"
        + (" --quick" if args.quick else "")
        + (f" --jobs {args.jobs}" if args.jobs != 2 else "")
    )
    md = "\n".join(
        [
            "# Pruning a trained ViT on Fashion-MNIST: Lotus vs Torch-Pruning, recovered alike",
            "",
            f"`{command}`",
            "",
            f"Dense start: Pre-LN ViT (width 64, depth 4, 4 heads, 49 tokens, SOAP), {args.epochs} epochs on "
            f"{args.train_size} "
            f"training images, seeds {args.seeds}: test {', '.join(f'{t * 100:.2f}' for t in dense_test)} %. Recovery: "
            f"{args.recover_epochs} epochs, lr 5e-4, distillation from the dense model (alpha 0.5). Test "
            "accuracy per seed; "
            "drop = recovered - dense, per seed (median, range). img/s: recovered seed-0 model, 1 thread, batch 256, "
            "median (min-max) of interleaved rounds.",
            "",
            md_table(
                [
                    "method",
                    "params (K)",
                    "test after pruning (%)",
                    "test after recovery (%)",
                    "drop vs dense (pp)",
                    "recovery cost (share of dense training CPU s)",
                    "prune CPU s",
                    "inference img/s",
                ],
                rows,
            ),
            "",
            *verdict,
            "",
            f"Took {(time.time() - t0) / 60:.1f} min.",
        ]
    )
    result = {
        "benchmark": "pruning_real",
        "args": args_dict(args),
        "machine": machine(),
        "dense": dense_rows,
        "records": records,
        "summary": summary,
        "command": command,
    }
    write_results(out_path(args), result, md, quick=args.quick, echo=True)


if __name__ == "__main__":
    main()
