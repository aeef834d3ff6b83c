"""Instant Soup Pruning (mask merging, weak copies) and the essential-sparsity sweep (knee, JSON, PNG)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import pruning
from pruning.masks import get_mask, masked_modules
from pruning.soup import instant_soup_prune_, merge_masks
from pruning.sweep import essential_sparsity_sweep, find_knee, save_sweep, sparsity_grid


def test_merge_masks_semantics():
    a = {"w": torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool)}
    b = {"w": torch.tensor([1, 0, 1, 0, 1, 0], dtype=torch.bool)}
    c = {"w": torch.tensor([1, 1, 0, 0, 0, 1], dtype=torch.bool)}
    assert merge_masks([a, b, c], "union")["w"].tolist() == [True, True, True, False, True, True]
    assert merge_masks([a, b, c], "intersection")["w"].tolist() == [True, False, False, False, False, False]
    # vote: counts 3,2,1,0,2,1 -> keep 3 (sparsity 0.5): index 0 and both 2-vote entries
    assert merge_masks([a, b, c], "vote", sparsity=0.5)["w"].tolist() == [True, True, False, False, True, False]
    # tie-break by magnitude among equal vote counts (index 2 vs 5 both have one vote)
    tb = {"w": torch.tensor([1.0, 1.0, 0.1, 1.0, 1.0, 0.9])}
    kept = merge_masks([a, b, c], "vote", sparsity=1 / 3, tiebreak=tb)["w"]
    assert kept.tolist() == [True, True, False, False, True, True]
    with pytest.raises(ValueError, match="sparsity"):
        merge_masks([a], "vote")
    with pytest.raises(ValueError, match="merge"):
        merge_masks([a], "mean", sparsity=0.5)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 3))


def _keep(mod: nn.Module, fqn: str) -> bool:
    return isinstance(mod, nn.Linear) and fqn != "4"


def _train_fn(model: nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        x = torch.randn(32, 8, generator=g)
        loss = nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"loss": float(loss.detach())}


@pytest.mark.parametrize("merge", ["vote", "union", "intersection"])
def test_instant_soup_prune(merge):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = instant_soup_prune_(model, _train_fn, sparsity=0.6, k=3, merge=merge, filter_fn=_keep)
    assert len(rep["copies"]) == 3 and all("loss" in c for c in rep["copies"])
    assert 0.0 < rep["agreement"] <= 1.0
    total = rep["total"]
    if merge == "vote":
        assert total["nonzeros"] == total["params"] - round(0.6 * total["params"])
    elif merge == "union":
        assert total["sparsity"] <= 0.6 + 1e-9
    else:
        assert total["sparsity"] >= 0.6 - 1e-9
    assert set(masked_modules(model)) == {"0", "2"}
    # the main model's own weights are untouched: only the mask changed
    for fqn in ("0", "2"):
        orig = model.get_submodule(fqn).parametrizations.weight.original
        assert torch.equal(orig, before[f"{fqn}.weight"])
    # the ISSP mask is not just the main model's own magnitude mask (copies were trained)
    own = _model()
    pruning.prune_(own, pruning.MagnitudeConfig(0.6), filter_fn=_keep)
    assert not torch.equal(get_mask(own[2]), get_mask(model[2]))


def test_soup_validation():
    with pytest.raises(ValueError, match="seeds"):
        instant_soup_prune_(_model(), _train_fn, 0.5, k=2, seeds=[1], filter_fn=_keep)
    with pytest.raises(ValueError, match="k:"):
        instant_soup_prune_(_model(), _train_fn, 0.5, k=0, filter_fn=_keep)
    with pytest.raises(ValueError, match="sparsity"):
        instant_soup_prune_(_model(), _train_fn, 1.2, filter_fn=_keep)


def test_find_knee_uses_first_drop():
    pts = [{"sparsity": s, "metric": m} for s, m in [(0, 0.90), (0.2, 0.905), (0.4, 0.895), (0.6, 0.85), (0.8, 0.891)]]
    k = find_knee(pts, dense=0.90, tolerance=0.01)
    assert k["knee"] == 0.4 and k["largest_within_tolerance"] == 0.8
    assert find_knee(pts, dense=0.90, tolerance=0.0)["knee"] == 0.2
    lower = [{"sparsity": 0, "metric": 1.0}, {"sparsity": 0.5, "metric": 1.05}, {"sparsity": 0.7, "metric": 1.3}]
    assert find_knee(lower, 1.0, 0.1, higher_is_better=False)["knee"] == 0.5
    assert sparsity_grid(0.3, 0.9) == [0.0, 0.3, 0.6, 0.9]
    with pytest.raises(ValueError, match="step"):
        sparsity_grid(0.0)


def test_sweep_end_to_end_writes_json_md_png(tmp_path):
    model = _model()
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x).argmax(-1)

    def agreement(m: nn.Module) -> float:  # fraction of predictions equal to the dense model's
        with torch.no_grad():
            return float((m(x).argmax(-1) == ref).float().mean())

    res = essential_sparsity_sweep(model, agreement, step=0.3, max_sparsity=0.9, tolerance=0.02, filter_fn=_keep)
    assert [p["sparsity"] for p in res["points"]] == [0.0, 0.3, 0.6, 0.9]
    assert res["dense"] == 1.0 and res["points"][0]["delta"] == 0.0
    assert res["points"][-1]["metric"] < 1.0  # 90% one-shot pruning changes predictions
    assert res["points"][-1]["achieved_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert res["knee"] in (0.0, 0.3, 0.6)
    assert not masked_modules(model)  # the swept model itself is untouched
    paths = save_sweep(res, str(tmp_path / "out"))
    assert json.loads(open(paths["json"]).read())["knee"] == res["knee"]
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "knee" in open(paths["md"]).read()
    with pytest.raises(ValueError, match="tolerance"):
        essential_sparsity_sweep(model, agreement, tolerance=-1)
