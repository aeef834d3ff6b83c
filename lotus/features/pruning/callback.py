"""The training-loop side of the ``pruning:`` section, on the :mod:`pruning` library.

- Structured thinning (``pruning.structured``) at ``structured.at_epoch`` with :func:`pruning.prune_structured`,
  then ``trainer.rebuild_optimizer`` with the optimizer state (Adam moments) sliced to the kept heads/neurons.
- Masks: a :class:`pruning.GradualPruner` whose clock is the fractional epoch (one-shot at ``at_epoch``, or
  Zhu & Gupta's cubic ramp evaluated continuously and re-applied every ``frequency`` optimizer steps); it
  re-zeroes the weights under the masks after every step and re-scores when the target rises. Calibration
  batches are built only when a prune needs them (the method's ``needs_calibration`` in :mod:`pruning.registry`).
- 2:4 with ``sparse_kernels`` on CUDA: masked Linears become ``SemiSparseLinear`` (semi-structured forward
  kernel); on CPU the run logs that masked dense is used.
- Resume: this callback's state is restored first, then ``on_load_checkpoint`` rebuilds the thinned widths
  and the masks (from the model state's parametrization keys) before the weights load.
- Data parallel (DDP / FSDP2 under torchrun): calibration is sharded across ranks and reduced, every rank
  reaches the same decision, and the model is rebuilt and re-wrapped (:mod:`lotus.features.pruning.distributed`).
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

import pruning
from lotus.callbacks import Callback, Trainer
from lotus.data import batches
from lotus.errors import library_error
from lotus.features.pruning.checks import check_nm_shapes
from lotus.features.pruning.config import PruningConfig
from lotus.features.pruning.distributed import (
    calibration,
    enforce_masks_sharded,
    is_parallel,
    mask_sparsity,
    prune_masks_parallel,
    restore_shapes,
    thin_parallel,
)
from lotus.features.schedule.auto import AutoState
from lotus.parallel.full_state import is_sharded
from lotus.parallel.rebuild import digest
from pruning.masks import enforce_masks_, make_filter, masked_modules
from pruning.optimizer_state import optimizer_param_names, slice_optimizer_state
from pruning.registry import needs_calibration
from pruning.semi_structured import CPU_NOTE, SemiSparseLinear, resolve_backend

__all__ = ["PruningCallback"]

# library field -> config key, for the library's "field: reason" errors
_MASK_KEYS = {f: f"pruning.{f}" for f in ("sparsity", "scope", "n", "m", "score", "initial_sparsity")}
_MASK_KEYS["calib_loader"] = "pruning.calib_batches"
_STRUCTURED_KEYS = {
    f: f"pruning.structured.{f}" for f in ("heads", "mlp", "importance", "scope", "round_to", "min_heads", "min_mlp")
}
_STRUCTURED_KEYS["calib_loader"] = "pruning.calib_batches"


class PruningCallback(Callback):
    """Applies the ``pruning:`` section during training (see the module docstring)."""

    def __init__(self, cfg: PruningConfig, auto: AutoState | None = None) -> None:
        self.cfg = cfg
        self.auto = auto  # schedule.mode: auto decides when and how much to thin (pruning.structured: the most)
        self.pruner: pruning.GradualPruner | None = None
        self.current = 0.0  # mask sparsity target applied so far (restored into the pruner)
        self.structured_done = False
        self.widths: dict | None = None
        self.kernels_enabled = False
        self._semi_masks: dict = {}
        self._batch = 0
        self._calib: list | None = None

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _model(trainer: Trainer) -> nn.Module:
        return trainer.unwrapped_model

    def _progress(self, trainer: Trainer) -> float:
        spe = max(int(trainer.steps_per_epoch or 0), 1)
        return trainer.epoch + min(self._batch / spe, 1.0)

    def calib_batches(self, trainer: Trainer) -> list:
        """``calib_batches`` fixed training batches (seeded, no augmentation), cached for the run; of the global
        batch size (``data.batch_size`` x ranks), so a data-parallel run scores what one process would."""
        if self._calib is None:
            n = len(trainer.train_set)
            bs = trainer.cfg.data.batch_size * trainer.dist.world_size
            g = torch.Generator().manual_seed(trainer.cfg.train.seed + 7919)
            idx = torch.randperm(n, generator=g)[: self.cfg.calib_batches * bs].numpy()
            self._calib = [(x, y) for x, y, _ in batches(trainer.train_set, idx, bs, trainer.cfg.data.num_workers)]
        return self._calib

    def _schedule(self, epochs: int) -> pruning.GradualSchedule | pruning.OneShotSchedule:
        c = self.cfg
        if c.schedule == "gradual":
            end = c.end_epoch if c.end_epoch is not None else c.start_epoch + 0.75 * (epochs - c.start_epoch)
            return pruning.GradualSchedule(
                final_sparsity=c.sparsity,
                start_step=c.start_epoch,
                end_step=end,
                frequency=None,
                initial_sparsity=c.initial_sparsity,
            )
        return pruning.OneShotSchedule(sparsity=c.mask_config().sparsity, step=c.at_epoch)

    # ---------------------------------------------------------------- pruning
    def _maybe_structured(self, trainer: Trainer, progress: float) -> None:
        s = self.cfg.structured
        if self.auto is not None:
            due = self.auto.thin_due(progress)
            if not s.enabled or self.structured_done or due is None:
                return
            lib = dataclasses.replace(s.library(), heads=due[0], mlp=due[1])
        elif not s.enabled or self.structured_done or progress < s.at_epoch:
            return
        else:
            lib = s.library()
        model = self._model(trainer)
        t0 = time.perf_counter()
        calib = self.calib_batches(trainer) if needs_calibration(lib) else None
        parallel = is_parallel(trainer)
        names = None
        if not parallel:
            try:
                names = optimizer_param_names(trainer.optimizer, model)
            except ValueError:
                names = None
        was = model.training
        try:
            if parallel:  # gather, thin the same way on every rank, re-wrap, optimizer state sliced
                report = thin_parallel(trainer, lib, calib, self.widths)
            else:
                report = pruning.prune_structured(model, lib, calib_loader=calib)
        except ValueError as e:  # e.g. a ratio that removes every head of a small block, a model it cannot thin
            raise library_error(e, _STRUCTURED_KEYS, "pruning.structured") from None
        self._model(trainer).train(was)
        if not parallel:
            old_state = trainer.optimizer.state_dict()

            def carry_state(_old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
                if names is not None:
                    new.load_state_dict(slice_optimizer_state(old_state, report["kept_indices"], names))

            trainer.rebuild_optimizer(carry_state)
        trainer.model_thinned(report)  # e.g. the EMA copy is thinned the same way
        self.structured_done = True
        self.widths = report["widths"]
        trainer.log(
            "prune_structured",
            heads=lib.heads,
            mlp=lib.mlp,
            importance=s.importance,
            params_before=report["params_before"],
            params_after=report["params_after"],
            optimizer_state_kept=parallel or names is not None,
            seconds=round(time.perf_counter() - t0, 3),
            widths=report["widths"],
            kept_digest=digest(report["kept"]),
            rank_digests=report.get("rank_digests"),
        )

    def _ensure_pruner(self, trainer: Trainer) -> pruning.GradualPruner:
        """The mask pruner, built on first use (after any thinning, so its layer filter sees the final modules)."""
        if self.pruner is None:
            c, model = self.cfg, self._model(trainer)
            keep = make_filter(model, c.include_head, c.include_patch_embed, c.exclude)
            method = c.mask_config()
            if isinstance(method, pruning.SemiStructuredConfig):
                what = 'pruning.method: "2:4"' if c.method == "2:4" else f"pruning.method: nm with pruning.m={method.m}"
                check_nm_shapes(model, keep, method.m, what)
            needs_calib = needs_calibration(method)  # the registry's capability: Wanda, Taylor, score="wanda"
            self.pruner = pruning.GradualPruner(
                model,
                self._schedule(trainer.cfg.train.epochs),
                method,
                filter_fn=keep,
                calib_loader=(lambda: self._rank_calib(trainer)) if needs_calib else None,
            )
            self.pruner.current = self.current  # resumed: the masks are back in the model already
        return self.pruner

    def _rank_calib(self, trainer: Trainer) -> list:
        """This rank's share of the calibration batches; sets the pruner's cross-rank ``reduce_sum``."""
        mine, self.pruner.reduce_sum = calibration(trainer, self.calib_batches(trainer))
        return mine

    def _maybe_prune(self, trainer: Trainer, progress: float) -> None:
        if not self.cfg.masks_enabled or progress < self.cfg.mask_epoch:
            return
        pruner = self._ensure_pruner(trainer)
        t0 = time.perf_counter()
        c = self.cfg
        try:
            if is_parallel(trainer):  # DDP / FSDP2: masks on a gathered plain copy, then wrapped again
                report = prune_masks_parallel(
                    trainer, pruner, progress, self.widths, (c.include_head, c.include_patch_embed, c.exclude)
                )
            else:
                report = pruner.step(progress)  # enforces the masks; prunes when the target rose
        except ValueError as e:
            raise library_error(e, _MASK_KEYS, "pruning") from None
        if report is None:
            return
        self.current = pruner.current
        model = self._model(trainer)
        trainer.log(
            "prune",
            method=self.cfg.method,
            target=round(self.current, 6),
            sparsity=round(report["total"]["sparsity"], 6),
            nonzeros=report["model"]["nonzeros"],
            params=report["model"]["params"],
            layers=len(masked_modules(model)),
            skipped=report["skipped"],
            notes=report["notes"],
            seconds=round(time.perf_counter() - t0, 3),
            rank_digests=report.get("rank_digests"),
        )
        if self.cfg.sparse_kernels:
            self._enable_kernels(trainer)

    def _enable_kernels(self, trainer: Trainer) -> None:
        if self.kernels_enabled:
            return
        model = self._model(trainer)
        dtype = getattr(trainer.autocast(), "fast_dtype", None) if trainer.device.type == "cuda" else None
        rep = pruning.enable_sparse_training_(model, compute_dtype=dtype)
        self.kernels_enabled = True
        trainer.log(
            "sparse_kernels",
            swapped=len(rep["swapped"]),
            skipped=rep["skipped"],
            backend=rep["backend"],
            note=rep["note"],
        )

    # ---------------------------------------------------------------- callbacks
    def on_load_checkpoint(self, trainer: Trainer, state: dict) -> None:
        model = self._model(trainer)
        restore_shapes(model, state.get("model", {}), self.widths)
        modules = dict(model.named_modules())
        if self._semi_masks:
            backend = resolve_backend("auto") if torch.cuda.is_available() else "cutlass"
            for fqn, mask in self._semi_masks.items():
                parent, _, child = fqn.rpartition(".")
                setattr(
                    model.get_submodule(parent) if parent else model,
                    child,
                    SemiSparseLinear.from_linear(modules[fqn], mask, backend),
                )
            self.kernels_enabled = True

    def on_fit_start(self, trainer: Trainer) -> None:
        c = self.cfg
        if c.sparse_kernels and trainer.device.type != "cuda" and not trainer.restored:
            trainer.log("sparse_kernels", swapped=0, note=CPU_NOTE)
        self._batch = 0
        progress = float(trainer.epoch)
        self._maybe_structured(trainer, progress)
        self._maybe_prune(trainer, progress)

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self._batch = 0
        self._maybe_structured(trainer, float(epoch))
        if self.cfg.schedule == "one_shot":
            self._maybe_prune(trainer, float(epoch))

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        self._batch += 1
        progress = self._progress(trainer)
        self._maybe_structured(trainer, progress)
        end = getattr(self.pruner.schedule, "end_step", 0.0) if self.pruner is not None else float("inf")
        update = self.cfg.schedule == "one_shot" or step % self.cfg.frequency == 0 or progress >= end
        if update:
            self._maybe_prune(trainer, progress)
        elif self.current > 0:
            model = self._model(trainer)
            enforce_masks_sharded(model) if is_sharded(model) else enforce_masks_(model)

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        model = self._model(trainer)
        if self.current > 0:
            metrics["sparsity"] = round(self._sparsity(model), 6)
        if self.structured_done:
            metrics["params"] = sum(p.numel() for p in model.parameters())

    @staticmethod
    def _sparsity(model: nn.Module) -> float:
        """Sparsity of the masked layers (from the masks under FSDP2, where weights are shards)."""
        if is_sharded(model):
            return mask_sparsity(model)["sparsity"]
        return pruning.sparsity_report(model, masked_modules(model))["total"]["sparsity"]

    def on_fit_end(self, trainer: Trainer, summary: dict) -> None:
        model = self._model(trainer)
        summary["pruning"] = {
            "method": self.cfg.method,
            "target_sparsity": self.current,
            "sparsity": self._sparsity(model) if self.current > 0 else None,
            "structured": self.structured_done,
            "widths": self.widths,
            "sparse_kernels": self.kernels_enabled,
        }

    def state_dict(self) -> dict:
        semi = {}
        if self.kernels_enabled and self.pruner is not None:
            semi = {
                f: m.weight_mask.detach().cpu().clone()
                for f, m in self.pruner.model.named_modules()
                if isinstance(m, SemiSparseLinear)
            }
        return {
            "current": self.current,
            "structured_done": self.structured_done,
            "widths": self.widths,
            "semi_masks": semi,
        }

    def load_state_dict(self, state: dict) -> None:
        self.current = float(state.get("current", 0.0))
        self.structured_done = bool(state.get("structured_done", False))
        self.widths = state.get("widths")
        self._semi_masks = dict(state.get("semi_masks") or {})
