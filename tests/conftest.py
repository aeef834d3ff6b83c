"""Shared fixtures: tiny configs that train in a second or two on 2 CPU cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
# One thread per test process: tiny models gain nothing from more, and a shared machine stays fast.
torch.set_num_threads(1)

TINY = {
    "model": {"name": "lotus_vit_micro", "img_size": 16, "patch_size": 4},
    "data": {"name": "digits", "batch_size": 32, "eval_batch_size": 512},
    "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
    "train": {"epochs": 2, "warmup_epochs": 0.2, "seed": 0, "label_smoothing": 0.0, "threads": 1},
}


@pytest.fixture
def tiny_cfg_dict():
    import copy

    return copy.deepcopy(TINY)


@pytest.fixture
def tiny_cfg(tiny_cfg_dict):
    from lotus.config import config_from_dict

    return config_from_dict(tiny_cfg_dict)


@pytest.fixture
def tiny_yaml(tmp_path, tiny_cfg_dict):
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg_dict))
    return path


@pytest.fixture
def one_thread():
    """Pin torch to one thread for the test and restore the previous count after (CLI runs may change it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SLOW_LIST = Path(__file__).with_name("slow_tests.txt")


def slow_tests() -> set[str]:
    """``file.py::test_name`` entries (or whole ``file.py``) of tests/slow_tests.txt, comments dropped."""
    return {line.split("#", 1)[0].strip() for line in SLOW_LIST.read_text().splitlines()} - {""}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests listed in tests/slow_tests.txt (measured over ~3 s on 2 cores) ``slow``, so that
    ``pytest -m "not slow"`` is the fast unit run; every parametrized case of a listed test is slow."""
    slow = slow_tests()
    for item in items:
        name = getattr(item, "originalname", item.name)
        if item.path.name in slow or f"{item.path.name}::{name}" in slow:
            item.add_marker(pytest.mark.slow)
