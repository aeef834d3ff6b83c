"""Patch tickets: training-step throughput at keep_rate 0.5 vs full tokens, and accuracy vs random patches.

Part 1 (throughput, CPU, side by side): one training step (forward, cross-entropy, backward, AdamW step)
of the *same* model on full tokens and on the kept tokens (keep_rate 0.5, patch tickets given, through the
model's own forward with ``KeptPatchTokens`` exactly as lotus trains). Steps are interleaved (full, kept,
full, kept, ...) so machine load hits both alike; the median of the per-round paired ratios is reported with
its range, plus the cost of ranking a batch online (one no-grad full-token forward for the CLS attention),
so the effective ratio of the online modes can be read off:
``refresh_every: 0`` (per batch) = full / (kept + score); per-epoch refresh = full / (kept + score / refresh_every).

Part 2 (accuracy at equal epochs, digits, lotus training): ``configs/digits_preln.yaml`` (all patches),
``configs/digits_patches.yaml`` (CLS-attention patch tickets) and the same config with ``scorer: random``
(the random-patch baseline with the same keep-rate schedule), plus the offline LOTUS pipeline (a dense scorer
trained ``--scorer-epochs`` epochs ranks every image once into a ticket file; ``source: file``), over several
seeds; final val accuracy (mean +- std), wall time, training FLOPs and the time spent ranking patches.

Full run (README numbers)::

    python benchmarks/tickets_patches.py
    # = --models lotus_vit_tiny:16:4 lotus_vit_tiny:32:4 vit_small_patch16_224:224:16 --batch 64 64 16
    #   --repeats 7 --iters 3 --seeds 0 1 2 --scorer-epochs 5

Smoke run (~2-4 min)::

    python benchmarks/tickets_patches.py --quick

Target: kept-token step throughput >= 1.8x the full-token step at keep_rate 0.5.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks._common import add_harness_args, out_path, write_results  # noqa: E402
from data_tickets import PatchTicket, apply_patch_tickets  # noqa: E402
from data_tickets.keep_rate import num_kept  # noqa: E402
from lotus.bench_stats import seed_stats  # noqa: E402

TARGET = 1.8


# ------------------------------------------------------------------------------------------ part 1
def build(name: str, img: int, patch: int, chans: int = 3, classes: int = 10) -> torch.nn.Module:
    import timm

    import lotus.models  # noqa: F401  (registers lotus_vit_*)

    return timm.create_model(
        name, pretrained=False, img_size=img, patch_size=patch, in_chans=chans, num_classes=classes
    )


def throughput(spec: str, batch: int, keep_rate: float, repeats: int, iters: int, seed: int = 0) -> dict:
    name, img, patch = spec.split(":")
    img, patch = int(img), int(patch)
    torch.manual_seed(seed)
    model = build(name, img, patch)
    kept = apply_patch_tickets(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, img, img)
    y = torch.randint(0, 10, (batch,))
    n = int(model.patch_embed.num_patches)
    ticket = PatchTicket(keep_rate=keep_rate)
    keep = ticket.select(model, x)  # a real CLS-attention ticket (any K-subset costs the same)

    def step(keep_idx):
        with kept.keep(keep_idx):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timed(fn):
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters, (time.process_time() - c0) / iters

    model.train()
    step(None)
    step(keep)  # warm-up both shapes
    full, part, score = [], [], []
    for _ in range(repeats):
        full.append(timed(lambda: step(None)))
        part.append(timed(lambda: step(keep)))
        score.append(timed(lambda: ticket.select(model, x)))
    ratios = [f[0] / k[0] for f, k in zip(full, part)]
    cpu_ratios = [f[1] / k[1] for f, k in zip(full, part)]
    med = lambda v: statistics.median(v)  # noqa: E731
    f_s, k_s, s_s = med([t[0] for t in full]), med([t[0] for t in part]), med([t[0] for t in score])
    return {
        "model": name,
        "img_size": img,
        "patch_size": patch,
        "patches": n,
        "kept": num_kept(n, keep_rate),
        "batch": batch,
        "keep_rate": keep_rate,
        "full_step_s": f_s,
        "kept_step_s": k_s,
        "score_batch_s": s_s,
        "full_img_s": batch / f_s,
        "kept_img_s": batch / k_s,
        "speedup": med(ratios),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
        "cpu_speedup": med(cpu_ratios),
        "online_per_batch_speedup": f_s / (k_s + s_s),
        "online_refresh3_speedup": f_s / (k_s + s_s / 3),
        "repeats": repeats,
        "iters": iters,
    }


# ------------------------------------------------------------------------------------------ part 2
def _file_ticket(seed: int, extra: list[str], scorer_epochs: int, workdir: Path) -> tuple[list[str], float]:
    """LOTUS offline pipeline: train a dense scorer briefly, rank every train image's patches, save a ticket."""
    from lotus.config import load_config
    from lotus.features.patches.rankings_file import make_patch_ticket_file
    from lotus.models import unwrap
    from lotus.training import Trainer
    from lotus.weights import save_weights

    t0 = time.perf_counter()
    scfg = load_config(
        ROOT / "configs/digits_preln.yaml",
        extra
        + [f"train.seed={seed}", f"train.epochs={scorer_epochs}", f"train.warmup_epochs={min(1.0, scorer_epochs / 2)}"],
    )
    trainer = Trainer(scfg, write=False, quiet=True)
    trainer.fit()
    ckpt = workdir / f"scorer-{seed}.safetensors"
    save_weights(unwrap(trainer.model), ckpt)
    pcfg = load_config(ROOT / "configs/digits_patches.yaml", extra + [f"train.seed={seed}"])
    out = workdir / f"patches-{seed}.npz"
    make_patch_ticket_file(pcfg, str(out), checkpoint=str(ckpt), rollout=pcfg.tickets.patches.rollout, progress=False)
    return ["tickets.patches.source=file", f"tickets.patches.file={out}"], time.perf_counter() - t0


def train_runs(
    variants: list[tuple[str, str, list[str]]], seeds: list[int], extra: list[str], quiet: bool, scorer_epochs: int = 5
) -> list[dict]:
    import tempfile

    from lotus.config import load_config
    from lotus.training import Trainer

    rows = []
    with tempfile.TemporaryDirectory(prefix="lotus-patch-bench-") as tmp:
        for seed in seeds:  # interleave variants per seed: load drifts hit every variant alike
            for label, path, sets in variants:
                prep_s = 0.0
                if "file" in sets:
                    sets, prep_s = _file_ticket(seed, extra, scorer_epochs, Path(tmp))
                cfg = load_config(ROOT / path, sets + extra + [f"train.seed={seed}"])
                t0 = time.perf_counter()
                s = Trainer(cfg, write=False, quiet=True).fit()
                wall = time.perf_counter() - t0
                pt = s.get("patch_tickets") or {}
                rows.append(
                    {
                        "variant": label,
                        "config": path,
                        "set": sets + extra,
                        "seed": seed,
                        "final_val_acc": s["final_val_acc"],
                        "best_val_acc": s["best_val_acc"],
                        "train_wall_s": s["wall_s"] + prep_s,
                        "prep_s": prep_s,
                        "total_s": wall + prep_s,
                        "train_flops": s["train_flops"],
                        "epochs": s["epochs"],
                        "refresh_s": pt.get("refresh_seconds", 0.0) + prep_s,
                    }
                )
                if not quiet:
                    r = rows[-1]
                    print(
                        f"  {label:<30} seed {seed}: acc {r['final_val_acc'] * 100:.2f}%  "
                        f"train {r['train_wall_s']:.1f}s",
                        flush=True,
                    )
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    base = None
    for label in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == label]
        acc = [r["final_val_acc"] * 100 for r in rs]
        acc_mean, acc_std = seed_stats(acc)
        s = {
            "variant": label,
            "seeds": len(rs),
            "acc_mean": acc_mean,
            "acc_std": acc_std,
            "wall_s": statistics.mean(r["train_wall_s"] for r in rs),
            "flops": statistics.mean(r["train_flops"] for r in rs),
            "refresh_s": statistics.mean(r["refresh_s"] for r in rs),
        }
        base = base or s
        s["wall_ratio"] = base["wall_s"] / s["wall_s"]
        s["flops_ratio"] = base["flops"] / s["flops"] if s["flops"] else float("nan")
        out.append(s)
    return out


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models",
        nargs="+",
        default=["lotus_vit_tiny:16:4", "lotus_vit_tiny:32:4", "vit_small_patch16_224:224:16"],
        help="timm model:img_size:patch_size for the throughput part (first: the digits config)",
    )
    p.add_argument("--batch", type=int, nargs="+", default=[64, 64, 16], help="batch size per model")
    p.add_argument("--keep-rate", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--set", action="append", default=[], help="extra config override for every training run")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-train", action="store_true", help="throughput part only")
    p.add_argument("--skip-throughput", action="store_true", help="accuracy (training) part only")
    p.add_argument(
        "--scorer-epochs",
        type=int,
        default=5,
        help="offline variant: epochs of the dense scorer whose CLS attention makes the ticket file "
        "(its training and ranking time count in that variant's wall time); 0 skips the variant",
    )
    add_harness_args(
        p,
        "tickets_patches",
        seeds=[0, 1, 2],
        quick="smoke run: the two lotus_vit_tiny throughput rows, 3 repeats; training with "
        "lotus_vit_micro, 6 epochs, 1 seed",
    )
    a = p.parse_args()
    md: list[str] = []

    def emit(text: str = "", **kw) -> None:  # a line of the report: printed now, written to the .md at the end
        print(text, **kw)
        md.append(text)

    if a.threads:
        torch.set_num_threads(a.threads)
    extra = list(a.set)
    seeds = a.seeds
    if a.quick:
        a.models, a.batch, a.repeats, a.iters = a.models[:2], a.batch[:2], 3, 2
        seeds = seeds[:1]
        a.scorer_epochs = min(a.scorer_epochs, 1)
        extra += [
            "model.name=lotus_vit_micro",
            "train.epochs=6",
            "train.warmup_epochs=0.5",
            "data.batch_size=32",
            "optim.lr=3e-3",
            "tickets.patches.schedule=[[0,1.0],[1,0.5],[5,1.0]]",
            "tickets.patches.refresh_every=2",
        ]
    batches = (a.batch * len(a.models))[: len(a.models)] if len(a.batch) < len(a.models) else a.batch

    tp = []
    for spec, bs in zip([] if a.skip_throughput else a.models, batches):
        tp.append(throughput(spec, bs, a.keep_rate, a.repeats, a.iters))
    if tp:
        emit(
            f"## Patch tickets: training-step throughput (keep_rate {a.keep_rate}, CPU, "
            f"{torch.get_num_threads()} threads)\n"
        )
        emit(
            "| model | img/patch | tokens full -> kept | batch | full img/s | kept img/s | speedup (range) | "
            "CPU-time speedup "
            "| + online rank per batch | + rank every 3 epochs | target |"
        )
        emit("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in tp:
        ok = "met" if r["speedup"] >= TARGET else "MISSED"
        emit(
            f"| {r['model']} | {r['img_size']}/{r['patch_size']} | {r['patches']} -> {r['kept']} | {r['batch']} "
            f"| {r['full_img_s']:.1f} | {r['kept_img_s']:.1f} | {r['speedup']:.2f}x ({r['speedup_min']:.2f}-"
            f"{r['speedup_max']:.2f}) | {r['cpu_speedup']:.2f}x | {r['online_per_batch_speedup']:.2f}x "
            f"| {r['online_refresh3_speedup']:.2f}x | >= {TARGET}x {ok} |"
        )

    summary, rows = [], []
    if not a.skip_train:
        variants = [
            ("all patches", "configs/digits_preln.yaml", []),
            ("cls_attention tickets", "configs/digits_patches.yaml", []),
            ("random patches", "configs/digits_patches.yaml", ["tickets.patches.scorer=random"]),
        ]
        if a.scorer_epochs > 0:
            variants.append(
                (f"cls_attention file ({a.scorer_epochs}-ep scorer)", "configs/digits_patches.yaml", ["file"])
            )
        emit(f"\n## Patch tickets on digits: accuracy at equal epochs ({len(seeds)} seed(s))\n", flush=True)
        rows = train_runs(variants, seeds, extra, quiet=False, scorer_epochs=a.scorer_epochs)
        summary = summarise(rows)
        emit(
            "\n| variant | seeds | final val acc % (mean +- std) | wall s (incl. ranking) | wall speed-up "
            "| train FLOPs | FLOPs ratio | ranking (+ scorer) s |"
        )
        emit("|---|---|---|---|---|---|---|---|")
        for s in summary:
            emit(
                f"| {s['variant']} | {s['seeds']} | {s['acc_mean']:.2f} +- {s['acc_std']:.2f} | {s['wall_s']:.1f} "
                f"| {s['wall_ratio']:.2f}x | {s['flops']:.3g} | {s['flops_ratio']:.2f}x | {s['refresh_s']:.1f} |"
            )
        emit(
            "\nFLOPs: training forward FLOPs x 3 as the lotus trainer counts them (kept-token epochs count "
            "the kept tokens); ranking passes (and the file variant's scorer training) are not in the FLOPs "
            "column but are in the wall time."
        )
    write_results(
        out_path(a),
        {
            "benchmark": "tickets_patches",
            "target_speedup": TARGET,
            "platform": platform.platform(),
            "throughput": tp,
            "training": summary,
            "runs": rows,
            "overrides": extra,
        },
        "\n".join(md),
        quick=a.quick,
        echo=False,
    )


if __name__ == "__main__":
    main()
