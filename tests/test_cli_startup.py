"""The CLI answers --help and config errors without importing torch or timm (issue #33, item 4)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# runs in a fresh interpreter: this test process has torch loaded already
_PROBE = textwrap.dedent("""
    import contextlib, io, os, sys, tempfile

    import lotus.cli, lotus.config
    from lotus.errors import ConfigError

    for name in [None, *lotus.cli.COMMANDS]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = lotus.cli.main(["--help"] if name is None else [name, "--help"])
        assert code == 0 and "usage: lotus" in out.getvalue(), (name, code, out.getvalue()[:200])
        assert "torch" not in sys.modules, f"lotus {name or ''} --help imported torch"

    cfg = lotus.config.load_config("configs/digits.yaml", ["train.epochs=2"])
    assert cfg.train.epochs == 2 and lotus.config.config_to_dict(cfg)["model"]["name"]

    tmp = tempfile.mkdtemp()
    bad = {"syntax": ("model: [\\n", "not valid YAML"),
           "unknown": ("train:\\n  epoch: 3\\n", "train.epoch"),
           "type": ("train:\\n  epochs: ten\\n", "train.epochs"),
           "range": ("optim:\\n  lr: -1\\n", "optim.lr"),
           "base": ("base: missing.yaml\\n", "missing.yaml")}
    for kind, (text, needle) in bad.items():
        path = os.path.join(tmp, kind + ".yaml")
        with open(path, "w") as f:
            f.write(text)
        try:
            lotus.config.load_config(path)
        except ConfigError as e:
            assert needle in str(e), (kind, str(e))
        else:
            raise AssertionError(f"{kind}: no ConfigError")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = lotus.cli.main(["train", "--config", path])
        assert code == 2 and err.getvalue().startswith("error: ") and needle in err.getvalue(), (kind, err.getvalue())
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert lotus.cli.main(["train", "--config", os.path.join(tmp, "nope.yaml")]) == 2
    assert "config file not found" in err.getvalue(), err.getvalue()

    heavy = sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules)
    assert not heavy, f"imported {heavy}"
    print("ok")
""")


def test_cli_help_and_config_errors_import_neither_torch_nor_timm():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]


def test_lotus_package_attributes_still_resolve():
    """``lotus.Trainer`` and friends are loaded on first use (module ``__getattr__``), not at import."""
    import lotus

    for name in lotus.__all__:
        assert getattr(lotus, name) is not None, name
