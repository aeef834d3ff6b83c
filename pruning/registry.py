"""One registry of pruning methods, keyed by config type: ``prune_`` dispatches through it.

Each config class is registered with :func:`register_method`, which records *what the method is* as data
(like timm's ``OptimInfo``) and *which function applies it* (like torchao's ``sparsify_`` handler registry,
``_QUANTIZE_CONFIG_HANDLER[type(config)]``)::

    @register_method("magnitude", handler="pruning.handlers:prune_magnitude", gradual=True)
    @dataclass
    class MagnitudeConfig: ...

``GradualPruner``, the training callback and ``lotus prune`` read these capabilities (``needs_calibration``,
``needs_grad``, ``gradual``, ``structured``) and the method names instead of keeping their own lists. This
module imports no torch: handlers may be given as ``"module:function"`` and are imported on first dispatch,
so reading the method names (a config schema, a CLI's ``--help``) stays cheap.

Adding a criterion: its config in :mod:`pruning.config` (with the decorator), its handler in its own module
(``handler(model, config, inputs: PruneInputs) -> report``), and a test.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

__all__ = [
    "PruneMethod",
    "PruneInputs",
    "Handler",
    "register_method",
    "method_for",
    "method_named",
    "methods",
    "method_names",
    "config_for",
    "needs_calibration",
    "needs_grad",
    "field_choices",
]

Handler = Callable[[Any, Any, "PruneInputs"], dict]
Capability = bool | Callable[[Any], bool]  # a constant, or a function of the config instance (e.g. its score)
C = TypeVar("C", bound=type)


@dataclass(frozen=True)
class PruneInputs:
    """What ``prune_`` passes to every handler besides the model and the config."""

    calib_loader: Iterable[Any] | None = None
    filter_fn: Callable[[Any, str], bool] | None = None
    loss_fn: Callable[[Any, Any], Any] | None = None
    reduce_sum: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class PruneMethod:
    """A registered pruning method: its config type, handler and capabilities.

    ``needs_calibration`` / ``needs_grad`` may be a function of the config (N:M needs data only when scored
    by Wanda). ``gradual``: its ``sparsity`` is a setting, so a ``GradualPruner`` can raise it step by step.
    ``structured``: it changes shapes (removes heads/neurons) instead of attaching masks. ``presets`` are
    extra names that fix some fields (``"2:4"`` is N:M with ``n=2, m=4``).
    """

    name: str
    config: type
    handler: Handler | str
    description: str = ""
    needs_calibration: Capability = False
    needs_grad: Capability = False
    gradual: bool = False
    structured: bool = False
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def resolve_handler(self) -> Handler:
        """The handler callable (a ``"module:function"`` path is imported now)."""
        if callable(self.handler):
            return self.handler
        module, _, attr = self.handler.partition(":")
        return getattr(importlib.import_module(module), attr)

    @property
    def names(self) -> tuple[str, ...]:
        """The method's name followed by its presets' names."""
        return (self.name, *self.presets)


_METHODS: dict[type, PruneMethod] = {}


def _registered() -> dict[type, PruneMethod]:
    """The registry, with the built-in methods (registered when :mod:`pruning.config` is imported) in it."""
    importlib.import_module(f"{__package__}.config")
    return _METHODS


def register_method(
    name: str,
    *,
    handler: Handler | str,
    description: str = "",
    needs_calibration: Capability = False,
    needs_grad: Capability = False,
    gradual: bool = False,
    structured: bool = False,
    presets: Mapping[str, Mapping[str, Any]] | None = None,
) -> Callable[[C], C]:
    """Class decorator: register a config dataclass as the method ``name`` (see :class:`PruneMethod`)."""

    def decorate(cls: C) -> C:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"register_method: {cls.__name__} is not a dataclass")
        info = PruneMethod(
            name, cls, handler, description, needs_calibration, needs_grad, gradual, structured, dict(presets or {})
        )
        taken = {n: m for m in _METHODS.values() if m.config is not cls for n in m.names}
        clash = [n for n in info.names if n in taken]
        if clash:
            raise ValueError(f"register_method: name {clash[0]!r} is taken by {taken[clash[0]].config.__name__}")
        _METHODS[cls] = info
        return cls

    return decorate


def methods() -> list[PruneMethod]:
    """Every registered method, in registration order."""
    return list(_registered().values())


def method_names(structured: bool | None = None) -> tuple[str, ...]:
    """All method names (presets included); ``structured=False`` only mask methods, ``True`` only thinning."""
    return tuple(n for m in _registered().values() if structured is None or m.structured == structured for n in m.names)


def method_for(config: Any) -> PruneMethod:
    """The registered method of a config instance (or class); ``ValueError`` for an unregistered type."""
    cls = config if isinstance(config, type) else type(config)
    info = _registered().get(cls)
    if info is None:
        known = ", ".join(m.config.__name__ for m in _METHODS.values())
        raise ValueError(f"config: expected one of {known} (or a registered config), got {cls.__name__}")
    return info


def method_named(name: str) -> PruneMethod:
    """The method registered under ``name`` or one of its presets."""
    for m in _registered().values():
        if name in m.names:
            return m
    raise ValueError(f"method: expected one of {', '.join(method_names())}, got {name!r}")


def config_for(name: str, **values: Any) -> Any:
    """Build the config of method ``name`` from ``values``: keys that are not fields of that config and
    ``None`` values are ignored (the config's defaults apply); a preset's fixed fields win."""
    info = method_named(name)
    fields = {f.name for f in dataclasses.fields(info.config) if f.init}
    kwargs = {k: v for k, v in values.items() if k in fields and v is not None}
    kwargs.update(info.presets.get(name, {}))
    return info.config(**kwargs)


def _capability(value: Capability, config: Any) -> bool:
    return bool(value(config) if callable(value) else value)


def needs_calibration(config: Any) -> bool:
    """True when pruning with ``config`` runs calibration batches (``calib_loader`` is required)."""
    return _capability(method_for(config).needs_calibration, config)


def needs_grad(config: Any) -> bool:
    """True when pruning with ``config`` backpropagates a loss (labelled batches, or a ``loss_fn``)."""
    return _capability(method_for(config).needs_grad, config)


def field_choices(config: type | str, name: str) -> tuple[Any, ...]:
    """The allowed values of a ``Literal`` field of a config (class or method name), e.g. its scopes."""
    cls = method_named(config).config if isinstance(config, str) else config
    hint = get_type_hints(cls).get(name)
    return get_args(hint) if get_origin(hint) is Literal else ()
