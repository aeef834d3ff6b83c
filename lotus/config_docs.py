"""Config reference generated from the config dataclasses: the one place a key's meaning is written is the
attribute docstring right after its field (``lr: float = 1e-3`` then ``\"\"\"Peak learning rate.\"\"\"``).

- ``python -m lotus.config_docs > docs/configuration.md`` writes the reference (``--check FILE`` exits 1 when
  FILE differs from what would be written).
- ``lotus train --config C --print-config`` prints the resolved config as YAML with each key's meaning as a
  comment (:func:`commented_yaml`).

Docstrings are read with :mod:`ast` from the classes' source files, so nothing here imports torch or timm.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
from collections.abc import Iterator
from functools import cache
from typing import Any, get_type_hints

import yaml

from lotus.schema import describe_type

__all__ = ["field_docs", "walk", "commented_yaml", "render_markdown", "main"]


@cache
def _module_tree(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), filename=path)


def _class_node(cls: type) -> ast.ClassDef | None:
    path = inspect.getsourcefile(cls)
    if path is None:
        return None
    for node in _module_tree(path).body:
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            return node
    return None


@cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field name: its attribute docstring, whitespace collapsed}`` of ``cls`` and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's docstring wins over its base's
        if not dataclasses.is_dataclass(klass):
            continue
        node = _class_node(klass)
        if node is None:
            continue
        body = node.body
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _flow(value: Any) -> str:
    """A value as one line of YAML (``null``, ``[0.9, 0.999]``, ``'2:4'``, ``{}``)."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return text.removesuffix("...").strip()


def _range(meta: dict) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f"{'(' if meta.get('min_exclusive') else '['}{lo:g}, {hi:g}{')' if meta.get('max_exclusive') else ']'}"
    if lo is not None:
        return f"{'>' if meta.get('min_exclusive') else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if meta.get('max_exclusive') else '<='} {hi:g}"
    return ""


@dataclasses.dataclass
class Key:
    """One config key: its dotted path, type, default, range and meaning."""

    path: str
    type: str
    default: Any
    range: str
    doc: str
    section: bool  # a nested section (its keys follow)
    cls: type


def walk(cls: type | None = None, prefix: str = "") -> Iterator[Key]:
    """Every key of the config tree under ``cls`` (default :class:`lotus.config.Config`), depth first."""
    if cls is None:
        from lotus.config import Config

        cls = Config
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        path = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        section = dataclasses.is_dataclass(tp)
        yield Key(
            path,
            "section" if section else describe_type(tp),
            None if section else _default(f),
            _range(dict(f.metadata)),
            docs.get(f.name, ""),
            section,
            cls,
        )
        if section:
            yield from walk(tp, path)


def _doc_map() -> dict[str, str]:
    return {k.path: k.doc for k in walk()}


def commented_yaml(data: dict, docs: dict[str, str] | None = None) -> str:
    """``data`` (a config as plain dicts) as block YAML, each key followed by ``# its meaning``."""
    docs = _doc_map() if docs is None else docs
    sections = {k.path for k in walk() if k.section}
    lines: list[str] = []

    def emit(node: dict, prefix: str, indent: int) -> None:
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            doc = docs.get(path, "")
            comment = f"  # {doc}" if doc else ""
            name = _flow(key)
            if path in sections and isinstance(value, dict) and value:
                lines.append(f"{' ' * indent}{name}:{comment}")
                emit(value, path, indent + 2)
            else:
                lines.append(f"{' ' * indent}{name}: {_flow(value)}{comment}")

    emit(data, "", 0)
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


HEADER = """# Configuration reference

<!-- Generated by `python -m lotus.config_docs > docs/configuration.md` from the attribute docstrings of the
config dataclasses (lotus/config.py, lotus/features/*/config.py, lotus/parallel/config.py,
lotus/transform_config.py, pruning/config.py). Edit those docstrings, not this file;
tests/test_config_docs.py fails when this file is out of date. -->

A config is a YAML file with the sections below; every section and key is optional (a missing key takes its
default, the feature sections are off by default). `base: other.yaml` (a path relative to the file) starts
from another config and merges this file's sections over it key by key. `--set a.b=value` overrides any key
(the value is parsed as YAML). Every key is validated when the config is loaded: an unknown key, a wrong type
or an out-of-range value is one `error:` line naming the key (`train.epochs: expected int >= 1, got 'ten'`).
`lotus train --config C --print-config` prints the resolved config with each key's meaning (the text below)
as a comment.

Range: `[a, b]` includes both ends, `(a, b)` excludes them; a type `'x' | 'y'` lists the allowed values.
"""


def render_markdown() -> str:
    """The whole of docs/configuration.md."""
    keys = list(walk())
    out = [HEADER]
    top = [k for k in keys if "." not in k.path and not k.section]
    groups: list[tuple[str, str, list[Key]]] = [("top level", "", top)]
    for k in keys:
        if k.section:
            children = [c for c in keys if c.path.rpartition(".")[0] == k.path and not c.section]
            groups.append((k.path, k.doc, children))
    out.append(
        "\nSections: "
        + ", ".join(
            f"[`{name}`](#{name.replace('.', '')})" if name != "top level" else "[top level](#top-level)"
            for name, _, _ in groups
        )
        + ".\n"
    )
    for name, doc, children in groups:
        out.append(f"\n## {name if name == 'top level' else '`' + name + '`'}\n")
        if name == "top level":
            out.append("\nKeys outside any section.\n")
        elif doc:
            out.append(f"\n{doc}\n")
        subs = [
            k.path for k in keys if k.section and k.path.rpartition(".")[0] == (name if name != "top level" else "")
        ]
        if name != "top level" and subs:
            out.append("\nSubsections: " + ", ".join(f"[`{s}`](#{s.replace('.', '')})" for s in subs) + ".\n")
        if not children:
            continue
        out.append("\n| key | type | default | range | meaning |\n|---|---|---|---|---|\n")
        for c in children:
            default = "(required)" if c.default is dataclasses.MISSING else f"`{_cell(_flow(c.default))}`"
            rng = f"`{_cell(c.range)}`" if c.range else ""
            out.append(f"| `{c.path}` | `{_cell(c.type)}` | {default} | {rng} | {_cell(c.doc)} |\n")
    return "".join(out)


def missing_docs() -> list[str]:
    """Dotted paths of the keys that have no docstring."""
    return [k.path for k in walk() if not k.doc]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render_markdown()
    if argv[:1] == ["--check"] and len(argv) == 2:
        try:
            with open(argv[1], encoding="utf-8") as f:
                same = f.read() == text
        except OSError:
            same = False
        if not same:
            print(f"{argv[1]} is out of date: run python -m lotus.config_docs > {argv[1]}", file=sys.stderr)
            return 1
        return 0
    if argv:
        print("usage: python -m lotus.config_docs [--check FILE]   (prints docs/configuration.md)", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
