"""N:M masks (magnitude / Wanda scored), the CPU 2:4 path, and the sparse-training module on CPU."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import pruning
from pruning import SemiStructuredConfig, prune_
from pruning.mask_scores import is_nm_sparse, nm_mask
from pruning.masks import enforce_masks_, get_mask, is_masked, masked_modules
from pruning.semi_structured import (
    CPU_NOTE,
    SemiSparseLinear,
    check_legality,
    disable_sparse_training_,
    enable_sparse_training_,
)


def vit(depth: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=depth, num_classes=10
    ).eval()


def test_two_four_keeps_top_two_of_every_group_of_four():
    m = vit()
    rep = prune_(m, SemiStructuredConfig())
    assert rep["method"] == "2:4" and CPU_NOTE in rep["notes"]
    assert rep["kernels"]["converted"] == [] and rep["kernels"]["note"] == CPU_NOTE
    for fqn, mod in masked_modules(m).items():
        w = mod.weight.detach()
        groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert (groups == 2).all(), fqn  # random init has no exact zeros: exactly 2 kept per group
        orig = mod.parametrizations.weight.original.detach().abs().reshape(w.shape[0], -1, 4)
        kept = (w != 0).reshape(w.shape[0], -1, 4)
        # every kept weight is at least as large as every dropped weight of its own group
        min_kept = orig.masked_fill(~kept, float("inf")).amin(-1)
        max_dropped = orig.masked_fill(kept, -1.0).amax(-1)
        assert (min_kept >= max_dropped).all()
        assert is_nm_sparse(w, 2, 4)
    assert rep["total"]["sparsity"] == pytest.approx(0.5)
    assert not rep["layers"]["head"]["masked"]


@pytest.mark.parametrize("n,m", [(1, 4), (4, 8), (2, 8)])
def test_general_n_m(n, m):
    model = vit()
    rep = prune_(model, SemiStructuredConfig(n=n, m=m))
    assert rep["total"]["sparsity"] == pytest.approx(1 - n / m)
    assert any("no sparse kernels" in note for note in rep["notes"])
    for mod in masked_modules(model).values():
        assert is_nm_sparse(mod.weight, n, m)


def test_wanda_scored_nm_differs_from_magnitude_with_skewed_inputs():
    torch.manual_seed(0)
    base = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.9, 0.1, 0.2] * 2] * 4))
    scale = torch.tensor([1.0, 1.0, 50.0, 50.0] * 2)
    loader = [(torch.randn(64, 8) * scale, torch.zeros(64))]
    mag = nn.Sequential(nn.Linear(8, 4, bias=False))
    wan = nn.Sequential(nn.Linear(8, 4, bias=False))
    mag.load_state_dict(nn.Sequential(base).state_dict())
    wan.load_state_dict(nn.Sequential(base).state_dict())
    prune_(mag, SemiStructuredConfig(score="magnitude"))
    prune_(wan, SemiStructuredConfig(score="wanda"), calib_loader=loader)
    assert get_mask(mag[0])[:, [0, 1, 4, 5]].all() and not get_mask(mag[0])[:, [2, 3, 6, 7]].any()
    assert get_mask(wan[0])[:, [2, 3, 6, 7]].all() and not get_mask(wan[0])[:, [0, 1, 4, 5]].any()
    with pytest.raises(ValueError, match="calib_loader"):
        prune_(nn.Sequential(nn.Linear(8, 4)), SemiStructuredConfig(score="wanda"))


def test_layers_with_bad_input_dim_are_skipped_and_listed():
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
    rep = prune_(model, SemiStructuredConfig())
    assert "0" in rep["skipped"] and "multiple of 4" in rep["skipped"]["0"]
    assert rep["layers"]["2"]["masked"] and not rep["layers"]["0"]["masked"]
    with pytest.raises(ValueError, match="no selected layer"):
        prune_(nn.Sequential(nn.Linear(10, 3)), SemiStructuredConfig())


def test_nm_mask_and_config_validation():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[True, True, False, False, False, False, True, True]]
    with pytest.raises(ValueError, match="multiple"):
        nm_mask(torch.ones(2, 6), 2, 4)
    with pytest.raises(ValueError, match="n < m"):
        SemiStructuredConfig(n=4, m=4)
    with pytest.raises(ValueError, match="score"):
        SemiStructuredConfig(score="taylor")
    with pytest.raises(ValueError, match="kernels"):
        SemiStructuredConfig(kernels="always")
    assert not is_nm_sparse(torch.ones(4, 8))


def test_cpu_semi_structured_conversion_and_legality_report_cpu():
    m = vit()
    prune_(m, SemiStructuredConfig(kernels="off"))
    rep = pruning.to_semi_structured_(m)
    assert rep["converted"] == [] and rep["note"] == CPU_NOTE
    assert set(rep["skipped"]) == set(masked_modules(m))
    assert "CUDA" in check_legality(torch.zeros(64, 64), "cutlass")
    tr = enable_sparse_training_(m)
    assert tr["swapped"] == [] and tr["note"] == CPU_NOTE
    assert not any(isinstance(mod, SemiSparseLinear) for mod in m.modules())


def test_semi_sparse_linear_cpu_fallback_trains_with_masked_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    scores = lin.weight.detach().abs()
    mask = nm_mask(scores, 2, 4)
    ref_w = (lin.weight.detach() * mask).clone()
    sp = SemiSparseLinear.from_linear(lin, mask, backend="cutlass")
    assert sp.weight is lin.weight  # same Parameter: optimisers keep it
    assert set(sp.state_dict()) == {"weight", "bias"}  # plain Linear keys: exports load into timm models
    x = torch.randn(3, 5, 16)
    y = sp(x)
    assert torch.allclose(y, nn.functional.linear(x, ref_w, lin.bias), atol=1e-6)
    y.sum().backward()
    assert (sp.weight.grad[~mask] == 0).all() and (sp.weight.grad[mask] != 0).any()
    opt = torch.optim.SGD(sp.parameters(), lr=0.1, weight_decay=0.5)
    opt.step()
    assert (sp.weight[~mask] != 0).any()  # weight decay moved pruned entries ...
    enforce_masks_(nn.Sequential(sp))
    assert (sp.weight[~mask] == 0).all()  # ... enforce_masks_ puts them back to zero
    seq = nn.Sequential(sp)
    assert "0" in masked_modules(seq)
    pruning.make_permanent(seq)
    assert type(seq[0]) is nn.Linear and is_nm_sparse(seq[0].weight, 2, 4)
    seq2 = nn.Sequential(SemiSparseLinear.from_linear(nn.Linear(16, 8), mask, "cutlass"))
    disable_sparse_training_(seq2)
    assert type(seq2[0]).__name__ == "ParametrizedLinear" and is_masked(seq2[0])


def test_one_shot_nm_through_gradual_pruner():
    m = vit()
    pruner = pruning.GradualPruner(m, pruning.OneShotSchedule(0.5, step=3), SemiStructuredConfig())
    assert pruner.step(1) is None and not masked_modules(m)
    rep = pruner.step(3)
    assert rep is not None and rep["total"]["sparsity"] == pytest.approx(0.5)
    assert pruner.step(4) is None
    with pytest.raises(ValueError, match="OneShotSchedule"):
        pruning.GradualPruner(m, pruning.GradualSchedule(0.5, 0, 10, 2), SemiStructuredConfig())
