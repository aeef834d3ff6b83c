"""Lotus: cheaper vision-transformer training on PyTorch + timm.

Public API::

    from lotus import load_config, Trainer, Callback, train, create_model, build_datasets
"""
from __future__ import annotations

__version__ = "0.1.0"

from lotus.callbacks import Callback  # noqa: E402
from lotus.config import Config, load_config  # noqa: E402
from lotus.data import build_datasets  # noqa: E402
from lotus.errors import ConfigError, LotusError  # noqa: E402
from lotus.evaluation import evaluate  # noqa: E402
from lotus.models import create_model  # noqa: E402
from lotus.training import Trainer, train  # noqa: E402

__all__ = ["__version__", "Config", "load_config", "build_datasets", "ConfigError", "LotusError",
           "create_model", "Callback", "Trainer", "train", "evaluate"]
