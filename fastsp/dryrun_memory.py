"""What the dry run (fastsp.dryrun) counts as memory: the bytes of live CUDA tensor storages.

Counted per storage, so views share theirs, from the op that makes it until it is freed (its
Python object dies) or resized: FSDP2 frees and re-allocates its unsharded parameters by
resizing their storages (free_storage / alloc_storage in
torch.distributed.fsdp._fully_shard._fsdp_param), not through an op a dispatch mode sees, which
is why `storage_resizes` reports them. torch's own FSDPMemTracker
(torch.distributed._tools.mem_tracker) counts the same way; it needs a real CUDA device.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves


class LiveMemory:
    """The bytes of CUDA tensor storages alive, and their peak: every op's outputs are counted
    once per storage (views share theirs) until the storage is freed or resized (`resized`).
    A tensor subclass (FSDP2's DTensor) counts the storages of the tensors it wraps: its own
    ops on them run below the dry run's dispatch mode (fastsp.dryrun.StepChecks, which calls
    `observe` after every op), unseen."""

    def __init__(self):
        self.live = 0
        self.peak = 0
        self._bytes: dict[int, int] = {}  # each counted storage's size

    def reset_peak(self) -> None:
        self.peak = self.live

    def _freed(self, key: int) -> None:
        self.live -= self._bytes.pop(key)

    def resized(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        if storage._cdata in self._bytes:
            self.live += nbytes - self._bytes[storage._cdata]
            self._bytes[storage._cdata] = nbytes
            self.peak = max(self.peak, self.live)

    def _count(self, t) -> None:
        if is_traceable_wrapper_subclass(t):
            for name in t.__tensor_flatten__()[0]:
                self._count(getattr(t, name))
        elif (
            isinstance(t, torch.Tensor)
            and t.is_cuda
            and t.untyped_storage()._cdata not in self._bytes
        ):
            storage = t.untyped_storage()
            self._bytes[storage._cdata] = storage.nbytes()
            self.live += storage.nbytes()
            weakref.finalize(storage, self._freed, storage._cdata)

    def observe(self, func, args, kwargs, out) -> None:
        """Count the outputs of one op (called by the dry run's one dispatch mode)."""
        for t in tree_leaves(out):
            self._count(t)
        self.peak = max(self.peak, self.live)


@contextlib.contextmanager
def storage_resizes(resized: Callable[[torch.UntypedStorage, int], None]) -> Iterator[None]:
    """Call `resized(storage, nbytes)` before every UntypedStorage.resize_ (FSDP2 frees and
    re-allocates its unsharded parameters that way, not through an op a dispatch mode sees)."""
    original = torch.UntypedStorage.resize_

    def resize_(storage, nbytes):
        resized(storage, int(nbytes))
        return original(storage, nbytes)

    torch.UntypedStorage.resize_ = resize_
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = original
