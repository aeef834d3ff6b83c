"""Forward hooks that measure outlier metrics on a ViT's residual stream.

Sites: the input of every transformer block (``blocks.0`` is the embedding output after timm's ``norm_pre``)
and the output of the last block (``final``, before the final norm). Works on any model with a ``.blocks``
container (every timm ``VisionTransformer``, DeiT, EVA-style models, Lotus' OP-block ViTs); hooks are plain
``register_forward_pre_hook`` / ``register_forward_hook`` handles, removed when the probe closes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from lotus.features.outliers.metrics import OutlierStats

__all__ = ["FINAL", "find_blocks", "site_names", "ResidualStreamProbe", "measure"]

FINAL = "final"


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a (possibly DDP/compile-wrapped) ViT, in order."""
    seen = set()
    m = model
    while id(m) not in seen:
        seen.add(id(m))
        blocks = getattr(m, "blocks", None)
        if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0:
            return list(blocks)
        inner = getattr(m, "module", None) or getattr(m, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        m = inner
    raise ValueError(f"outliers: {type(model).__name__} has no non-empty .blocks (expected a timm ViT)")


def site_names(model: nn.Module) -> list[str]:
    """All measurable sites: ``blocks.0`` .. ``blocks.{L-1}`` (block inputs) and ``final``."""
    return [f"blocks.{i}" for i in range(len(find_blocks(model)))] + [FINAL]


def _first_tensor(obj) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
        return obj[0]
    return None


class ResidualStreamProbe:
    """Context manager: while open, every forward pass updates one :class:`OutlierStats` per site.

    >>> with ResidualStreamProbe(model) as probe:
    ...     model(images)
    >>> probe.compute()["blocks.0"]["kurtosis"]
    """

    def __init__(self, model: nn.Module, layers: Iterable[str] | None = None) -> None:
        blocks = find_blocks(model)
        available = [f"blocks.{i}" for i in range(len(blocks))] + [FINAL]
        wanted = list(layers) if layers else available
        unknown = [n for n in wanted if n not in available]
        if unknown:
            raise ValueError(
                f"outliers.layers: unknown site {unknown[0]!r} (this model has blocks.0..blocks.{len(blocks) - 1} "
                f"and {FINAL!r})"
            )
        self.sites = [n for n in available if n in wanted]  # model order
        self.stats = {n: OutlierStats() for n in self.sites}
        self._blocks = blocks
        self._handles: list = []

    def _pre_hook(self, name: str):
        def hook(_module, args, kwargs=None):
            x = _first_tensor(args)
            if x is None and kwargs:
                x = _first_tensor(kwargs.get("x"))
            if x is not None:
                self.stats[name].update(x)

        return hook

    def _post_hook(self, name: str):
        def hook(_module, _args, output):
            x = _first_tensor(output)
            if x is not None:
                self.stats[name].update(x)

        return hook

    def open(self) -> ResidualStreamProbe:
        if self._handles:
            return self
        for i, blk in enumerate(self._blocks):
            name = f"blocks.{i}"
            if name in self.stats:
                self._handles.append(blk.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
        if FINAL in self.stats:
            self._handles.append(self._blocks[-1].register_forward_hook(self._post_hook(FINAL)))
        return self

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self) -> None:
        self.stats = {n: OutlierStats() for n in self.sites}

    def __enter__(self) -> ResidualStreamProbe:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def compute(self) -> dict[str, dict[str, float]]:
        """``{site: {"kurtosis", "mmr", "rms", "max_abs"}}`` for every site that saw activations."""
        return {n: s.compute() for n, s in self.stats.items() if s.tokens > 0}


@torch.no_grad()
def measure(
    model: nn.Module,
    images: torch.Tensor,
    layers: Iterable[str] | None = None,
    chunk_size: int | None = None,
    forward=None,
) -> dict[str, dict[str, float]]:
    """Per-site metrics of ``model`` on ``images`` in eval mode (train mode restored afterwards)."""
    was_training = model.training
    model.eval()
    fwd = forward or (lambda m, x: m(x))
    try:
        with ResidualStreamProbe(model, layers) as probe:
            step = chunk_size or len(images)
            for start in range(0, len(images), step):
                fwd(model, images[start : start + step])
        return probe.compute()
    finally:
        model.train(was_training)
