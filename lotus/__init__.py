"""Lotus: cheaper vision-transformer training on PyTorch + timm.

Public API::

    from lotus import load_config, Trainer, Callback, train, create_model, build_datasets
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
from typing import Any

# name -> module that defines it, imported on first use (module __getattr__): ``import lotus.cli`` or
# ``lotus.config`` must not import torch and timm (the CLI answers --help and config errors at once)
_WHERE = {
    "Callback": "callbacks",
    "Config": "config",
    "load_config": "config",
    "build_datasets": "data",
    "ConfigError": "errors",
    "LotusError": "errors",
    "evaluate": "evaluation",
    "create_model": "models",
    "Trainer": "training",
    "train": "training",
}

__all__ = [
    "__version__",
    "Config",
    "load_config",
    "build_datasets",
    "ConfigError",
    "LotusError",
    "create_model",
    "Callback",
    "Trainer",
    "train",
    "evaluate",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"lotus.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'lotus' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
