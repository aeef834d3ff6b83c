"""Run folders' configs saved by older Lotus versions, read in today's keys (``lotus bench`` reuses them).

User configs and ``--set`` never go through here: an old key there is a one-line error naming the new one
(:func:`lotus.config.config_from_dict`).
"""

from __future__ import annotations

import os

from lotus.config import Config, _read_yaml, config_from_dict

__all__ = ["upgrade_saved", "load_saved_config"]


def upgrade_saved(data: dict) -> dict:
    """A run folder's saved config from before the ``lotus:`` -> ``schedule:`` rename, in today's keys (a pure
    rename: ``lotus.schedule`` is ``schedule.mode``), so that ``lotus bench`` can still reuse it; a config
    without ``lotus:`` is returned as it is. User configs and ``--set`` keep the one-line error instead."""
    if not isinstance(data, dict) or not isinstance(data.get("lotus"), dict) or "schedule" in data:
        return data
    out = {k: v for k, v in data.items() if k != "lotus"}
    section = dict(data["lotus"])
    if "schedule" in section:
        section["mode"] = section.pop("schedule")
    out["schedule"] = section
    return out


def load_saved_config(path: str) -> Config:
    """A run folder's ``config.yaml``, read through :func:`upgrade_saved` (``lotus bench`` reuse)."""
    data = _read_yaml(path)
    data.setdefault("name", os.path.basename(os.path.dirname(os.path.abspath(path))))
    return config_from_dict(upgrade_saved(data))
