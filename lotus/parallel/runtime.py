"""Process-group set-up from the ``torchrun`` environment.

One process without ``torchrun`` is a world of size 1 and needs no process group. Under ``torchrun``
(``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) we initialise ``nccl`` on CUDA and ``gloo`` on CPU and build
an explicit 1-D :class:`~torch.distributed.device_mesh.DeviceMesh` of the matching device type, which
FSDP2's ``fully_shard`` shards over.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lotus.errors import LotusError, RankError

__all__ = ["DistInfo", "init_distributed", "single_process_mesh", "destroy", "launched_by_torchrun"]


@dataclass
class DistInfo:
    """Where this process sits in the job and which device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    is_main: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    mesh: DeviceMesh | None = None  # set when world_size > 1 (FSDP2 shards over it)


def launched_by_torchrun() -> bool:
    """True when the torchrun/elastic environment variables are present."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def _env_int(name: str) -> int:
    """An integer torchrun variable, or a one-line error naming it."""
    raw = os.environ.get(name, "")
    try:
        return int(raw)
    except ValueError:
        raise LotusError(f"environment variable {name}: expected an integer (set by torchrun), got {raw!r}") from None


def _pick_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    """This rank's device from ``train.device`` (``auto``: CUDA when available) and its local rank."""
    if isinstance(device, torch.device):
        return device
    want = (device or "auto").lower()
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LotusError("train.device: 'cuda' requested but no CUDA device is available; use 'cpu' or 'auto'")
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise RankError(  # only the ranks past the visible devices see it: each prints it
                f"LOCAL_RANK {local_rank}: only {n} CUDA device(s) visible; use --nproc_per_node <= {n}"
            )
        return torch.device("cuda", local_rank)
    if want == "cpu":
        return torch.device("cpu")
    raise LotusError(f"device: expected 'auto', 'cpu' or 'cuda', got {device!r}")


def init_distributed(
    device: str | torch.device | None = "auto", backend: str = "auto", timeout_s: float = 1800.0
) -> DistInfo:
    """Read the torchrun environment, initialise the process group and return this rank's :class:`DistInfo`.

    Without torchrun (or with ``WORLD_SIZE=1``) no process group is created and the result describes a
    single process. Calling it again when the group already exists returns the same description.
    """
    if not launched_by_torchrun() or _env_int("WORLD_SIZE") <= 1:
        dev = _pick_device(device, 0)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(device=dev)
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    dev = _pick_device(device, local)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise LotusError("parallel.backend: 'nccl' needs CUDA devices; use 'gloo' (or 'auto') on CPU")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                backend=backend,
                timeout=datetime.timedelta(seconds=timeout_s),
                device_id=dev if dev.type == "cuda" else None,
            )
        except (RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RankError(
                f"could not initialise the {backend} process group (rank {rank}/{world}): {first}"
            ) from None
    mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    return DistInfo(
        rank=rank, world_size=world, local_rank=local, is_main=rank == 0, device=dev, backend=backend, mesh=mesh
    )


def single_process_mesh(device: torch.device) -> DeviceMesh:
    """A one-rank process group and device mesh for FSDP2 in a single process (e.g. one GPU with
    ``cpu_offload``: parameters, gradients and optimizer state in host memory). Reuses an existing group."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            store=dist.HashStore(),
            rank=0,
            world_size=1,
            device_id=device if device.type == "cuda" else None,
        )
    if dist.get_world_size() != 1:
        raise LotusError("parallel: a process group with several ranks exists; use init_distributed()")
    return init_device_mesh(device.type, (1,), mesh_dim_names=("dp",))


def destroy() -> None:
    """Tear down the process group if this process created one (safe to call more than once)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears down gloo while a peer still has collectives in flight
        dist.destroy_process_group()
