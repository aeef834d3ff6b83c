"""Predicted vs measured memory on CPU: the profiler's per-block costs, composed by the planner's cost
model, match what a real training step of the wrapped model allocates (within 15%)."""

from __future__ import annotations

import pytest
import torch

from lotus.parallel.cost_model import evaluate
from lotus.parallel.measure import measure_memory, measure_training_step, saved_activation_bytes
from lotus.parallel.plan_file import BlockChoice, uniform_choices
from lotus.parallel.planner import make_plan
from lotus.parallel.profiler import profile_model
from lotus.parallel.strategies import wrap_block

BATCH = 16
DEPTH = 3


def make_model():
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=4,
        num_classes=10,
        depth=DEPTH,
        embed_dim=64,
        num_heads=2,
    )


def apply_choices(model, choices):
    for i, c in enumerate(choices):
        if c.memory != "none":
            model.blocks[i] = wrap_block(model.blocks[i], ac=c.ac, offload=c.offload)
    return model


@pytest.fixture(scope="module")
def table():
    return profile_model(make_model(), BATCH, repeats=1)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


PLANS = {
    "none": uniform_choices(DEPTH, "none"),
    "selective": uniform_choices(DEPTH, "selective"),
    "full": uniform_choices(DEPTH, "full"),
    "mixed": [BlockChoice("full"), BlockChoice("none"), BlockChoice("selective")],
}


@pytest.mark.parametrize("name", list(PLANS))
def test_predicted_memory_matches_measured(table, batch, name):
    choices = PLANS[name]
    pred = evaluate(table, "none", choices)
    model = apply_choices(make_model(), choices)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    meas = measure_training_step(model, *batch, opt, repeats=1)
    # Activation memory held at the end of forward.
    assert pred.activation_bytes == pytest.approx(meas.activation_bytes, rel=0.15)
    # Parameters + optimizer state (measured from the optimizer's real state, not assumed).
    assert pred.static_bytes == pytest.approx(meas.static_bytes, rel=0.15)
    # Peak during forward + backward + optimizer step, above what is held before the step.
    assert pred.peak_bytes - pred.static_bytes == pytest.approx(meas.peak_bytes, rel=0.15)


def test_options_order_memory(table):
    """Checkpointing saves memory in the expected order, and the savings are substantial."""
    acts = {
        m: evaluate(table, "none", uniform_choices(DEPTH, m)).activation_bytes for m in ("none", "selective", "full")
    }
    assert acts["full"] < 0.25 * acts["none"]
    assert acts["full"] < acts["selective"] < 0.9 * acts["none"]


def test_saved_tensor_hooks_agree_with_allocator(batch):
    """Cross-check of the two CPU measurements on an un-checkpointed model: the storages autograd saves
    (saved-tensor hooks) are what the forward pass leaves allocated."""
    model = make_model()
    params = list(model.parameters())
    img, _ = batch
    _, hooked = saved_activation_bytes(lambda: model(img), exclude=params)
    out, alloc = measure_memory(lambda: model(img))
    assert hooked == pytest.approx(alloc.retained_bytes, rel=0.15)


def test_plan_under_budget_is_measured_under_budget(table, batch):
    """A budget below what no-checkpointing needs: the plan's real peak fits (with the 15% tolerance)."""
    none = evaluate(table, "none", uniform_choices(DEPTH, "none")).peak_bytes
    full = evaluate(table, "none", uniform_choices(DEPTH, "full")).peak_bytes
    budget = (none + full) / 2
    plan = make_plan(table, budget)
    assert plan.predicted_peak_bytes <= budget
    assert any(c.memory != "none" for c in plan.blocks)
    model = apply_choices(make_model(), plan.blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    meas = measure_training_step(model, *batch, opt, repeats=1)
    assert meas.static_bytes + meas.peak_bytes <= budget * 1.15
    assert meas.static_bytes + meas.peak_bytes < none
