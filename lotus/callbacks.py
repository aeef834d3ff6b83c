"""The hook protocol between the training loop and the features that plug into it.

A feature is one or more :class:`Callback` objects. The loop calls the hooks below in the order of
:data:`lotus.features.registry.FEATURES` (data selection first, then pruning, then monitoring), then the
user's own callbacks in the order given. What each feature may change on the trainer is declared once,
in that registry (``Feature.writes``); the hooks that hand a value back to the loop (``epoch_subset``,
``epoch_sampler``, ``wrap_forward``, ``per_sample_loss``) are how that happens, not attribute writes.

This module imports nothing at run time (torch only for annotations), so every feature can import it at the
top and the CLI can define a callback without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
    from torch import nn

    from lotus.config import Config
    from lotus.data import DataBundle


class Trainer(Protocol):
    """What a feature may read on the training loop (``lotus.training.Trainer`` satisfies it; that module
    imports the features, so they name this protocol instead). Features change the loop only through their
    hooks' return values and the methods below, never by assigning attributes."""

    cfg: Config
    data: DataBundle
    train_set: Any
    val_set: Any
    labels_train: np.ndarray
    device: torch.device
    dist: Any  # lotus.training.runtime.DistInfo: rank, world_size, is_main
    autocast: Callable[[], Any]
    model: nn.Module  # as trained (possibly wrapped for data parallelism)
    unwrapped_model: nn.Module  # the bare timm model
    optimizer: torch.optim.Optimizer
    forward: Forward
    plan: Any  # lotus.features.schedule.phases.Plan: this epoch's schedule phase
    subset: np.ndarray | None  # the epoch's train indices, None = all
    sampler: Any  # the epoch sampler a feature installed, if any
    epoch: int
    step: int
    steps_per_epoch: int
    restored: bool  # resumed from a checkpoint: start-of-run events are not logged again
    write: bool
    run_dir: str | None
    features: Mapping[str, Callback]  # what the feature registry published: config section -> callback

    def log(self, event: str, **fields: Any) -> None:
        """Record an event in metrics.jsonl and the run summary."""

    def evaluate(self, model: nn.Module | None = None) -> dict:
        """Validation metrics of ``model`` (default: the trained model)."""

    def count_as_training(self, wall_s: float, cpu_s: float) -> None:
        """Add work done outside the epoch's training segment (probes) to the run's training time."""

    def rebuild_optimizer(self) -> None:
        """Rebuild the optimiser (and its schedule) for the model's current parameters."""

    def wrap_model(self, plain: nn.Module, **kw: Any) -> nn.Module:
        """Wrap a bare model for this run's parallelism."""

    def replace_model(self, plain: nn.Module, wrapped: nn.Module) -> None:
        """Train ``wrapped`` (built from the bare ``plain``) from now on, e.g. after thinning changed shapes."""

    def model_thinned(self, report: dict) -> None:
        """Tell every callback (``on_model_thinned``) that the model's shapes changed."""


__all__ = ["Callback", "Forward", "Trainer", "default_forward", "HOOKS", "overrides"]

Forward = Callable[["nn.Module", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]  # noqa: F821
"""``forward(model, images, index) -> logits``: the training forward (patch tickets replace it)."""


def default_forward(model: nn.Module, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The plain training forward: ``model(images)``."""
    return model(images)


class Callback:
    """Hook points of the training loop. Override what you need; every method is optional.

    ``state_dict`` must hold only tensors, numbers, strings, lists and dicts (it is saved with the training
    state and loaded with ``weights_only=True``).
    """

    # ------------------------------------------------------------------ run
    def on_load_checkpoint(self, trainer: Trainer, state: dict) -> None:
        """On resume, before the model weights are loaded: rebuild shapes/parametrizations here."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """After model, optimiser and (on resume) the restored state are ready."""

    def wrap_forward(self, trainer: Trainer, forward: Forward) -> Forward:
        """Called once after ``on_fit_start``: return a replacement training forward (or ``forward``)."""
        return forward

    def on_fit_end(self, trainer: Trainer, summary: dict) -> None:
        """``summary`` is written to summary.json after all callbacks ran."""

    # ---------------------------------------------------------------- epoch
    def epoch_subset(self, trainer: Trainer, epoch: int) -> np.ndarray | None:
        """The train indices of this epoch, or ``None`` for no opinion (all data unless another feature says)."""
        return None

    def epoch_sampler(self, trainer: Trainer, epoch: int, subset: np.ndarray | None) -> Iterable[int] | None:
        """An iterable of train indices for this epoch drawn from ``subset`` (``None``: all data), or ``None``
        to keep the loop's seeded shuffle."""
        return None

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """After this epoch's subset and sampler are set (``trainer.subset``, ``trainer.sampler``)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        """``metrics`` is written to metrics.jsonl after all callbacks ran: add keys to log them."""

    # ----------------------------------------------------------------- step
    def transform_batch(
        self, trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Change a training batch after augmentation, before the forward."""
        return images, labels, index

    def per_sample_loss(self, trainer: Trainer, loss: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Re-weight the per-sample loss vector (e.g. InfoBatch); sees the loss before averaging."""
        return loss

    def on_after_backward(self, trainer: Trainer) -> None:
        """Gradients are available (e.g. mask them)."""

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        """After ``optimizer.step()`` (e.g. re-apply masks, prune on a schedule)."""

    def on_model_thinned(self, trainer: Trainer, report: dict) -> None:
        """After structured thinning (``report``: ``pruning.prune_structured``'s): follow the new shapes."""

    # --------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


HOOKS: tuple[str, ...] = tuple(name for name in vars(Callback) if not name.startswith("_"))
"""Every hook name (for checks such as "which slots does this callback write")."""


def overrides(cb: Any, hook: str) -> bool:
    """Whether ``cb`` implements ``hook`` itself (not the no-op of :class:`Callback`)."""
    return getattr(type(cb), hook, None) is not getattr(Callback, hook)
