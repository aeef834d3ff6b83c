"""SOAP/Shampoo selection (pytorch-optimizer, eager on CPU) and the simulated W8A8 int8 path."""

from __future__ import annotations

import types

import pytest
import timm
import torch

import lotus.models  # noqa: F401
from lotus.features.outliers.optimizers import build, optimizer_class
from lotus.features.outliers.quant import (
    QuantConfig,
    W8A8Linear,
    block_linear_filter,
    calibrate_activation_scales,
    quantcheck,
    quantize_w8a8_,
)


def _optim_cfg(**kw):
    base = dict(
        name="soap", lr=1e-3, weight_decay=0.05, betas=[0.9, 0.95], eps=1e-8, momentum=0.9, nesterov=False, extra={}
    )
    return types.SimpleNamespace(**{**base, **kw})


def _micro(**kw):
    return timm.create_model("lotus_vit_micro", num_classes=3, in_chans=1, img_size=16, **kw)


@pytest.mark.parametrize("name", ["soap", "shampoo"])
def test_soap_and_shampoo_build_and_step_on_cpu(name):
    torch.manual_seed(0)
    model = timm.create_model(
        "lotus_vit_micro", num_classes=3, in_chans=1, img_size=8, patch_size=4, depth=1, embed_dim=32
    )
    from lotus.optim import param_groups

    # precondition early and often so the few steps below exercise the non-diagonal preconditioners
    extra = (
        {"precondition_frequency": 2}
        if name == "soap"
        else {"graft_type": "adagrad", "start_preconditioning_step": 2, "preconditioning_compute_steps": 2}
    )
    opt = build(name, param_groups(model, 0.05), _optim_cfg(name=name, extra=extra))
    assert isinstance(opt, optimizer_class(name))
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[0]["weight_decay"] == 0.05
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert not torch.equal(before, model.blocks[0].attn.qkv.weight)
    assert losses[-1] < losses[0]


def test_optimizer_selection_through_lotus_optim_and_bad_extra():
    from lotus.config import config_from_dict
    from lotus.optim import build_optimizer

    cfg = config_from_dict({"optim": {"name": "soap", "lr": 2e-3, "eps": 1e-10, "betas": [0.95, 0.95]}})
    opt = build_optimizer(cfg.optim, _micro())
    assert type(opt).__name__ == "SOAP"
    assert opt.param_groups[0]["eps"] == 1e-10 and opt.param_groups[0]["betas"] == (0.95, 0.95)
    with pytest.raises(ValueError, match="optim.extra.precondition_freq: not an option of soap"):
        build("soap", _micro().parameters(), _optim_cfg(extra={"precondition_freq": 5}))
    with pytest.raises(ValueError, match="optim.extra.graft_type"):
        build("shampoo", _micro().parameters(), _optim_cfg(extra={"graft_type": "adam"}))
    with pytest.raises(ValueError, match="optim.name"):
        build("lion", _micro().parameters(), _optim_cfg())


def test_w8a8_linear_quantises_weights_per_channel_and_inputs_per_tensor():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 4)
    with torch.no_grad():
        lin.weight[0] *= 100  # one large row must not coarsen the others (per-channel scales)
    q = W8A8Linear.from_linear(lin, act_absmax=3.0)
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.abs().max() == 127
    assert torch.allclose(q.weight_scale, lin.weight.abs().amax(1) / 127)
    err = (q.dequantized_weight() - lin.weight).abs()
    assert (err <= q.weight_scale[:, None] / 2 + 1e-7).all()
    # input on the int8 grid of scale 3/127 and inside the range: only weight rounding remains
    x = torch.randint(-127, 128, (5, 16)).float() * (3.0 / 127)
    assert torch.allclose(q(x), torch.nn.functional.linear(x, q.dequantized_weight(), lin.bias), atol=1e-5)
    # values beyond the calibrated range are clipped to +-127 * scale
    big = torch.full((1, 16), 10.0)
    clipped = torch.full((1, 16), 127 * 3.0 / 127)
    assert torch.allclose(q(big), torch.nn.functional.linear(clipped, q.dequantized_weight(), lin.bias), atol=1e-4)


def test_quantize_model_swaps_block_linears_with_bounded_error():
    torch.manual_seed(0)
    model = _micro().eval()
    calib = [torch.randn(8, 1, 16, 16) for _ in range(3)]
    cfg = QuantConfig(calib_batches=3)
    scales = calibrate_activation_scales(model, calib, cfg)
    assert len(scales) == 4 * len(model.blocks)  # qkv, proj, fc1, fc2 per block; not the head
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        ref = model(x)
        q = quantize_w8a8_(__import__("copy").deepcopy(model), scales, cfg)
        out = q(x)
    swapped = [n for n, m in q.named_modules() if isinstance(m, W8A8Linear)]
    assert len(swapped) == len(scales) and all(n.startswith("blocks.") for n in swapped)
    assert isinstance(q.head, torch.nn.Linear)
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.05, rel  # int8 error is present but small
    # 4-bit is much worse than 8-bit: the error really comes from the quantisation grid
    cfg4 = QuantConfig(weight_bits=4, act_bits=4)
    q4 = quantize_w8a8_(__import__("copy").deepcopy(model), scales, cfg4)
    with torch.no_grad():
        assert (q4(x) - ref).norm() / ref.norm() > 2 * rel
    assert block_linear_filter("all")(model.head, "head")


def test_quantcheck_reports_float_and_int8_accuracy():
    torch.manual_seed(0)
    model = _micro()
    x = torch.randn(40, 1, 16, 16)
    with torch.no_grad():
        y = model(x).argmax(-1)  # labels the float model gets right: float accuracy is exactly 1
    loader = [(x[i : i + 20], y[i : i + 20]) for i in (0, 20)]
    res = quantcheck(model, [x[:20]], loader, QuantConfig(calib_batches=1))
    assert res["float_acc"] == 1.0 and 0.8 <= res["int8_acc"] <= 1.0
    assert res["drop_pp"] == pytest.approx(100 * (1.0 - res["int8_acc"]))
    assert not any(isinstance(m, W8A8Linear) for m in model.modules())  # the float model is untouched
    res_p = quantcheck(
        model, [x[:20]], loader, QuantConfig(calib_batches=1, act_observer="percentile", percentile=99.0)
    )
    assert res_p["act_range_max"] < res["act_range_max"]
    with pytest.raises(ValueError, match="no Linear layers"):
        quantcheck(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 3)), [x[:4]], loader)
