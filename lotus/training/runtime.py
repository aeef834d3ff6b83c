"""Where and how a run computes: device, threads, mixed precision, seeding, ``torch.compile``."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lotus.errors import LotusError
from lotus.parallel.runtime import DistInfo

__all__ = ["Runtime", "setup_runtime", "maybe_compile"]


@dataclass
class Runtime:
    device: torch.device
    autocast: Callable[[], Any]  # a context manager factory for the forward passes
    fp16: bool  # fp16 autocast: the step scales the loss (GradScaler)


def setup_runtime(t: Any, dist: DistInfo) -> Runtime:
    """Apply ``train.threads``/``device``/``amp``/``seed``/``deterministic`` (the ``train:`` section)."""
    if isinstance(t.threads, int):
        torch.set_num_threads(t.threads)
    if t.device == "cuda" and not torch.cuda.is_available():
        raise LotusError("train.device: cuda requested but no CUDA device is available")
    if dist.world_size > 1:  # torchrun chose this rank's device
        device = dist.device
    else:
        device = torch.device("cuda" if t.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if t.amp == "fp16" and device.type != "cuda":
        raise LotusError(f"train.amp: fp16 needs a CUDA device (this run is on {device.type}); use bf16 or off")
    bf16 = t.amp == "bf16" or (t.amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    dtype = torch.float16 if t.amp == "fp16" else torch.bfloat16 if bf16 else None
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    torch.manual_seed(t.seed)  # same init on every rank
    np.random.seed(t.seed % 2**32)
    random.seed(t.seed)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return Runtime(device=device, autocast=autocast, fp16=dtype is torch.float16)


def maybe_compile(model: nn.Module, t: Any, device: torch.device) -> nn.Module:
    """``torch.compile(model)`` when ``train.compile`` (inductor; on CPU it needs a C++ compiler)."""
    if not t.compile:
        return model
    if device.type == "cpu" and not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")):
        raise LotusError(
            "train.compile: torch.compile on CPU needs a C++ compiler (g++ or c++ on PATH, or CXX); "
            "install one or set train.compile: false"
        )
    return torch.compile(model)
