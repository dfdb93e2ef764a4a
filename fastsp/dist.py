"""Process-group helpers: one process without torchrun, DDP (gloo on CPU, NCCL on CUDA) with it."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str) -> torch.device:
    """auto -> cuda when available, else cpu; asking for cuda without one is an error."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "--device cuda was requested but torch sees no CUDA device; use --device cpu"
        )
    return torch.device(preference)


def launched_world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE when RANK is set), 1 without it:
    known before the process group starts."""
    return int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ else 1


def init(device_preference: str) -> DistInfo:
    """Join the torchrun process group if RANK is set, else run as the only process."""
    device = pick_device(device_preference)
    if "RANK" not in os.environ:
        return DistInfo(0, 1, 0, device)
    rank, world_size = int(os.environ["RANK"]), launched_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    global _control_group
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        # Host-side agreement (e.g. "stop after this step?") goes over gloo on CPU tensors, so it
        # never waits for the GPU's stream the way an NCCL collective plus .item() would.
        _control_group = torch_dist.new_group(backend="gloo") if backend == "nccl" else None
        # Who is who, once at the start: a rank that dies later is named by `lost_ranks`.
        global _processes
        _processes = [None] * world_size
        torch_dist.all_gather_object(
            _processes, (socket.gethostname(), os.getpid()), group=_control_group
        )
    return DistInfo(rank, world_size, local_rank, device)


_control_group = None
_processes: list[tuple[str, int]] = []  # (host, pid) of each rank


def _process_gone(pid: int) -> bool:
    """Whether process `pid` of this host has ended (a zombie that torchrun has not reaped yet
    has ended too)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def lost_ranks() -> str:
    """The ranks whose process has ended ("rank 1 (pid 123 on host)"), as far as this host can
    see: ranks on other hosts are not checked. Empty when none is known to be gone: a failed
    collective is then not explained by a dead rank here."""
    host = socket.gethostname()
    gone = [
        f"rank {rank} (pid {pid} on {where})"
        for rank, (where, pid) in enumerate(_processes)
        if where == host and pid != os.getpid() and _process_gone(pid)
    ]
    return ", ".join(gone)


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank (a host-side collective)."""
    if not torch_dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX, group=_control_group)
    return bool(value.item())


def shutdown() -> None:
    """Destroy the process group (fastsp.cli.run_command calls it on every way out)."""
    global _control_group, _processes
    _control_group, _processes = None, []
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (in place); the identity in a single process."""
    if torch_dist.is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        tensor /= torch_dist.get_world_size()
    return tensor
