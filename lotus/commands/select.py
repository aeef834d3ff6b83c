"""Score the training samples of a config's dataset and write a data-ticket file.

The scores come from short proxy trainings on the lotus training loop (default), or from a trained model
(--checkpoint). The selected subset, all scores, the settings and a fingerprint of the train split go into
one .npz; train on it with --set tickets.file=FILE.

examples:
  lotus select --config configs/digits.yaml --scorer el2n --policy ccs --fraction 0.5 --out tickets/digits-el2n-50.npz
  lotus select --config configs/digits.yaml --scorer forgetting --proxy-epochs 8 --policy top --count 500 --out t.npz
  lotus select --config configs/digits.yaml --scorer loss --checkpoint runs/digits/best.safetensors --policy moderate --fraction 0.3 --out t.npz
  lotus select --config configs/digits.yaml --from-ticket tickets/digits-el2n-50.npz --policy top --fraction 0.3 --out t30.npz
  lotus select --config configs/digits.yaml --policy random --fraction 0.3 --class-balanced --out tickets/random-30.npz
  lotus select --config configs/digits.yaml --checkpoint runs/digits --scorer cls_attention --policy top --fraction 1 \
      --patches 0.5 --out tickets/digits-patches.npz   # then: --set tickets.patches.enabled=true
      --set tickets.patches.source=file --set tickets.patches.file=tickets/digits-patches.npz
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch

from data_tickets import POLICIES, SCORERS, PatchTicket, TicketFile, score, select
from lotus.checkpoint import load_weights, model_config_from_checkpoint
from lotus.config import load_config
from lotus.data import build_datasets
from lotus.errors import LotusError, library_error
from lotus.features.tickets.callback import load_ticket
from lotus.features.tickets.proxy import make_proxy
from lotus.models import create_model, resolve_img_size

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="YAML training config (its data/model/optim sections are used)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.limit_train=500 (repeatable)")
    p.add_argument("--scorer", choices=sorted(SCORERS), default=None,
                   help="informativeness score (default el2n; none needed for --policy random)")
    p.add_argument("--policy", choices=sorted(POLICIES), default="ccs", help="selection policy (default ccs)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--fraction", type=float, help="fraction of the train split to keep, in (0, 1]")
    size.add_argument("--count", type=int, help="number of samples to keep")
    p.add_argument("--class-balanced", action="store_true", help="keep the class proportions of the train split")
    p.add_argument("--seed", type=int, default=0, help="seed of proxy trainings and of the policy (default 0)")
    p.add_argument("--beta", type=float, default=None, help="ccs: fraction of hardest samples dropped (default 0.1)")
    p.add_argument("--strata", type=int, default=None, help="ccs: number of score strata (default 50)")
    p.add_argument("--proxy-epochs", type=int, default=3, help="epochs of each proxy training (default 3)")
    p.add_argument("--repeats", type=int, default=None,
                   help="proxy trainings averaged (el2n default 3, others 1; forgetting counts per run)")
    p.add_argument("--model", metavar="NAME", help="timm model for the proxy / checkpoint (default: model.name)")
    p.add_argument("--checkpoint", metavar="PATH", help="score with this trained model (a .safetensors/state-dict "
                   "file or a run directory holding best.safetensors) instead of proxy trainings")
    p.add_argument("--from-ticket", metavar="FILE", help="reuse the scores stored in this ticket file (no scoring)")
    p.add_argument("--layer", default=None, help="cls_attention: block index or 'rollout' (default last block)")
    p.add_argument("--patches", type=float, default=None, metavar="KEEP_RATE",
                   help="also store patch tickets: each image's patches ranked by the model's CLS attention "
                   "(requires a ViT); KEEP_RATE is recorded as the default keep rate")
    p.add_argument("--patch-rollout", action="store_true", help="--patches: rank by attention rollout over all "
                   "blocks instead of the last block's CLS attention")
    p.add_argument("--batch-size", type=int, default=None, help="scoring batch size (default data.eval_batch_size)")
    p.add_argument("--out", "-o", help="output .npz (default tickets/<config>-<scorer>-<policy>-<pct>.npz)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or proxy logs")


# library field -> flag, for data_tickets' "field: reason" errors
_FLAGS = {"count": "--count", "fraction": "--fraction", "ccs beta": "--beta", "ccs strata": "--strata",
          "class_balanced": "--class-balanced", "repeats": "--repeats"}


def _checkpoint_file(path: str) -> str:
    if os.path.isdir(path):
        for name in ("best.safetensors", "last.safetensors"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise LotusError(f"--checkpoint: {path} has no best.safetensors or last.safetensors")
    if not os.path.isfile(path):
        raise LotusError(f"--checkpoint: file not found: {path}")
    return path


def _default_out(cfg, scorer: str | None, policy: str, fraction: float | None, count: int | None) -> str:
    size = f"{round(fraction * 100):g}pct" if fraction is not None else f"n{count}"
    return os.path.join("tickets", f"{cfg.name}-{scorer or 'none'}-{policy}-{size}.npz")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    if args.fraction is not None and not 0.0 < args.fraction <= 1.0:
        raise LotusError(f"--fraction: expected a number in (0, 1], got {args.fraction}")
    if args.proxy_epochs < 1:
        raise LotusError(f"--proxy-epochs: expected int >= 1, got {args.proxy_epochs}")
    if args.repeats is not None and args.repeats < 1:
        raise LotusError(f"--repeats: expected int >= 1, got {args.repeats}")
    if args.patches is not None and not 0.0 < args.patches <= 1.0:
        raise LotusError(f"--patches: expected a keep rate in (0, 1], got {args.patches}")
    if args.from_ticket and (args.scorer or args.checkpoint):
        raise LotusError("--from-ticket: reuses stored scores; do not combine with --scorer or --checkpoint")
    scorer = args.scorer or (None if args.policy == "random" or args.from_ticket else "el2n")
    out = args.out or _default_out(cfg, scorer, args.policy, args.fraction, args.count)
    if not out.endswith(".npz"):
        raise LotusError(f"--out: expected a .npz file name, got {out}")
    if os.path.exists(out) and not args.force:
        raise LotusError(f"--out: {out} already exists (pass --force to overwrite)")
    if args.batch_size is not None and args.batch_size < 1:
        raise LotusError(f"--batch-size: expected int >= 1, got {args.batch_size}")
    pol_kw = {k: v for k, v in (("beta", args.beta), ("strata", args.strata)) if v is not None}
    if pol_kw and args.policy != "ccs":
        raise LotusError("--beta/--strata: only used by --policy ccs")
    kw: dict = {}
    if args.repeats is not None:
        if scorer is None or "repeats" not in SCORERS[scorer].options():
            raise LotusError(f"--repeats: not used by --scorer {scorer}")
        kw["repeats"] = args.repeats
    if args.layer is not None:
        if scorer != "cls_attention":
            raise LotusError("--layer: only used by --scorer cls_attention")
        try:
            kw["layer"] = args.layer if args.layer == "rollout" else int(args.layer)
        except ValueError:
            raise LotusError(f"--layer: expected a block index or 'rollout', got {args.layer!r}") from None
    if scorer == "forgetting" and args.checkpoint:
        raise LotusError("--scorer forgetting: needs proxy trainings, not --checkpoint")
    if scorer == "forgetting" and args.proxy_epochs < 2:
        raise LotusError("--proxy-epochs: forgetting needs >= 2 epochs")
    t0 = time.perf_counter()

    ckpt = _checkpoint_file(args.checkpoint) if args.checkpoint else None
    if ckpt:  # the model section the checkpoint records fills in what the config does not set
        given = dict(cfg.source.get("model") or {}, **({"name": args.model} if args.model else {}))
        cfg.model = model_config_from_checkpoint(cfg.model, ckpt, given, "--checkpoint")
    data = build_datasets(cfg.data, resolve_img_size(cfg.model), cfg.model.in_chans, model_cfg=cfg.model)
    train_set, labels = data.train, data.labels_train
    device = torch.device("cuda" if cfg.train.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    progress = None if not args.quiet else False
    bs = args.batch_size or cfg.data.eval_batch_size

    model = proxy = None
    proxy_meta: dict | None = None
    if ckpt:
        mcfg = dataclasses.replace(cfg.model, name=args.model or cfg.model.name, checkpoint=None, pretrained=False)
        model = create_model(mcfg, data.num_classes, data.in_chans, data.img_size)
        model = load_weights(model, ckpt, key="--checkpoint").to(device).eval()
        proxy_meta = {"checkpoint": os.path.abspath(ckpt), "model": mcfg.name}
    elif scorer is not None or args.patches is not None:
        proxy = make_proxy(cfg, epochs=args.proxy_epochs, model=args.model, quiet=args.quiet,
                           cache=args.patches is not None)  # the patch scorer reuses the first proxy
        proxy_meta = dict(proxy.config)

    scores = None
    if args.from_ticket:
        src = load_ticket(args.from_ticket, "--from-ticket")
        try:
            src.validate_against(train_set, labels=labels)
        except ValueError as e:
            raise LotusError(f"--from-ticket: {e}") from None
        if src.scores is None:
            raise LotusError(f"--from-ticket: {args.from_ticket} stores no scores")
        scores, scorer, proxy_meta = torch.from_numpy(src.scores), src.scorer, src.proxy
    elif scorer is not None:
        try:
            scores = score(model, train_set, scorer, proxy=proxy, batch_size=bs, device=device, progress=progress,
                           seed=args.seed, **kw)
        except ValueError as e:  # e.g. a model the scorer cannot use, scores that diverged
            raise library_error(e, _FLAGS, f"--scorer {scorer}") from None
    if proxy_meta is not None and args.repeats is not None:
        proxy_meta["repeats"] = args.repeats

    base = scores if scores is not None else np.zeros(len(train_set))
    try:
        idx = select(base, args.policy, fraction=args.fraction, count=args.count, labels=labels,
                     class_balanced=args.class_balanced, seed=args.seed, **pol_kw)
    except ValueError as e:
        raise library_error(e, _FLAGS, f"--policy {args.policy}") from None

    patch_rank = None
    extra: dict = {"config": os.path.abspath(args.config), "overrides": list(args.set), "policy_options": pol_kw,
                   "scorer_options": {k: v for k, v in kw.items()}, "train_size": len(train_set)}
    if args.patches is not None:
        pmodel = model if model is not None else proxy(args.seed, None).to(device)
        ticket = PatchTicket(keep_rate=args.patches, rollout=args.patch_rollout)
        try:
            patch_rank = ticket.compute(pmodel, train_set, batch_size=bs, device=device, progress=not args.quiet)
        except ValueError as e:  # a model whose attention the CLS-attention scorer cannot read
            raise LotusError(f"--patches: {e}") from None
        # same layout as PatchTicket.to_ticket, so tickets.patches (source: file) can read it
        extra["patches"] = {"keep_rate": args.patches, "scorer": "cls_attention", "rollout": args.patch_rollout,
                            "num_patches": int(patch_rank.shape[1]), "stored": int(patch_rank.shape[1])}

    t = TicketFile.create(idx, dataset=train_set, labels=labels, scores=None if scores is None else scores.numpy(),
                          scorer=scorer, policy=args.policy,
                          fraction=args.fraction if args.fraction is not None else round(idx.size / len(train_set), 6),
                          seed=args.seed, class_balanced=args.class_balanced, proxy=proxy_meta,
                          patch_indices=patch_rank, extra=extra)
    t.save(out)
    print(json.dumps({"out": out, "count": int(idx.size), "train_size": len(train_set),
                      "fraction": round(idx.size / len(train_set), 4), "scorer": scorer, "policy": args.policy,
                      "seed": args.seed, "wall_s": round(time.perf_counter() - t0, 2)}))
    return 0
