"""The dry run of one rank of an FSDP2 run (`--parallel fsdp --dry-world-size N`), in one process.

    python -m fastsp.dryrun --preset sd21 --parallel fsdp --dry-world-size 8 --batch-size 128

torchtitan's memory estimation does it this way: a fake process group of N ranks
(torch.testing._internal.distributed.fake_pg: collectives that return at once and move nothing)
stands in for torchrun's, this process is its rank 0, and the run is assembled as the trainer
assembles it (fastsp.training.assembly, whose fastsp.training.parallel.shard calls fully_shard per
block): the dry run's live memory is then rank 0's shards of the weights, gradients, Adam moments,
EMA and frozen perceptual network, plus the blocks FSDP2 all-gathers while they run, plus rank 0's
activations (--batch-size is global: each rank trains on batch / N items).

What FSDP2 needs of torch.cuda that a CPU-only torch lacks is given here (`cuda_streams`):
streams and events order kernels on a GPU; fake tensors have no kernels to order, so they do
nothing. When FSDP2 frees an unsharded block it keeps the buffer for the next all-gather
(free_storage / alloc_storage in torch.distributed.fsdp._fully_shard._fsdp_param resize its
storage to 0 bytes and back), which fastsp.dryrun_memory.LiveMemory counts.
Not counted: the bytes NCCL holds for its collectives, and the caching allocator's per-stream
pools (memory a side stream frees is reused by the compute stream only later), which on a GPU
raise the peak above the live tensors counted here. The dry run's checks (fastsp.dryrun
StepChecks) see a DTensor's ops, not the ops it runs on its local tensors below them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as torch_dist

from fastsp.errors import ConfigError

OPTION = "--dry-world-size"


def pop_world_size(argv: list[str]) -> str | None:
    """Remove `--dry-world-size N` (the dry run's own option) from argv; its value, unparsed."""
    if OPTION not in argv:
        return None
    at = argv.index(OPTION)
    value = argv[at + 1] if at + 1 < len(argv) else ""
    del argv[at : at + 2]
    return value


def check_world_size(parallel: str, value: str | None) -> int:
    """The number of ranks the dry run is rank 0 of: --dry-world-size under --parallel fsdp,
    else 1 (a DDP rank holds what one process holds)."""
    if value is None:
        if parallel == "fsdp":
            raise ConfigError(
                "--parallel fsdp in the dry run needs the number of GPUs to shard over: add "
                f"{OPTION} N (e.g. 8)"
            )
        return 1
    if parallel != "fsdp":
        raise ConfigError(
            f"{OPTION} is the number of GPUs FSDP2 shards over; every DDP rank holds a whole "
            f"replica, so a one-process dry run already measures one: add --parallel fsdp or "
            f"drop {OPTION}"
        )
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{OPTION} {value!r} must be a number of GPUs, 1 or more (e.g. 8)")
    return int(value)


class _Event:
    """torch.cuda.Event of the dry run: nothing to wait for."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None) -> _Event:
        return self

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _Stream:
    """torch.cuda.Stream of the dry run: FSDP2's all-gather, copy-in and reduce-scatter streams
    on the one fake device, with nothing to order."""

    def __init__(self, device=None, priority: int = 0, **kwargs):
        self.device = torch.device("cuda", 0)
        self.priority = priority

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> _Event:
        return event or _Event()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


@contextlib.contextmanager
def cuda_streams() -> Iterator[None]:
    """The torch.cuda calls FSDP2 makes (torch.distributed.fsdp._fully_shard: its streams,
    events and current device, and torch.accelerator's current stream), which a CPU-only torch
    refuses, for the dry run's one fake GPU."""
    default = _Stream()
    fakes = [
        (torch.cuda, "Stream", _Stream),
        (torch.cuda, "Event", _Event),
        (torch.cuda, "current_device", lambda: 0),
        (torch.cuda, "current_stream", lambda device=None: default),
        (torch.cuda, "stream", lambda stream: contextlib.nullcontext()),
        (torch.cuda, "synchronize", lambda device=None: None),
        (torch.accelerator, "current_stream", lambda device=None: default),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in fakes]
    for module, name, fake in fakes:
        setattr(module, name, fake)
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


@contextlib.contextmanager
def fake_ranks(world_size: int) -> Iterator[None]:
    """This process as rank 0 of `world_size` (a fake process group, which
    fastsp.cli.run_command's fastsp.dist.shutdown destroys), FSDP2's torch.cuda calls answered."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch_dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        with cuda_streams():
            yield
    finally:
        torch_dist.destroy_process_group()
