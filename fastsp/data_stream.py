"""The sharded, resumable batch stream that training reads: which keys each step gets, on each rank.

The data sets themselves live in fastsp.data (and fastsp.latent_shards); this module only decides
the order they are read in, so determinism and resume rest on it alone.

The stream: training reads one infinite sequence of keys, the concatenation of per-epoch
permutations `perm_e = randperm(N)` drawn from a generator seeded by a hash of `(seed, e)`; the
flip bit of each position is drawn from the same generator. Nothing depends on worker RNG, the
world size or how many steps ran before.

Sharding: step `s` covers stream positions `[s*B, (s+1)*B)` for the global batch `B`; rank `r`
of `W` takes the contiguous slice `[r*B/W, (r+1)*B/W)`. Concatenating the ranks' slices gives the
one-process batch, so a run's data does not change with the number of GPUs.

Resume: a step's keys are a pure function of `(seed, N, B, step)`, so starting the sampler at
`start_step = k` (from a checkpoint) continues mid-epoch exactly where step `k` of an
uninterrupted run would be; only the current epoch's permutation is computed and cached.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from fastsp import preemption
from fastsp.run_folder import RunLock

__all__ = ["InMemoryLoader", "ShardedBatchSampler", "make_loader"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix(*values: int) -> int:
    """A 63-bit generator seed from a tuple of ints (nearby tuples give unrelated seeds)."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (v & _MASK64))
    return h >> 1


class ShardedBatchSampler(Sampler):
    """Infinite, deterministic, rank-sharded and resumable stream of batches of keys (index, flip).

    Yields, for steps `start_step, start_step + 1, ...`, this rank's `global_batch // world_size`
    keys: the slice `[rank*b, (rank+1)*b)` of stream positions `[step*B, (step+1)*B)`, where the
    stream is the concatenation of per-epoch permutations (see the module docstring).
    """

    def __init__(
        self,
        dataset_len: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_step: int = 0,
    ):
        if dataset_len < 1:
            raise ValueError(f"dataset_len must be >= 1, got {dataset_len}")
        if global_batch < 1 or world_size < 1:
            raise ValueError(
                f"global_batch and world_size must be >= 1, got {global_batch} and {world_size}"
            )
        if global_batch % world_size:
            raise ValueError(
                f"global_batch {global_batch} is not divisible by world_size {world_size}; "
                f"pick a global batch that is a multiple of the number of processes"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.dataset_len = dataset_len
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_step = start_step
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def epoch(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Epoch `e`'s permutation [N] int64 and flip bits [N] bool (cached while in use)."""
        if e not in self._cache:
            g = torch.Generator().manual_seed(_mix(self.seed, e))
            perm = torch.randperm(self.dataset_len, generator=g)
            flips = torch.randint(0, 2, (self.dataset_len,), generator=g).bool()
            self._cache = {k: v for k, v in self._cache.items() if k > e - 2}
            self._cache[e] = (perm, flips)
        return self._cache[e]

    def step_tensors(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's indices [b] int64 and flip bits [b] bool for training step `step`."""
        n = self.dataset_len
        pos = step * self.global_batch + self.rank * self.local_batch
        end = pos + self.local_batch
        indices, flips = [], []
        while pos < end:
            e, off = divmod(pos, n)
            take = min(end - pos, n - off)
            perm, flip = self.epoch(e)
            indices.append(perm[off : off + take])
            flips.append(flip[off : off + take])
            pos += take
        if len(indices) == 1:
            return indices[0], flips[0]
        return torch.cat(indices), torch.cat(flips)

    def keys(self, step: int) -> list[tuple[int, bool]]:
        """This rank's keys `(index, flip)` for training step `step`."""
        indices, flips = self.step_tensors(step)
        return list(zip(indices.tolist(), flips.tolist(), strict=True))

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        step = self.start_step
        while True:
            yield self.keys(step)
            step += 1


class InMemoryLoader:
    """The loader for in-memory data sets (those with `get_batch`): one gather per step, no
    per-item collation, no workers. Yields exactly what the DataLoader path would."""

    def __init__(self, dataset, batch_sampler: ShardedBatchSampler, pin_memory: bool = False):
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.pin_memory = pin_memory

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        step = self.batch_sampler.start_step
        while True:
            indices, _ = self.batch_sampler.step_tensors(step)  # flip: ignored by these data sets
            batch = self.dataset.get_batch(indices)
            if "bad" not in batch:  # in-memory data has no bad files; the key keeps batches alike
                batch["bad"] = torch.zeros(indices.shape, dtype=torch.int64)
            if self.pin_memory:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            yield batch
            step += 1


def make_loader(
    dataset,
    global_batch: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    start_step: int = 0,
    num_workers: int = 0,
):
    """An endless iterable of this rank's batches, one per training step from `start_step`:
    {"x": [B/W, C, R, R] float32, "label": [B/W] int64, "bad": [B/W] int64 (1 = substituted),
    "context": [B/W, L, D] (if any)}."""
    sampler = ShardedBatchSampler(len(dataset), global_batch, rank, world_size, seed, start_step)
    pin = torch.cuda.is_available()
    if hasattr(dataset, "get_batch"):
        return InMemoryLoader(dataset, sampler, pin_memory=pin)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin,
        persistent_workers=num_workers > 0,
        worker_init_fn=_init_worker,
    )


def _init_worker(worker_id: int) -> None:
    """A worker leaves SIGTERM/SIGINT to the trainer (fastsp.preemption) and lets go of the run
    folder's lock that it inherited (fastsp.run_folder)."""
    preemption.ignore_in_worker()
    RunLock.close_in_child()
