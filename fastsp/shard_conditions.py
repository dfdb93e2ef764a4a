"""A diffusers family's conditions in latent shards besides the context: the pooled prompt
embedding "pooled" [N, P] (SDXL, SD3, Flux) and SDXL's added time ids "time_ids" [N, 6] of each
safetensors shard, the empty prompt's "pooled" [P] (what CFG dropout trains with), and the family
metadata.json names (fastsp.prepare --pipeline writes them; fastsp.family_config lists the
families). Absent keys mean the family does not use them; every shard must agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fastsp.errors import DataError

CONDITION_KEYS = ("pooled", "time_ids")
_TIME_IDS = 6  # SDXL: original (h, w), crop (top, left), target (h, w)


@dataclass(frozen=True)
class FamilyConditions:
    family: str | None  # metadata.json's "family" ("sd" for a prepared folder without one);
    # None for hand-made shards, which do not say
    pooled_dim: int  # P, 0 without "pooled"
    has_time_ids: bool
    null_pooled: torch.Tensor | None  # [P] float32, the empty prompt's (prepared folders)

    @property
    def keys(self) -> tuple[str, ...]:
        """The condition keys each item holds."""
        return ("pooled",) * bool(self.pooled_dim) + ("time_ids",) * self.has_time_ids


def _shapes(path: str) -> tuple[int, dict[str, tuple[int, ...]]]:
    """The latents' N and the shapes of the condition keys of one shard."""
    if not path.endswith(".safetensors"):
        return 0, {}
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        n = f.get_slice("latents").get_shape()[0]
        return n, {k: tuple(f.get_slice(k).get_shape()) for k in CONDITION_KEYS if k in keys}


def read_family_conditions(
    root: str, metadata: dict | None, shards: list[str], empty_prompt: str
) -> FamilyConditions:
    """The conditions of the data set's `shards` (paths, already checked readable), refused
    (DataError) where a shard lacks or misshapes one the others have."""
    found = {path: _shapes(path) for path in shards}
    first_path = shards[0]
    reference = {k: shape[1:] for k, shape in found[first_path][1].items()}
    for path, (n, shapes) in found.items():
        mine = {k: shape[1:] for k, shape in shapes.items()}
        wrong = [k for k, shape in shapes.items() if shape[0] != n]
        if "time_ids" in mine and mine["time_ids"] != (_TIME_IDS,):
            wrong.append("time_ids")
        if "pooled" in mine and len(mine["pooled"]) != 1:
            wrong.append("pooled")
        if mine != reference or wrong:
            raise DataError(
                f"latent shard '{path}' has conditions {_show(shapes)} but '{first_path}' has "
                f"{_show(found[first_path][1])}; every shard needs the same 'pooled' [N, P] and "
                f"'time_ids' [N, {_TIME_IDS}] (or none): prepare the folder again"
            )
    pooled_dim = reference["pooled"][0] if "pooled" in reference else 0
    family = None if metadata is None else metadata.get("family", "sd")
    null_pooled = None
    if pooled_dim and metadata is not None:
        path = os.path.join(root, metadata.get("empty_prompt", empty_prompt))
        from safetensors.torch import load_file

        try:
            null_pooled = load_file(path)["pooled"].float()
        except Exception as e:  # a missing file, a bad header or no "pooled" key
            raise DataError(
                f"cannot read the empty prompt's pooled embedding in '{path}' "
                f"({type(e).__name__}: {e}); prepare the folder again"
            ) from e
        if tuple(null_pooled.shape) != (pooled_dim,):
            raise DataError(
                f"the empty prompt's pooled embedding in '{path}' has shape "
                f"{list(null_pooled.shape)}, the shards' is [{pooled_dim}]; prepare it again"
            )
    return FamilyConditions(family, pooled_dim, "time_ids" in reference, null_pooled)


def _show(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k} {list(v)}" for k, v in shapes.items()) or "none"
