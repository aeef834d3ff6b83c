"""Patch tickets: kept-token forward, CLS attention from q/k, random baseline, schedules, offline tickets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import TensorDataset

from data_tickets import KeepRateSchedule, PatchTicket, TicketFile, apply_patch_tickets
from data_tickets.keep_rate import num_kept
from data_tickets.kept_tokens import KeptPatchTokens, forward_kept_tokens
from data_tickets.patches import patch_attention, random_patch_scores

torch.manual_seed(0)


def vit(**kw) -> VisionTransformer:
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5)
    args.update(kw)
    torch.manual_seed(0)
    m = VisionTransformer(**args)
    with torch.no_grad():  # non-trivial cls/reg tokens and position embeddings
        for p in (m.cls_token, m.reg_token, m.pos_embed):
            if p is not None:
                p.normal_(std=0.5)
    return m.eval()


VARIANTS = {
    "cls": {},
    "reg_no_embed_class": dict(reg_tokens=2, no_embed_class=True),
    "reg_embed_class": dict(reg_tokens=3),
    "no_cls_avg": dict(class_token=False, global_pool="avg"),
    "pre_norm_qk_norm": dict(pre_norm=True, qk_norm=True),
    "map_pool": dict(global_pool="map"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_keep_rate_one_equals_full_forward(name):
    m = vit(**VARIANTS[name])
    x = torch.randn(3, 3, 16, 16)
    n = m.patch_embed.num_patches
    full = m(x)
    all_idx = torch.arange(n)
    assert torch.allclose(forward_kept_tokens(m, x, all_idx), full, atol=1e-5)
    # any order of the kept tokens: position embeddings travel with their patches
    perm = torch.stack([torch.randperm(n) for _ in range(3)])
    assert torch.allclose(forward_kept_tokens(m, x, perm), full, atol=1e-5)
    ticket = PatchTicket(keep_rate=1.0, scorer="random")
    keep = ticket.select(m, x, index=torch.arange(3))
    assert keep.shape == (3, n)
    assert torch.allclose(ticket.forward(m, x, keep), full, atol=1e-5)


def test_dynamic_img_size_other_resolution():
    m = vit(dynamic_img_size=True)
    x = torch.randn(2, 3, 24, 20)  # 6 x 5 grid instead of 4 x 4
    assert torch.allclose(forward_kept_tokens(m, x, torch.arange(30)), m(x), atol=1e-5)
    assert patch_attention(m, x).shape == (2, 30)
    assert PatchTicket(0.5, scorer="random").select(m, x).shape == (2, 15)


def test_kept_forward_really_drops_tokens_and_matches_masked_reference():
    m = vit()
    x = torch.randn(2, 3, 16, 16)
    keep = torch.tensor([[0, 3, 5, 9, 15], [1, 2, 4, 8, 10]])
    seen = []
    h = m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    out = forward_kept_tokens(m, x, keep)
    h.remove()
    assert seen == [torch.Size([2, 1 + 5, 32])]
    # reference: timm's own path with the non-kept tokens removed after the position embedding
    tokens = m._pos_embed(m.patch_embed(x))
    ref_in = torch.cat([tokens[:, :1], torch.gather(tokens[:, 1:], 1, keep[..., None].expand(-1, -1, 32))], 1)
    ref = m.forward_head(m.norm(m.blocks(ref_in)))
    assert torch.allclose(out, ref, atol=1e-5)


def test_backward_reaches_only_kept_positions():
    m = vit().train()
    x = torch.randn(4, 3, 16, 16)
    keep = PatchTicket(0.5, scorer="random", seed=1).select(m, x, index=torch.arange(4))
    loss = F.cross_entropy(forward_kept_tokens(m, x, keep), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    used = torch.zeros(16, dtype=torch.bool)
    used[keep.unique()] = True
    g = m.pos_embed.grad[0, 1:].abs().sum(-1)
    assert (g[used] > 0).all() and (g[~used] == 0).all()
    assert m.pos_embed.grad[0, 0].abs().sum() > 0  # class token position


def _timm_attention_probs(m: VisionTransformer, x: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities from timm's own non-fused path (the input of attn_drop)."""
    probs = []
    hooks = []
    for blk in m.blocks:
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda mod, i, o: probs.append(o.detach())))
    try:
        m(x)
    finally:
        for h in hooks:
            h.remove()
        for blk in m.blocks:
            blk.attn.fused_attn = True
    return probs


@pytest.mark.parametrize("name", ["cls", "reg_no_embed_class", "pre_norm_qk_norm"])
def test_attention_from_qk_equals_timm_non_fused(name):
    m = vit(**VARIANTS[name], depth=3)
    x = torch.randn(3, 3, 16, 16)
    probs = _timm_attention_probs(m, x)
    npt = m.num_prefix_tokens
    last = probs[-1].mean(1)[:, 0, npt:]
    got = patch_attention(m, x)
    assert got.shape == (3, 16)
    # same ranking and same values up to the renormalisation over patches
    assert torch.allclose(got, last / last.sum(-1, keepdim=True), atol=1e-5)
    joint = None
    for a in probs:
        a = a.mean(1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1])
        a = a / a.sum(-1, keepdim=True)
        joint = a if joint is None else a @ joint
    roll = joint[:, 0, npt:]
    assert torch.allclose(patch_attention(m, x, rollout=True), roll / roll.sum(-1, keepdim=True), atol=1e-5)


def test_cls_attention_ticket_keeps_top_scored_patches_and_restores_mode():
    m = vit().train()
    x = torch.randn(2, 3, 16, 16)
    t = PatchTicket(keep_rate=0.25)
    keep = t.select(m, x)
    assert m.training  # scoring ran in eval mode, mode restored
    scores = patch_attention(m, x)
    top = torch.sort(scores.topk(4, dim=1).indices, 1).values
    assert torch.equal(keep, top)
    assert torch.equal(keep, torch.sort(keep, 1).values)  # spatial order


def test_random_baseline_is_seeded_per_sample_and_epoch():
    s1 = random_patch_scores(torch.tensor([3, 7, 11]), 16, seed=0, epoch=0)
    s2 = random_patch_scores(torch.tensor([11]), 16, seed=0, epoch=0)
    assert torch.equal(s1[2], s2[0])  # independent of the batch a sample lands in
    assert not torch.equal(s1[0], random_patch_scores([3], 16, seed=0, epoch=1)[0])
    assert not torch.equal(s1[0], random_patch_scores([3], 16, seed=1, epoch=0)[0])
    assert ((s1 >= 0) & (s1 < 1)).all()
    m = vit()
    x = torch.randn(8, 3, 16, 16)
    t = PatchTicket(0.5, scorer="random", seed=0)
    keep = t.select(m, x, index=torch.arange(8))
    assert keep.shape == (8, 8)
    assert all(row.unique().numel() == 8 for row in keep)
    # over many samples every patch is chosen about equally often (uniform baseline)
    many = random_patch_scores(torch.arange(4000), 16).argsort(1, descending=True)[:, :8]
    counts = torch.bincount(many.flatten(), minlength=16).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.06


def test_num_kept_rounding_and_validation():
    assert num_kept(64, 0.5) == 32 and num_kept(16, 0.3) == 5 and num_kept(10, 0.01) == 1 and num_kept(7, 1.0) == 7
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="keep_rate"):
            num_kept(16, bad)
    with pytest.raises(ValueError, match="keep_rate"):
        PatchTicket(keep_rate=0)
    with pytest.raises(ValueError, match="scorer"):
        PatchTicket(scorer="loss")


def test_bad_keep_idx_and_models_are_clear_errors():
    m = vit()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"keep_idx: expected patch indices in \[0, 15\]"):
        forward_kept_tokens(m, x, torch.tensor([0, 16]))
    with pytest.raises(ValueError, match="keep_idx: expected shape"):
        forward_kept_tokens(m, x, torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        forward_kept_tokens(m, x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="VisionTransformer"):
        forward_kept_tokens(torch.nn.Linear(3, 3), x, torch.arange(4))
    with pytest.raises(ValueError, match="class token"):
        patch_attention(vit(class_token=False, global_pool="avg"), x)


def test_keep_rate_schedule():
    s = KeepRateSchedule([(0, 1.0), (2, 0.5), (8, 1.0)])
    assert [s(e) for e in (0, 1, 2, 5, 7, 8, 20)] == [1.0, 1.0, 0.5, 0.5, 0.5, 1.0, 1.0]
    lin = KeepRateSchedule([(0, 1.0), (4, 0.5)], mode="linear")
    assert [lin(e) for e in (0, 1, 2, 4, 9)] == [1.0, 0.875, 0.75, 0.5, 0.5]
    assert s.min_rate == 0.5
    with pytest.raises(ValueError, match="increase"):
        KeepRateSchedule([(2, 0.5), (1, 0.7)])
    with pytest.raises(ValueError, match=r"schedule\[0\]: keep_rate"):
        KeepRateSchedule([(0, 0.0)])
    with pytest.raises(ValueError, match="pair"):
        KeepRateSchedule([(0,)])


def test_offline_tickets_round_trip(tmp_path):
    m = vit()
    images = torch.randn(10, 3, 16, 16)
    ds = TensorDataset(images, torch.arange(10) % 5)
    t = PatchTicket(keep_rate=0.5)
    rank = t.compute(m, ds, batch_size=4, progress=False)
    assert rank.shape == (10, 16) and rank.dtype == np.int16
    assert np.array_equal(rank[7], t.rank(m, images[7:8])[0].numpy())  # row i belongs to sample i
    path = tmp_path / "patches.npz"
    t.to_ticket(rank, num_patches=16, labels=np.arange(10) % 5).save(path)
    loaded = TicketFile.load(path)
    stored = PatchTicket.rank_from_ticket(loaded, num_patches=16, keep_rate=0.5)
    keep = PatchTicket.keep_from_rank(stored[[1, 7]], num_kept(16, 0.5))
    assert torch.equal(keep, t.select(m, images[[1, 7]]))
    with pytest.raises(ValueError, match="made for 16 patches"):
        PatchTicket.rank_from_ticket(loaded, num_patches=64)
    short = t.to_ticket(rank[:, :4], num_patches=16)
    with pytest.raises(ValueError, match="keep_rate 0.5 needs 8"):
        PatchTicket.rank_from_ticket(short, num_patches=16, keep_rate=0.5)
    with pytest.raises(ValueError, match="no patch tickets"):
        PatchTicket.rank_from_ticket(TicketFile(np.arange(3)), num_patches=16)


def test_public_keep_selection_layout_and_errors():
    rank = torch.tensor([[5, 0, 3, 1], [2, 7, 6, 4]])
    keep = PatchTicket.keep_from_rank(rank, 3)
    assert keep.dtype == torch.int64 and keep.tolist() == [[0, 3, 5], [2, 6, 7]]  # best 3, spatial order
    assert torch.equal(PatchTicket.keep_from_rank(rank.numpy().astype(np.int16), 3), keep)  # stored (numpy) rank
    scores = random_patch_scores(torch.arange(4), 16, seed=3)
    keep = PatchTicket.keep_from_scores(scores, 5)
    assert torch.equal(keep, scores.topk(5, dim=1).indices.sort(dim=1).values)
    assert PatchTicket.keep_from_scores(torch.tensor([[1.0, 2.0, 2.0, 2.0]]), 2).tolist() == [[1, 2]]  # ties
    for bad, match in [
        (lambda: PatchTicket.keep_from_rank(rank, 5), "stores only 4"),
        (lambda: PatchTicket.keep_from_rank(rank, 0), "at least one"),
        (lambda: PatchTicket.keep_from_rank(rank[0], 2), "rank: expected"),
        (lambda: PatchTicket.keep_from_scores(scores[0], 2), "scores: expected"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()


def test_public_keep_selection_feeds_kept_token_forward():
    m = vit()
    x, index = torch.randn(3, 3, 16, 16), torch.tensor([4, 9, 2])
    t = PatchTicket(keep_rate=0.25, scorer="random", seed=1)
    keep = PatchTicket.keep_from_scores(random_patch_scores(index, 16, seed=1, epoch=2), num_kept(16, 0.25))
    assert torch.equal(keep, t.select(m, x, index=index, epoch=2))
    ref = forward_kept_tokens(m, x, keep)
    with apply_patch_tickets(m).keep(keep):
        assert torch.allclose(m(x), ref, atol=1e-5)


def test_patches_module_keeps_the_names_lotus_imports():
    from data_tickets import patches

    for name in (
        "num_kept",
        "apply_patch_tickets",
        "KeepRateSchedule",
        "_keep_from_rank",
        "random_patch_scores",
        "rank_patches",
        "PatchTicket",
    ):
        assert hasattr(patches, name), name


@pytest.mark.parametrize("name", ["cls", "reg_no_embed_class", "no_cls_avg"])
def test_kept_tokens_module_matches_functional_forward(name):
    m = vit(**VARIANTS[name])
    keys = list(m.state_dict())
    x = torch.randn(3, 3, 16, 16)
    keep = torch.stack([torch.randperm(16)[:6] for _ in range(3)])
    ref = forward_kept_tokens(m, x, keep)
    full = m(x)
    kept = apply_patch_tickets(m)
    assert isinstance(m.patch_drop, KeptPatchTokens) and apply_patch_tickets(m) is kept  # idempotent
    assert list(m.state_dict()) == keys  # no new parameters or buffers
    with kept.keep(keep):
        out = m(x)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(m(x), full, atol=1e-6)  # outside the context: all tokens again
    with pytest.raises(ValueError, match="keep_idx"), kept.keep(torch.tensor([0, 99])):
        m(x)
    assert kept.keep_idx is None


def test_kept_tokens_module_keeps_timm_patch_dropout():
    m = vit(patch_drop_rate=0.5).train()
    kept = apply_patch_tickets(m)
    assert type(kept.inner).__name__ == "PatchDropout"
    seen = []
    h = m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    with kept.keep(torch.arange(8)):
        m(torch.randn(2, 3, 16, 16))
    h.remove()
    assert seen == [1 + 4]  # 8 kept, then timm's own PatchDropout keeps half of those
