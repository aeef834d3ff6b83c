"""User errors vs internal errors at the CLI boundary, errors that name their culprit, torchrun reporting, and
the kept-token module on every timm family with a ``patch_drop`` slot."""

from __future__ import annotations

import copy
import errno
import importlib
import inspect
import os
import pkgutil
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import TINY

from data_tickets import apply_patch_tickets
from data_tickets.kept_tokens import KeptPatchTokens, _families
from lotus.cli import main, report_error
from lotus.errors import ConfigError, LotusError, RankError, describe, library_error
from lotus.training import Trainer

SMALL = copy.deepcopy(TINY)
SMALL["data"].update(limit_train=64, eval_batch_size=256)
SMALL["train"].update(epochs=1)

_SUFFIX = "(a bug in Lotus; rerun with --debug for the traceback)"


@pytest.fixture
def small_yaml(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return path


# ------------------------------------------------------------------------------------ classification
@pytest.mark.parametrize(
    "exc, code, text",
    [
        (ConfigError("train.epochs: expected int >= 1, got 0"), 2, "error: train.epochs: expected int >= 1, got 0"),
        (LotusError("data.root: a\nsecond line"), 2, "error: data.root: a"),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "runs/x/a.yaml"),
            2,
            "error: runs/x/a.yaml: No such file or directory",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/ro/metrics.jsonl"),
            2,
            "error: /ro/metrics.jsonl: Permission denied",
        ),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "runs/x"), 2, "error: runs/x: Is a directory"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "file/x"), 2, "error: file/x: Not a directory"),
        (
            OSError(errno.ENOSPC, "No space left on device", "runs/x/state.pt"),
            2,
            "error: runs/x/state.pt: No space left on device",
        ),
        (
            FileNotFoundError("no filename attached"),
            1,
            f"internal error: FileNotFoundError: no filename attached {_SUFFIX}",
        ),
        (OSError("socket closed"), 1, f"internal error: OSError: socket closed {_SUFFIX}"),
        (ValueError("shapes do not match\nmore"), 1, f"internal error: ValueError: shapes do not match {_SUFFIX}"),
        (RuntimeError(""), 1, f"internal error: RuntimeError: RuntimeError {_SUFFIX}"),
        (KeyError("epoch"), 1, f"internal error: KeyError: 'epoch' {_SUFFIX}"),
        (TypeError("bad operand"), 1, f"internal error: TypeError: bad operand {_SUFFIX}"),
    ],
)
def test_describe_user_vs_internal(exc, code, text):
    assert describe(exc) == (code, text)


def test_library_error_names_the_key():
    keys = {"heads": "pruning.structured.heads"}
    e = library_error(ValueError("heads: 0.9 would remove all 2 heads of blocks.0.attn"), keys, "pruning.structured")
    assert (
        isinstance(e, LotusError)
        and str(e) == "pruning.structured.heads: 0.9 would remove all 2 heads of blocks.0.attn"
    )
    e = library_error(ValueError("structured pruning does not support X"), keys, "pruning.structured")
    assert str(e) == "pruning.structured: structured pruning does not support X"


# ------------------------------------------------------------------------------------ internal errors
def _boom(exc: BaseException):
    def fit(self):
        raise exc

    return fit


@pytest.mark.parametrize(
    "exc, line",
    [
        (RuntimeError("boom\nline 2"), "RuntimeError: boom"),
        (ValueError("boom"), "ValueError: boom"),  # a ValueError from inside Lotus is a bug, not bad input
        (KeyError("boom"), "KeyError: 'boom'"),
    ],
)
def test_internal_error_is_exit_1_and_says_so(monkeypatch, capsys, small_yaml, tmp_path, exc, line):
    monkeypatch.setattr(Trainer, "fit", _boom(exc))
    code = main(["train", "--config", str(small_yaml), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert err == f"internal error: {line} {_SUFFIX}\n"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_traceback(monkeypatch, capsys, small_yaml, tmp_path, where):
    monkeypatch.setattr(Trainer, "fit", _boom(RuntimeError("boom")))
    args = ["train", "--config", str(small_yaml), "--out", str(tmp_path / "run"), "--quiet"]
    code = main(["--debug", *args] if where == "before" else [*args, "--debug"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback (most recent call last)" in err and "RuntimeError: boom" in err
    assert err.strip().splitlines()[-1].startswith("internal error: RuntimeError: boom")
    code = main(["--debug", "train", "--config", str(tmp_path / "nope.yaml")])  # user errors keep exit code 2
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].endswith("config file not found")


def test_user_oserror_from_inside_a_run_names_the_file(monkeypatch, capsys, small_yaml, tmp_path):
    monkeypatch.setattr(
        Trainer, "fit", _boom(PermissionError(errno.EACCES, "Permission denied", "/ro/best.safetensors"))
    )
    code = main(["train", "--config", str(small_yaml), "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 2 and capsys.readouterr().err == "error: /ro/best.safetensors: Permission denied\n"


def test_keyboard_interrupt_is_130(monkeypatch, capsys, small_yaml, tmp_path):
    monkeypatch.setattr(Trainer, "fit", _boom(KeyboardInterrupt()))
    assert main(["train", "--config", str(small_yaml), "--out", str(tmp_path / "run"), "--quiet"]) == 130
    assert capsys.readouterr().err.startswith("error: interrupted")


_PATCHED_MAIN = (
    "import sys; from lotus.training import Trainer; from lotus.cli import main\n"
    "def fit(self): raise RuntimeError('boom')\n"
    "Trainer.fit = fit\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_internal_error_process_exit_code(small_yaml, tmp_path):
    args = ["train", "--config", str(small_yaml), "--out", str(tmp_path / "run"), "--quiet"]
    r = subprocess.run([sys.executable, "-c", _PATCHED_MAIN, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"internal error: RuntimeError: boom {_SUFFIX}"]
    r = subprocess.run(
        [sys.executable, "-c", _PATCHED_MAIN, "--debug", *args], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr


# ------------------------------------------------------------------------------------ torchrun
@pytest.mark.parametrize(
    "rank, exc, printed",
    [
        ("0", ConfigError("train.epochs: bad"), "error: train.epochs: bad"),
        ("1", ConfigError("train.epochs: bad"), None),  # every rank has it: rank 0 says it once
        ("1", RankError("LOCAL_RANK 1: only 1 CUDA device(s) visible"), "error: [rank 1] LOCAL_RANK 1: only 1"),
        ("1", RuntimeError("boom"), "internal error: [rank 1] RuntimeError: boom"),
    ],
)
def test_rank_decides_who_prints(monkeypatch, capsys, rank, exc, printed):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert report_error(exc) == describe(exc)[0]
    err = capsys.readouterr().err
    assert (err == "") if printed is None else (err.startswith(printed) and err.count("\n") == 1)


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_usage_error_under_torchrun_printed_by_rank_0(monkeypatch, capsys, rank, printed):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert ("unrecognized arguments: --bogus" in err) is printed and err.count("\n") == int(printed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_config_error_prints_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**SMALL, "train": {"epochs": "ten"}}))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "lotus",
        "train",
        "--config",
        str(bad),
        "--quiet",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("error:")]
    assert r.returncode != 0
    assert lines == ["error: train.epochs: expected int >= 1, got 'ten'"], r.stdout + r.stderr


# ------------------------------------------------------------------------------------ errors that name the culprit
def _image_folder(root, broken: str) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            os.makedirs(root / split / cls)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    path = root / broken
    path.write_bytes(path.read_bytes()[:60])


@pytest.mark.parametrize("workers", [0, 1])  # torch takes ~5 s per worker to shut down after a worker error
def test_corrupt_image_names_the_file_also_from_loader_workers(tmp_path, capsys, workers):
    _image_folder(tmp_path / "imgs", "train/a/1.png")
    cfg = copy.deepcopy(SMALL)
    cfg["data"] = {"name": "imagefolder", "root": str(tmp_path / "imgs"), "batch_size": 4, "num_workers": workers}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["train", "--config", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: data.root: {tmp_path / 'imgs' / 'train' / 'a' / '1.png'}: not a readable image")


@pytest.mark.parametrize(
    "name, family",
    [
        ("eva02_tiny_patch14_224", "eva02_tiny_patch14_224 is an Eva"),
        ("beit_base_patch16_224", "beit_base_patch16_224 is a Beit"),
        ("vit_relpos_small_patch16_224", "is a VisionTransformerRelPos"),
        ("samvit_base_patch16", "is a VisionTransformerSAM"),
        ("vit_small_patch16_18x2_224", "vit_small_patch16_18x2_224 uses ParallelThingsBlock"),
    ],
)
def test_op_block_on_other_families_names_model_block(name, family):
    from lotus.config import config_from_dict
    from lotus.models import create_model

    cfg = config_from_dict({"model": {"name": name, "block": "op", "img_size": 32}})
    with pytest.raises(ConfigError, match="^model.block: op supports timm VisionTransformer models") as e:
        create_model(cfg.model, 10, 3, 32)
    assert family in str(e.value)


def test_nm_shape_error_names_the_layer():
    from lotus.features.pruning.checks import check_nm_shapes

    narrow = timm.create_model("lotus_vit_micro", embed_dim=10, num_heads=2, mlp_ratio=1.0)
    with pytest.raises(
        LotusError,
        match=r'^pruning.method: "2:4" needs in_features divisible by 4; '
        r"blocks.0.attn.qkv has 10 \(no layer of the 8",
    ):
        check_nm_shapes(narrow, None, 4, 'pruning.method: "2:4"')
    check_nm_shapes(timm.create_model("lotus_vit_micro"), None, 4, "--method 2:4")  # 64 wide: fine


# ------------------------------------------------------------------------------------ patch_drop contracts
_TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=16, num_heads=2, num_classes=3)
SUPPORTED = {  # one tiny model per timm family whose forward calls patch_drop (16 patches each)
    "VisionTransformer": ("vit_tiny_patch16_224", {}),
    "VisionTransformerDistilled": ("deit_tiny_distilled_patch16_224", {}),
    "Eva": ("eva02_tiny_patch14_224", {}),
    "Eva (mixed rope)": ("vit_small_patch16_rope_mixed_224", {}),
}
REFUSED = {
    "VisionTransformerSAM": ("samvit_base_patch16", {"window_size": 2, "global_attn_indexes": [1]}),
    "NaFlexVit": ("naflexvit_base_patch16_gap", {"patch_size": 8}),
}


def _slot_classes() -> set[str]:
    """Every timm model class whose __init__ (or a base's) fills a ``patch_drop`` slot."""
    found = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's deprecated alias modules warn on import
        modules = [
            importlib.import_module(f"timm.models.{m.name}")
            for m in pkgutil.iter_modules(timm.models.__path__)
            if not m.name.startswith("_")
        ]
    for mod in modules:
        for cls in vars(mod).values():
            if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module) and cls.__module__ == mod.__name__):
                continue
            for base in cls.__mro__[:-1]:
                try:
                    src = inspect.getsource(base.__init__)
                except (OSError, TypeError):
                    continue
                if "self.patch_drop =" in src:
                    found.add(cls.__name__)
                    break
    return found


def test_every_timm_family_with_a_patch_drop_slot_is_covered():
    covered = {k.split(" ")[0] for k in SUPPORTED} | set(REFUSED)
    assert _slot_classes() <= covered, "a timm family with a patch_drop slot has no kept-token test"
    assert {cls.__name__ for cls, _ in _families()} <= covered | {"VisionTransformer"}


def _build(name: str, extra: dict) -> torch.nn.Module:
    kw = dict(_TINY_VIT, **extra)
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw)


@pytest.mark.parametrize("family", list(SUPPORTED))
def test_kept_tokens_run_on_prefix_plus_k_tokens(family):
    name, extra = SUPPORTED[family]
    model = _build(name, extra)
    kept = apply_patch_tickets(model)
    assert isinstance(model.patch_drop, KeptPatchTokens) and apply_patch_tickets(model) is kept
    n, npt = model.patch_embed.num_patches, int(model.num_prefix_tokens)
    x = torch.randn(3, 3, 32, 32)
    seen: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for b in model.blocks]
    keep = torch.stack(
        [torch.randperm(n, generator=torch.Generator().manual_seed(i))[:5].sort().values for i in range(3)]
    )
    model.train()
    with kept.keep(keep):
        loss = model(x).logsumexp(-1).sum()
    loss.backward()
    assert seen == [npt + 5] * len(model.blocks)
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    seen.clear()
    model.eval()
    with torch.no_grad():
        full = model(x)
        assert seen == [npt + n] * len(model.blocks)  # no keep set: every token
        # every patch, shuffled: the same logits only if position (and rotary) embeddings travel with them
        perm = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(9 + i)) for i in range(3)])
        with kept.keep(perm):
            shuffled = model(x)
    for h in hooks:
        h.remove()
    assert torch.allclose(shuffled, full, atol=1e-5)


def test_eva_random_patch_dropout_composes_with_kept_tokens():
    model = _build("eva02_tiny_patch14_224", {"patch_drop_rate": 0.5})
    kept = apply_patch_tickets(model)
    keep = torch.tensor([[0, 2, 4, 6, 8, 10, 12, 14]] * 2)
    x = torch.randn(2, 16, 16)
    with kept.keep(keep):
        out, idx = kept(torch.cat([torch.zeros(2, 1, 16), x], dim=1))
    assert out.shape == (2, 1 + 4, 16) and idx.shape == (2, 4)
    assert set(idx.flatten().tolist()) <= set(range(0, 16, 2))  # indices into the patch grid, among the kept
    model.train()
    with kept.keep(keep):
        model(torch.randn(2, 3, 32, 32)).sum().backward()


@pytest.mark.parametrize("family", list(REFUSED))
def test_unsupported_families_are_refused_naming_the_class(family):
    name, extra = REFUSED[family]
    model = _build(name, extra)
    with pytest.raises(ValueError, match=f"^apply_patch_tickets: {family} is not supported"):
        apply_patch_tickets(model)


def test_forward_kept_tokens_refuses_eva():
    from data_tickets.kept_tokens import forward_kept_tokens

    with pytest.raises(ValueError, match="forward_kept_tokens: Eva is not supported"):
        forward_kept_tokens(_build("eva02_tiny_patch14_224", {}), torch.randn(1, 3, 32, 32), torch.arange(4))


def test_patch_ticket_training_on_eva_and_refusal_of_sam(tmp_path, capsys):
    cfg = copy.deepcopy(SMALL)
    cfg["model"] = {
        "name": "eva02_tiny_patch14_224",
        "img_size": 16,
        "patch_size": 4,
        "kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2},
    }
    cfg["tickets"] = {"patches": {"enabled": True, "scorer": "random", "keep_rate": 0.5}}
    path = tmp_path / "eva.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "eva"), "--quiet"]) == 0, (
        capsys.readouterr().err
    )
    metrics = (tmp_path / "eva" / "metrics.jsonl").read_text()
    assert '"patch_kept": 8' in metrics
    cfg["model"] = {
        "name": "samvit_base_patch16",
        "img_size": 16,
        "patch_size": 4,
        "kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2, "window_size": 2, "global_attn_indexes": [0]},
    }
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "sam"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tickets.patches: apply_patch_tickets: VisionTransformerSAM is not supported")
    assert err.count("\n") == 1


def test_parallel_plan_on_a_model_without_blocks_names_the_key():
    from lotus.parallel.apply import parallelize
    from lotus.parallel.config import ParallelConfig
    from lotus.parallel.runtime import DistInfo

    with pytest.raises(LotusError, match="^parallel.mode: ddp is not supported for this model: Linear: expected"):
        parallelize(torch.nn.Linear(2, 2), ParallelConfig(mode="ddp"), DistInfo())
