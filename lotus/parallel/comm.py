"""Communication costs for the planner: measured collectives, or a ring model without a process group.

With a process group of more than one rank, the all-gather / reduce-scatter (FSDP) and all-reduce (DDP)
of each block's parameter bytes are timed with the real collectives. Without one (``lotus plan
--world-size 4`` on a laptop) a ring model is used: ``(W-1)/W * bytes / bandwidth + (W-1) * latency``
per all-gather or reduce-scatter and twice that for an all-reduce, with ``bandwidth`` from
``--bandwidth`` / ``parallel.bandwidth`` or a device default (CUDA 50 GB/s: a conservative
NVLink/InfiniBand figure; CPU/gloo 2 GB/s).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lotus.parallel.measure import median_time

__all__ = ["comm_costs", "DEFAULT_BANDWIDTH", "DEFAULT_LATENCY"]

DEFAULT_BANDWIDTH = {"cuda": 50e9, "cpu": 2e9}  # bytes/s used by the ring model without a process group
DEFAULT_LATENCY = {"cuda": 20e-6, "cpu": 100e-6}  # seconds per ring step


def comm_costs(
    nbytes: float,
    world_size: int,
    device: torch.device,
    bandwidth: float | None = None,
    measure: bool = True,
    repeats: int = 3,
) -> tuple[float, float, float, str]:
    """(all-gather s, reduce-scatter s, all-reduce s, source) for ``nbytes`` of full parameters.

    Measured with the real collectives when a process group with ``world_size`` ranks exists (a
    collective: every rank must call this with the same sizes), else the ring model.
    """
    if world_size <= 1:
        return 0.0, 0.0, 0.0, "none"
    if (
        measure
        and bandwidth is None
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() == world_size
    ):
        n = max(1, int(nbytes) // 4 // world_size)
        shard = torch.ones(n, dtype=torch.float32, device=device)
        full = torch.empty(n * world_size, dtype=torch.float32, device=device)

        def ag():
            dist.all_gather_into_tensor(full, shard)

        def rs():
            dist.reduce_scatter_tensor(shard, full)

        def ar():
            dist.all_reduce(full)

        out = []
        for fn in (ag, rs, ar):
            fn()  # warm-up / connection set-up
            dist.barrier()
            out.append(median_time(fn, repeats, device, best=True))
        return out[0], out[1], out[2], "measured"
    bw = bandwidth or DEFAULT_BANDWIDTH.get(device.type, DEFAULT_BANDWIDTH["cpu"])
    lat = DEFAULT_LATENCY.get(device.type, DEFAULT_LATENCY["cpu"])
    step = (world_size - 1) / world_size * nbytes / bw + (world_size - 1) * lat
    return step, step, 2 * step, f"ring model at {bw / 1e9:.1f} GB/s"
