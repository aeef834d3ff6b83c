"""Unstructured masks (magnitude layer/global, Wanda) as parametrizations, filters, reports, permanence."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.nn.utils import parametrize

import pruning
from pruning import MagnitudeConfig, WandaConfig, prune_
from pruning.mask_scores import collect_input_norms
from pruning.masks import (
    effective_weight,
    enforce_masks_,
    get_mask,
    load_masks,
    make_filter,
    masked_modules,
    masks_state,
)
from pruning.report import format_report


def vit(depth: int = 2, **kw) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=depth, num_classes=10, **kw
    ).eval()


def calib(n: int = 2, bs: int = 4, size: int = 32, kind: str = "tensor"):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(bs, 3, size, size, generator=g) for _ in range(n)]
    if kind == "tensor":
        return xs
    if kind == "pair":
        return [(x, torch.zeros(bs, dtype=torch.long)) for x in xs]
    return [(x, torch.zeros(bs, dtype=torch.long), torch.arange(bs)) for x in xs]


def test_layer_magnitude_exact_and_head_patch_dense():
    m = vit()
    x = torch.randn(2, 3, 32, 32)
    dense = m(x)
    rep = prune_(m, MagnitudeConfig(sparsity=0.3))
    pruned = masked_modules(m)
    assert set(pruned) == {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    for fqn, mod in pruned.items():
        w = mod.weight
        assert int((w == 0).sum()) == round(0.3 * w.numel()), fqn
        # smallest magnitudes were removed: every pruned |w| <= every kept |w|
        orig = mod.parametrizations.weight.original.detach().abs()
        mask = get_mask(mod)
        assert orig[~mask].max() <= orig[mask].min()
    assert rep["layers"]["head"]["sparsity"] == 0.0 and not rep["layers"]["head"]["masked"]
    assert rep["layers"]["patch_embed.proj"]["sparsity"] == 0.0
    assert abs(rep["total"]["sparsity"] - 0.3) < 1e-5  # exact per layer up to rounding of 0.3 * numel
    assert rep["model"]["params"] == sum(p.numel() for p in m.parameters())
    assert not torch.allclose(m(x), dense)


def test_global_magnitude_hits_total_and_varies_per_layer():
    m = vit()
    with torch.no_grad():  # make fc2 of block 0 tiny so global pruning takes more of it
        m.blocks[0].mlp.fc2.weight.mul_(0.05)
    rep = prune_(m, MagnitudeConfig(sparsity=0.5, scope="global"))
    assert rep["total"]["nonzeros"] == rep["total"]["params"] - round(0.5 * rep["total"]["params"])
    assert rep["layers"]["blocks.0.mlp.fc2"]["sparsity"] > 0.9
    assert rep["layers"]["blocks.1.mlp.fc2"]["sparsity"] < 0.5


def test_gradients_of_pruned_weights_are_zero_and_masks_survive_steps():
    m = vit(depth=1)
    prune_(m, MagnitudeConfig(sparsity=0.5))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    m.train()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        fc1 = m.blocks[0].mlp.fc1
        grad = fc1.parametrizations.weight.original.grad
        assert (grad[~get_mask(fc1)] == 0).all()
        opt.step()
        enforce_masks_(m)
    for mod in masked_modules(m).values():
        orig = mod.parametrizations.weight.original
        assert (orig[~get_mask(mod)] == 0).all()
        assert abs(float((mod.weight == 0).float().mean()) - 0.5) < 1e-6


def test_make_permanent_keeps_output_params_and_plain_state_dict():
    m = vit(depth=1)
    prune_(m, MagnitudeConfig(sparsity=0.6))
    x = torch.randn(2, 3, 32, 32)
    before = m(x)
    params_before = {id(p) for p in m.parameters()}
    pruning.make_permanent(m)
    assert not any(parametrize.is_parametrized(mod) for mod in m.modules())
    assert {id(p) for p in m.parameters()} == params_before  # optimisers keep working
    assert torch.equal(m(x), before)
    fresh = vit(depth=1)
    fresh.load_state_dict(m.state_dict())  # plain timm keys
    w = fresh.blocks[0].mlp.fc1.weight
    assert int((w == 0).sum()) == round(0.6 * w.numel())


def test_masks_state_roundtrip_and_regrowth_never_happens():
    m = vit(depth=1)
    prune_(m, MagnitudeConfig(sparsity=0.4))
    state = masks_state(m)
    first = {k: v.clone() for k, v in state.items()}
    prune_(m, MagnitudeConfig(sparsity=0.7))  # re-scoring on masked weights: old zeros stay pruned
    for fqn, mod in masked_modules(m).items():
        new = get_mask(mod)
        assert not (new & ~first[fqn]).any()
    other = vit(depth=1)
    load_masks(other, masks_state(m))
    assert set(masked_modules(other)) == set(masked_modules(m))
    with pytest.raises(ValueError, match="not found"):
        load_masks(other, {"blocks.9.mlp.fc1": torch.ones(3, dtype=torch.bool)})


def test_wanda_differs_from_magnitude_when_activations_are_skewed():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    with torch.no_grad():  # channels 0-3 carry small weights but huge activations
        lin.weight.uniform_(0.5, 1.0)
        lin.weight[:, :4] = 0.1
    scale = torch.ones(16)
    scale[:4] = 100.0
    loader = [torch.randn(32, 16) * scale for _ in range(2)]
    mag, wan = nn.Sequential(lin), nn.Sequential(nn.Linear(16, 8, bias=False))
    wan[0].load_state_dict(lin.state_dict())
    prune_(mag, MagnitudeConfig(sparsity=0.25))
    prune_(wan, WandaConfig(sparsity=0.25), calib_loader=loader)
    mag_mask, wan_mask = get_mask(mag[0]), get_mask(wan[0])
    assert not mag_mask[:, :4].any()  # magnitude drops the small-weight channels entirely
    assert wan_mask[:, :4].all()  # Wanda keeps them: |w| * ||x|| is large
    assert int((~wan_mask).sum(1).unique().numel()) == 1  # row scope: same count per output row
    assert int((~wan_mask).sum()) == 8 * 4


@pytest.mark.parametrize("kind", ["tensor", "pair", "triple"])
def test_wanda_on_vit_accepts_every_batch_form(kind):
    m = vit(depth=1)
    rep = prune_(m, WandaConfig(sparsity=0.5, max_calib_batches=1), calib_loader=calib(kind=kind))
    assert rep["method"] == "wanda"
    assert rep["total"]["sparsity"] == pytest.approx(0.5)


def test_wanda_errors_and_config_validation():
    m = vit(depth=1)
    with pytest.raises(ValueError, match="calib_loader"):
        prune_(m, WandaConfig(sparsity=0.5))
    with pytest.raises(ValueError, match="calib_loader"):
        prune_(m, WandaConfig(sparsity=0.5), calib_loader=[{"label": 1}])
    with pytest.raises(ValueError, match="no batches"):
        prune_(m, WandaConfig(sparsity=0.5), calib_loader=[])
    for bad in (1.0, -0.1, 1.5, "half", True):
        with pytest.raises(ValueError, match="sparsity"):
            MagnitudeConfig(sparsity=bad)
    with pytest.raises(ValueError, match="scope"):
        MagnitudeConfig(scope="block")
    with pytest.raises(ValueError, match="config"):
        prune_(m, {"sparsity": 0.5})
    with pytest.raises(ValueError, match="selected no"):
        prune_(m, MagnitudeConfig(0.5), filter_fn=lambda mod, fqn: False)
    with pytest.raises(ValueError, match="only nn.Linear"):
        prune_(m, MagnitudeConfig(0.5), filter_fn=lambda mod, fqn: isinstance(mod, nn.LayerNorm))


def test_filters_include_head_and_patch_embed_with_conv_wanda():
    m = vit(depth=1)
    keep = make_filter(m, include_head=True, include_patch_embed=True)
    rep = prune_(m, WandaConfig(sparsity=0.5), calib_loader=calib(n=1), filter_fn=keep)
    assert rep["layers"]["head"]["masked"] and rep["layers"]["patch_embed.proj"]["masked"]
    assert rep["layers"]["patch_embed.proj"]["sparsity"] == pytest.approx(0.5)
    # conv norms line up with the flattened (out, in*kh*kw) weight
    norms = collect_input_norms(m, {"patch_embed.proj": m.patch_embed.proj}, calib(n=1))
    assert norms["patch_embed.proj"].shape == (3 * 4 * 4,)
    only_mlp = make_filter(m, exclude=["blocks.0.attn"])
    rep = prune_(vit(depth=1), MagnitudeConfig(0.5), filter_fn=only_mlp)
    assert not rep["layers"]["blocks.0.attn.qkv"]["masked"] and rep["layers"]["blocks.0.mlp.fc1"]["masked"]


@pytest.mark.parametrize("name,size", [("deit_tiny_distilled_patch16_224", 32), ("eva02_tiny_patch14_224", 28)])
def test_other_timm_families(name, size):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, img_size=size, patch_size=4, depth=1, num_classes=10).eval()
    x = torch.randn(2, 3, size, size)
    rep = prune_(m, WandaConfig(sparsity=0.5), calib_loader=[x])
    heads = [k for k in rep["layers"] if k.startswith("head")]
    assert heads and all(not rep["layers"][k]["masked"] for k in heads)  # head and head_dist stay dense
    assert rep["layers"]["blocks.0.attn.qkv"]["sparsity"] == pytest.approx(0.5)
    out = m(x)
    out = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(out).all()


def test_cost_report_counts_flops_and_effective_flops():
    m = vit(depth=1)
    x = torch.randn(2, 3, 32, 32)
    dense = pruning.model_stats(m, x, latency=False)
    prune_(m, MagnitudeConfig(sparsity=0.5))
    after = pruning.model_stats(m, x, latency=True, warmup=1, iters=2)
    assert dense["flops"] == after["flops"] > 0  # masked weights are still computed densely
    assert after["effective_flops"] < after["flops"]
    assert after["nonzeros"] < dense["nonzeros"] and after["params"] == dense["params"]
    assert after["latency"]["median_ms"] > 0 and after["latency"]["batch"] == 2
    text = format_report({"method": "magnitude", **pruning.sparsity_report(m), "before": dense, "after": after})
    assert "blocks.0.mlp.fc1" in text and "sparsity 0.5000" in text


def test_effective_weight_of_unmasked_layer_is_the_weight():
    lin = nn.Linear(4, 4)
    assert effective_weight(lin) is lin.weight
