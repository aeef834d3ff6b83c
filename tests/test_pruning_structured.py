"""Structured thinning: outputs equal the masked-dense model, params drop, save/reload, training, errors."""

import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from timm.layers import Attention
from timm.models.eva import Eva
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer
from torch.nn.utils import parametrize

from pruning import StructuredConfig, apply_widths, get_widths, prune_structured
from pruning.optimizer_state import optimizer_param_names, slice_optimizer_state
from pruning.structured_eva import ThinnedEvaAttention
from pruning.structured_importance import head_importance, neuron_importance
from pruning.structured_units import register_attention

torch.set_num_threads(1)


def tiny_vit(**kw) -> VisionTransformer:
    args = dict(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0, num_classes=10, qkv_bias=True
    )
    args.update(kw)
    torch.manual_seed(0)
    return VisionTransformer(**args).eval()


def tiny_eva(**kw) -> Eva:
    args = dict(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        num_classes=10,
        use_rot_pos_emb=True,
        ref_feat_shape=(4, 4),
    )
    args.update(kw)
    torch.manual_seed(0)
    model = Eva(**args).eval()
    with torch.no_grad():  # EVA zero-inits q/v biases; give them values so slicing them is checked
        for blk in model.blocks:
            for name in ("q_bias", "v_bias"):
                if getattr(blk.attn, name, None) is not None:
                    getattr(blk.attn, name).normal_()
    return model


def masked_reference(original: nn.Module, report: dict) -> nn.Module:
    """The original model with removed heads / neurons zeroed at the output projection's input columns."""
    ref = copy.deepcopy(original)
    with torch.no_grad():
        for bname, kept in report["kept"].items():
            blk = ref.get_submodule(bname)
            if "heads" in kept:
                mask = torch.zeros(blk.attn.num_heads)
                mask[kept["heads"]] = 1
                blk.attn.proj.weight.mul_(mask.repeat_interleave(blk.attn.head_dim)[None])
            if "mlp" in kept:
                mask = torch.zeros(blk.mlp.fc2.in_features)
                mask[kept["mlp"]] = 1
                blk.mlp.fc2.weight.mul_(mask[None])
    return ref


def set_fused(model: nn.Module, fused: bool) -> None:
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


def calib(n: int = 3, labels: bool = True, index: bool = False):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        x = torch.randn(4, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (4,), generator=g)
        if index:
            out.append((x, y, torch.arange(4) + 4 * i))
        else:
            out.append((x, y) if labels else x)
    return out


X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "importance,scope", [("magnitude", "layer"), ("activation", "global"), ("taylor", "layer"), ("taylor", "global")]
)
@pytest.mark.parametrize("fused", [True, False])
def test_vit_equals_masked_dense(importance, scope, fused):
    model = tiny_vit(qk_norm=True, reg_tokens=2)
    original = copy.deepcopy(model)
    report = prune_structured(
        model,
        StructuredConfig(heads=0.5, mlp=0.5, importance=importance, scope=scope),
        calib_loader=calib(index=importance == "taylor"),
    )
    ref = masked_reference(original, report)
    set_fused(model, fused)
    set_fused(ref, fused)
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), atol=1e-5, rtol=1e-5)
    widths = get_widths(model)
    total_heads = sum(w["heads"] for w in widths.values())
    total_mlp = sum(w["mlp"] for w in widths.values())
    assert total_heads == 4 and total_mlp == 256
    if scope == "layer":
        assert all(w == {"heads": 2, "mlp": 128} for w in widths.values())
    for blk in model.blocks:
        a = blk.attn
        assert a.qkv.weight.shape == (3 * a.num_heads * a.head_dim, 64)
        assert a.proj.weight.shape == (64, a.num_heads * a.head_dim) and a.attn_dim == a.num_heads * a.head_dim
        assert blk.mlp.fc1.out_features == blk.mlp.fc2.in_features
    # parameters really drop, by exactly the removed rows/columns
    per_head = 3 * (64 * 16 + 16) + 64 * 16
    per_neuron = 64 + 1 + 64
    assert report["params_after"] == sum(p.numel() for p in model.parameters())
    assert report["params_before"] - report["params_after"] == 4 * per_head + 256 * per_neuron
    json.dumps(report)


def test_round_to_and_partial_ratios():
    model = tiny_vit(depth=3)
    report = prune_structured(model, StructuredConfig(heads=0.25, mlp=0.3, round_to=8))
    for name, w in report["widths"].items():
        assert w["mlp"] % 8 == 0 and w["mlp"] == 176  # 256 - round(76.8) = 179 -> nearest multiple of 8
        assert w["heads"] == 3
        assert report["blocks"][name] == {"heads_before": 4, "heads_after": 3, "mlp_before": 256, "mlp_after": 176}
    # what the ratios rounded to is said: 1 of 4 heads is exactly 0.25; 80 of 256 neurons is not 0.3
    assert report["rounded"] == [
        "mlp: asked 0.3, removed 80 of 256 per block (0.31; whole neurons, rounded to the nearest)"
    ]


def test_a_ratio_that_rounds_says_so():
    from pruning.structured import rounding_notes

    before = {"b0": {"heads": 3, "mlp": 100}, "b1": {"heads": 3, "mlp": 100}}
    after = {"b0": {"heads": 1, "mlp": 50}, "b1": {"heads": 1, "mlp": 50}}
    assert rounding_notes(before, after, {"heads": 0.5, "mlp": 0.5}) == [
        "heads: asked 0.5, removed 2 of 3 per block (0.67; whole heads, rounded to the nearest)"
    ]
    uneven = {"b0": {"heads": 2}, "b1": {"heads": 3}}
    assert rounding_notes(before, uneven, {"heads": 0.5, "mlp": 0.0}) == [
        "heads: asked 0.5, removed 1 of 6 in all (0.17; whole heads, rounded to the nearest)"
    ]


def test_global_scope_prunes_unevenly_and_respects_min_heads():
    model = tiny_vit(depth=3)
    with torch.no_grad():  # make block 2 clearly the least important
        model.blocks[2].attn.qkv.weight.mul_(0.01)
        model.blocks[2].mlp.fc1.weight.mul_(0.01)
    report = prune_structured(model, StructuredConfig(heads=0.5, mlp=0.25, scope="global", min_heads=1))
    heads = [w["heads"] for w in report["widths"].values()]
    mlp = [w["mlp"] for w in report["widths"].values()]
    assert sum(heads) == 6 and sum(mlp) == 576
    assert heads[2] == 1 and mlp[2] < 192  # the weak block loses most, but keeps min_heads


def test_importance_ranks_dead_groups_lowest():
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[:, 16:32] = 0  # head 1 of block 0 contributes nothing
        model.blocks[0].attn.qkv.weight.view(3, 4, 16, 64)[:, 1] *= 0.01
        model.blocks[1].mlp.fc2.weight[:, 7] = 0  # neuron 7 of block 1 contributes nothing
        model.blocks[1].mlp.fc1.weight[7] *= 0.01
    for imp in ("magnitude", "activation", "taylor"):
        h = head_importance(model, imp, calib_loader=calib())
        n = neuron_importance(model, imp, calib_loader=calib())
        assert set(h) == {"blocks.0", "blocks.1"} and h["blocks.0"].shape == (4,)
        assert int(h["blocks.0"].argmin()) == 1, imp
        assert int(n["blocks.1"].argmin()) == 7, imp
    # activation importance depends on the data, magnitude does not
    act_a = neuron_importance(model, "activation", calib_loader=calib())
    act_b = neuron_importance(model, "activation", calib_loader=[x * 3 + 1 for x, _ in calib()])
    assert not torch.allclose(act_a["blocks.0"], act_b["blocks.0"])


@pytest.mark.parametrize(
    "kw",
    [
        dict(qkv_fused=True),  # fused qkv + q/v bias (k bias buffer)
        dict(qkv_fused=False, swiglu_mlp=True),  # separate q/k/v, GluMlp (packed SwiGLU)
        dict(attn_type="rope", swiglu_mlp=True, swiglu_align_to=8),  # AttentionRope, SwiGLU
        dict(attn_type="rope", qkv_fused=False, qk_norm=True),
    ],
)
def test_eva_equals_masked_dense_and_reloads(kw, tmp_path):
    model = tiny_eva(**kw)
    original = copy.deepcopy(model)
    report = prune_structured(model, StructuredConfig(heads=0.5, mlp=0.5, importance="taylor"), calib_loader=calib())
    if kw.get("attn_type") != "rope":
        assert all(type(b.attn) is ThinnedEvaAttention for b in model.blocks)
    ref = masked_reference(original, report)
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), atol=1e-5, rtol=1e-5)
    path = tmp_path / "eva.safetensors"
    save_file(model.state_dict(), str(path), metadata={"widths": json.dumps(get_widths(model))})
    fresh = apply_widths(tiny_eva(**kw), json.loads(json.dumps(report["widths"])))
    fresh.load_state_dict(load_file(str(path)), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), model(X), atol=0, rtol=0)


def test_inner_norms_are_sliced():
    model = tiny_eva(attn_type="rope", scale_attn_inner=True, scale_mlp=True)
    prune_structured(model, StructuredConfig(heads=0.5, mlp=0.5))
    blk = model.blocks[0]
    assert blk.attn.norm.normalized_shape == (32,) and blk.attn.norm.weight.shape == (32,)
    assert blk.mlp.norm.normalized_shape == (128,)
    assert model(X).shape == (3, 10)


def test_safetensors_round_trip(tmp_path):
    model = tiny_vit(qk_norm=True)
    prune_structured(
        model,
        StructuredConfig(heads=0.25, mlp=0.5, importance="activation", scope="global", round_to=8),
        calib_loader=calib(labels=False),
    )
    path = tmp_path / "thin.safetensors"
    save_file(model.state_dict(), str(path), metadata={"lotus_widths": json.dumps(get_widths(model))})
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        widths = f.metadata()["lotus_widths"]
    fresh = tiny_vit(qk_norm=True)
    with pytest.raises(RuntimeError):  # unthinned model cannot take the thinned weights
        fresh.load_state_dict(load_file(str(path)))
    apply_widths(fresh, widths)  # JSON text accepted
    fresh.load_state_dict(load_file(str(path)), strict=True)
    assert get_widths(fresh) == get_widths(model)
    for fused in (True, False):
        set_fused(model, fused)
        set_fused(fresh, fused)
        with torch.no_grad():
            torch.testing.assert_close(fresh(X), model(X), atol=0, rtol=0)


def test_train_mode_gradients_flow_and_optimizer_state_is_sliced():
    model = tiny_vit(drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for x, y in calib(2):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    names = optimizer_param_names(opt, model)
    old_state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    report = prune_structured(model, StructuredConfig(heads=0.5, mlp=0.5, importance="taylor"), calib_loader=calib())
    assert model.training and all(m.training for m in model.modules())  # modes kept after calibration
    new_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    new_opt.load_state_dict(slice_optimizer_state(opt, report["kept_indices"], names))
    params = dict(model.named_parameters())
    qkv = "blocks.0.attn.qkv.weight"
    info = report["kept_indices"][qkv]
    assert info["dim"] == 0 and info["old_shape"] == [192, 64] and info["new_shape"] == [96, 64]
    torch.testing.assert_close(
        new_opt.state[params[qkv]]["exp_avg"], old_state[qkv]["exp_avg"][torch.tensor(info["index"])]
    )
    fc2 = "blocks.1.mlp.fc2.weight"
    idx = torch.tensor(report["kept_indices"][fc2]["index"])
    torch.testing.assert_close(new_opt.state[params[fc2]]["exp_avg_sq"], old_state[fc2]["exp_avg_sq"][:, idx])
    torch.testing.assert_close(new_opt.state[params["cls_token"]]["exp_avg"], old_state["cls_token"]["exp_avg"])
    before = {n: p.detach().clone() for n, p in params.items()}
    x, y = calib(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    new_opt.step()
    assert not torch.equal(before[qkv], params[qkv])


def test_slice_optimizer_state_errors():
    model = tiny_vit()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nn.functional.cross_entropy(model(X), torch.zeros(3, dtype=torch.long)).backward()
    opt.step()
    names = optimizer_param_names(opt, model)
    report = prune_structured(model, StructuredConfig(mlp=0.5))
    assert set(report["kept_indices"]) == {
        f"blocks.{i}.mlp.{n}" for i in range(2) for n in ("fc1.weight", "fc1.bias", "fc2.weight")
    }
    assert [w["heads"] for w in report["widths"].values()] == [4, 4]  # heads untouched
    with pytest.raises(ValueError, match="names"):
        slice_optimizer_state(opt, report["kept_indices"], names[:-1])
    sd = slice_optimizer_state(opt.state_dict(), report["kept_indices"], names)
    new = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    new.load_state_dict(sd)
    with pytest.raises(ValueError, match="not in the model"):
        optimizer_param_names(opt, model)  # old optimizer, pruned model


def test_config_validation():
    with pytest.raises(ValueError, match=r"^heads: expected a fraction in \[0, 1\), got 1.0 \(.*every head"):
        StructuredConfig(heads=1.0)
    with pytest.raises(ValueError, match=r"^mlp: expected a fraction in \[0, 1\), got -0.1$"):
        StructuredConfig(mlp=-0.1)
    for bad in (
        dict(heads=True),
        dict(heads="0.5"),
        dict(importance="l1"),
        dict(scope="block"),
        dict(round_to=0),
        dict(min_heads=1.5),
    ):
        field = next(iter(bad))
        with pytest.raises(ValueError, match=rf"^{field}: ") as err:  # bare field name: callers prefix their path
            StructuredConfig(**bad)
        assert "\n" not in str(err.value) and "StructuredConfig" not in str(err.value)


def test_bad_inputs_are_clear_errors():
    model = tiny_vit(num_heads=2)
    with pytest.raises(ValueError, match=r"^heads: 0.8 would remove all 2 heads of blocks\.0\.attn$"):
        prune_structured(model, StructuredConfig(heads=0.8))
    with pytest.raises(ValueError, match="^min_heads: 3 exceeds the 2 heads"):
        prune_structured(model, StructuredConfig(heads=0.5, min_heads=3))
    with pytest.raises(ValueError, match="needs calibration data"):
        prune_structured(model, StructuredConfig(mlp=0.5, importance="taylor"))
    with pytest.raises(ValueError, match="labelled batches"):
        prune_structured(model, StructuredConfig(mlp=0.5, importance="taylor"), calib_loader=calib(labels=False))
    with pytest.raises(ValueError, match="calib_loader: expected batches"):
        prune_structured(model, StructuredConfig(mlp=0.5, importance="activation"), calib_loader=[{"x": X}])
    with pytest.raises(ValueError, match="no batches"):
        prune_structured(model, StructuredConfig(mlp=0.5, importance="activation"), calib_loader=[])
    assert get_widths(model) == {"blocks.0": {"heads": 2, "mlp": 256}, "blocks.1": {"heads": 2, "mlp": 256}}
    for widths, msg in [
        ({"blocks.9": {"heads": 1}}, "unknown block"),
        ({"blocks.0": {"attn": 1}}, "unknown key"),
        ({"blocks.0": {"mlp": 512}}, r"expected an int in \[1, 256\]"),
        ("{", "not valid JSON"),
        ([1], "expected a dict"),
    ]:
        with pytest.raises(ValueError, match=msg):
            apply_widths(model, widths)
    assert get_widths(model)["blocks.0"] == {"heads": 2, "mlp": 256}  # nothing changed by failed calls


def test_unsupported_modules_are_named():
    psb = tiny_vit(block_fn=ParallelScalingBlock)
    with pytest.raises(ValueError, match=r"does not support blocks\.0 \(.*ParallelScalingBlock"):
        prune_structured(psb, StructuredConfig(heads=0.5))
    gqa = tiny_eva(attn_type="rope", qkv_fused=False, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"grouped-query attention at blocks\.0\.attn"):
        get_widths(gqa)
    masked = tiny_vit()
    parametrize.register_parametrization(masked.blocks[1].mlp.fc1, "weight", _Mask())
    assert get_widths(masked)["blocks.1"] == {"heads": 4, "mlp": 256}  # widths are readable from masked models
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc1 with a parametrization"):
        prune_structured(masked, StructuredConfig(mlp=0.5))
    with pytest.raises(ValueError, match="taylor importance needs plain weights"):
        neuron_importance(masked, "taylor", calib_loader=calib(1))
    assert get_widths(masked)["blocks.1"] == {"heads": 4, "mlp": 256}  # nothing was changed
    with pytest.raises(ValueError, match="no transformer blocks"):
        prune_structured(nn.Sequential(nn.Linear(4, 4)), StructuredConfig(mlp=0.5))


class _TimesTwoAttention(Attention):
    """A timm Attention subclass that keeps the base sizing (inner width num_heads * head_dim)."""

    def forward(self, x, attn_mask=None, is_causal=False):
        return 2 * super().forward(x, attn_mask=attn_mask, is_causal=is_causal)


def test_attention_subclasses_need_registration():
    model = tiny_vit(attn_layer=_TimesTwoAttention)
    original = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn \(.*_TimesTwoAttention\)"):
        prune_structured(model, StructuredConfig(heads=0.5))
    register_attention(_TimesTwoAttention)
    report = prune_structured(model, StructuredConfig(heads=0.5, mlp=0.25))
    with torch.no_grad():
        torch.testing.assert_close(model(X), masked_reference(original, report)(X), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="register_attention"):
        register_attention(nn.Linear)


class _Mask(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * (w.abs() > 1e-3)


@pytest.mark.parametrize("name", ["SOAP", "Shampoo"])
def test_kronecker_factored_optimizer_state_is_restricted_to_the_kept_coordinates(name):
    import pytorch_optimizer

    make = getattr(pytorch_optimizer, name)
    torch.manual_seed(0)
    model = tiny_vit().train()
    opt = make(model.parameters(), lr=1e-3)
    for x, y in calib(3):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    names = optimizer_param_names(opt, model)
    params = dict(model.named_parameters())
    old = {n: opt.state[p] for n, p in params.items()}
    old = {
        n: {
            k: (
                [t.clone() if isinstance(t, torch.Tensor) else t for t in v]
                if isinstance(v, list)
                else v.clone()
                if isinstance(v, torch.Tensor)
                else v
            )
            for k, v in st.items()
        }
        for n, st in old.items()
    }
    report = prune_structured(model, StructuredConfig(heads=0.5, mlp=0.5), calib_loader=calib())
    new_opt = make(model.parameters(), lr=1e-3)
    new_opt.load_state_dict(slice_optimizer_state(opt, report["kept_indices"], names))
    params = dict(model.named_parameters())
    fc1, fc2 = "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"
    i1 = torch.tensor(report["kept_indices"][fc1]["index"])
    i2 = torch.tensor(report["kept_indices"][fc2]["index"])
    st1, st2 = new_opt.state[params[fc1]], new_opt.state[params[fc2]]
    if name == "SOAP":
        torch.testing.assert_close(st1["GG"][0], old[fc1]["GG"][0][i1][:, i1])  # the thinned dim: restricted
        torch.testing.assert_close(st1["GG"][1], old[fc1]["GG"][1])  # the other dim: as it was
        torch.testing.assert_close(st2["GG"][1], old[fc2]["GG"][1][i2][:, i2])
        q = st1["Q"][0]
        torch.testing.assert_close(q.T @ q, torch.eye(len(i1)), atol=1e-5, rtol=0)  # a new orthonormal basis
        torch.testing.assert_close(st1["exp_avg"], old[fc1]["exp_avg"][i1])
        assert st1["exp_avg_sq"].shape == params[fc1].shape
        torch.testing.assert_close(st1["exp_avg_sq"][0], old[fc1]["exp_avg_sq"].mean(dim=0))
    else:
        torch.testing.assert_close(st1["pre_cond_0"], old[fc1]["pre_cond_0"][i1][:, i1])
        torch.testing.assert_close(st1["pre_cond_1"], old[fc1]["pre_cond_1"])
        torch.testing.assert_close(st2["inv_pre_cond_1"], old[fc2]["inv_pre_cond_1"][i2][:, i2])
    before = {n: p.detach().clone() for n, p in params.items()}
    for x, y in calib(2):  # it keeps training on the thinned shapes
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        new_opt.step()
        new_opt.zero_grad()
    assert torch.isfinite(loss) and not torch.equal(before[fc1], params[fc1])
