"""Package version, recorded in every ticket file (falls back when not installed as a distribution)."""

from __future__ import annotations

from importlib import metadata

__all__ = ["__version__"]


def _version() -> str:
    for dist in ("lotus", "lotus-vit", "data-tickets"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "0.1.0"


__version__ = _version()
