"""The method registry (dispatch, capabilities, a method added from outside) and the Taylor criterion added
through it: hand-computed scores, requested sparsity per scope, gradual use, `lotus prune --method taylor` and
the training config's ``method: taylor``."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from pruning import (
    GradualPruner,
    GradualSchedule,
    MagnitudeConfig,
    SemiStructuredConfig,
    StructuredConfig,
    TaylorConfig,
    WandaConfig,
    make_permanent,
    prune_,
    registry,
)
from pruning.masks import get_mask
from pruning.taylor import taylor_scores

LINEAR = lambda m, f: isinstance(m, nn.Linear)  # noqa: E731


def _batches(n: int = 2, bs: int = 5, d: int = 4, classes: int = 3) -> list:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(bs, d, generator=g), torch.randint(0, classes, (bs,), generator=g)) for _ in range(n)]


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=1, num_classes=4
    ).eval()


def _vit_batches(n: int = 2) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(n)]


# ----------------------------------------------------------------------------------------------- the criterion
def test_taylor_scores_match_a_hand_computation_on_a_linear():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin)
    batches = _batches()
    scores = taylor_scores(model, {"0": lin}, batches)["0"]
    w, b = lin.weight.detach(), lin.bias.detach()
    expected = torch.zeros_like(w)
    for x, y in batches:  # cross-entropy (mean over the batch): dL/dW = (softmax(xW^T + b) - onehot(y))^T x / B
        delta = torch.softmax(x @ w.T + b, dim=1) - F.one_hot(y, 3).float()
        expected += (w * (delta.T @ x) / x.shape[0]).abs()
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-7)
    assert not lin.weight.requires_grad or lin.weight.grad is None  # no gradient left behind
    # a loss_fn replaces cross-entropy (and makes unlabelled batches usable)
    xs = [x for x, _ in batches]
    sq = taylor_scores(model, {"0": lin}, xs, loss_fn=lambda out, _y: out.pow(2).sum())["0"]
    hand = sum((w * ((2 * (x @ w.T + b)).T @ x)).abs() for x in xs)
    torch.testing.assert_close(sq, hand, rtol=1e-5, atol=1e-6)


def test_taylor_mask_drops_the_lowest_scores_at_the_requested_sparsity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    batches = _batches(d=8)
    scores = taylor_scores(model, {"0": model[0], "2": model[2]}, batches)
    rep = prune_(model, TaylorConfig(sparsity=0.5), calib_loader=batches, filter_fn=LINEAR)
    assert rep["method"] == "taylor" and rep["config"]["scope"] == "layer"
    for fqn in ("0", "2"):
        mask, s = get_mask(model.get_submodule(fqn)), scores[fqn]
        assert rep["layers"][fqn]["sparsity"] == pytest.approx(0.5)
        assert s[~mask].max() <= s[mask].min()  # exactly the lowest half is gone
        assert (model.get_submodule(fqn).weight[~mask] == 0).all()


@pytest.mark.parametrize("scope", ["layer", "row", "global"])
def test_taylor_reaches_the_sparsity_in_every_scope_on_a_vit(scope):
    model = _vit()
    rep = prune_(model, TaylorConfig(sparsity=0.6, scope=scope, max_calib_batches=1), calib_loader=_vit_batches())
    assert rep["total"]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    masked = {f: get_mask(model.get_submodule(f)) for f, v in rep["layers"].items() if v.get("masked")}
    assert "head" not in masked and len(masked) == 4  # qkv, proj, fc1, fc2; the classifier stays dense
    if scope == "row":
        for mask in masked.values():
            assert ((~mask).sum(1) == round(0.6 * mask.shape[1])).all()  # every output row pruned alike


def test_taylor_errors_name_the_missing_input():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="^calib_loader: "):
        prune_(model, TaylorConfig(), filter_fn=LINEAR)
    with pytest.raises(ValueError, match="labelled"):
        prune_(model, TaylorConfig(), calib_loader=[torch.randn(2, 4)], filter_fn=LINEAR)
    with pytest.raises(ValueError, match="^scope: "):
        TaylorConfig(scope="block")
    with pytest.raises(ValueError, match="^sparsity: "):
        TaylorConfig(sparsity=1.0)


def test_gradual_taylor_keeps_pruned_weights_pruned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3))
    calls = []

    def factory():
        calls.append(1)
        return _batches(d=8)

    pruner = GradualPruner(
        model, GradualSchedule(0.75, 0, 4, 1), TaylorConfig(), filter_fn=LINEAR, calib_loader=factory
    )
    assert pruner.needs_calibration
    before = None
    for t in range(1, 5):
        pruner.step(t)
        mask = get_mask(model[0])
        if before is not None:
            assert not (mask & ~before).any()  # a pruned weight (score 0) never comes back
        before = mask.clone()
    assert pruner.current == pytest.approx(0.75) and len(calls) == len(pruner.history) == 4
    assert (~get_mask(model[0])).float().mean() == pytest.approx(0.75)
    # masks folded into the weights and re-applied at the same sparsity (lotus prune's recovery): the same zeros
    final = get_mask(model[0]).clone()
    make_permanent(model)
    prune_(model, TaylorConfig(0.75), calib_loader=_batches(d=8), filter_fn=LINEAR)
    assert torch.equal(get_mask(model[0]), final)


# ----------------------------------------------------------------------------------------------- the registry
def test_registry_capabilities_and_names():
    info = registry.method_for(TaylorConfig())
    assert (info.name, info.needs_grad, info.gradual, info.structured) == ("taylor", True, True, False)
    assert registry.needs_calibration(TaylorConfig()) and registry.needs_grad(TaylorConfig())
    assert not registry.needs_calibration(MagnitudeConfig()) and registry.needs_calibration(WandaConfig())
    assert registry.needs_calibration(SemiStructuredConfig(score="wanda"))
    assert not registry.needs_calibration(SemiStructuredConfig())
    assert registry.needs_grad(StructuredConfig(heads=0.5, importance="taylor"))
    assert not registry.needs_grad(StructuredConfig(heads=0.5, importance="activation"))
    assert registry.method_names() == ("magnitude", "wanda", "nm", "2:4", "structured", "taylor")
    assert "structured" not in registry.method_names(structured=False)
    assert registry.config_for("2:4", n=3, m=8, sparsity=0.9, scope=None) == SemiStructuredConfig(n=2, m=4)
    assert registry.config_for("wanda", sparsity=0.3, scope=None) == WandaConfig(sparsity=0.3)
    assert registry.field_choices("taylor", "scope") == ("layer", "row", "global")
    with pytest.raises(ValueError, match="^method: expected one of"):
        registry.method_named("obd")

    @dataclass
    class Unknown:
        sparsity: float = 0.5

    with pytest.raises(ValueError, match="^config: expected one of .*got Unknown"):
        prune_(nn.Sequential(nn.Linear(4, 3)), Unknown())


def test_a_method_registered_from_outside_is_dispatched_and_scheduled():
    """The seam: a config + its handler; prune_ and GradualPruner need no change."""
    from pruning.handlers import apply_masks, select_layers
    from pruning.mask_scores import masks_from_scores

    def prune_first(model, config, inputs):  # keep the last inputs of every row: a deterministic toy criterion
        mods = select_layers(model, inputs.filter_fn)
        scores = {f: torch.arange(m.in_features).float().expand(m.out_features, -1) for f, m in mods.items()}
        return apply_masks(model, config, mods, masks_from_scores(scores, config.sparsity, "row"))

    @registry.register_method("first_inputs", handler=prune_first, gradual=True)
    @dataclass
    class FirstInputsConfig:
        sparsity: float = 0.5

    try:
        model = nn.Sequential(nn.Linear(4, 2))
        rep = prune_(model, FirstInputsConfig(0.5), filter_fn=LINEAR)
        assert rep["method"] == "first_inputs"
        assert get_mask(model[0]).tolist() == [[False, False, True, True]] * 2
        pruner = GradualPruner(model, GradualSchedule(0.75, 0, 2, 1), FirstInputsConfig(), filter_fn=LINEAR)
        pruner.step(2)
        assert get_mask(model[0]).tolist() == [[False, False, False, True]] * 2
        assert "first_inputs" in registry.method_names(structured=False)

        @dataclass
        class Other:
            sparsity: float = 0.5

        with pytest.raises(ValueError, match="'taylor' is taken by TaylorConfig"):
            registry.register_method("taylor", handler=prune_first)(Other)
    finally:
        registry._METHODS.pop(FirstInputsConfig, None)


def test_gradual_pruner_reads_the_capabilities():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="^schedule: nm sparsity is fixed.*magnitude or wanda or taylor"):
        GradualPruner(model, GradualSchedule(0.5), SemiStructuredConfig())
    with pytest.raises(ValueError, match="^method: structured changes shapes"):
        GradualPruner(model, GradualSchedule(0.5), StructuredConfig(heads=0.5))
    with pytest.raises(ValueError, match="^calib_loader: taylor scoring needs calibration data"):
        GradualPruner(model, GradualSchedule(0.5), TaylorConfig())


# ----------------------------------------------------------------------------------------------- lotus front ends
def test_training_config_takes_the_registered_methods(tiny_cfg_dict):
    from lotus.config import config_from_dict
    from lotus.errors import ConfigError

    d = dict(tiny_cfg_dict, pruning={"method": "taylor", "sparsity": 0.5, "scope": "global", "schedule": "gradual"})
    cfg = config_from_dict(d).pruning
    assert cfg.mask_config(0.2) == TaylorConfig(sparsity=0.2, scope="global")
    with pytest.raises(ConfigError, match="pruning.method: expected .*'taylor'"):
        config_from_dict(dict(tiny_cfg_dict, pruning={"method": "obd"}))
    with pytest.raises(ConfigError, match="pruning.scope"):
        config_from_dict(dict(tiny_cfg_dict, pruning={"method": "wanda", "scope": "global"}))


def test_one_shot_taylor_in_training(tmp_path, tiny_cfg_dict):
    from lotus.config import config_from_dict
    from lotus.training import Trainer

    d = tiny_cfg_dict
    d["data"].update(limit_train=64, eval_batch_size=512)
    d["train"].update(epochs=1, warmup_epochs=0.0)
    d["pruning"] = {"method": "taylor", "sparsity": 0.5, "at_epoch": 0.0, "calib_batches": 1}
    summary = Trainer(config_from_dict(d), run_dir=str(tmp_path / "r"), quiet=True).fit()
    assert summary["pruning"]["method"] == "taylor"
    assert summary["pruning"]["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_lotus_prune_method_taylor(tmp_path, capsys, one_thread):
    import yaml

    import lotus.models  # noqa: F401 - registers lotus_vit_micro
    from lotus.cli import main
    from lotus.weights import save_weights

    cfg = tmp_path / "micro.yaml"
    model_sec = {"name": "lotus_vit_micro", "img_size": 16, "patch_size": 4}
    cfg.write_text(yaml.safe_dump({"model": model_sec, "data": {"name": "digits", "batch_size": 32}}))
    torch.manual_seed(0)
    ckpt = tmp_path / "micro.safetensors"
    save_weights(timm.create_model("lotus_vit_micro", img_size=16, patch_size=4, num_classes=10, in_chans=1), ckpt, {})
    out = tmp_path / "out"
    base = ["prune", "--checkpoint", str(ckpt), "--method", "taylor", "--out", str(out)]
    assert main([*base, "--model", "lotus_vit_micro"]) == 2  # no data: taylor needs calibration batches
    assert "--calib" in capsys.readouterr().err
    fast = ["--latency-iters", "0", "--max-eval", "64", "--calib-batches", "1"]
    assert main([*base, "--config", str(cfg), "--sparsity", "0.4", "--scope", "row", *fast]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "taylor" and rep["config"]["scope"] == "row"
    assert rep["total"]["sparsity"] == pytest.approx(0.4, abs=0.01)  # per row: round(0.4 * in) of each row
