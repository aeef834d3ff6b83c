"""The Outlier-Protected block: forward/backward, every config switch, timm/pruning/optimiser compatibility."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers import Attention, RmsNorm

import lotus.models  # noqa: F401
from lotus.models.op_block import OPBlock, OPConfig, SoftcapAttention, build_op_vit, op_model_kwargs, resolve_beta


def _op_vit(depth: int = 2, **op):
    cfg = OPConfig(**op)
    return timm.create_model(
        "lotus_vit_micro", num_classes=4, in_chans=1, img_size=16, depth=depth, **op_model_kwargs(cfg, depth)
    )


@pytest.mark.parametrize("qk_norm", ["rms", "tanh", "none"])
def test_forward_backward_every_qk_mode(qk_norm):
    torch.manual_seed(0)
    model = _op_vit(qk_norm=qk_norm)
    x = torch.randn(3, 1, 16, 16)
    out = model(x)
    assert out.shape == (3, 4) and torch.isfinite(out).all()
    out.square().mean().backward()
    blk = model.blocks[0]
    assert isinstance(blk, OPBlock)
    # timm's own Attention wherever it expresses the mode (pruning/checkpoints see a standard ViT)
    assert type(blk.attn) is (SoftcapAttention if qk_norm == "tanh" else Attention)
    assert blk.beta_attn.grad is not None and blk.attn.qkv.weight.grad is not None
    assert isinstance(blk.attn.q_norm, RmsNorm) == isinstance(blk.attn.k_norm, RmsNorm) == (qk_norm == "rms")


def test_no_pre_norms_one_embed_norm_and_final_norm_switch():
    model = _op_vit()
    assert isinstance(model.norm_pre, torch.nn.LayerNorm)
    assert isinstance(model.norm, torch.nn.LayerNorm)
    norms = [n for n, m in model.blocks.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms == []  # no LayerNorm inside the blocks
    bare = _op_vit(embed_norm=False, final_norm=False)
    assert isinstance(bare.norm_pre, torch.nn.Identity) and isinstance(bare.norm, torch.nn.Identity)
    assert torch.isfinite(bare(torch.randn(2, 1, 16, 16))).all()


def test_beta_default_trainable_and_excluded_from_weight_decay():
    from lotus.optim import param_groups

    model = _op_vit(depth=4)
    assert resolve_beta(OPConfig(), 4) == pytest.approx(0.5)
    for blk in model.blocks:
        assert blk.beta_attn.item() == pytest.approx(1 / math.sqrt(4)) and blk.beta_attn.requires_grad
        assert blk.beta_attn.ndim == 1
    groups = param_groups(model, 0.1)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(model.blocks[0].beta_attn) in no_decay and id(model.blocks[0].beta_mlp) in no_decay
    fixed = _op_vit(beta=0.25, trainable_beta=False)
    assert fixed.blocks[1].beta_mlp.item() == 0.25 and not fixed.blocks[1].beta_mlp.requires_grad
    assert all(id(fixed.blocks[1].beta_mlp) != id(p) for g in param_groups(fixed, 0.1) for p in g["params"])


def test_beta_scales_the_residual_branches():
    torch.manual_seed(0)
    model = _op_vit(beta=1.0).eval()
    blk = model.blocks[0]
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        a = x + blk.attn(x)
        expected = a + blk.mlp(a)
        assert torch.allclose(blk(x), expected, atol=1e-5)
        blk.beta_attn.fill_(0.0)
        blk.beta_mlp.fill_(0.0)
        assert torch.allclose(blk(x), x)


def test_input_scale_alpha_on_first_block_only():
    model = _op_vit(input_scale=0.5)
    assert model.blocks[0].input_scale.item() == 0.5 and model.blocks[0].input_scale.requires_grad
    assert model.blocks[1].input_scale is None
    frozen = _op_vit(input_scale=2.0, trainable_input_scale=False)
    assert not frozen.blocks[0].input_scale.requires_grad
    x = torch.randn(1, 17, 64)
    with torch.no_grad():
        frozen.blocks[0].input_scale.fill_(0.0)
        assert torch.allclose(frozen.blocks[0](x), frozen.blocks[0](torch.zeros_like(x)))


def test_tanh_softcap_bounds_logits_and_qk_rms_normalises():
    torch.manual_seed(0)
    attn = SoftcapAttention(16, num_heads=2, softcap=1e-3).eval()
    x = 100 * torch.randn(1, 5, 16)
    # with a tiny cap every logit is ~0: attention is uniform, output = proj(mean of v)
    with torch.no_grad():
        v = attn.qkv(x).reshape(1, 5, 3, 2, 8)[:, :, 2].mean(1).reshape(1, 16)
        assert torch.allclose(attn(x), attn.proj(v).expand(1, 5, 16), atol=0.1)  # |out| ~ 30
        plain = Attention(16, num_heads=2).eval()
        plain.load_state_dict(attn.state_dict())  # same parameter names; uncapped: near one-hot attention
        assert not torch.allclose(plain(x), attn.proj(v).expand(1, 5, 16), atol=1.0)
        attn.softcap = 1e6  # a huge cap is the identity on these logits
        assert torch.allclose(attn(x), plain(x), atol=1e-3)
    blk = OPBlock(16, num_heads=2, qk_norm_type="rms")
    q = blk.attn.q_norm(torch.randn(3, 8) * 50)  # per head: RMS over head_dim
    assert blk.attn.q_norm.normalized_shape == (8,)
    assert torch.allclose(q.square().mean(-1), torch.ones(3), atol=1e-3)
    with pytest.raises(ValueError, match="model.op.qk_norm"):
        OPBlock(16, num_heads=2, qk_norm_type="layer")
    with pytest.raises(ValueError, match="model.op.softcap"):
        SoftcapAttention(16, num_heads=2, softcap=0.0)


def test_create_model_op_block_through_lotus_config():
    from lotus.config import config_from_dict
    from lotus.models import create_model

    cfg = config_from_dict(
        {
            "model": {
                "name": "lotus_vit_micro",
                "block": "op",
                "op": {"qk_norm": "tanh", "softcap": 20.0, "final_norm": False},
            }
        }
    )
    model = create_model(cfg.model, 10, 1, 16)
    assert all(isinstance(b, OPBlock) for b in model.blocks)
    assert model.blocks[0].attn.softcap == 20.0 and isinstance(model.norm, torch.nn.Identity)
    assert model.blocks[0].beta_attn.item() == pytest.approx(1 / math.sqrt(2))
    from lotus.errors import ConfigError

    with pytest.raises(ConfigError, match="model.op.qk_norm"):
        config_from_dict({"model": {"block": "op", "op": {"qk_norm": "layernorm"}}})
    with pytest.raises(ConfigError, match="model.op.beta"):
        config_from_dict({"model": {"block": "op", "op": {"beta": -1.0}}})


def test_build_op_vit_state_dict_roundtrip_and_token_dropping():
    torch.manual_seed(0)
    m1 = build_op_vit(
        OPConfig(input_scale=1.0),
        img_size=16,
        patch_size=4,
        in_chans=1,
        num_classes=3,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )
    m2 = build_op_vit(
        OPConfig(input_scale=1.0),
        img_size=16,
        patch_size=4,
        in_chans=1,
        num_classes=3,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )
    m2.load_state_dict(m1.state_dict())
    x = torch.randn(2, 1, 16, 16)
    assert torch.allclose(m1(x), m2(x))
    # blocks accept any token count (patch tickets drop tokens before the blocks)
    tokens = torch.randn(2, 7, 32)
    assert m1.blocks(tokens).shape == (2, 7, 32)


def test_structured_pruning_of_op_blocks():
    """The pruning package's structured thinning works on OP blocks (timm Attention + Mlp inside)."""
    from pruning import StructuredConfig, apply_widths, get_widths, prune_structured

    torch.manual_seed(0)
    model = _op_vit(depth=2).eval()
    x = torch.randn(2, 1, 16, 16)
    prune_structured(model, StructuredConfig(heads=0.5, mlp=0.5))
    widths = get_widths(model)
    assert model.blocks[0].attn.num_heads == 1 and model.blocks[0].mlp.fc1.out_features == 64
    fresh = _op_vit(depth=2).eval()
    apply_widths(fresh, widths)
    fresh.load_state_dict(model.state_dict())
    assert torch.allclose(fresh(x), model(x), atol=1e-6)


def test_manual_head_and_neuron_thinning_of_softcap_attention():
    """Thin heads (qkv rows / proj cols) and MLP neurons by hand, as a structured pruner would."""
    torch.manual_seed(0)
    model = _op_vit(qk_norm="tanh").eval()
    blk = model.blocks[0]
    attn, mlp = blk.attn, blk.mlp
    hd, dim = attn.head_dim, 64
    keep_head = 1
    rows = torch.cat([torch.arange(j * dim + keep_head * hd, j * dim + (keep_head + 1) * hd) for j in range(3)])
    qkv = torch.nn.Linear(dim, 3 * hd)
    qkv.weight.data, qkv.bias.data = attn.qkv.weight.data[rows], attn.qkv.bias.data[rows]
    proj = torch.nn.Linear(hd, dim)
    proj.weight.data = attn.proj.weight.data[:, keep_head * hd : (keep_head + 1) * hd]
    proj.bias.data = attn.proj.bias.data
    attn.qkv, attn.proj, attn.num_heads = qkv, proj, 1
    fc1 = torch.nn.Linear(dim, 10)
    fc1.weight.data, fc1.bias.data = mlp.fc1.weight.data[:10], mlp.fc1.bias.data[:10]
    fc2 = torch.nn.Linear(10, dim)
    fc2.weight.data, fc2.bias.data = mlp.fc2.weight.data[:, :10], mlp.fc2.bias.data
    mlp.fc1, mlp.fc2 = fc1, fc2
    out = model(torch.randn(2, 1, 16, 16))
    assert out.shape == (2, 4) and torch.isfinite(out).all()
