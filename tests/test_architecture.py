"""The package layout contracts: no import cycle, small modules, one shape for every feature."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lotus", "pruning", "data_tickets")


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _module_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``name`` imports at module level (not inside functions or classes)."""
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"
    stack = list(ast.parse(path.read_text()).body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
        else:
            stack.extend(ast.iter_child_nodes(node))
    return {m for m in out if m in known and m != name}


def test_no_module_level_import_cycle():
    mods = {k: v for p in PACKAGES for k, v in _modules(p).items()}
    graph = {m: _module_level_imports(m, p, set(mods)) for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep] if dep in path else [m, dep]
            if not state.get(dep):
                found = visit(dep, path + [dep])
                if found:
                    return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if not state.get(m):
            cycle = visit(m, [m])
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_libraries_never_import_lotus():
    for package in ("pruning", "data_tickets"):
        for name, path in _modules(package).items():
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else ([node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                )
                assert not any(n == "lotus" or n.startswith("lotus.") for n in names), f"{name} imports lotus"


_IMPORT_EACH = """
import importlib, os, subprocess, sys, traceback
import matplotlib, numpy, safetensors, sklearn, timm, torch, tqdm, yaml  # third-party only: preloaded once
failed = []
for name in sys.argv[1:]:
    if not hasattr(os, "fork"):  # no fork: a fresh interpreter per module (slower, same check)
        if subprocess.run([sys.executable, "-c", "import " + name]).returncode:
            failed.append(name)
        continue
    pid = os.fork()
    if pid == 0:  # a child that has imported none of our packages yet
        try:
            importlib.import_module(name)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    if os.waitpid(pid, 0)[1]:
        failed.append(name)
print("FAILED", failed)
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module imported first, on its own (an import cycle that only some import orders survive fails)."""
    names = [m for p in PACKAGES for m in _modules(p) if m != "lotus.__main__"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "MPLBACKEND": "Agg"}
    r = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, *names],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=str(ROOT),
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_stay_small(package):
    big = {name: n for name, p in _modules(package).items() if (n := len(p.read_text().splitlines())) > 420}
    assert not big, f"modules over ~400 lines (split them by concern): {big}"


def test_every_feature_has_the_same_shape():
    from lotus.features.registry import FEATURES

    folders = {p.name for p in (ROOT / "lotus" / "features").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert {f.name for f in FEATURES} == folders
    for name in folders:
        for required in ("__init__.py", "config.py", "callback.py"):
            assert (ROOT / "lotus" / "features" / name / required).is_file(), f"lotus/features/{name}/{required}"
        cfg_imports = _module_level_imports(
            f"lotus.features.{name}.config", ROOT / "lotus" / "features" / name / "config.py", set(_modules("lotus"))
        )
        allowed = {"lotus.errors", "lotus.schema"} | {f"lotus.features.{n}.config" for n in folders}
        assert cfg_imports <= allowed, f"lotus/features/{name}/config.py imports {cfg_imports - allowed}"


def test_features_write_only_the_slots_they_declare(tiny_cfg_dict, tmp_path):
    """Every feature on at once: each callback overrides only the slot hooks its registry entry lists."""
    from lotus.callbacks import overrides
    from lotus.config import config_from_dict
    from lotus.features.registry import FEATURES, SLOT_HOOKS, build_callbacks
    from lotus.features.schedule.phases import Schedule

    d = tiny_cfg_dict
    d["train"]["epochs"] = 4
    d["tickets"] = {"dynamic": {"enabled": True}, "patches": {"enabled": True}}
    d["pruning"] = {"method": "magnitude", "at_epoch": 2, "structured": {"mlp": 0.25, "at_epoch": 1}}
    d["outliers"] = {"enabled": True}
    d["distill"] = {"enabled": True, "teacher": str(tmp_path / "teacher.safetensors")}  # built at fit start
    d["schedule"] = {"enabled": True, "warmup_epochs": 1, "anneal_epochs": 1, "reselect": {"enabled": True}}
    cfg = config_from_dict(d)
    cbs = build_callbacks(cfg, Schedule(cfg))
    owners = {type(cb).__name__: f for f in FEATURES for cb in f.build(cfg, Schedule(cfg))}
    assert len(cbs) == len(owners) == 6  # schedule (reselect), dynamic, pruning, distill, patches, outliers
    for cb in cbs:
        feature = owners[type(cb).__name__]
        for slot, hook in SLOT_HOOKS.items():
            assert overrides(cb, hook) == (slot in feature.writes), (feature.name, slot)


def test_features_use_the_typed_trainer_contract():
    """Hooks see the ``Trainer`` protocol, never ``Any``; features reach each other through
    ``trainer.features`` (what the registry publishes), not by scanning ``trainer.callbacks``."""
    import re

    offenders = []
    for folder in ("lotus/features", "lotus/parallel"):
        for path in sorted(Path(ROOT, folder).rglob("*.py")):
            text = path.read_text()
            for pattern in (r"trainer: Any\b", r"trainer\.callbacks\b", r"trainer\.(model|unwrapped_model) = "):
                offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert offenders == []


def test_the_trainer_satisfies_its_protocol(tiny_cfg):
    from lotus.callbacks import Trainer as Contract
    from lotus.training import Trainer

    cfg = tiny_cfg
    t = Trainer(cfg, write=False, quiet=True)
    t.fit()
    missing = [
        name
        for name in [*Contract.__annotations__, *vars(Contract)]
        if not name.startswith("_") and not hasattr(t, name)
    ]
    assert missing == []
    assert t.features == {}  # the tiny config turns no feature on
