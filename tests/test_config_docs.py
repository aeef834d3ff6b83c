"""docs/configuration.md is generated from the config dataclasses' attribute docstrings; every key has one, and
``lotus train --print-config`` shows the same text."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys

import yaml

from lotus import config_docs
from lotus.config import config_to_dict, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "configuration.md")


def test_configuration_md_is_up_to_date():
    with open(DOC, encoding="utf-8") as f:
        on_disk = f.read()
    assert on_disk == config_docs.render_markdown(), (
        "docs/configuration.md is out of date: run python -m lotus.config_docs > docs/configuration.md"
    )


def test_every_config_key_has_a_docstring():
    assert config_docs.missing_docs() == []


def test_every_key_is_in_the_reference():
    keys = list(config_docs.walk())
    assert len(keys) > 200
    text = config_docs.render_markdown()
    for k in keys:
        assert (f"| `{k.path}` |" in text) if not k.section else (f"## `{k.path}`" in text), k.path


def test_walk_covers_every_init_field():
    from lotus.config import Config

    top = [k.path for k in config_docs.walk() if "." not in k.path]
    assert top == [f.name for f in dataclasses.fields(Config) if f.init]


def test_check_flag(tmp_path):
    stale = tmp_path / "c.md"
    stale.write_text("old\n")
    assert config_docs.main(["--check", str(stale)]) == 1
    stale.write_text(config_docs.render_markdown())
    assert config_docs.main(["--check", str(stale)]) == 0


def test_print_config_shows_each_meaning_and_parses_back(capsys):
    from lotus.commands import train

    p = argparse.ArgumentParser()
    train.add_arguments(p)
    cfg_path = os.path.join(ROOT, "configs", "digits.yaml")
    assert train.run(p.parse_args(["--config", cfg_path, "--print-config", "--set", "optim.lr=0.002"])) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == config_to_dict(load_config(cfg_path, ["optim.lr=0.002"]))
    docs = {k.path: k.doc for k in config_docs.walk()}
    assert f"  lr: 0.002  # {docs['optim.lr']}\n" in out
    assert f"optim:  # {docs['optim']}\n" in out
    assert f"  auto:  # {docs['schedule.auto']}\n" in out


def test_commented_yaml_round_trips_odd_values():
    data = config_to_dict(
        load_config(
            os.path.join(ROOT, "configs", "digits.yaml"),
            ['pruning.method="2:4"', "model.kwargs={dynamic_img_size: true}"],
        )
    )
    data["optim"]["extra"] = {"foo": "# not a comment", "bar": "a: b", "baz": [1, None, "yes"]}
    data["data"]["root"] = "/tmp/with space/x#y"
    assert yaml.safe_load(config_docs.commented_yaml(data)) == data


def test_generator_imports_neither_torch_nor_timm():
    code = (
        "import sys; from lotus import config_docs; config_docs.render_markdown(); "
        "print('torch' in sys.modules, 'timm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
