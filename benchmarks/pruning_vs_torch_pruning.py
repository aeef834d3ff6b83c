"""Structured ViT thinning: Lotus (`pruning.structured`) vs Torch-Pruning at the same removed fraction.

Part A, speed: `vit_small_patch16_224` (random init) at 224 px; the same fraction of heads and MLP neurons
removed by each tool (their widths and parameter counts are printed to show the shapes match); CPU
throughput of dense / Lotus / Torch-Pruning measured in interleaved rounds in one run; time to prune.

Part B, accuracy: a small ViT trained with `lotus.train` on scikit-learn digits (bundled, no download; the
configs/digits_preln.yaml recipe with a 6-head model), pruned by each tool with the matching importance (L2 magnitude;
first-order Taylor from the same calibration batches) inside a lotus callback, then fine-tuned by the same
lotus loop; validation accuracy right after pruning and after fine-tuning, per seed.

Torch-Pruning is a benchmark-only dependency (`pip install torch-pruning`). Its timm ViT recipe is followed:
`num_heads` per qkv layer, `prune_num_heads=True, prune_head_dims=False`, the residual stream (patch embed,
attention proj and fc2 outputs, head) ignored so that only heads and MLP hidden neurons go, as with Lotus;
afterwards the attention modules' `num_heads`/`attn_dim` are set from the pruner, as its example does.

Full run::

    python benchmarks/pruning_vs_torch_pruning.py
    # = --ratio 0.5 --batch 32 --repeats 7 --seeds 0 1 2 --epochs 30 --finetune-epochs 10

Smoke run::

    python benchmarks/pruning_vs_torch_pruning.py --quick
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks._common import add_harness_args, args_dict, out_path, write_results  # noqa: E402
from lotus.bench_stats import seed_stats  # noqa: E402
from pruning import StructuredConfig, get_widths, prune_structured  # noqa: E402


def import_torch_pruning():
    try:
        import torch_pruning as tp
    except ImportError:
        raise SystemExit(
            "error: this benchmark needs Torch-Pruning: pip install torch-pruning "
            "(benchmark-only dependency; also in the 'bench' extra)"
        ) from None
    return tp


# --------------------------------------------------------------------------------------------------------------
# pruning with each tool


def prune_lotus(model: nn.Module, ratio: float, importance: str, calib: list | None) -> float:
    t0 = time.perf_counter()
    prune_structured(model, StructuredConfig(heads=ratio, mlp=ratio, importance=importance), calib_loader=calib)
    return time.perf_counter() - t0


def prune_torch_pruning(
    model: VisionTransformer, ratio: float, importance: str, calib: list | None, example: torch.Tensor
) -> float:
    tp = import_torch_pruning()
    t0 = time.perf_counter()
    imp = (
        tp.importance.GroupMagnitudeImportance(p=2)
        if importance == "magnitude"
        else tp.importance.GroupTaylorImportance()
    )
    ignored = [model.head, model.patch_embed.proj]
    for b in model.blocks:
        ignored += [b.attn.proj, b.mlp.fc2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(
            model,
            example,
            importance=imp,
            pruning_ratio=ratio,
            ignored_layers=ignored,
            num_heads={b.attn.qkv: b.attn.num_heads for b in model.blocks},
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=ratio,
            global_pruning=False,
        )
        if importance == "taylor":
            was_training = model.training
            model.eval()
            model.zero_grad()
            for x, y in calib:
                F.cross_entropy(model(x), y).backward()
            model.train(was_training)
        for group in pruner.step(interactive=True):
            group.prune()
    for b in model.blocks:
        b.attn.num_heads = pruner.num_heads[b.attn.qkv]
        b.attn.attn_dim = b.attn.qkv.out_features // 3
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def widths_of(model: nn.Module) -> str:
    w = get_widths(model)
    heads = sorted({v["heads"] for v in w.values()})
    mlp = sorted({v["mlp"] for v in w.values()})
    return f"{'/'.join(map(str, heads))} / {'/'.join(map(str, mlp))}"


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    m = copy.deepcopy(model)
    for mod in m.modules():  # FlopCounterMode does not see the CPU SDPA kernel; the math path is equivalent
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        m(example)
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------------------------------------------
# part A: speed


def part_speed(args) -> list[dict]:
    torch.manual_seed(0)
    dense = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    example = torch.randn(1, 3, 224, 224)
    ours, theirs = copy.deepcopy(dense), copy.deepcopy(dense)
    t_ours = prune_lotus(ours, args.ratio, "magnitude", None)
    t_theirs = prune_torch_pruning(theirs, args.ratio, "magnitude", None, example)
    variants = {"dense": dense, "lotus": ours, "torch-pruning": theirs}
    prune_s = {"dense": 0.0, "lotus": t_ours, "torch-pruning": t_theirs}
    x = torch.randn(args.batch, 3, 224, 224)
    with torch.inference_mode():
        ref = dense(x[:2])
        for m in variants.values():
            m(x)  # warm-up
        assert ours(x[:2]).shape == ref.shape and theirs(x[:2]).shape == ref.shape
    samples = {k: [] for k in variants}
    for rnd in range(args.repeats):
        order = list(variants) if rnd % 2 == 0 else list(reversed(variants))
        for name in order:
            with torch.inference_mode():
                t0 = time.perf_counter()
                variants[name](x)
                samples[name].append(args.batch / (time.perf_counter() - t0))
    dense_ips = statistics.median(samples["dense"])
    rows = []
    for name, m in variants.items():
        ips = statistics.median(samples[name])
        rows.append(
            {
                "tool": name,
                "widths": widths_of(m),
                "params": n_params(m),
                "flops_per_img": count_flops(m, example),
                "img_per_s": ips,
                "img_per_s_all": samples[name],
                "speedup": ips / dense_ips,
                "prune_seconds": prune_s[name],
            }
        )
    return rows


# --------------------------------------------------------------------------------------------------------------
# part B: accuracy after fine-tuning on digits, both tools inside the same lotus training loop

DIGITS_MODEL = {"img_size": 16, "patch_size": 4, "kwargs": {"embed_dim": 96, "depth": 4, "num_heads": 6}}


def digits_config(epochs: int, lr: float, seed: int, threads: int, warmup: float):
    """configs/digits_preln.yaml (the project's digits recipe) with a 6-head ViT (16 px, patch 4); no files written."""
    import yaml

    from lotus.config import config_from_dict

    root = Path(__file__).resolve().parents[1]
    data = yaml.safe_load((root / "configs" / "digits_preln.yaml").read_text())
    data["name"] = "bench-structured-vs-tp"
    data.setdefault("model", {}).update(copy.deepcopy(DIGITS_MODEL))
    data.setdefault("optim", {})["lr"] = lr
    t = data.setdefault("train", {})
    t.update({"epochs": epochs, "seed": seed, "threads": threads, "warmup_epochs": min(warmup, epochs)})
    return config_from_dict(data)


def _prune_callback(tool: str, importance: str, ratio: float, dense_state: dict, calib_batches: int, record: dict):
    """A lotus callback: at fit start load the dense weights, prune with ``tool``, rebuild the optimizer."""
    from lotus.callbacks import Callback

    class PruneAtStart(Callback):
        def on_fit_start(self, trainer) -> None:
            model = trainer.model
            model.load_state_dict(dense_state)
            g = torch.Generator().manual_seed(trainer.cfg.train.seed + 1000)
            idx = torch.randperm(len(trainer.train_set), generator=g)[: calib_batches * 64].tolist()
            items = [trainer.train_set[i] for i in idx]
            calib = [
                (
                    torch.stack([it[0] for it in items[i : i + 64]]).to(trainer.device),
                    torch.tensor([int(it[1]) for it in items[i : i + 64]], device=trainer.device),
                )
                for i in range(0, len(items), 64)
            ]
            if tool == "lotus":
                record["prune_seconds"] = prune_lotus(model, ratio, importance, calib)
            else:
                record["prune_seconds"] = prune_torch_pruning(model, ratio, importance, calib, calib[0][0][:1])
            trainer.rebuild_optimizer()
            record["acc_pruned"] = trainer.evaluate()["val_acc"]
            record["params"] = n_params(model)
            record["widths"] = widths_of(model)

    return PruneAtStart()


def part_accuracy(args) -> list[dict]:
    from lotus.training import Trainer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            cfg = digits_config(args.epochs, 2e-3, seed, args.train_threads, warmup=2)
            trainer = Trainer(cfg, run_dir=os.path.join(tmp, f"dense{seed}"), quiet=True, write=False)
            summary = trainer.fit()
            dense = trainer.model
            dense_state = {k: v.detach().clone() for k, v in dense.state_dict().items()}
            rows.append(
                {
                    "seed": seed,
                    "tool": "dense",
                    "importance": "-",
                    "widths": widths_of(dense),
                    "params": n_params(dense),
                    "acc_pruned": summary["final_val_acc"],
                    "acc_finetuned": summary["final_val_acc"],
                }
            )
            for importance in args.importances:
                for tool in ("lotus", "torch-pruning"):
                    record: dict = {"seed": seed, "tool": tool, "importance": importance}
                    cb = _prune_callback(tool, importance, args.ratio, dense_state, args.calib_batches, record)
                    cfg_ft = digits_config(args.finetune_epochs, 1e-3, seed, args.train_threads, warmup=0)
                    ft = Trainer(
                        cfg_ft,
                        callbacks=[cb],
                        run_dir=os.path.join(tmp, f"{tool}-{importance}{seed}"),
                        quiet=True,
                        write=False,
                    ).fit()
                    record["acc_finetuned"] = ft["final_val_acc"]
                    rows.append(record)
            print(f"  seed {seed} done", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of heads and of MLP neurons removed")
    p.add_argument("--batch", type=int, default=32, help="part A batch size (224 px)")
    p.add_argument("--repeats", type=int, default=7, help="part A interleaved rounds (median reported)")
    p.add_argument("--epochs", type=int, default=30, help="dense training epochs on digits")
    p.add_argument("--finetune-epochs", type=int, default=10)
    p.add_argument("--calib-batches", type=int, default=8, help="batches of 64 for Taylor importance")
    p.add_argument("--importances", nargs="+", default=["magnitude", "taylor"], choices=["magnitude", "taylor"])
    p.add_argument("--threads", type=int, default=None, help="part A intra-op threads (default: torch's choice)")
    p.add_argument("--train-threads", type=int, default=1, help="part B intra-op threads (tiny model)")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    add_harness_args(
        p, "pruning_vs_torch_pruning", seeds=[0, 1, 2], quick="smoke run: batch 4, 2 rounds, 1 seed, 4+1 epochs"
    )
    args = p.parse_args(argv)
    md: list[str] = []

    def emit(text: str = "", **kw) -> None:  # a line of the report: printed now, written to the .md at the end
        print(text, **kw)
        md.append(text)

    if not 0 < args.ratio < 1:
        p.error(f"--ratio: expected a fraction in (0, 1), got {args.ratio}")
    for name in ("threads", "train_threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')}: expected an int >= 1, got {v}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.repeats, args.seeds, args.epochs, args.finetune_epochs, args.calib_batches = 4, 2, [0], 4, 1, 2
    tp = import_torch_pruning()

    result: dict = {
        "benchmark": "pruning_vs_torch_pruning",
        "args": args_dict(args),
        "env": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "torch_pruning": getattr(tp, "__version__", "?"),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
        },
    }
    if not args.skip_speed:
        rows = part_speed(args)
        result["speed"] = rows
        emit(
            f"\nA. vit_small_patch16_224 @ 224px, batch {args.batch}, CPU {torch.get_num_threads()} threads, "
            f"{args.ratio:.0%} of heads and MLP neurons removed (median of {args.repeats} interleaved rounds)\n"
        )
        emit("| tool | heads / MLP per block | params (M) | GFLOPs/img | img/s | speedup vs dense | prune time (s) |")
        emit("|---|---|---|---|---|---|---|")
        for r in rows:
            emit(
                f"| {r['tool']} | {r['widths']} | {r['params'] / 1e6:.2f} | {r['flops_per_img'] / 1e9:.2f} | "
                f"{r['img_per_s']:.1f} | {r['speedup']:.2f}x | {r['prune_seconds']:.2f} |"
            )
    if not args.skip_accuracy:
        emit(
            "\nB. digits ViT (configs/digits_preln.yaml recipe; 16 px, patch 4, dim 96, depth 4, 6 heads) ...",
            flush=True,
        )
        rows = part_accuracy(args)
        result["accuracy"] = rows
        emit(
            f"\nB. digits ViT, {args.ratio:.0%} heads and MLP removed, val accuracy (mean over seeds "
            f"{args.seeds}); dense {args.epochs} epochs, fine-tune {args.finetune_epochs} epochs\n"
        )
        emit("| tool | importance | heads / MLP per block | params (K) | acc after pruning | acc after fine-tune |")
        emit("|---|---|---|---|---|---|")
        keys = []
        for r in rows:
            if (r["tool"], r["importance"]) not in keys:
                keys.append((r["tool"], r["importance"]))
        summary = []
        for tool, imp in keys:
            sel = [r for r in rows if r["tool"] == tool and r["importance"] == imp]
            a0 = [r["acc_pruned"] for r in sel]
            a1 = [r["acc_finetuned"] for r in sel]
            (m0, _), (m1, s1) = seed_stats(a0), seed_stats(a1)
            summary.append(
                {
                    "tool": tool,
                    "importance": imp,
                    "acc_pruned_mean": m0,
                    "acc_finetuned_mean": m1,
                    "acc_finetuned_std": s1,
                }
            )
            emit(
                f"| {tool} | {imp} | {sel[0]['widths']} | {sel[0]['params'] / 1e3:.1f} | "
                f"{m0:.3f} | {m1:.3f} ± {s1:.3f} |"
            )
        result["accuracy_summary"] = summary
    write_results(out_path(args), result, "\n".join(md), quick=args.quick, echo=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
