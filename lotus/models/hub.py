"""Pretrained weights without waiting on a network that is not there.

timm downloads through ``huggingface_hub``, which retries for a minute or more when the hub is unreachable
and reads ``HF_HUB_OFFLINE`` only when it is first imported. Before asking timm for pretrained weights we
check (``HF_HUB_OFFLINE`` set, or no TCP connection to the hub within 2 s): offline, weights already in the
local hub cache are loaded from there (timm's ``pretrained_cfg_overlay={"file": ...}``), and otherwise the
run stops at once with one line that says what to pass instead.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

import timm

from lotus.errors import LotusError

__all__ = ["hub_reachable", "offline_pretrained_overlay"]

_HOST = ("huggingface.co", 443)
_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def hub_reachable(timeout: float = 2.0) -> bool:
    """False when ``HF_HUB_OFFLINE`` is set or the hub cannot be reached within ``timeout`` seconds
    (name lookup included: it runs in a thread that is abandoned if it hangs)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection(_HOST, timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def offline_pretrained_overlay(name: str) -> dict[str, Any]:
    """``pretrained_cfg_overlay`` that makes timm load ``name``'s weights from the local hub cache, or a
    one-line error naming ``model.pretrained`` when they are not cached."""
    pcfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(pcfg, "hf_hub_id", None) if pcfg is not None else None
    if repo:
        from huggingface_hub import try_to_load_from_cache  # a timm dependency; only needed offline

        for filename in _FILES:
            path = try_to_load_from_cache(repo, filename)
            if isinstance(path, str) and os.path.isfile(path):
                return {"file": path}
    raise LotusError(
        f"model.pretrained: cannot download pretrained weights for {name} (no network, and they "
        "are not in the local hub cache); pass model.checkpoint (a local .safetensors or "
        "state-dict file) instead"
    )
