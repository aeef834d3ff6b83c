"""DDP and FSDP2 (+ checkpointing, per-block plans) on CPU/gloo in 2 processes match one-process training.

One ``torchrun --nproc_per_node 2`` launch (this file run as a script) trains a tiny ViT for a few
steps under each configuration on half of every batch per rank; the pytest side trains the same model
on the full batches in one process and compares per-step losses and final weights. The workers also
save full state dicts (gathered from FSDP shards) that the pytest side loads into a plain model, and
resume a one-process state at world size 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

STEPS = 3
BATCH = 8  # global batch; each of the 2 ranks takes 4
CASES = {
    "ddp": {"mode": "ddp"},
    "fsdp": {"mode": "fsdp"},
    "fsdp_ac_full_zero2": {"mode": "fsdp", "activation_checkpoint": "full", "reshard_after_forward": False},
    "fsdp_selective_block1": {"mode": "fsdp", "activation_checkpoint": "selective", "blocks": [1]},
    "ddp_ac_full": {"mode": "ddp", "activation_checkpoint": "full"},
    "auto_plan": {"mode": "auto"},  # plan file written by the test: mixed per-block choices under FSDP
}


def make_model() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=4,
        num_classes=5,
        depth=2,
        embed_dim=32,
        num_heads=2,
        in_chans=3,
    )


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, BATCH, 3, 16, 16, generator=g), torch.randint(0, 5, (STEPS, BATCH), generator=g)


def train_steps(model, opt, xs, ys, rank: int = 0, world: int = 1) -> list[float]:
    """STEPS optimizer steps; each rank takes its contiguous slice of every batch; returns global losses."""
    import torch.distributed as dist

    losses = []
    per = BATCH // world
    for x, y in zip(xs, ys):
        xb, yb = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        val = loss.detach().clone()
        if world > 1:
            dist.all_reduce(val)
            val /= world
        losses.append(float(val))
    return losses


def worker(out_dir: str, plan_path: str) -> None:
    from lotus.parallel import get_full_state, init_distributed, parallelize, set_full_state
    from lotus.parallel.config import ParallelConfig

    torch.set_num_threads(1)
    info = init_distributed(device="cpu")
    assert info.world_size == 2 and info.mesh is not None and info.backend == "gloo"
    xs, ys = make_data()
    results = {}
    for name, kw in CASES.items():
        kw = dict(kw, plan=plan_path) if kw["mode"] == "auto" else kw
        model = parallelize(make_model(), ParallelConfig(**kw), info)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        results[name] = train_steps(model, opt, xs, ys, info.rank, info.world_size)
        model_sd, optim_sd = get_full_state(model, opt)
        if info.is_main:
            torch.save({"model": model_sd, "optim": optim_sd}, os.path.join(out_dir, f"{name}.pt"))
    # Resume at another world size: a one-process state (written by pytest) continues under FSDP on 2 ranks.
    state = torch.load(os.path.join(out_dir, "single_state.pt"), weights_only=True)
    model = parallelize(make_model(), ParallelConfig(mode="fsdp"), info)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    set_full_state(model, opt, state["model"], state["optim"])
    results["resumed_fsdp"] = train_steps(model, opt, xs, ys, info.rank, info.world_size)
    if info.is_main:
        with open(os.path.join(out_dir, "losses.json"), "w") as f:
            json.dump(results, f)
    from lotus.parallel.runtime import destroy

    destroy()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown, where gloo's threads can still abort the process


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    from lotus.parallel import get_full_state
    from lotus.parallel.plan_file import BlockChoice, Plan, write_plan

    out = tmp_path_factory.mktemp("dist")
    plan = Plan(mode="fsdp", world_size=2, blocks=[BlockChoice("full", False), BlockChoice("selective", True)])
    write_plan(plan, out / "plan.json")
    # One-process reference run, and the state the workers resume from (after one extra step).
    torch.manual_seed(0)
    xs, ys = make_data()
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_losses = train_steps(model, opt, xs, ys)
    model_sd, optim_sd = get_full_state(model, opt)
    torch.save({"model": model_sd, "optim": optim_sd}, out / "single_state.pt")
    resumed_ref = train_steps(model, opt, xs, ys)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        __file__,
        "--worker",
        str(out),
        str(out / "plan.json"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "losses.json") as f:
        losses = json.load(f)
    return {"dir": out, "losses": losses, "ref": ref_losses, "ref_state": model_sd, "resumed_ref": resumed_ref}


@pytest.mark.parametrize("case", list(CASES))
def test_losses_match_single_process(dist_run, case):
    got, ref = dist_run["losses"][case], dist_run["ref"]
    assert len(got) == STEPS
    assert got[0] == pytest.approx(ref[0], rel=1e-5, abs=1e-6)  # same init on every rank
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-5)
    assert ref[-1] < ref[0]  # the run actually trains


@pytest.mark.parametrize("case", ["ddp", "fsdp", "auto_plan"])
def test_full_state_from_two_ranks_loads_into_plain_model(dist_run, case):
    """Rank-agnostic state: FSDP shards / DDP replicas gathered on rank 0, loaded into one process."""
    from lotus.parallel import set_full_state

    saved = torch.load(dist_run["dir"] / f"{case}.pt", weights_only=True)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    set_full_state(model, opt, saved["model"], saved["optim"])
    # The two-rank model after STEPS steps equals the one-process model after STEPS steps.
    ref = make_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    xs, ys = make_data()
    train_steps(ref, ref_opt, xs, ys)
    for (k, a), (k2, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert len(opt.state) == len(list(model.parameters()))
    # Training continues identically from the restored optimizer state.
    assert train_steps(model, opt, xs, ys) == pytest.approx(train_steps(ref, ref_opt, xs, ys), rel=1e-3, abs=1e-4)


def test_resume_one_process_state_on_two_ranks(dist_run):
    assert dist_run["losses"]["resumed_fsdp"] == pytest.approx(dist_run["resumed_ref"], rel=1e-4, abs=1e-5)


if __name__ == "__main__" and "--worker" in sys.argv:
    i = sys.argv.index("--worker")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    worker(sys.argv[i + 1], sys.argv[i + 2])


_ONE_RANK = r"""
import torch, torch.nn.functional as F, sys
sys.path.insert(0, sys.argv[1])
from test_parallel_dist import make_model, make_data, train_steps
from lotus.parallel import DistInfo, parallelize, get_full_state
from lotus.parallel.config import ParallelConfig
from lotus.parallel.runtime import single_process_mesh, destroy
from lotus.parallel.strategies import apply_fsdp
torch.set_num_threads(1)
xs, ys = make_data()
model = apply_fsdp(make_model(), single_process_mesh(torch.device("cpu")), [True, False])
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
print(train_steps(model, opt, xs, ys))
sd, _ = get_full_state(model, opt)
assert all(type(v) is torch.Tensor for v in sd.values())
destroy()
"""


def test_fsdp_on_one_rank_group_matches(dist_run):
    """FSDP2 on a one-process group (what one GPU with cpu_offload uses) trains exactly like plain."""
    proc = subprocess.run(
        [sys.executable, "-c", _ONE_RANK, os.path.dirname(os.path.abspath(__file__))],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = json.loads(proc.stdout.strip().splitlines()[-1])
    assert losses == pytest.approx(dist_run["ref"], rel=1e-5, abs=1e-6)


def test_gathered_masked_state_folds_to_the_plain_keys():
    """FSDP2 gathers parametrized tensors as ``parametrizations.w.original`` + ``.0.mask``; the weights file
    must hold what export_state_dict writes for a plain model (masks folded, plain keys)."""
    import torch
    from torch import nn
    from torch.nn.utils import parametrize

    from lotus.parallel.full_state import fold_parametrized_state
    from lotus.weights import export_state_dict
    from pruning.masks import WeightMask

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    parametrize.register_parametrization(model[0], "weight", WeightMask(torch.rand(3, 4) > 0.5))
    raw = model.state_dict()
    assert "0.parametrizations.weight.original" in raw and "0.parametrizations.weight.0.mask" in raw
    folded, plain = fold_parametrized_state(raw), export_state_dict(model)
    assert folded.keys() == plain.keys()
    for k in plain:
        torch.testing.assert_close(folded[k], plain[k], atol=0, rtol=0)
    with pytest.raises(ValueError, match="cannot fold"):
        fold_parametrized_state({"0.parametrizations.weight.0.scale": torch.ones(1)})
