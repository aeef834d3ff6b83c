"""2:4 semi-structured kernels on CUDA (skipped without a sm_80+ GPU; the CPU path is in test_pruning_nm.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pruning
from pruning import SemiStructuredConfig, prune_
from pruning.mask_scores import is_nm_sparse
from pruning.masks import enforce_masks_, get_mask, masked_modules
from pruning.semi_structured import (
    SemiSparseLinear,
    check_legality,
    enable_sparse_training_,
    probe_shape,
    semi_structured_available,
    to_semi_structured_,
)

pytestmark = pytest.mark.skipif(not semi_structured_available(), reason="needs a CUDA GPU with sm_80+ (2:4 kernels)")


def mlp(dtype=torch.float16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).cuda().to(dtype).eval()


@pytest.mark.parametrize("backend", ["cutlass", "auto"])
def test_convert_matches_masked_dense(backend):
    m = mlp()
    prune_(m, SemiStructuredConfig(kernels="off"))
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        ref = m(x).float()
    rep = to_semi_structured_(m, backend=backend, probe=False)
    assert sorted(rep["converted"]) == ["0", "2"] and rep["skipped"] == {}
    assert type(m[0].weight).__name__.startswith("SparseSemiStructuredTensor")
    with torch.no_grad():
        got = m(x).float()
    assert torch.allclose(got, ref, atol=2e-2, rtol=2e-2)
    report = pruning.sparsity_report(m)
    assert report["layers"]["0"]["kernel"] == "2:4" and report["total"]["sparsity"] == pytest.approx(0.5)


def test_prune_with_probe_converts_only_faster_layers():
    m = mlp(torch.bfloat16)
    rep = prune_(m, SemiStructuredConfig(probe_tokens=2048))
    k = rep["kernels"]
    assert k["device"] and k["probe"]
    for key, p in k["probe"].items():
        assert p["dense_ms"] > 0 and p["sparse_ms"] > 0 and p["rel_err"] < 1e-2, key
    for fqn in ("0", "2"):
        assert fqn in k["converted"] or "probe" in k["skipped"][fqn]


def test_illegal_layers_are_skipped_and_listed():
    m = nn.Sequential(nn.Linear(64, 40), nn.Linear(40, 64)).cuda().half()
    prune_(m, SemiStructuredConfig(kernels="off"))
    rep = to_semi_structured_(m, backend="cutlass", probe=False)
    assert rep["converted"] == [] and "shape" in rep["skipped"]["0"] and "shape" in rep["skipped"]["1"]
    m32 = nn.Sequential(nn.Linear(128, 128)).cuda()
    prune_(m32, SemiStructuredConfig(kernels="off"))
    rep = to_semi_structured_(m32, probe=False)
    assert "dtype" in rep["skipped"]["0"]
    dense = torch.randn(128, 128, device="cuda", dtype=torch.float16)
    assert "not 2:4" in check_legality(dense, "cutlass")


def test_probe_shape_reports_times():
    p = probe_shape(768, 3072, 1024, torch.bfloat16, "auto", iters=5, warmup=2)
    assert p["dense_ms"] > 0 and p["sparse_ms"] > 0 and p["speedup"] > 0 and p["rel_err"] < 1e-2


def test_sparse_training_forward_kernel_and_masked_grads():
    m = mlp(torch.bfloat16).train()
    prune_(m, SemiStructuredConfig(kernels="off"))
    masks = {f: get_mask(mod).clone() for f, mod in masked_modules(m).items()}
    x = torch.randn(4, 32, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = m(x).float()
    rep = enable_sparse_training_(m)
    assert sorted(rep["swapped"]) == ["0", "2"] and isinstance(m[0], SemiSparseLinear)
    assert m[0]._kernel_ok(x)
    out = m(x)
    assert torch.allclose(out.float(), ref, atol=5e-2, rtol=5e-2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1)
    out.float().pow(2).mean().backward()
    assert (m[0].weight.grad[~masks["0"]] == 0).all()
    opt.step()
    enforce_masks_(m)
    assert is_nm_sparse(m[0].weight, 2, 4) and is_nm_sparse(m[2].weight, 2, 4)
    pruning.make_permanent(m)
    assert type(m[0]) is nn.Linear
