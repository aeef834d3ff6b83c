"""Score the training samples of a config's dataset and write a data-ticket file.

The scores come from short proxy trainings on the lotus training loop (default), or from a trained model
(--checkpoint). The selected subset, all scores, the settings and a fingerprint of the train split go into
one .npz; train on it with --set tickets.file=FILE. Selection is class-balanced (per-class quotas in the
train split's proportions) unless --no-class-balance. Proxy trainings are cached (--proxy-cache, default a
.proxy-cache folder next to --out): several --scorer values, or a later lotus select on the same data, model
and proxy settings, reuse them instead of training again.

examples:
  lotus select -c configs/digits.yaml --scorer el2n --policy ccs --fraction 0.5 --out tickets/digits-el2n-50.npz
  lotus select -c configs/digits.yaml --scorer el2n forgetting --fraction 0.3 --out tickets/digits-{scorer}-30.npz
  lotus select -c configs/digits.yaml --scorer forgetting --proxy-epochs 8 --policy top --count 500 --out t.npz
  lotus select -c configs/digits.yaml --scorer loss --checkpoint runs/digits --policy moderate --fraction 0.3 \\
      --out t.npz
  lotus select -c configs/digits.yaml --from-ticket tickets/digits-el2n-50.npz --policy top --fraction 0.3 \\
      --out t30.npz
  lotus select -c configs/digits.yaml --policy random --fraction 0.3 --no-class-balance --out tickets/random-30.npz
  lotus select --config configs/digits.yaml --checkpoint runs/digits --scorer cls_attention --policy top --fraction 1 \
      --patches 0.5 --out tickets/digits-patches.npz   # then: --set tickets.patches.enabled=true
      --set tickets.patches.source=file --set tickets.patches.file=tickets/digits-patches.npz
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from typing import TYPE_CHECKING

from data_tickets.policies import POLICIES, uses_class_balance
from lotus.commands import select_ticket
from lotus.config import load_config
from lotus.errors import LotusError
from lotus.run_files import checkpoint_file
from lotus.safe_io import output_lock

if TYPE_CHECKING:  # annotations only: torch is imported when the command runs
    pass

__all__ = ["add_arguments", "run"]


def _scorer(name: str) -> str:
    """argparse type of ``--scorer``: a name of ``data_tickets.SCORERS``. The registry imports torch, so it is
    read when a value is given, not when the parser is built (``lotus select --help`` stays fast)."""
    from data_tickets import SCORERS

    if name not in SCORERS:
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {', '.join(sorted(SCORERS))})")
    return name


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", "-c", required=True, help="YAML training config (its data/model/optim sections are used)"
    )
    p.add_argument(
        "--set",
        "-s",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set data.limit_train=500 (repeatable)",
    )
    p.add_argument(
        "--scorer",
        type=_scorer,
        default=None,
        nargs="+",
        metavar="SCORER",
        help="informativeness score(s), names of data_tickets.SCORERS (default aum: one proxy training's margins, "
        "averaged over its epochs; none needed for --policy "
        "random); several scorers write one ticket each (--out must then contain {scorer}) from the same proxy "
        "trainings",
    )
    p.add_argument("--policy", choices=sorted(POLICIES), default="ccs", help="selection policy (default ccs)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--fraction", type=float, help="fraction of the train split to keep, in (0, 1]")
    size.add_argument("--count", type=int, help="number of samples to keep")
    p.add_argument(
        "--class-balance",
        dest="class_balanced",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="per-class quotas in the train split's proportions, the policy applied within each class "
        "(default on; --no-class-balance selects over the whole split)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of proxy trainings and of the policy (default 0)")
    p.add_argument(
        "--beta",
        type=float,
        default=None,
        help="ccs: fraction of hardest samples dropped (default by the share kept: 0 from 50 %%, 0.1 below, "
        "0.3 below 20 %%)",
    )
    p.add_argument("--strata", type=int, default=None, help="ccs: number of score strata (default 50)")
    p.add_argument("--proxy-epochs", type=int, default=3, help="epochs of each proxy training (default 3)")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="proxy trainings averaged (el2n default 3, others 1; forgetting counts per run)",
    )
    p.add_argument("--model", metavar="NAME", help="timm model for the proxy / checkpoint (default: model.name)")
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="score with this trained model (a .safetensors/state-dict "
        "file or a run directory holding best.safetensors) instead of proxy trainings",
    )
    p.add_argument("--from-ticket", metavar="FILE", help="reuse the scores stored in this ticket file (no scoring)")
    p.add_argument("--layer", default=None, help="cls_attention: block index or 'rollout' (default last block)")
    p.add_argument(
        "--patches",
        type=float,
        default=None,
        metavar="KEEP_RATE",
        help="also store patch tickets: each image's patches ranked by the model's CLS attention "
        "(requires a ViT); KEEP_RATE is recorded as the default keep rate",
    )
    p.add_argument(
        "--patch-rollout",
        action="store_true",
        help="--patches: rank by attention rollout over all blocks instead of the last block's CLS attention",
    )
    p.add_argument(
        "--proxy-cache",
        metavar="DIR",
        default=None,
        help="folder of cached proxy trainings (default: .proxy-cache next to --out)",
    )
    p.add_argument(
        "--no-proxy-cache", action="store_true", help="share proxies only within this invocation (nothing written)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="scoring batch size (default data.eval_batch_size)")
    p.add_argument(
        "--out",
        "-o",
        help="output .npz (default tickets/<config>-<scorer>-<policy>-<pct>.npz); "
        "{scorer} is replaced by the scorer name",
    )
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or proxy logs")


def _default_out(cfg, scorer: str | None, policy: str, fraction: float | None, count: int | None) -> str:
    size = f"{round(fraction * 100):g}pct" if fraction is not None else f"n{count}"
    return os.path.join("tickets", f"{cfg.name}-{scorer or 'none'}-{policy}-{size}.npz")


def _outputs(args: argparse.Namespace, cfg, scorers: list[str | None]) -> dict[str | None, str]:
    """Output path per scorer; refuses names that are not .npz, collide or exist (without --force)."""
    if args.out and len(scorers) > 1 and "{scorer}" not in args.out:
        raise LotusError(
            f"--out: several scorers ({' '.join(scorers)}) write one ticket each; put {{scorer}} in "
            f"the file name, got {args.out}"
        )
    outs = {}
    for sc in scorers:
        out = (
            args.out.replace("{scorer}", sc or "none")
            if args.out
            else _default_out(cfg, sc, args.policy, args.fraction, args.count)
        )
        if not out.endswith(".npz"):
            raise LotusError(f"--out: expected a .npz file name, got {out}")
        if os.path.exists(out) and not args.force:
            raise LotusError(f"--out: {out} already exists (pass --force to overwrite)")
        outs[sc] = out
    return outs


def _scorer_options(args: argparse.Namespace, scorer: str | None) -> dict:
    from data_tickets import SCORERS

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
    return kw


def run(args: argparse.Namespace) -> int:
    import torch

    from data_tickets import PatchTicket
    from lotus.data import build_datasets
    from lotus.features.tickets.proxy import make_cached_proxy
    from lotus.models import create_model, resolve_img_size
    from lotus.weights import load_weights
    from lotus.weights_meta import model_config_from_checkpoint

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
    if args.proxy_cache is not None and args.no_proxy_cache:
        raise LotusError("--proxy-cache: not allowed with --no-proxy-cache")
    scorers: list[str | None] = (
        list(dict.fromkeys(args.scorer))
        if args.scorer
        else [None if args.policy == "random" or args.from_ticket else "aum"]
    )
    outs = _outputs(args, cfg, scorers)
    if args.batch_size is not None and args.batch_size < 1:
        raise LotusError(f"--batch-size: expected int >= 1, got {args.batch_size}")
    pol_kw = {k: v for k, v in (("beta", args.beta), ("strata", args.strata)) if v is not None}
    if pol_kw and args.policy != "ccs":
        raise LotusError("--beta/--strata: only used by --policy ccs")
    options = {sc: _scorer_options(args, sc) for sc in scorers}
    with contextlib.ExitStack() as locks:  # a second select on one --out is refused while this one runs
        for out in outs.values():
            locks.enter_context(output_lock(out, "--out"))
        t0 = time.perf_counter()

        ckpt = checkpoint_file(args.checkpoint) if args.checkpoint else None
        if ckpt:  # the model section the checkpoint records fills in what the config does not set
            given = dict(cfg.source.get("model") or {}, **({"name": args.model} if args.model else {}))
            cfg.model = model_config_from_checkpoint(cfg.model, ckpt, given, "--checkpoint")
        data = build_datasets(cfg.data, resolve_img_size(cfg.model), cfg.model.in_chans, model_cfg=cfg.model)
        train_set, labels = data.train, data.labels_train
        device = torch.device("cuda" if cfg.train.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
        progress = None if not args.quiet else False
        bs = args.batch_size or cfg.data.eval_batch_size
        balanced = uses_class_balance(args.class_balanced, labels)

        model = proxy = None
        proxy_meta: dict | None = None
        tmp_cache = None
        if ckpt:
            mcfg = dataclasses.replace(cfg.model, name=args.model or cfg.model.name, checkpoint=None, pretrained=False)
            model = create_model(mcfg, data.num_classes, data.in_chans, data.img_size)
            model = load_weights(model, ckpt, key="--checkpoint").to(device).eval()
            proxy_meta = {"checkpoint": os.path.abspath(ckpt), "model": mcfg.name}
        elif any(sc is not None for sc in scorers) or args.patches is not None:
            if args.no_proxy_cache:
                tmp_cache = tempfile.TemporaryDirectory(prefix="lotus-proxy-")
            folder = (
                tmp_cache.name
                if tmp_cache
                else (
                    args.proxy_cache
                    or os.path.join(os.path.dirname(os.path.abspath(next(iter(outs.values())))), ".proxy-cache")
                )
            )

            def log(msg: str) -> None:
                if not args.quiet or "recomputing" in msg:
                    print(msg, file=sys.stderr, flush=True)

            proxy = make_cached_proxy(
                cfg, data, folder, epochs=args.proxy_epochs, model=args.model, quiet=args.quiet, device=device, log=log
            )
            proxy_meta = dict(proxy.config)
        try:
            patch_rank, patch_extra = None, None
            if args.patches is not None:  # one ranking, stored in every ticket of this invocation
                pmodel = model if model is not None else proxy(args.seed, None).to(device)
                ticket = PatchTicket(keep_rate=args.patches, rollout=args.patch_rollout)
                try:
                    patch_rank = ticket.compute(
                        pmodel, train_set, batch_size=bs, device=device, progress=not args.quiet
                    )
                except ValueError as e:  # a model whose attention the CLS-attention scorer cannot read
                    raise LotusError(f"--patches: {e}") from None
                # same layout as PatchTicket.to_ticket, so tickets.patches (source: file) can read it
                patch_extra = {
                    "keep_rate": args.patches,
                    "scorer": "cls_attention",
                    "rollout": args.patch_rollout,
                    "num_patches": int(patch_rank.shape[1]),
                    "stored": int(patch_rank.shape[1]),
                }
            job = select_ticket.Job(
                args,
                train_set,
                labels,
                model,
                proxy,
                proxy_meta,
                balanced,
                device,
                bs,
                progress,
                pol_kw,
                patch_rank,
                patch_extra,
                t0,
            )
            for sc in scorers:
                select_ticket.write_ticket(job, sc, outs[sc], options[sc])
        finally:
            if tmp_cache is not None:
                tmp_cache.cleanup()
        return 0
