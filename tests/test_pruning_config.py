"""Config validation: one-line ValueErrors that start with the bare field name (callers prefix their key path)."""

from __future__ import annotations

import pytest

from pruning import MagnitudeConfig, SemiStructuredConfig, StructuredConfig, WandaConfig

BAD = [
    (MagnitudeConfig, {"sparsity": 1.0}, "sparsity"),
    (MagnitudeConfig, {"sparsity": "0.5"}, "sparsity"),
    (MagnitudeConfig, {"scope": "row"}, "scope"),
    (WandaConfig, {"sparsity": -0.1}, "sparsity"),
    (WandaConfig, {"scope": "global"}, "scope"),
    (WandaConfig, {"max_calib_batches": 0}, "max_calib_batches"),
    (WandaConfig, {"max_calib_batches": "8"}, "max_calib_batches"),
    (SemiStructuredConfig, {"n": 0}, "n"),
    (SemiStructuredConfig, {"m": 2.0}, "m"),
    (SemiStructuredConfig, {"n": 4, "m": 4}, "n"),
    (SemiStructuredConfig, {"score": "taylor"}, "score"),
    (SemiStructuredConfig, {"kernels": "always"}, "kernels"),
    (SemiStructuredConfig, {"backend": "triton"}, "backend"),
    (SemiStructuredConfig, {"probe_tokens": None}, "probe_tokens"),
    (StructuredConfig, {"heads": 1.5}, "heads"),
    (StructuredConfig, {"mlp": float("nan")}, "mlp"),
    (StructuredConfig, {"importance": "l1"}, "importance"),
    (StructuredConfig, {"scope": "block"}, "scope"),
    (StructuredConfig, {"round_to": 0}, "round_to"),
    (StructuredConfig, {"min_heads": True}, "min_heads"),
]


@pytest.mark.parametrize("cls, kwargs, field", BAD, ids=[f"{c.__name__}-{f}-{i}" for i, (c, _, f) in enumerate(BAD)])
def test_errors_start_with_the_bare_field_name(cls, kwargs, field):
    with pytest.raises(ValueError) as err:
        cls(**kwargs)
    msg = str(err.value)
    assert msg.startswith(f"{field}: ") and "\n" not in msg and cls.__name__ not in msg


def test_structured_fraction_message():
    with pytest.raises(ValueError) as err:
        StructuredConfig(heads=1.5)
    assert str(err.value) == "heads: expected a fraction in [0, 1), got 1.5 (that would remove every head)"
    assert StructuredConfig(heads=0.25, mlp=0).mlp == 0.0
