"""``lotus prune --finetune-epochs N``: recover the pruned model's accuracy right after pruning.

The pruned weights (``OUT/pruned.safetensors``, thinned widths in the metadata) are fine-tuned with the Lotus
:class:`~lotus.training.Trainer` on the data of ``--config``/``--calib``, in ``OUT/finetune/`` (a normal run
directory: its ``config.yaml`` reruns the fine-tune with ``lotus train``). The run's config is the data
config's ``data``, ``optim``, ``train`` and ``mixup`` sections with ``model.checkpoint`` = the pruned file,
``train.epochs`` = N, ``optim.lr`` = ``--finetune-lr`` (default: a tenth of the config's), and:

- ``--distill``: a ``distill:`` section whose teacher is the unpruned model (``OUT/teacher.safetensors``).
- mask methods (magnitude, wanda, nm, 2:4): a one-shot ``pruning:`` section with the same method, sparsity,
  scope and layer filter at epoch 0. On the already-sparse weights its re-scoring selects the same mask:
  the pruned entries are exact zeros, so they are the smallest magnitudes of their layer / row / group and
  score 0 under Wanda (N:M groups are re-scored by magnitude, which is exact whatever the score used to
  prune). The fit checks this at its start (:class:`SameMasks`) and stops with an error if any mask
  differs; the masks are then enforced after every step as in any masked run.

``OUT/model.safetensors`` becomes the fine-tuned weights (the last epoch's; the validation set picks
nothing) and the report gains ``recovery`` and ``accuracy`` (before pruning, after pruning, after recovery).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from typing import TYPE_CHECKING, Any

import pruning
from lotus.callbacks import Callback
from lotus.config import Config, config_from_dict
from lotus.errors import LotusError
from lotus.schema import to_dict
from pruning.registry import method_named

if TYPE_CHECKING:  # annotations only: torch is imported when the command runs
    import torch

__all__ = ["SameMasks", "add_arguments", "check_args", "finetune_config", "markdown", "recover"]

LR_FACTOR = 0.1  # default --finetune-lr: this times the config's optim.lr


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("recovery (fine-tune after pruning)")
    g.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        metavar="N",
        help="fine-tune the pruned model for N epochs on the data of --config/--calib (OUT/finetune/); "
        "OUT/model.safetensors is then the fine-tuned model, OUT/pruned.safetensors the pruned one",
    )
    g.add_argument(
        "--finetune-lr",
        type=float,
        metavar="LR",
        help=f"peak lr of the fine-tune (default: {LR_FACTOR:g} x the config's optim.lr)",
    )
    g.add_argument(
        "--distill",
        action="store_true",
        help="distill from the unpruned model (saved as OUT/teacher.safetensors) while fine-tuning",
    )
    g.add_argument(
        "--distill-alpha",
        type=float,
        default=0.5,
        help="weight of the teacher's soft targets (distill.alpha), in [0, 1]",
    )


def check_args(args: argparse.Namespace) -> None:
    """One-line errors for the recovery flags (called with the other ``lotus prune`` checks)."""
    n = args.finetune_epochs
    if n < 0:
        raise LotusError(f"--finetune-epochs: expected an int >= 0, got {n}")
    if not n:
        for flag, given in (
            ("--distill", args.distill),
            ("--finetune-lr", args.finetune_lr is not None),
            ("--distill-alpha", args.distill_alpha != 0.5),
        ):
            if given:
                raise LotusError(f"{flag}: only used with --finetune-epochs N")
        return
    if args.sweep:
        raise LotusError("--finetune-epochs: fine-tunes a pruned model; not with --sweep")
    if not (args.config or args.calib):
        raise LotusError(
            "--finetune-epochs: fine-tuning needs training data; pass --config CONFIG.yaml or "
            "--calib CONFIG.yaml (its data, optim and train sections are used)"
        )
    if args.finetune_lr is not None and not args.finetune_lr > 0:
        raise LotusError(f"--finetune-lr: expected a number > 0, got {args.finetune_lr:g}")
    if not 0.0 <= args.distill_alpha <= 1.0:
        raise LotusError(f"--distill-alpha: expected a number in [0, 1], got {args.distill_alpha:g}")


def _mask_section(args: argparse.Namespace) -> dict | None:
    """The one-shot ``pruning:`` section that re-applies the masks of ``args.method`` at epoch 0."""
    method = method_named(args.method)
    if method.structured:
        return None
    sec: dict[str, Any] = {
        "method": args.method,
        "schedule": "one_shot",
        "at_epoch": 0,
        "include_head": args.include_head,
        "include_patch_embed": args.include_patch_embed,
    }
    if method.gradual:  # its sparsity is a setting: re-run it at that sparsity
        sec.update(sparsity=args.sparsity, scope=args.scope)
    else:  # the pruned entries are the zeros of each group: magnitude re-scoring finds them exactly
        sec.update(n=args.n, m=args.m, score="magnitude")
    return sec


def finetune_config(args: argparse.Namespace, data_cfg: Config, mcfg: Any, pruned: str, teacher: str | None) -> Config:
    """The fine-tune run's config (see the module docstring)."""
    from lotus.weights_meta import model_config_from_checkpoint

    src = copy.deepcopy(data_cfg.source)
    model = to_dict(model_config_from_checkpoint(mcfg, pruned, {}, "--finetune-epochs"))
    model.update(checkpoint=os.path.abspath(pruned), pretrained=False)
    optim = dict(src.get("optim") or {})
    lr = args.finetune_lr if args.finetune_lr is not None else LR_FACTOR * data_cfg.optim.lr
    optim["lr"] = lr
    n = args.finetune_epochs
    train = dict(src.get("train") or {})
    train.update(
        epochs=n,
        max_steps=None,
        warmup_epochs=min(data_cfg.train.warmup_epochs, 0.2 * n),
        min_lr=min(data_cfg.train.min_lr, 0.1 * lr),
        device=args.device,
    )
    out: dict[str, Any] = {
        "name": f"{data_cfg.name}-finetune",
        "model": model,
        "data": src.get("data") or {},
        "optim": optim,
        "train": train,
        "output": {"dir": os.path.join(args.out, "finetune")},
    }
    if src.get("mixup"):
        out["mixup"] = src["mixup"]
    masks = _mask_section(args)
    if masks is not None:
        out["pruning"] = masks
    if teacher is not None:
        out["distill"] = {"enabled": True, "teacher": os.path.abspath(teacher), "alpha": args.distill_alpha}
    return config_from_dict(out)


class SameMasks(Callback):
    """Stops the fit at its start unless the masks the ``pruning:`` section applied are ``expected``."""

    def __init__(self, expected: dict[str, torch.Tensor]):
        self.expected = expected

    def on_fit_start(self, trainer: Any) -> None:
        import torch

        from pruning.masks import masks_state

        got = masks_state(trainer.unwrapped_model)
        differ = sorted(set(got) ^ set(self.expected)) + [
            k
            for k in self.expected
            if k in got and not torch.equal(got[k].reshape(-1).cpu(), self.expected[k].reshape(-1).cpu())
        ]
        if differ:
            raise LotusError(
                f"--finetune-epochs: re-applying the masks on the pruned weights gave another mask in "
                f"{len(differ)} layer(s) (e.g. {differ[0]}); fine-tune with --method structured or "
                "without --finetune-epochs"
            )


def recover(
    args: argparse.Namespace,
    data_cfg: Config,
    mcfg: Any,
    bundle: Any,
    device: torch.device,
    dtype: torch.dtype,
    pruned: str,
    teacher: str | None,
    masks: dict | None,
) -> dict:
    """Fine-tune ``pruned``, write ``OUT/model.safetensors`` and return the report's ``recovery`` section."""
    from lotus.commands.prune_inputs import accuracy
    from lotus.data_meta import run_data_metadata
    from lotus.training import Trainer
    from lotus.weights import save_weights
    from pruning.masks import masked_modules

    cfg = finetune_config(args, data_cfg, mcfg, pruned, teacher)
    t0 = time.perf_counter()
    trainer = Trainer(
        cfg, callbacks=[SameMasks(masks)] if masks is not None else None, run_dir=cfg.output.dir, force=args.force
    )
    summary = trainer.fit()
    seconds = time.perf_counter() - t0
    model = trainer.unwrapped_model
    sparsity = None
    if masks is not None:
        sparsity = pruning.sparsity_report(model, masked_modules(model))["total"]["sparsity"]
        pruning.make_permanent(model)
    model = model.float().eval()
    weights = os.path.join(args.out, "model.safetensors")
    save_weights(
        model,
        weights,
        {
            "method": args.method,
            "source": args.checkpoint or "pruned",
            "finetuned": {"epochs": cfg.train.epochs, "distilled": teacher is not None},
            "data": run_data_metadata(trainer),
        },
        model_cfg=cfg.model,
    )
    acc = accuracy(model.to(device=device, dtype=dtype), bundle, device, dtype, args.max_eval)
    return {
        "val_acc": acc,
        "epochs": cfg.train.epochs,
        "lr": cfg.optim.lr,
        "distilled": teacher is not None,
        "alpha": cfg.distill.alpha if teacher is not None else None,
        "wall_s": round(seconds, 3),
        "train_wall_s": summary.get("wall_s"),
        "sparsity": sparsity,
        "run_dir": cfg.output.dir,
        "masks_checked": masks is not None,
    }


def markdown(report: dict) -> str:
    """The report.md section of a recovered prune: the three accuracies and how the fine-tune ran."""
    rec, acc = report["recovery"], report["accuracy"]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    how = f"{rec['epochs']} epochs, lr {rec['lr']:g}" + (
        f", distilled from the unpruned model (alpha {rec['alpha']:g})" if rec["distilled"] else ""
    )
    lines = [
        "## recovery",
        "",
        "| | val_acc |",
        "|---|---|",
        f"| before pruning | {pct(acc['before_pruning'])} |",
        f"| after pruning | {pct(acc['after_pruning'])} |",
        f"| after recovery | {pct(acc['after_recovery'])} |",
        "",
        f"fine-tune: {how}; {rec['wall_s']:.1f} s; run dir {rec['run_dir']}",
    ]
    if rec.get("sparsity") is not None:
        lines.append(f"masks kept while fine-tuning: pruned-layer sparsity {rec['sparsity']:.4f}")
    return "\n".join(lines)
