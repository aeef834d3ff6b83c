"""Full (rank-agnostic, CPU) model and optimiser state dicts, via torch.distributed.checkpoint."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

__all__ = ["get_full_state", "set_full_state"]

_OPTS = StateDictOptions(full_state_dict=True, cpu_offload=True)


def get_full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    return (get_model_state_dict(model, options=_OPTS),
            get_optimizer_state_dict(model, optimizer, options=_OPTS))


def set_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_sd: dict | None,
                   optim_sd: dict | None) -> None:
    if model_sd is not None:
        set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True))
    if optimizer is not None and optim_sd is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))
