"""Planner on synthetic cost tables (DP vs brute force, budgets, infeasibility), plan files, config checks,
the ``lotus plan`` command, and single-process ``parallelize`` (checkpointing keeps gradients exact)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lotus.errors import ConfigError, LotusError
from lotus.parallel.config import ParallelConfig, format_bytes, parse_bandwidth, parse_bytes
from lotus.parallel.cost_model import evaluate
from lotus.parallel.cost_table import BlockCost, CostTable, OptionCost, StageCost
from lotus.parallel.plan_file import BlockChoice, Plan, read_plan, uniform_choices, write_plan
from lotus.parallel.planner import PlanInfeasible, brute_force, make_plan, minimum_memory, solve_dp, solve_greedy


def synthetic_table(
    rng: random.Random, n_blocks: int, world: int = 1, offload: bool = False, integer: bool = True
) -> CostTable:
    """Random but ViT-shaped costs: recomputation trades time for memory; blocks differ."""
    r = (lambda a, b: rng.randint(a, b)) if integer else (lambda a, b: rng.uniform(a, b))
    blocks = []
    for _ in range(n_blocks):
        act = r(20, 60)
        fwd = r(2, 6)
        opts = {
            "none": OptionCost(fwd, 2 * fwd, act, r(5, 15)),
            "selective": OptionCost(fwd, 2 * fwd + r(1, 3), act // 2 if integer else act / 2, r(10, 25)),
            "full": OptionCost(fwd, 3 * fwd, r(2, 5), act + r(5, 15)),
        }
        if offload:
            opts["offload"] = OptionCost(fwd + r(1, 4), 2 * fwd + r(1, 4), r(2, 5), act + r(0, 5))
        p = r(8, 20)
        blocks.append(
            BlockCost(
                options=opts,
                param_bytes=p,
                grad_bytes=p,
                output_bytes=r(2, 5),
                allgather_s=r(0, 4),
                reduce_scatter_s=r(0, 4),
                allreduce_s=r(0, 6),
            )
        )
    return CostTable(
        blocks=blocks,
        batch_size=8,
        world_size=world,
        pre=StageCost(1, 1, r(2, 5), r(1, 5), r(2, 6), r(2, 6)),
        post=StageCost(1, 1, r(2, 5), r(1, 5), r(1, 3), r(1, 3)),
        optimizer_state_bytes=r(10, 30),
        optimizer_step_s=r(1, 3),
        optimizer_peak_bytes=r(1, 5),
    )


def _fits(table, mode, choices, budget):
    return evaluate(table, mode, choices).peak_bytes <= budget + 1e-9


CASES = [
    (seed, n, mode, world, offload)
    for seed, (n, mode, world, offload) in enumerate(
        [
            (3, "none", 1, False),
            (4, "none", 1, True),
            (5, "none", 1, False),
            (3, "fsdp", 2, False),
            (4, "fsdp", 4, False),
            (3, "fsdp", 2, True),
            (4, "ddp", 2, False),
            (5, "ddp", 4, False),
        ]
    )
]


@pytest.mark.parametrize("seed,n,mode,world,offload", CASES)
def test_dp_matches_brute_force(seed, n, mode, world, offload):
    rng = random.Random(seed)
    table = synthetic_table(rng, n, world, offload)
    lightest = minimum_memory(table, mode, buckets=4096)
    heaviest = evaluate(table, mode, uniform_choices(n, "none", False)).peak_bytes
    checked = 0
    for budget in sorted(
        {
            int(lightest) + 1,
            int((lightest + heaviest) / 2),
            int(heaviest) + 5,
            int(lightest + (heaviest - lightest) / 4),
        }
    ):
        exact = brute_force(table, mode, budget)
        # Integer costs and one byte per bucket: the DP is exact.
        dp = solve_dp(table, mode, budget, buckets=budget)
        assert (exact is None) == (dp is None), budget
        if exact is None:
            continue
        checked += 1
        assert _fits(table, mode, dp, budget)
        assert evaluate(table, mode, dp).step_time_s == pytest.approx(evaluate(table, mode, exact).step_time_s)
        # Greedy is feasible but never better than the optimum.
        greedy = solve_greedy(table, mode, budget)
        if greedy is not None:
            assert _fits(table, mode, greedy, budget)
            assert evaluate(table, mode, greedy).step_time_s >= evaluate(table, mode, exact).step_time_s - 1e-9
    assert checked >= 2


@pytest.mark.parametrize("seed", range(4))
def test_budget_respected_with_coarse_buckets(seed):
    """Real-valued costs: plans always fit, even with coarse buckets (sizes are rounded up, so a coarse
    DP may only miss plans within a few buckets of the budget), and more memory never makes the plan
    slower."""
    rng = random.Random(100 + seed)
    table = synthetic_table(rng, 8, world=2, integer=False)
    low = minimum_memory(table, "fsdp", buckets=4096)
    high = evaluate(table, "fsdp", uniform_choices(8, "none", False)).peak_bytes * 1.05
    last_time = float("inf")
    found_coarse = 0
    for frac in (0.0, 0.1, 0.3, 0.6, 1.0):
        budget = low * 1.01 + frac * (high - low)
        coarse = solve_dp(table, "fsdp", budget, buckets=64)
        if coarse is not None:
            found_coarse += 1
            assert evaluate(table, "fsdp", coarse).peak_bytes <= budget
        choices = solve_dp(table, "fsdp", budget, buckets=4096)
        assert choices is not None
        pred = evaluate(table, "fsdp", choices)
        assert pred.peak_bytes <= budget
        assert pred.step_time_s <= last_time + 1e-9
        last_time = pred.step_time_s
    assert found_coarse >= 3
    # With room for everything, the fastest assignment is chosen: no recomputation at all.
    roomy = solve_dp(table, "fsdp", high * 10, buckets=256)
    assert all(c.memory == "none" and not c.reshard_after_forward for c in roomy)


def test_plan_prefers_checkpointing_only_where_needed():
    """The DP checkpoints a subset of blocks under a budget between "none" and "all full", and beats
    checkpointing every block on time."""
    table = synthetic_table(random.Random(7), 6, integer=False)
    none = evaluate(table, "none", uniform_choices(6, "none")).peak_bytes
    full = evaluate(table, "none", uniform_choices(6, "full")).peak_bytes
    plan = make_plan(table, (none + full) / 2, buckets=2048)
    assert plan.predicted_peak_bytes <= (none + full) / 2
    mems = [c.memory for c in plan.blocks]
    assert any(m != "none" for m in mems) and any(m != "full" for m in mems)
    assert plan.predicted_step_time_s < evaluate(table, "none", uniform_choices(6, "full")).step_time_s


def test_infeasible_budget_reports_minimum():
    table = synthetic_table(random.Random(3), 4, world=2)
    need = min(
        evaluate(table, "fsdp", list(c)).peak_bytes
        for c in __import__("itertools").product(
            [BlockChoice(m, r) for m in ("none", "selective", "full") for r in (True, False)], repeat=4
        )
    )
    assert minimum_memory(table, "fsdp", buckets=4096) == pytest.approx(need, rel=0.01)
    with pytest.raises(PlanInfeasible) as e:
        make_plan(table, need * 0.9, modes=["fsdp"])
    msg = str(e.value)
    assert "\n" not in msg and "infeasible" in msg and "needs at least" in msg
    assert e.value.min_bytes == pytest.approx(need, rel=0.01)
    assert make_plan(table, need * 1.01, modes=["fsdp"], buckets=4096).predicted_peak_bytes <= need * 1.01


def test_make_plan_picks_faster_mode_and_fsdp_saves_memory():
    table = synthetic_table(random.Random(11), 4, world=4, integer=False)
    ddp = evaluate(table, "ddp", uniform_choices(4, "none"))
    fsdp = evaluate(table, "fsdp", uniform_choices(4, "none"))
    assert fsdp.peak_bytes < ddp.peak_bytes  # sharded parameters, gradients and optimizer state
    plan = make_plan(table, ddp.peak_bytes * 10)
    best = min((evaluate(table, m, solve_dp(table, m, ddp.peak_bytes * 10)).step_time_s, m) for m in ("ddp", "fsdp"))
    assert plan.mode == best[1]
    with pytest.raises(ValueError, match="method"):
        make_plan(table, 1e9, method="annealing")


def test_plan_json_roundtrip_and_errors(tmp_path):
    table = synthetic_table(random.Random(5), 3, world=2, integer=False)
    plan = make_plan(table, 1e9, modes=["fsdp"])
    path = tmp_path / "plan.json"
    write_plan(plan, path)
    back = read_plan(path, num_blocks=3)
    assert back.blocks == plan.blocks and back.mode == "fsdp" and back.world_size == 2
    assert back.predicted_peak_bytes == pytest.approx(plan.predicted_peak_bytes)
    with pytest.raises(LotusError, match="has 4"):
        read_plan(path, num_blocks=4)
    with pytest.raises(LotusError, match="not found"):
        read_plan(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LotusError, match="not valid JSON"):
        read_plan(tmp_path / "bad.json")
    d = json.loads(path.read_text())
    d["blocks"][1]["memory"] = "half"
    (tmp_path / "opt.json").write_text(json.dumps(d))
    with pytest.raises(LotusError, match=r"blocks\[1\]\.memory"):
        read_plan(tmp_path / "opt.json")


def test_parse_sizes():
    assert parse_bytes("8GiB") == 8 * 2**30
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("2g") == 2 * 2**30
    assert parse_bytes(4096) == 4096
    assert parse_bandwidth("25GB/s") == 25e9
    assert format_bytes(3 * 2**30) == "3.00 GiB"
    for bad in ("eight", "8 parsecs", "-1GiB", "0", ""):
        with pytest.raises(ValueError, match="expected"):
            parse_bytes(bad, "--memory-budget")


@pytest.mark.parametrize(
    "section,match",
    [
        ({"mode": "auto"}, "parallel.mode: 'auto' needs"),
        ({"mode": "ddp", "cpu_offload": True}, "parallel.cpu_offload"),
        ({"mode": "none", "mixed_precision": True}, "parallel.mixed_precision"),
        ({"mode": "auto", "memory_budget": "lots"}, "parallel.memory_budget: expected a size"),
        ({"activation_checkpoint": "full", "offload_activations": True}, "parallel.offload_activations"),
        ({"activation_checkpoint": "full", "blocks": [0, 0]}, "parallel.blocks: duplicate"),
        ({"blocks": [1]}, "parallel.blocks: only used"),
        ({"mode": "fsdp", "bandwidth": "fast"}, "parallel.bandwidth"),
        ({"activation_checkpoint": "sometimes"}, "parallel.activation_checkpoint"),
        ({"mode": "zero3"}, "parallel.mode"),
    ],
)
def test_config_errors(section, match):
    from lotus.config import config_from_dict

    with pytest.raises(ConfigError, match=match) as e:
        config_from_dict({"parallel": section})
    assert "\n" not in str(e.value)


def test_config_default_is_disabled():
    from lotus.config import config_from_dict

    cfg = config_from_dict({})
    assert cfg.parallel.mode == "none" and not cfg.parallel.enabled
    ok = config_from_dict({"parallel": {"mode": "auto", "memory_budget": "2GiB"}})
    assert ok.parallel.budget_bytes == 2 * 2**30
    # A config may carry a plan and a budget and switch modes with --set parallel.mode=...
    carry = config_from_dict(
        {"parallel": {"mode": "fsdp", "plan": "p.json", "memory_budget": "8GiB", "activation_checkpoint": "selective"}}
    )
    assert carry.parallel.plan == "p.json"


# ---------------------------------------------------------------------------------- single process


def _tiny_vit(depth=3):
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=4,
        num_classes=5,
        depth=depth,
        embed_dim=32,
        num_heads=2,
    )


def _grads(model, x, y):
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "kw",
    [
        {"activation_checkpoint": "full"},
        {"activation_checkpoint": "selective", "blocks": [0, 2]},
        {"offload_activations": True},
    ],
)
def test_parallelize_one_process_keeps_gradients(kw):
    from lotus.parallel import DistInfo, parallelize
    from lotus.parallel.strategies import apply_offload

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 5, (6,), generator=g)
    ref = _grads(_tiny_vit(), x, y)
    if kw.get("offload_activations"):
        model = apply_offload(_tiny_vit())  # CPU: the hooks run, nothing needs to move
        with pytest.raises(LotusError, match="offload needs a CUDA device"):
            parallelize(_tiny_vit(), ParallelConfig(**kw), DistInfo())
    else:
        model = parallelize(_tiny_vit(), ParallelConfig(**kw), DistInfo())
        wrapped = [type(b).__name__ for b in model.blocks]
        want = kw.get("blocks", [0, 1, 2])
        assert [i for i, n in enumerate(wrapped) if n == "CheckpointWrapper"] == want
        assert list(model.state_dict()) == list(_tiny_vit().state_dict())  # clean keys
    got = _grads(model, x, y)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_parallelize_rejects_mode_none_on_several_ranks_and_bad_blocks():
    from lotus.parallel import DistInfo, parallelize

    with pytest.raises(LotusError, match="independent models"):
        parallelize(_tiny_vit(), ParallelConfig(), DistInfo(world_size=2, is_main=True))
    with pytest.raises(LotusError, match="parallel.blocks: block 7"):
        parallelize(_tiny_vit(), ParallelConfig(activation_checkpoint="full", blocks=[7]), DistInfo())


def test_parallelize_applies_plan_file(tmp_path):
    from lotus.parallel import DistInfo, get_plan, parallelize

    plan = Plan(mode="none", world_size=1, blocks=[BlockChoice("full"), BlockChoice("none"), BlockChoice("selective")])
    write_plan(plan, tmp_path / "p.json")
    model = parallelize(_tiny_vit(), ParallelConfig(mode="auto", plan=str(tmp_path / "p.json")), DistInfo())
    assert [type(b).__name__ for b in model.blocks] == ["CheckpointWrapper", "Block", "CheckpointWrapper"]
    assert get_plan(model).blocks == plan.blocks
    with pytest.raises(LotusError, match="plans 3 blocks but the model has 2"):
        parallelize(_tiny_vit(depth=2), ParallelConfig(mode="auto", plan=str(tmp_path / "p.json")), DistInfo())


# ----------------------------------------------------------------------------------------- CLI


def _cli(args, capsys):
    from lotus.cli import main

    rc = main(["plan", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_plan_command_from_saved_profile(tmp_path, capsys):
    table = synthetic_table(random.Random(2), 4, world=2, integer=False)
    (tmp_path / "prof.json").write_text(json.dumps(table.to_dict()))
    need = minimum_memory(table, "fsdp")
    rc, out, err = _cli(
        [
            "--profile",
            str(tmp_path / "prof.json"),
            "--memory-budget",
            f"{int(need * 1.2)}",
            "--mode",
            "fsdp",
            "--out",
            str(tmp_path / "plan.json"),
        ],
        capsys,
    )
    assert rc == 0, err
    assert "| block | memory option |" in out and "checkpoint every block" in out
    plan = read_plan(tmp_path / "plan.json", num_blocks=4)
    assert plan.mode == "fsdp" and plan.predicted_peak_bytes <= need * 1.2
    rc, out, err = _cli(["--profile", str(tmp_path / "prof.json"), "--memory-budget", f"{int(need * 0.5)}"], capsys)
    assert rc == 2 and err.startswith("error: memory budget") and err.count("\n") == 1
    rc, out, err = _cli(["--profile", str(tmp_path / "prof.json"), "--memory-budget", "lots"], capsys)
    assert rc == 2 and "--memory-budget: expected a size" in err and err.count("\n") == 1
    rc, out, err = _cli(["--profile", str(tmp_path / "nope.json"), "--memory-budget", "1GiB"], capsys)
    assert rc == 2 and "not found" in err


def test_plan_command_profiles_config(tmp_path, capsys):
    import yaml

    cfg = {
        "model": {"name": "lotus_vit_micro", "img_size": 16, "patch_size": 4},
        "data": {"name": "digits", "batch_size": 8},
        "parallel": {"profile_repeats": 1},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    rc, out, err = _cli(
        [
            "--config",
            str(tmp_path / "c.yaml"),
            "--memory-budget",
            "1GiB",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "p.json"),
            "--save-profile",
            str(tmp_path / "prof.json"),
        ],
        capsys,
    )
    assert rc == 0, err
    plan = read_plan(tmp_path / "p.json")
    assert plan.mode == "none" and all(c.memory == "none" for c in plan.blocks)  # 1 GiB: no checkpointing needed
    table = CostTable.from_dict(json.loads((tmp_path / "prof.json").read_text()))
    assert table.batch_size == 8 and set(table.options()) == {"none", "selective", "full"}
    b = table.blocks[0].options
    assert b["full"].retained_bytes < b["selective"].retained_bytes < b["none"].retained_bytes
