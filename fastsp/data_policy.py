"""What every data set shares: the item key, the bad-data policy and the error of bad data.

A data set is indexed by a key `(index, flip)` (a bare int means no flip). Bad data
(`on_bad_data`): "stop" raises `DataError` naming the file; "skip" leaves the file out with one
`BadDataWarning` naming it and lists it in the data set's `bad_files` (each reader's module,
fastsp.image_folder and fastsp.latent_shards, says which files it finds bad, and when).
"""

from __future__ import annotations

import warnings

from fastsp.config_fields import ON_BAD_DATA
from fastsp.errors import DataError

__all__ = ["FIX_DATA", "BadDataWarning", "DataError"]

FIX_DATA = (
    "pass --data PATH to a folder of images (one subfolder per class) or of latent shards, "
    "or --data digits for the built-in data set"
)


class BadDataWarning(UserWarning):
    """A bad file left out, or replaced by another item, because `on_bad_data` is "skip"."""


def check_policy(on_bad_data) -> None:
    if on_bad_data not in ON_BAD_DATA:
        raise ValueError(f"on_bad_data must be one of {ON_BAD_DATA}, got {on_bad_data!r}")


def skip_bad_file(bad_files: list[tuple[str, str]], path: str, reason: str) -> None:
    """Record a bad file and warn once about it (on_bad_data == "skip")."""
    bad_files.append((path, reason))
    warnings.warn(f"skipping '{path}': {reason}", BadDataWarning, stacklevel=3)


def split_key(key) -> tuple[int, bool]:
    """A sampler key `(index, flip)`; a bare int means no flip."""
    if isinstance(key, tuple):
        index, flip = key
        return int(index), bool(flip)
    return int(key), False


def check_index(index: int, n: int) -> int:
    if index < 0:
        index += n
    if not 0 <= index < n:
        raise IndexError(f"index {index} out of range for a data set of {n} items")
    return index


def missing_folder(kind: str, root: str) -> DataError:
    return DataError(f"{kind} '{root}' does not exist; {FIX_DATA}")
