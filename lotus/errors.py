"""User-facing errors: the CLI prints them on one line and exits with code 2."""
from __future__ import annotations


class LotusError(Exception):
    """A problem with the user's input (config, files, data); never a bug in Lotus."""


class ConfigError(LotusError):
    """A config value that is missing, unknown, of the wrong type or out of range."""
