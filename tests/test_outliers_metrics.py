"""Kurtosis (He et al. 2024, Eq. 1), max-median ratio, and the residual-stream hooks."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import lotus.models  # noqa: F401  (registers lotus_vit_*)
from lotus.features.outliers.hooks import FINAL, ResidualStreamProbe, find_blocks, measure, site_names
from lotus.features.outliers.metrics import OutlierStats, kurtosis, max_median_ratio, neuron_rms


def test_kurtosis_is_one_for_equal_rms_neurons():
    g = torch.Generator().manual_seed(0)
    # every neuron has RMS exactly 1 over tokens: random signs of unit magnitude
    x = torch.randint(0, 2, (4, 50, 32), generator=g).float() * 2 - 1
    assert kurtosis(x) == pytest.approx(1.0, abs=1e-12)
    # equal RMS but different token patterns and a global scale: still 1
    y = torch.randn(200, 16, generator=g)
    y = y / neuron_rms(y).float() * 7.5
    assert kurtosis(y) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("d", [2, 8, 64, 192])
def test_kurtosis_is_width_for_a_single_active_neuron(d):
    x = torch.zeros(3, 10, d)
    x[..., d // 3] = torch.randn(3, 10)
    assert kurtosis(x) == pytest.approx(float(d), rel=1e-12)


def test_kurtosis_matches_eq1_by_hand_and_is_scale_invariant():
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, -2.0, 4.0]])  # tokens x width
    s = torch.sqrt((x.double() ** 2).mean(0))
    expected = float((s**4).mean() / (s**2).mean() ** 2)
    assert kurtosis(x) == pytest.approx(expected, rel=1e-12)
    assert kurtosis(1000 * x) == pytest.approx(expected, rel=1e-9)
    # an outlier neuron raises it; uses the RMS over tokens, not the std (mean is not removed)
    assert kurtosis(torch.ones(5, 4)) == pytest.approx(1.0)
    assert math.isnan(kurtosis(torch.zeros(2, 3)))


def test_max_median_ratio_on_crafted_tensors():
    # per token: |x| = [1, 2, 3, 10] -> median 2.5, max 10 -> 4 ; |x| = [1, 1, 1, 1] -> 1
    x = torch.tensor([[1.0, -2.0, 3.0, -10.0], [1.0, 1.0, -1.0, 1.0]])
    assert max_median_ratio(x) == pytest.approx((4.0 + 1.0) / 2)
    # odd width: median is the middle value
    assert max_median_ratio(torch.tensor([[1.0, 5.0, 2.0]])) == pytest.approx(2.5)
    # batch dims pool as tokens
    assert max_median_ratio(x.view(1, 2, 4)) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="tokens, width"):
        max_median_ratio(torch.ones(4))


def test_streaming_stats_equal_metrics_on_concatenation():
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randn(3, 7, 12, generator=g) * torch.linspace(0.1, 5, 12) for _ in range(3)]
    st = OutlierStats()
    for c in chunks:
        st.update(c)
    full = torch.cat(chunks)
    out = st.compute()
    assert out["kurtosis"] == pytest.approx(kurtosis(full), rel=1e-6)
    assert out["mmr"] == pytest.approx(max_median_ratio(full), rel=1e-6)
    assert out["max_abs"] == pytest.approx(float(full.abs().max()))
    with pytest.raises(ValueError):
        OutlierStats().compute()


def _vit(**kw):
    return timm.create_model("lotus_vit_micro", num_classes=3, in_chans=1, img_size=16, **kw)


def test_probe_hooks_block_inputs_and_final_output():
    torch.manual_seed(0)
    model = _vit().eval()
    x = torch.randn(5, 1, 16, 16)
    assert site_names(model) == ["blocks.0", "blocks.1", FINAL]
    with torch.no_grad():
        feats = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        after0 = model.blocks[0](feats)
        final = model.blocks[1](after0)
    res = measure(model, x)
    assert list(res) == ["blocks.0", "blocks.1", FINAL]
    assert res["blocks.0"]["kurtosis"] == pytest.approx(kurtosis(feats), rel=1e-5)
    assert res["blocks.1"]["kurtosis"] == pytest.approx(kurtosis(after0), rel=1e-5)
    assert res[FINAL]["kurtosis"] == pytest.approx(kurtosis(final), rel=1e-5)
    assert res[FINAL]["mmr"] == pytest.approx(max_median_ratio(final), rel=1e-5)
    # chunked forwards give the same numbers; hooks are removed afterwards; train mode restored
    model.train()
    res2 = measure(model, x, chunk_size=2)
    assert model.training
    assert res2[FINAL]["kurtosis"] == pytest.approx(res[FINAL]["kurtosis"], rel=1e-6)
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in find_blocks(model))


def test_probe_layer_selection_and_errors():
    model = _vit()
    with ResidualStreamProbe(model, ["final"]) as probe:
        with torch.no_grad():
            model(torch.randn(2, 1, 16, 16))
    assert list(probe.compute()) == ["final"]
    with pytest.raises(ValueError, match="outliers.layers: unknown site 'blocks.9'"):
        ResidualStreamProbe(model, ["blocks.9"])
    with pytest.raises(ValueError, match="has no non-empty .blocks"):
        find_blocks(torch.nn.Linear(2, 2))
