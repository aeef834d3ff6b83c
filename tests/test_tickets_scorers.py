"""data_tickets scorers: shapes, index alignment, determinism, sanity properties, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import data_tickets as dt
from data_tickets.attention import capture_attention, cls_attention

N_CLASSES = 10


class Indexed(Dataset):
    """(image, label, index) items; ``order`` permutes which item sits at which position."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, with_index: bool = True):
        self.x, self.y, self.with_index = x, y, with_index

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return (self.x[i], int(self.y[i]), i) if self.with_index else (self.x[i], int(self.y[i]))


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:600], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target[:600])
    return x, y


@pytest.fixture(scope="module")
def noisy(digits):
    """Digits with 5% of labels flipped to a wrong class."""
    x, y = digits
    rng = np.random.default_rng(0)
    flip = np.sort(rng.choice(len(y), 30, replace=False))
    y2 = y.clone()
    y2[flip] = (y2[flip] + torch.tensor(rng.integers(1, N_CLASSES, flip.size))) % N_CLASSES
    return Indexed(x, y2), flip


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, N_CLASSES))


def micro_vit(seed: int = 0) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    m = VisionTransformer(
        img_size=8, patch_size=2, in_chans=1, num_classes=N_CLASSES, embed_dim=32, depth=2, num_heads=2
    )
    with torch.no_grad():  # sharper attention than a fresh init so scores are not all ~1
        for blk in m.blocks:
            blk.attn.qkv.weight.mul_(4.0)
    return m.eval()


@pytest.fixture(scope="module")
def proxy(noisy):
    ds, _ = noisy
    return dt.make_proxy(mlp, ds, epochs=4, lr=3e-3, batch_size=64)


def precision_at(scores: torch.Tensor, flip: np.ndarray) -> float:
    top = np.argsort(-scores.numpy(), kind="stable")[: flip.size]
    return len(set(top.tolist()) & set(flip.tolist())) / flip.size


@pytest.mark.parametrize("name", ["loss", "el2n", "entropy", "margin", "grand", "prototype"])
def test_single_model_scorers_shape_dtype_determinism(name, digits):
    x, y = digits
    ds = Indexed(x[:120], y[:120])
    torch.manual_seed(0)
    model = micro_vit()
    a = dt.score(model, ds, name, batch_size=32, progress=False)
    b = dt.score(model, ds, name, batch_size=50, progress=False)
    assert a.shape == (120,) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # batch size does not change scores
    assert a.std() > 0


def test_cls_attention_scorer_range_and_rollout(digits):
    x, y = digits
    ds = Indexed(x[:64], y[:64])
    model = micro_vit()
    s = dt.score(model, ds, "cls_attention", progress=False)
    r = dt.score(model, ds, "cls_attention", layer="rollout", progress=False)
    assert s.shape == r.shape == (64,)
    assert bool(((s > 0) & (s <= 1.0 + 1e-6)).all()) and s.std() > 0
    torch.testing.assert_close(s, dt.score(model, ds, "cls_attention", progress=False))
    assert not torch.allclose(s, r)


def test_loss_scores_align_with_dataset_index(digits):
    """Scores land at each item's index, whatever order the dataset enumerates items in."""
    x, y = digits
    x, y = x[:50], y[:50]
    model = mlp().eval()
    with torch.no_grad():
        ref = F.cross_entropy(model(x), y, reduction="none")

    class Reversed(Dataset):
        def __len__(self):
            return 50

        def __getitem__(self, i):
            j = 49 - i
            return x[j], int(y[j]), j

    s = dt.score(model, Reversed(), "loss", batch_size=16, progress=False)
    torch.testing.assert_close(s, ref)
    s2 = dt.score(model, Indexed(x, y, with_index=False), "loss", batch_size=16, progress=False)  # (img, label)
    torch.testing.assert_close(s2, ref)


def test_entropy_and_margin_match_definitions(digits):
    x, y = digits
    x, y = x[:40], y[:40]
    model = mlp().eval()
    with torch.no_grad():
        p = model(x).softmax(-1)
    ent = -(p * p.log()).sum(-1)
    top = p.topk(2, -1).values
    other = p.scatter(1, y[:, None], -1.0).amax(1)
    ds = Indexed(x, y)
    torch.testing.assert_close(dt.score(model, ds, "entropy"), ent, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dt.score(model, ds, "margin"), 1 - (top[:, 0] - top[:, 1]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        dt.score(model, ds, "margin", use_labels=True), other - p.gather(1, y[:, None]).squeeze(1), rtol=1e-4, atol=1e-5
    )
    assert float(ent.max()) <= math.log(N_CLASSES) + 1e-5


def test_scoring_restores_train_mode_and_needs_no_grad(digits):
    x, y = digits
    model = micro_vit().train()
    dt.score(model, Indexed(x[:20], y[:20]), "loss", progress=False)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_grand_vmap_matches_per_sample_loop(digits):
    x, y = digits
    ds = Indexed(x[:24], y[:24])
    model = micro_vit()
    v = dt.score(model, ds, "grand", batch_size=12, progress=False)
    loop = dt.score(model, ds, "grand", method="loop", batch_size=12, progress=False)
    torch.testing.assert_close(v, loop, rtol=1e-3, atol=1e-4)
    plain = dt.score(model, ds, "grand", method="vmap_plain", batch_size=12, progress=False)
    torch.testing.assert_close(plain, loop, rtol=1e-3, atol=1e-4)
    head = dt.score(model, ds, "grand", params="head", batch_size=12, progress=False)
    assert bool((head < v).all())  # a subset of the gradient has a smaller norm
    # head-only gradient of a linear classifier has the closed form ||p - onehot|| * ||[h, 1]||
    with torch.no_grad():
        h = model.forward_head(model.forward_features(x[:24]), pre_logits=True)
        err = model.head(h).softmax(-1) - F.one_hot(y[:24], N_CLASSES).float()
        closed = err.norm(dim=-1) * torch.sqrt(h.pow(2).sum(-1) + 1)
    torch.testing.assert_close(head, closed, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["el2n", "loss", "grand"])
def test_mislabelled_samples_score_highest(name, noisy, proxy):
    ds, flip = noisy
    kw = {"repeats": 2} if name in ("el2n", "loss") else {}
    s = dt.score(None, ds, name, proxy=proxy, progress=False, **kw)
    assert s.shape == (len(ds),)
    # 30 of 600 labels are wrong (5% chance level); the top-30 scores must be mostly those. GraNd also
    # grows with the input norm, so it ranks them less cleanly (still >= 5x chance).
    assert precision_at(s, flip) >= (0.25 if name == "grand" else 0.6), precision_at(s, flip)


def test_el2n_proxy_average_is_deterministic_and_differs_per_seed(noisy, proxy):
    ds, _ = noisy
    a = dt.score(None, ds, "el2n", proxy=proxy, repeats=2, seed=0, progress=False)
    b = dt.score(None, ds, "el2n", proxy=proxy, repeats=2, seed=0, progress=False)
    c = dt.score(None, ds, "el2n", proxy=proxy, repeats=1, seed=5, progress=False)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_forgetting_counts_events_and_flags_mislabelled(noisy, proxy):
    ds, flip = noisy
    s = dt.score(None, ds, "forgetting", proxy=proxy, progress=False)
    assert s.shape == (len(ds),)
    assert bool((s >= 0).all()) and float(s.max()) <= 4  # 4 epochs: <= 3 transitions, or max + 1 if unlearned
    assert torch.equal(s, s.round())
    clean = np.setdiff1d(np.arange(len(ds)), flip)
    assert float(s[flip].mean()) > 3 * float(s[clean].mean())
    torch.testing.assert_close(s, dt.score(None, ds, "forgetting", proxy=proxy, progress=False))


def scripted_proxy(logits_at, epochs: int):
    """A proxy whose model returns ``logits_at(epoch, idx)`` for images that encode their own index, calling
    ``on_epoch_end`` after each of ``epochs`` epochs."""

    class Scripted(nn.Module):
        def __init__(self):
            super().__init__()
            self.epoch = 0
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, images):
            return logits_at(self.epoch, images.flatten(1)[:, 0].long())

    def proxy(seed, on_epoch_end=None):
        m = Scripted()
        for e in range(1, epochs + 1):
            m.epoch = e
            on_epoch_end(m, e)
        return m

    return proxy


def test_forgetting_event_logic_with_scripted_proxy(digits):
    """A scripted proxy whose per-epoch predictions are known: events and never-learned handling."""
    x, y = digits
    x, y = x[:4], y[:4]
    # rows: epochs; columns: samples; 1 = predicted correctly
    script = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1], [0, 0, 1, 1]], dtype=torch.bool)

    def logits_at(epoch, idx):  # the image encodes its own index
        right = F.one_hot(y[idx], N_CLASSES).float()
        wrong = F.one_hot((y[idx] + 1) % N_CLASSES, N_CLASSES).float()
        return torch.where(script[epoch - 1, idx][:, None], right, wrong)

    proxy = scripted_proxy(logits_at, epochs=4)

    xs = torch.arange(4).float().view(4, 1, 1, 1)
    s = dt.score(None, Indexed(xs, y), "forgetting", proxy=proxy, progress=False)
    # sample 0: 1->0, 1->0 = 2 events; 1: never learned -> max + 1 = 3; 2: one event; 3: none
    assert s.tolist() == [2.0, 3.0, 1.0, 0.0]


def test_aum_is_the_negated_margin_averaged_over_epochs(digits):
    """A scripted proxy with known logits per epoch: aum = -(z_y - max other z), averaged over 2 epochs."""
    x, y = digits
    y = y[:3]
    logits = torch.randn(2, 3, N_CLASSES, generator=torch.Generator().manual_seed(0))

    proxy = scripted_proxy(lambda epoch, idx: logits[epoch - 1, idx], epochs=2)

    s = dt.score(None, Indexed(torch.arange(3).float().view(3, 1, 1, 1), y), "aum", proxy=proxy, progress=False)
    zy = logits.gather(2, y.view(1, 3, 1).expand(2, 3, 1)).squeeze(2)
    other = logits.scatter(2, y.view(1, 3, 1).expand(2, 3, 1), float("-inf")).amax(2)
    torch.testing.assert_close(s, -(zy - other).mean(0))


def test_aum_flags_mislabelled(noisy, proxy):
    ds, flip = noisy
    s = dt.score(None, ds, "aum", proxy=proxy, progress=False)
    assert precision_at(s, flip) >= 0.6, precision_at(s, flip)
    with pytest.raises(ValueError, match="needs proxy"):
        dt.score(mlp(), ds, "aum")


def test_prototype_is_label_free_and_flags_outliers(digits):
    """Ten tight blobs plus five points midway between blob pairs: the midpoints are the atypical ones."""
    x, y = digits
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 16, generator=g) * 3
    pts = centers.repeat_interleave(19, 0) + 0.1 * torch.randn(190, 16, generator=g)
    mids = torch.stack([(centers[i] + centers[i + 5]) / 2 for i in range(5)])
    emb = torch.cat([mids, pts]).view(195, 1, 4, 4)
    ds = Indexed(emb, torch.zeros(195, dtype=torch.long))  # labels are not used
    kw = dict(n_clusters=10, normalize=False, embed_fn=lambda m, im: im.flatten(1), progress=False)
    s = dt.score(mlp(), ds, "prototype", **kw)
    assert set(np.argsort(-s.numpy())[:5].tolist()) == {0, 1, 2, 3, 4}
    torch.testing.assert_close(s, dt.score(mlp(), ds, "prototype", **kw))
    s_vit = dt.score(micro_vit(), Indexed(x[:60], y[:60]), "prototype", progress=False)  # timm embeddings, k=#classes
    assert s_vit.shape == (60,) and bool((s_vit >= 0).all())


def test_cls_attention_matches_materialised_attention(digits):
    """Our q/k recomputation equals the weights timm's non-fused path materialises (captured at attn_drop)."""
    x, _ = digits
    model = micro_vit()
    captured = {}
    last = model.blocks[-1].attn
    out_fused = model(x[:8])
    last.fused_attn = False  # reference path only; our helper never touches this flag
    h = last.attn_drop.register_forward_hook(lambda m, i, o: captured.setdefault("a", o.detach()))
    with torch.no_grad():
        out_ref = model(x[:8])
    h.remove()
    torch.testing.assert_close(out_fused, out_ref, rtol=1e-4, atol=1e-5)
    ref = captured["a"].mean(1)[:, 0, 1:]
    ref = ref / ref.sum(-1, keepdim=True)
    got = cls_attention(model, x[:8])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    assert got.shape == (8, 16)
    torch.testing.assert_close(got.sum(-1), torch.ones(8))
    with capture_attention(model, cls_only=False) as store:
        model(x[:2])
    assert sorted(store) == [0, 1] and store[1].shape == (2, 2, 17, 17)
    assert all(len(b.attn._forward_pre_hooks) == 0 for b in model.blocks)  # hooks removed


def test_scorer_errors_are_clear(digits, noisy):
    x, y = digits
    ds = Indexed(x[:10], y[:10])
    with pytest.raises(ValueError, match="scorer: expected one of"):
        dt.score(mlp(), ds, "nope")
    with pytest.raises(ValueError, match="has no option 'bogus'"):
        dt.score(mlp(), ds, "loss", bogus=1)
    with pytest.raises(ValueError, match="needs proxy="):
        dt.score(mlp(), ds, "forgetting")
    with pytest.raises(ValueError, match="repeats=3 needs proxy"):
        dt.score(mlp(), ds, "el2n", repeats=3)
    with pytest.raises(ValueError, match="class token|blocks"):
        dt.score(mlp(), ds, "cls_attention")
    with pytest.raises(ValueError, match="pass a model or a proxy"):
        dt.score(None, ds, "loss")
    with pytest.raises(ValueError, match="method"):
        dt.score(mlp(), ds, "grand", method="fast")

    class BadIndex(Indexed):
        def __getitem__(self, i):
            return self.x[i], int(self.y[i]), i + 100

    with pytest.raises(ValueError, match="out of range"):
        dt.score(mlp(), BadIndex(x[:10], y[:10]), "loss")


def test_register_custom_scorer(digits):
    x, y = digits

    @dt.register_scorer("test_pixel_mean", needs_labels=False)
    def _pm(ctx, scale: float = 1.0):
        return ctx.map(ctx.model, lambda m, b: b.images.flatten(1).mean(1) * scale)

    try:
        s = dt.score(mlp(), Indexed(x[:10], y[:10]), "test_pixel_mean", scale=2.0)
        torch.testing.assert_close(s, x[:10].flatten(1).mean(1) * 2)
    finally:
        dt.SCORERS.pop("test_pixel_mean")


def _plain_sq_norms(model: nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Reference: one autograd backward per sample."""
    out = []
    for i in range(len(y)):
        gs = torch.autograd.grad(
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(params.values()), allow_unused=True
        )
        out.append(sum(g.pow(2).sum() for g in gs if g is not None))
    return torch.stack(out)


class _Shared(nn.Module):
    """A Linear used twice per forward and a weight tied between two Linears (both fall back to the plain
    per-sample gradient), a LayerNorm, and a narrow Linear on 32 tokens (the outer-product branch)."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.norm = nn.Linear(2, 16), nn.Linear(16, 16), nn.LayerNorm(16)
        self.narrow, self.tied_a, self.tied_b = nn.Linear(16, 3), nn.Linear(3, 3), nn.Linear(3, 3)
        self.tied_b.weight = self.tied_a.weight
        self.out = nn.Linear(3, N_CLASSES)

    def forward(self, x):
        h = self.inp(x.flatten(1).reshape(x.shape[0], 32, 2))  # 32 "tokens" of 2 features per sample
        h = self.narrow(self.norm(self.shared(torch.relu(self.shared(h)))))  # 32 tokens > 16 * 3
        return self.out(self.tied_b(torch.tanh(self.tied_a(h))).mean(1))


@pytest.mark.parametrize("select", ["all", "biases", "linear_weights"])
def test_grad_norms_factorised_equal_autograd(digits, select):
    from data_tickets.grad_norms import _linear_units, per_sample_grad_sq_norms

    x, y = digits
    x, y = x[:10], y[:10]
    torch.manual_seed(0)
    for model in (micro_vit(), _Shared()):
        named = {k: v for k, v in model.named_parameters()}
        keep = {
            "all": lambda k: True,
            "biases": lambda k: k.endswith("bias"),
            "linear_weights": lambda k: k.endswith("weight") and named[k].dim() == 2,
        }[select]
        params = {k: v.detach() for k, v in named.items() if keep(k)}
        got = per_sample_grad_sq_norms(model, params, x, y, chunk_size=4)
        ref = _plain_sq_norms(model, {k: named[k] for k in params}, x, y)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
        units = set(_linear_units(model, set(named), x))
        if isinstance(model, _Shared):  # the twice-called and the tied Linears are not factorised
            assert units == {"inp", "narrow", "out"}
        else:
            assert {"blocks.0.attn.qkv", "blocks.1.mlp.fc2", "head"} <= units
        assert not any(m._forward_hooks for m in model.modules())  # hooks removed


def test_grad_norms_rejects_a_forward_that_changes_after_the_shape_pass(digits):
    from data_tickets.grad_norms import per_sample_grad_sq_norms

    class Flaky(nn.Module):  # runs its Linear once in the shape pass (no grad), twice when differentiated
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, N_CLASSES)

        def forward(self, x):
            x = x.flatten(1)
            return self.fc(x) + (self.fc(x) if torch.is_grad_enabled() else 0)

    x, y = digits
    model = Flaky()
    params = {k: v.detach() for k, v in model.named_parameters()}
    with pytest.raises(RuntimeError, match="ran twice"):
        per_sample_grad_sq_norms(model, params, x[:4], y[:4])
    assert not model.fc._forward_hooks
