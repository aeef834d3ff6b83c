"""The train state: the loop's counters and every random generator, saved and restored as plain data."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = ["TrainState", "capture_rng", "restore_rng"]


@dataclass
class TrainState:
    """Where the run is: counters that a resumed run continues from (``wall`` counts kept work only)."""

    epoch: int = 0
    step: int = 0
    samples_seen: int = 0
    train_flops: float = 0.0
    wall: float = 0.0
    cpu: float = 0.0  # process CPU seconds of the same kept work (robust to other jobs on the machine)
    best_acc: float = -1.0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, default in asdict(self).items():  # a key newer than the saved state keeps its default
            setattr(self, key, type(default)(state.get(key, default)))


def capture_rng(augment: torch.Generator) -> dict:
    """The torch (CPU, CUDA), numpy, Python and augmentation generators, as tensors and plain containers."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rng_numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "rng_python": [version, list(internal), gauss],
        "rng_augment": augment.get_state(),
    }


def restore_rng(state: dict, augment: torch.Generator) -> None:
    """Undo :func:`capture_rng`: every generator continues where the saved run left it."""
    torch.set_rng_state(state["rng_torch"])
    if state.get("rng_cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    s = state["rng_numpy"]
    np.random.set_state(("MT19937", s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))
    p = state["rng_python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    augment.set_state(state["rng_augment"])
