"""optim.name: every optimiser of timm's registry through create_optimizer_v2, over Lotus' parameter groups."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.optim import list_optimizers

import lotus.models  # noqa: F401  (registers lotus_vit_micro)
from lotus.config import config_from_dict
from lotus.errors import ConfigError
from lotus.optim import LrSchedule, build_optimizer, optimizer_names


def _micro():
    torch.manual_seed(0)
    return timm.create_model(
        "lotus_vit_micro", num_classes=3, in_chans=1, img_size=8, patch_size=4, depth=2, embed_dim=32
    )


def _steps(model, opt, n=6):
    x, y = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 3
    losses = []
    for _ in range(n):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "name, cls",
    [
        ("lion", "Lion"),
        ("lamb", "Lamb"),
        ("adan", "Adan"),
        ("nadamw", "NAdamW"),
        ("adabelief", "AdaBelief"),
        ("lookahead_adamw", "Lookahead"),
    ],
)
def test_timm_optimisers_keep_lotus_groups_and_train(name, cls):
    cfg = config_from_dict({"optim": {"name": name, "lr": 1e-3, "weight_decay": 0.05}})
    model = _micro()
    opt = build_optimizer(cfg.optim, model)
    assert type(opt).__name__ == cls
    # biases / norms / tokens never decayed, weights decayed (as for adamw)
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(wd) == len(named)
    assert [wd[id(named[k])] for k in ("blocks.0.attn.qkv.weight", "head.weight")] == [0.05, 0.05]
    assert [wd[id(named[k])] for k in ("blocks.0.attn.qkv.bias", "norm.weight", "cls_token", "pos_embed")] == [0.0] * 4
    LrSchedule(opt, cfg.optim, cfg.train).set_position(0.5)
    losses = _steps(model, opt)
    assert losses[-1] < losses[0]


def test_layer_decay_and_options_reach_the_timm_optimiser():
    cfg = config_from_dict(
        {
            "optim": {
                "name": "lamb",
                "layer_decay": 0.5,
                "betas": [0.8, 0.9],
                "eps": 1e-6,
                "extra": {"max_grad_norm": 2.0},
            }
        }
    )
    opt = build_optimizer(cfg.optim, _micro())
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert scales[-1] == 1.0 and scales[0] == pytest.approx(0.5**3)  # depth 2 -> 4 layer ids
    g = opt.param_groups[0]
    assert g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 and g["max_grad_norm"] == 2.0
    cfg = config_from_dict({"optim": {"name": "momentum", "momentum": 0.5}})
    assert build_optimizer(cfg.optim, _micro()).param_groups[0]["momentum"] == 0.5


def test_every_registry_name_is_accepted_and_builds_or_names_what_is_missing():
    names = optimizer_names()
    assert set(list_optimizers()) <= set(names) and {"soap", "shampoo", "adamw", "sgd"} <= set(names)
    for name in list_optimizers():
        cfg = config_from_dict({"optim": {"name": name}})
        try:
            opt = build_optimizer(cfg.optim, _micro())
        except ConfigError as e:  # bitsandbytes / apex / a CUDA-only kernel: one line naming optim.name
            assert str(e).startswith("optim") and "\n" not in str(e), (name, str(e))
            continue
        assert isinstance(opt, torch.optim.Optimizer), name


def test_bad_names_and_extras_name_the_key():
    with pytest.raises(
        ConfigError,
        match=r"optim.name: expected one of timm's optimizers .* got 'lionn'; "
        r"did you mean lion",
    ):
        config_from_dict({"optim": {"name": "lionn"}})
    cfg = config_from_dict({"optim": {"name": "lion", "extra": {"nope": 1}}})
    with pytest.raises(ConfigError, match="optim.extra: lion does not accept nope"):
        build_optimizer(cfg.optim, _micro())
