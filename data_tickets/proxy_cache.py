"""A disk cache of proxy trainings, so several scorers (and several runs) share one proxy per seed.

:func:`cached_proxy` wraps any :class:`data_tickets.proxy.Proxy`. The first call with a seed trains as usual
and stores the run: the model's state after every epoch (what ``on_epoch_end`` saw) and the returned model's
final state, in one ``safetensors`` file written atomically (temporary file, fsync, ``os.replace``) and read
without pickle. A later call with the same seed, by this process or another one, rebuilds the model with
``model_fn`` and *replays* the run instead of training: ``on_epoch_end(model, epoch)`` is called with each
stored epoch state (so ``forgetting``, which evaluates at every epoch end, gets the same counts), then the
final state is returned. Replaying is exact: the stored tensors are bit copies.

Entries are keyed by a fingerprint (:func:`proxy_fingerprint`) of the caller's ``key`` (which should hold the
data fingerprint, model config and proxy protocol) and the seed. An entry that cannot be read, or whose
recorded key or tensors do not fit, is retrained and overwritten, with a message.

Layout of ``<folder>/proxy-<fingerprint>.safetensors``: tensors ``epoch<e>/<name>`` (e = 1, 2, ...) and
``final/<name>`` (only when the returned state differs from the last epoch's); metadata ``format``,
``format_version``, ``fingerprint``, ``key`` (JSON), ``seed``, ``epochs`` (JSON list), ``final``
(``"last_epoch"`` or ``"stored"``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._atomic import write_atomic
from .proxy import EpochCallback, Proxy

__all__ = ["cached_proxy", "proxy_fingerprint", "FORMAT"]

FORMAT = "data-tickets-proxy"
FORMAT_VERSION = 1


def _canonical(key: Any) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"), default=repr)


def proxy_fingerprint(key: Any, seed: int) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of ``(format version, key, seed)``."""
    blob = _canonical({"format": FORMAT, "format_version": FORMAT_VERSION, "key": key, "seed": int(seed)})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _write_bytes(path: Path, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def _read(path: Path, key: str, seed: int) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]:
    """(epoch states in order, final state or None = last epoch's); ``ValueError`` naming what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        raw = path.read_bytes()
        tensors = load(raw)
        meta = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")]).get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})"
        ) from None
    if meta.get("format") != FORMAT or meta.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(
            f"stale (format {meta.get('format')!r} v{meta.get('format_version')}, "
            f"expected {FORMAT!r} v{FORMAT_VERSION})"
        )
    if meta.get("key") != key or meta.get("seed") != str(seed):
        raise ValueError("stale (recorded key or seed differs from this run's)")
    try:
        epochs = json.loads(meta["epochs"])
        final_kind = meta["final"]
    except (KeyError, json.JSONDecodeError):
        raise ValueError("stale (metadata lacks epochs/final)") from None
    states: list[dict[str, torch.Tensor]] = [{} for _ in epochs]
    final: dict[str, torch.Tensor] = {}
    pos = {f"epoch{e}": i for i, e in enumerate(epochs)}
    for name, t in tensors.items():
        head, _, param = name.partition("/")
        if head == "final":
            final[param] = t
        elif head in pos:
            states[pos[head]][param] = t
        else:
            raise ValueError(f"stale (unexpected tensor {name!r})")
    if final_kind == "last_epoch":
        if not states:
            raise ValueError("stale (final state refers to a missing last epoch)")
        return states, None
    if final_kind != "stored" or not final:
        raise ValueError(f"stale (final state {final_kind!r} missing)")
    return states, final


def cached_proxy(
    proxy: Proxy,
    model_fn: Callable[[], nn.Module],
    folder: str | os.PathLike,
    key: Any,
    *,
    device: str | torch.device | None = None,
    log: Callable[[str], None] | None = print,
) -> Proxy:
    """Wrap ``proxy`` so that each seed trains once and is replayed from ``folder`` afterwards.

    ``model_fn()`` builds the (untrained) architecture the proxy trains, to load stored states into; ``key``
    is any JSON-able description of what determines the training (data fingerprint, model and proxy
    settings; the seed is added per call). ``device``: where replayed models are put. ``log`` receives one
    line per cache event ("reusing proxy <fp>", "training proxy <fp>", "... recomputing"). The wrapper keeps
    ``proxy.config`` and counts ``stats = {"trained": n, "reused": m}``.
    """
    folder = Path(folder)
    key_json = _canonical(key)
    say = log or (lambda msg: None)
    stats = {"trained": 0, "reused": 0}

    def replay(path: Path, fp: str, seed: int, on_epoch_end: EpochCallback | None) -> nn.Module | None:
        try:
            states, final = _read(path, key_json, seed)
            model = model_fn()
            if device is not None:
                model.to(device)
            for i, st in enumerate(states if on_epoch_end is not None else []):
                model.load_state_dict(st, strict=True)
                on_epoch_end(model, i + 1)
            model.load_state_dict(final if final is not None else states[-1], strict=True)
        except ValueError as e:
            say(f"proxy cache {path}: {e}; recomputing")
            return None
        except RuntimeError as e:  # load_state_dict: missing/unexpected keys or shapes
            say(f"proxy cache {path}: stale (weights do not fit the model: {str(e).splitlines()[0]}); recomputing")
            return None
        stats["reused"] += 1
        say(f"reusing proxy {fp} (seed {seed}, {len(states)} epochs) from {path}")
        return model.eval()

    def wrapped(seed: int, on_epoch_end: EpochCallback | None = None) -> nn.Module:
        from safetensors.torch import save

        fp = proxy_fingerprint(key, seed)
        path = folder / f"proxy-{fp}.safetensors"
        if path.exists():
            model = replay(path, fp, seed, on_epoch_end)
            if model is not None:
                return model
        say(f"training proxy {fp} (seed {seed}); cached in {path}")
        states: list[dict[str, torch.Tensor]] = []

        def record(model: nn.Module, epoch: int) -> None:
            states.append(_state(model))
            if on_epoch_end is not None:
                on_epoch_end(model, epoch)

        model = proxy(seed, record)
        stats["trained"] += 1
        final = _state(model)
        tensors = {f"epoch{e + 1}/{k}": v for e, st in enumerate(states) for k, v in st.items()}
        last = bool(states) and _same(states[-1], final)
        if not last:
            tensors.update({f"final/{k}": v for k, v in final.items()})
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "fingerprint": fp,
            "key": key_json,
            "seed": str(seed),
            "epochs": json.dumps(list(range(1, len(states) + 1))),
            "final": "last_epoch" if last else "stored",
        }
        _write_bytes(path, save(tensors, metadata=meta))
        return model

    wrapped.config = dict(getattr(proxy, "config", {}) or {})
    wrapped.stats = stats
    return wrapped
