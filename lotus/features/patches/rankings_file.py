"""Offline patch tickets: rank every train image's patches with a scorer ViT and store them in a ticket
file that ``tickets.patches: {source: file}`` trains on (``lotus select --patches``)."""

from __future__ import annotations

import os

from data_tickets import PatchTicket, TicketFile
from data_tickets.keep_rate import num_kept
from lotus.config import Config
from lotus.data import build_datasets
from lotus.errors import LotusError
from lotus.models import create_model, resolve_img_size
from lotus.schema import to_dict
from lotus.weights import load_weights
from lotus.weights_meta import model_config_from_checkpoint

__all__ = ["make_patch_ticket_file"]


def make_patch_ticket_file(
    cfg: Config,
    out: str,
    checkpoint: str | None = None,
    rollout: bool = False,
    keep_rate: float = 1.0,
    batch_size: int | None = None,
    progress: bool = True,
) -> TicketFile:
    """Rank the patches of every train-split image of ``cfg`` with a scorer ViT and save a ticket file.

    The scorer is ``cfg.model`` with the weights of ``checkpoint`` (e.g. ``runs/x/best.safetensors``; without
    one the untrained model is used, which is rarely what you want); the model section it records (Lotus files)
    fills in every model key ``cfg.source`` does not set. ``keep_rate`` < 1 stores only the best
    ``keep_rate`` share of each image's patches (smaller file; training may then use at most that rate).
    The file holds every train index, the rankings (``patch_indices``) and the train split's fingerprint;
    train on it with ``tickets.patches: {enabled: true, source: file, file: OUT}``. Returns the TicketFile.
    """
    if not str(out).endswith(".npz"):
        raise LotusError(f"--out: expected a .npz ticket file name, got {out!r}")
    mcfg = cfg.model
    if checkpoint:
        given = cfg.source.get("model") if cfg.source else to_dict(mcfg)  # a config built in code: all of it
        mcfg = model_config_from_checkpoint(mcfg, checkpoint, given, "checkpoint")
    bundle = build_datasets(cfg.data, resolve_img_size(mcfg), mcfg.in_chans, model_cfg=mcfg)
    model = create_model(mcfg, bundle.num_classes, bundle.in_chans, bundle.img_size)
    if checkpoint:
        load_weights(model, checkpoint)
    if getattr(model, "cls_token", None) is None:
        raise LotusError(f"model.name: patch tickets rank patches by CLS attention; {mcfg.name} has no class token")
    n = int(model.patch_embed.num_patches)
    ticket = PatchTicket(keep_rate=keep_rate, rollout=rollout, seed=cfg.train.seed)
    rank = ticket.compute(
        model,
        bundle.train,
        batch_size=batch_size or cfg.data.eval_batch_size,
        store=num_kept(n, keep_rate),
        progress=progress,
    )
    tf = ticket.to_ticket(
        rank,
        num_patches=n,
        dataset=bundle.train,
        labels=bundle.labels_train,
        extra={
            "config": cfg.name,
            "model": mcfg.name,
            "checkpoint": os.path.abspath(checkpoint) if checkpoint else None,
        },
    )
    tf.proxy = {"model": mcfg.name, "checkpoint": os.path.abspath(checkpoint) if checkpoint else None}
    tf.save(out)
    return tf
