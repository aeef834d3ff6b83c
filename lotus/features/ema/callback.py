"""Model EMA during training (``ema:``), with timm's ``ModelEmaV3``.

The EMA copy follows the model through structured thinning (the same heads/neurons are removed, via
``pruning.structured.apply_kept``), is evaluated each evaluation epoch (``ema_val_acc``/``ema_val_loss`` in
metrics.jsonl) and saved as ``RUN_DIR/ema.safetensors``; its weights are part of ``state.pt``, so a resumed
run continues the same average.
"""

from __future__ import annotations

import os

import torch
from timm.utils import ModelEmaV3

from lotus.callbacks import Callback, Trainer
from lotus.data_meta import run_data_metadata
from lotus.errors import LotusError
from lotus.features.ema.config import EmaConfig
from lotus.weights import save_weights
from pruning.structured import apply_kept

__all__ = ["EmaCallback"]


class EmaCallback(Callback):
    """Keeps, evaluates and saves the EMA of ``trainer.unwrapped_model``."""

    def __init__(self, cfg: EmaConfig):
        self.cfg = cfg
        self.ema: ModelEmaV3 | None = None
        self._pending: dict | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self.ema = ModelEmaV3(trainer.unwrapped_model, decay=self.cfg.decay, use_warmup=self.cfg.warmup)
        if self._pending:
            try:
                self.ema.module.load_state_dict(self._pending)
            except RuntimeError as e:
                raise LotusError(
                    f"ema: the saved EMA weights do not fit the model ({str(e).splitlines()[0]})"
                ) from None

    def on_model_thinned(self, trainer: Trainer, report: dict) -> None:
        apply_kept(self.ema.module, report["kept"])

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        self.ema.update(trainer.unwrapped_model, step=step)

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        if not self.cfg.eval or "val_acc" not in metrics:
            return
        out = trainer.evaluate(self.ema.module)
        metrics.update(ema_val_loss=out["val_loss"], ema_val_acc=out["val_acc"])
        if trainer.write and trainer.dist.is_main:
            save_weights(
                self.ema.module,
                os.path.join(trainer.run_dir, "ema.safetensors"),
                {
                    "epoch": epoch + 1,
                    "step": trainer.step,
                    "val_acc": out["val_acc"],
                    "ema": True,
                    "data": run_data_metadata(trainer),
                },
                model_cfg=trainer.cfg.model,
            )

    def on_fit_end(self, trainer: Trainer, summary: dict) -> None:
        summary["ema"] = {"decay": self.cfg.decay, "warmup": self.cfg.warmup}

    def state_dict(self) -> dict:
        if self.ema is None:
            return dict(self._pending or {})
        return {k: v.detach().cpu().clone() for k, v in self.ema.module.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self._pending = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} or None
