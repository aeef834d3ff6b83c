"""The training-loop side of the ``pruning:`` section: a :class:`lotus.train.Callback` driving ``pruning``.

- Structured thinning (``pruning.structured``) at ``structured.at_epoch``, then ``trainer.rebuild_optimizer``
  with the optimizer state (Adam moments) sliced to the kept heads/neurons.
- Masks (magnitude / Wanda / N:M) one-shot at ``at_epoch`` or on the Zhu & Gupta cubic ramp, re-scored every
  ``frequency`` steps; after every optimizer step the stored weights under the masks are zeroed again.
- 2:4 with ``sparse_kernels`` on CUDA: masked Linears become ``pruning.SemiSparseLinear`` (semi-structured
  forward kernel); on CPU the run logs that masked dense is used.
- Resume: thinned widths (from this callback's state) and masks (from the model state's parametrization
  keys) are rebuilt in ``on_load_checkpoint`` before the weights load.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

import pruning
from lotus.callbacks import Callback
from lotus.data import batches
from lotus.features.pruning.config import PruningConfig
from pruning.masks import make_filter, masked_modules, set_mask
from pruning.schedule import cubic_sparsity
from pruning.semi_structured import SemiSparseLinear, resolve_backend
from pruning.structured import optimizer_param_names, slice_optimizer_state

__all__ = ["PruningCallback"]

_MASK_SUFFIX = ".parametrizations.weight.0.mask"


class PruningCallback(Callback):
    """Applies the ``pruning:`` section during training (see the module docstring)."""

    def __init__(self, cfg: PruningConfig) -> None:
        self.cfg = cfg
        self.current = 0.0  # unstructured target applied so far
        self.structured_done = False
        self.widths: dict | None = None
        self.kernels_enabled = False
        self._batch = 0
        self._calib: list | None = None
        self._end_epoch: float | None = None
        self._model_ref: nn.Module | None = None  # for state_dict (semi-structured masks)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _model(trainer: Any) -> nn.Module:
        return getattr(trainer, "unwrapped_model", None) or trainer.model

    def _progress(self, trainer: Any) -> float:
        spe = max(int(getattr(trainer, "steps_per_epoch", 0) or 0), 1)
        return trainer.epoch + min(self._batch / spe, 1.0)

    def _calib_batches(self, trainer: Any) -> list:
        """``calib_batches`` fixed training batches (seeded, no augmentation), cached for the run."""
        if self._calib is None:
            n = len(trainer.train_set)
            bs = trainer.cfg.data.batch_size
            g = torch.Generator().manual_seed(trainer.cfg.train.seed + 7919)
            idx = torch.randperm(n, generator=g)[: self.cfg.calib_batches * bs].numpy()
            self._calib = [(x, y) for x, y, _ in batches(trainer.train_set, idx, bs, trainer.cfg.data.num_workers)]
        return self._calib

    def _target(self, progress: float) -> float:
        c = self.cfg
        if c.method in ("nm", "2:4"):
            n, m = (2, 4) if c.method == "2:4" else (c.n, c.m)
            return 1.0 - n / m if progress >= c.at_epoch else 0.0
        if c.schedule == "one_shot":
            return c.sparsity if progress >= c.at_epoch else 0.0
        return cubic_sparsity(progress, c.sparsity, c.start_epoch, self._end_epoch, None, c.initial_sparsity)

    def _library_config(self, target: float) -> Any:
        c = self.cfg
        if c.method == "magnitude":
            return pruning.MagnitudeConfig(sparsity=target, scope=c.scope or "layer")
        if c.method == "wanda":
            return pruning.WandaConfig(sparsity=target, scope=c.scope or "row")
        n, m = (2, 4) if c.method == "2:4" else (c.n, c.m)
        return pruning.SemiStructuredConfig(n=n, m=m, score=c.score, kernels="off")

    def _needs_calib(self) -> bool:
        c = self.cfg
        return c.method == "wanda" or (c.method in ("nm", "2:4") and c.score == "wanda")

    # ---------------------------------------------------------------- pruning
    def _maybe_structured(self, trainer: Any, progress: float) -> None:
        s = self.cfg.structured
        if not s.enabled or self.structured_done or progress < s.at_epoch:
            return
        model = self._model(trainer)
        t0 = time.perf_counter()
        config = pruning.StructuredConfig(heads=s.heads, mlp=s.mlp, importance=s.importance, scope=s.scope,
                                          round_to=s.round_to, min_heads=s.min_heads)
        try:
            names = optimizer_param_names(trainer.optimizer, model)
        except ValueError:
            names = None
        calib = self._calib_batches(trainer) if s.importance != "magnitude" else None
        was = model.training
        report = pruning.prune_structured(model, config, calib_loader=calib)
        model.train(was)
        old_state = trainer.optimizer.state_dict()

        def carry_state(_old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
            if names is not None:
                new.load_state_dict(slice_optimizer_state(old_state, report["kept_indices"], names))

        trainer.rebuild_optimizer(carry_state)
        self.structured_done = True
        self.widths = report["widths"]
        trainer.log("prune_structured", heads=s.heads, mlp=s.mlp, importance=s.importance,
                    params_before=report["params_before"], params_after=report["params_after"],
                    optimizer_state_kept=names is not None, seconds=round(time.perf_counter() - t0, 3),
                    widths=report["widths"])

    def _maybe_prune(self, trainer: Any, progress: float) -> None:
        if not self.cfg.masks_enabled:
            return
        target = self._target(progress)
        if target <= self.current + 1e-9 or target <= 0.0:
            return
        model = self._model(trainer)
        t0 = time.perf_counter()
        keep = make_filter(model, self.cfg.include_head, self.cfg.include_patch_embed, self.cfg.exclude)
        calib = self._calib_batches(trainer) if self._needs_calib() else None
        report = pruning.prune_(model, self._library_config(target), calib_loader=calib, filter_fn=keep)
        self.current = target
        trainer.log("prune", method=self.cfg.method, target=round(target, 6),
                    sparsity=round(report["total"]["sparsity"], 6), nonzeros=report["model"]["nonzeros"],
                    params=report["model"]["params"], layers=len(masked_modules(model)),
                    skipped=report["skipped"], notes=report["notes"], seconds=round(time.perf_counter() - t0, 3))
        if self.cfg.sparse_kernels:
            self._enable_kernels(trainer)

    def _enable_kernels(self, trainer: Any) -> None:
        if self.kernels_enabled:
            return
        model = self._model(trainer)
        dtype = getattr(trainer.autocast(), "fast_dtype", None) if trainer.device.type == "cuda" else None
        rep = pruning.enable_sparse_training_(model, compute_dtype=dtype)
        self.kernels_enabled = True
        trainer.log("sparse_kernels", swapped=len(rep["swapped"]), skipped=rep["skipped"], backend=rep["backend"],
                    note=rep["note"])

    # ---------------------------------------------------------------- callbacks
    def on_load_checkpoint(self, trainer: Any, state: dict) -> None:
        model = self._model(trainer)
        mine = _own_state(state)
        widths = mine.get("widths")
        if widths:
            pruning.apply_widths(model, widths)
        modules = dict(model.named_modules())
        for key, mask in state.get("model", {}).items():
            if key.endswith(_MASK_SUFFIX):
                fqn = key[: -len(_MASK_SUFFIX)]
                if fqn not in modules:
                    raise ValueError(f"resume: masked layer {fqn} is not in the model")
                set_mask(modules[fqn], mask)
        semi = mine.get("semi_masks") or {}
        if semi:
            backend = mine.get("backend") or "cutlass"
            if torch.cuda.is_available():
                backend = resolve_backend("auto")
            for fqn, mask in semi.items():
                lin = modules[fqn]
                parent, _, child = fqn.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child,
                        SemiSparseLinear.from_linear(lin, mask, backend))
            self.kernels_enabled = True

    def on_fit_start(self, trainer: Any) -> None:
        c = self.cfg
        epochs = trainer.cfg.train.epochs
        self._end_epoch = c.end_epoch if c.end_epoch is not None else c.start_epoch + 0.75 * (epochs - c.start_epoch)
        if c.sparse_kernels and trainer.device.type != "cuda":
            trainer.log("sparse_kernels", swapped=0, note=pruning.CPU_NOTE)
        self._model_ref = self._model(trainer)
        self._batch = 0
        progress = float(trainer.epoch)
        self._maybe_structured(trainer, progress)
        self._maybe_prune(trainer, progress)

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self._batch = 0
        self._maybe_structured(trainer, float(epoch))
        if self.cfg.schedule == "one_shot":
            self._maybe_prune(trainer, float(epoch))

    def on_step_end(self, trainer: Any, step: int) -> None:
        self._batch += 1
        model = self._model(trainer)
        if self.current > 0:
            pruning.enforce_masks_(model)
        progress = self._progress(trainer)
        self._maybe_structured(trainer, progress)
        if self.cfg.schedule == "one_shot" or step % self.cfg.frequency == 0 or progress >= self._end_epoch:
            self._maybe_prune(trainer, progress)

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict) -> None:
        model = self._model(trainer)
        if self.current > 0:
            rep = pruning.sparsity_report(model, masked_modules(model))
            metrics["sparsity"] = round(rep["total"]["sparsity"], 6)
        if self.structured_done:
            metrics["params"] = sum(p.numel() for p in model.parameters())

    def on_fit_end(self, trainer: Any, summary: dict) -> None:
        model = self._model(trainer)
        rep = pruning.sparsity_report(model, masked_modules(model)) if self.current > 0 else None
        summary["pruning"] = {
            "method": self.cfg.method, "target_sparsity": self.current,
            "sparsity": None if rep is None else rep["total"]["sparsity"],
            "structured": self.structured_done, "widths": self.widths, "sparse_kernels": self.kernels_enabled,
        }

    def state_dict(self) -> dict:
        semi = {}
        if self.kernels_enabled and self._model_ref is not None:
            semi = {f: m.weight_mask.detach().cpu().clone() for f, m in self._model_ref.named_modules()
                    if isinstance(m, SemiSparseLinear)}
        return {"current": self.current, "structured_done": self.structured_done, "widths": self.widths,
                "semi_masks": semi}

    def load_state_dict(self, state: dict) -> None:
        self.current = float(state.get("current", 0.0))
        self.structured_done = bool(state.get("structured_done", False))
        self.widths = state.get("widths")


def _own_state(state: dict) -> dict:
    for key, value in (state.get("callbacks") or {}).items():
        if key.split(":", 1)[0] == "PruningCallback" and isinstance(value, dict):  # keys are "<class>:<n>"
            return value
    return {}
