"""Training callback: outlier metrics of the residual stream on a fixed probe batch every N steps."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

from lotus.callbacks import Callback, Trainer
from lotus.data import batches
from lotus.errors import LotusError
from lotus.features.outliers.config import OutliersConfig
from lotus.features.outliers.hooks import ResidualStreamProbe, find_blocks
from lotus.features.outliers.layer_report import read_outlier_records, summarize, write_run_report
from lotus.features.outliers.loading import EvalBatches, calibration_batches
from lotus.features.outliers.quant import quantcheck

__all__ = ["OutlierMonitor"]


def _round(v: float) -> float:
    return float(f"{v:.6g}") if math.isfinite(v) else v


class OutlierMonitor(Callback):
    """Logs per-layer kurtosis / max-median ratio (plus RMS and max |x|) as ``outliers`` events.

    The probe batch is fixed for the whole run (the first ``probe_batch_size`` samples of a seeded
    permutation of the val or train split, without augmentation) so values are comparable across steps.
    The probe runs the full model (``trainer.model``, in eval mode and without gradients, under the training
    autocast), not ``trainer.forward``, so token dropping by patch tickets does not change what is measured.
    Every rank runs the probe (needed under FSDP); only rank 0 writes.
    """

    def __init__(self, cfg: OutliersConfig):
        self.cfg = cfg
        self.probe_s = 0.0
        self.measurements = 0
        self.last: dict | None = None
        self.last_step = -1
        self._images: torch.Tensor | None = None

    # ---------------------------------------------------------------- setup
    def _probe_images(self, trainer: Trainer) -> torch.Tensor:
        dataset = trainer.val_set if self.cfg.probe_split == "val" else trainer.train_set
        n = min(self.cfg.probe_batch_size, len(dataset))
        g = torch.Generator().manual_seed(int(trainer.cfg.train.seed) + 2024)
        idx = np.sort(torch.randperm(len(dataset), generator=g)[:n].numpy())
        images = torch.cat([x for x, _, _ in batches(dataset, idx, n)])
        return images.to(trainer.device)

    def on_fit_start(self, trainer: Trainer) -> None:
        model = getattr(trainer, "unwrapped_model", None) or trainer.model
        try:
            find_blocks(model)
            ResidualStreamProbe(model, self.cfg.layers or None)  # validates outliers.layers
        except ValueError as e:
            raise LotusError(str(e)) from None
        self._images = self._probe_images(trainer)
        if self.cfg.at_start and trainer.step == 0:
            self.measure(trainer)

    # -------------------------------------------------------------- measure
    @torch.no_grad()
    def measure(self, trainer: Trainer) -> dict:
        """Run the probe now and log an ``outliers`` event; returns ``{site: metrics}``."""
        t0 = time.perf_counter()
        target = getattr(trainer, "unwrapped_model", None) or trainer.model
        model = trainer.model
        was_training = model.training
        model.eval()
        try:
            with ResidualStreamProbe(target, self.cfg.layers or None) as probe:
                with trainer.autocast():
                    model(self._images)
            layers = {site: {k: _round(v) for k, v in m.items()} for site, m in probe.compute().items()}
        finally:
            model.train(was_training)
        dt = time.perf_counter() - t0
        self.probe_s += dt
        self.measurements += 1
        self.last, self.last_step = layers, trainer.step
        summary = {k: _round(v) for k, v in summarize(layers).items()}
        trainer.log("outliers", **summary, probe_s=round(dt, 4), layers=layers)
        return layers

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        if step % self.cfg.every_n_steps == 0:
            self.measure(trainer)

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        # The final measurement happens here, while metrics.jsonl is still open (on_fit_end runs after it closed).
        cap = trainer.cfg.train.max_steps
        last_epoch = epoch + 1 >= trainer.cfg.train.epochs or (cap is not None and trainer.step >= cap)
        if last_epoch and self._images is not None and self.last_step != trainer.step:
            self.measure(trainer)
        if self.last is not None:
            metrics.update({k: _round(v) for k, v in summarize(self.last).items()})

    def on_fit_end(self, trainer: Trainer, summary: dict) -> None:
        if self._images is None:
            return
        if self.last is None or self.last_step != trainer.step:
            self.measure(trainer)
        wall = float(getattr(trainer, "wall", 0.0)) or float("nan")
        out = {
            "step": self.last_step,
            **{k: _round(v) for k, v in summarize(self.last).items()},
            "layers": self.last,
            "measurements": self.measurements,
            "probe_s": round(self.probe_s, 4),
            # share of the training wall time spent in probes (the budget is <= 5% at the default interval)
            "probe_fraction": round(self.probe_s / wall, 5) if wall == wall and wall > 0 else None,
        }
        summary["outliers"] = out
        is_main = getattr(getattr(trainer, "dist", None), "is_main", True)
        if self.cfg.quant_check:
            if getattr(getattr(trainer, "dist", None), "world_size", 1) > 1:
                summary["quant"] = {"skipped": "run lotus quantcheck on the saved checkpoint (multi-process run)"}
            else:
                summary["quant"] = self._quant_check(trainer)
                trainer.log("quantcheck", **summary["quant"])
        if self.cfg.report and getattr(trainer, "write", True) and is_main:
            path = os.path.join(trainer.run_dir, "metrics.jsonl")
            records = read_outlier_records(path) if os.path.isfile(path) else []
            if not records or records[-1]["step"] != self.last_step:
                records.append({"step": self.last_step, "layers": self.last})
            out["report"] = write_run_report(trainer.run_dir, records)

    def _quant_check(self, trainer: Trainer) -> dict:
        model = getattr(trainer, "unwrapped_model", None) or trainer.model
        calib = calibration_batches(trainer.train_set, trainer.cfg, self.cfg.quant.calib_batches)
        evals = EvalBatches(trainer.val_set, trainer.cfg.data.eval_batch_size)
        return quantcheck(model, calib, evals, self.cfg.quant, device=trainer.device)

    # --------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        return {
            "probe_s": self.probe_s,
            "measurements": self.measurements,
            "last_step": self.last_step,
            "last": self.last or {},
        }

    def load_state_dict(self, state: dict) -> None:
        self.probe_s = float(state.get("probe_s", 0.0))
        self.measurements = int(state.get("measurements", 0))
        self.last_step = int(state.get("last_step", -1))
        self.last = state.get("last") or None
