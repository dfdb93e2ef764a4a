"""Latent shards: a folder of precomputed VAE latents as a data set, and the check of each shard.

`inspect_shard` reads one shard's header (never its latents) and either describes it as a
`ShardInfo` or raises `DataError` saying what is wrong and how to fix it. `LatentsDataset` checks
every shard this way at construction, keeps those that agree with the majority, and reads items
lazily from memory maps. Items follow the contract in fastsp.data; bad shards follow its
`on_bad_data` policy.

A folder written by fastsp.prepare also holds `metadata.json` (`METADATA_FILE`, with "format":
"fastsp-latents": the VAE's scaling factor, the resolution, the encoders, the shard manifest) and
the empty prompt's context `empty_prompt.safetensors` (`EMPTY_PROMPT_FILE`, key "context" [L, D],
never read as a shard). metadata.json is prepare's completion mark and the folder's manifest, so
`check_prepared_folder` holds the reader to it: shards that carry prepare's header manifest
(`MANIFEST_KEY`) without a metadata.json are an unfinished preparation, and with one, the shard
files must be exactly those it lists, each holding the images its entry names; each refusal
names the file and a fix that works (a rerun of prepare writes what is missing).

Its latents already carry the VAE's scaling factor (they are `vae.encode(x).latent_dist.mean *
scaling_factor`), so the rule of `latent_scale` is: it multiplies the latents of folders WITHOUT
that metadata (hand-made shards of raw VAE latents: pass 0.18215
for SD's VAE), and with the metadata it must stay 1 (anything else is a DataError naming the
metadata's factor, never a second multiplication). `read_metadata(folder)` and
`read_null_context(folder)` give both files to other tools (prompt sampling).
"""

from __future__ import annotations

import bisect
import collections
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from fastsp.data_policy import (
    FIX_DATA,
    check_index,
    check_policy,
    missing_folder,
    skip_bad_file,
    split_key,
)
from fastsp.errors import DataError
from fastsp.shard_conditions import CONDITION_KEYS, read_family_conditions

__all__ = [
    "EMPTY_PROMPT_FILE",
    "METADATA_FILE",
    "METADATA_FORMAT",
    "LatentsDataset",
    "MANIFEST_KEY",
    "ShardInfo",
    "check_prepared_folder",
    "inspect_shard",
    "read_shard_manifest",
    "read_metadata",
    "read_null_context",
]

METADATA_FILE = "metadata.json"
METADATA_FORMAT = "fastsp-latents"  # metadata.json's "format": what fastsp.prepare wrote
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
MANIFEST_KEY = "fastsp_prepare"  # the key of a prepared shard's manifest in its safetensors header
RERUN_PREPARE = "rerun python -m fastsp.prepare into this folder with the options it names"

_ST_FLOAT = {"F16", "BF16", "F32", "F64"}
_ST_INT = {"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"}
_NPY_SIDE = (".labels.npy", ".context.npy")


@dataclass(frozen=True)
class ShardInfo:
    """One readable, valid latent shard, as `inspect_shard` found it."""

    path: str
    num_items: int  # N, the number of latents (may be 0)
    item_shape: tuple[int, int, int]  # (C, H, W) of one latent, H == W
    has_labels: bool
    max_label: int  # the largest class label; -1 without labels or when the shard is empty
    context_shape: tuple[int, int] | None  # (L, D) of one item's context; None without context
    label_counts: tuple[tuple[int, int], ...] = ()  # (label, items) of each label it holds

    @property
    def layout(self) -> tuple:
        """What every shard of a data set must share: (item shape, has labels, context shape),
        hashable so the majority can be counted."""
        return (self.item_shape, self.has_labels, self.context_shape)


@dataclass(frozen=True)
class _Header:
    """What a shard's file(s) declare, before any check: shapes include the leading N."""

    shape: tuple[int, ...]
    dtype: str  # as the format spells it ("float32" for numpy, "F32" for safetensors)
    is_float: bool
    label_shape: tuple[int, ...] | None  # None: the shard has no labels
    labels_are_int: bool
    label_values: np.ndarray | None  # a .npy memory map; from .safetensors only if integral
    context_shape: tuple[int, ...] | None  # None: the shard has no context
    context_is_float: bool


def _read_npy(path: str) -> _Header:
    """The header of `NAME.npy` and its optional `NAME.labels.npy` / `NAME.context.npy`."""
    base = path[: -len(".npy")]
    side = [base + suffix for suffix in _NPY_SIDE]  # labels, context
    try:
        lat = np.load(path, mmap_mode="r")
        lab, ctx = (np.load(p, mmap_mode="r") if os.path.exists(p) else None for p in side)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(
            f"cannot read latent shard '{path}' or its .labels.npy / .context.npy ({e}); "
            f"remove it or write it again with numpy.save"
        ) from e
    return _Header(
        shape=tuple(lat.shape),
        dtype=str(lat.dtype),
        is_float=bool(np.issubdtype(lat.dtype, np.floating)),
        label_shape=None if lab is None else tuple(lab.shape),
        labels_are_int=lab is not None and bool(np.issubdtype(lab.dtype, np.integer)),
        label_values=lab,  # memory-mapped: only the label check reads it
        context_shape=None if ctx is None else tuple(ctx.shape),
        context_is_float=ctx is not None and bool(np.issubdtype(ctx.dtype, np.floating)),
    )


def _read_safetensors(path: str) -> _Header:
    """The header of `NAME.safetensors` (tensors "latents", optional "labels" and "context")."""
    from safetensors import safe_open

    try:
        f = safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own error types
        raise DataError(
            f"cannot read latent shard '{path}' ({e}); remove it or write it again with "
            f"safetensors.torch.save_file"
        ) from e
    keys = set(f.keys())
    if "latents" not in keys:
        raise DataError(
            f"latent shard '{path}' has no tensor named 'latents' (it has "
            f"{sorted(keys)}); save the latents under the key 'latents'"
        )
    sl = f.get_slice("latents")
    dtype = sl.get_dtype()
    label_shape = label_values = context_shape = None
    labels_are_int = context_is_float = False
    if "labels" in keys:
        ls = f.get_slice("labels")
        label_shape, labels_are_int = tuple(ls.get_shape()), ls.get_dtype() in _ST_INT
        if labels_are_int:
            label_values = f.get_tensor("labels").numpy()
    if "context" in keys:
        cs = f.get_slice("context")
        context_shape, context_is_float = tuple(cs.get_shape()), cs.get_dtype() in _ST_FLOAT
    return _Header(
        shape=tuple(sl.get_shape()),
        dtype=dtype,
        is_float=dtype in _ST_FLOAT,
        label_shape=label_shape,
        labels_are_int=labels_are_int,
        label_values=label_values,
        context_shape=context_shape,
        context_is_float=context_is_float,
    )


def _check_latents(path: str, header: _Header) -> None:
    shape = header.shape
    if len(shape) != 4 or shape[2] != shape[3]:
        raise DataError(
            f"latent shard '{path}' has shape {list(shape)}; latents must be [N, C, H, W] "
            f"with H == W: write square latents, one row per image"
        )
    if not header.is_float:
        raise DataError(
            f"latent shard '{path}' has dtype {header.dtype}; latents must be floating point "
            f"(float16, bfloat16 or float32): save the VAE output without quantizing it"
        )


def _check_labels(path: str, n: int, header: _Header) -> tuple[tuple[int, int], ...]:
    """(label, items) of each label of a shard of `n` latents, by label (none without labels)."""
    if header.label_shape is None:
        return ()
    lshape, is_int = header.label_shape, header.labels_are_int
    if len(lshape) != 1 or lshape[0] != n or not is_int:
        raise DataError(
            f"labels of latent shard '{path}' have shape {list(lshape)}"
            f"{'' if is_int else ' and a non-integer dtype'}; labels must be [{n}] "
            f"integers, one per latent"
        )
    if not n:
        return ()
    labels, counts = np.unique(np.asarray(header.label_values), return_counts=True)
    if labels[0] < 0:
        raise DataError(
            f"labels of latent shard '{path}' include {int(labels[0])}; class labels must be "
            f"0, 1, 2, ... (no negatives)"
        )
    return tuple((int(a), int(b)) for a, b in zip(labels, counts, strict=True))


def _check_context(path: str, n: int, header: _Header) -> tuple[int, int] | None:
    """One item's context shape (L, D) of a shard of `n` latents, None when it has none."""
    if header.context_shape is None:
        return None
    cshape = header.context_shape
    if len(cshape) != 3 or cshape[0] != n or not header.context_is_float:
        raise DataError(
            f"context of latent shard '{path}' has shape {list(cshape)}; context must be "
            f"[{n}, L, D] floating point, one sequence per latent"
        )
    return tuple(cshape[1:])


def inspect_shard(path: str) -> ShardInfo:
    """Validate one shard (.npy or .safetensors) without reading its latents.

    Raises `DataError` naming the file when it is unreadable, its latents are not [N, C, H, H]
    floating point, or its labels or context do not fit them."""
    header = _read_npy(path) if path.endswith(".npy") else _read_safetensors(path)
    _check_latents(path, header)
    n = header.shape[0]
    label_counts = _check_labels(path, n, header)
    context_shape = _check_context(path, n, header)
    return ShardInfo(
        path=path,
        num_items=n,
        item_shape=tuple(header.shape[1:]),
        has_labels=header.label_shape is not None,
        max_label=label_counts[-1][0] if label_counts else -1,
        context_shape=context_shape,
        label_counts=label_counts,
    )


def _mismatch(shard: ShardInfo, ref: ShardInfo, others: int) -> DataError:
    """Why `shard` disagrees with the majority layout, first held by `ref` and by `others` more
    shards."""
    path, ref_path = shard.path, ref.path
    also = f" (as do {others} other shards)" if others else ""
    if shard.item_shape != ref.item_shape:
        return DataError(
            f"latent shard '{path}' has shape [N, {', '.join(map(str, shard.item_shape))}] but "
            f"'{ref_path}' has [N, {', '.join(map(str, ref.item_shape))}]{also}; every shard "
            f"must come from the same VAE and resolution: regenerate or remove the shard"
        )
    if shard.has_labels != ref.has_labels:
        have, lack = (path, ref_path) if shard.has_labels else (ref_path, path)
        return DataError(
            f"latent shard '{have}' has labels but '{lack}' has none{also}; give every shard "
            f"labels or none"
        )
    return DataError(
        f"latent shard '{path}' has context shape {shard.context_shape} but '{ref_path}' has "
        f"{ref.context_shape}{also}; every shard needs the same text-encoder context (or none)"
    )


_UNUSED_LABELS_ALLOWED = 8  # beyond as many unused labels as used ones


def _check_label_range(root: str, counts: dict[int, int], first_shard: dict[int, str]) -> None:
    """Refuse labels far beyond the number of distinct ones (`counts`: {label: items}): a
    class-conditional model holds one label embedding per label up to the largest, so one stray
    10**6 among labels 0..9 would grow it a hundred-thousand-fold. Allowed: at most as many
    unused labels below the largest as used ones, plus `_UNUSED_LABELS_ALLOWED` (the gaps of a
    subset of classes, not a stray label)."""
    distinct = len(counts)
    limit = 2 * distinct + _UNUSED_LABELS_ALLOWED  # labels must be below it
    far = sorted(label for label in counts if label >= limit)
    if not far:
        return
    shown = ", ".join(f"{label} (in '{first_shard[label]}')" for label in far[-3:])
    more = f" and {len(far) - 3} more" if len(far) > 3 else ""
    raise DataError(
        f"the latent shards in '{root}' have labels far beyond their {distinct} distinct "
        f"labels: {shown}{more}; the model would hold {far[-1] + 1:,} label embeddings. "
        f"Relabel the shards 0..{distinct - 1} (numpy.unique(labels, return_inverse=True) gives "
        f"the map), or pass --cond none to train without labels"
    )


def read_metadata(folder) -> dict | None:
    """`folder/metadata.json` as fastsp.prepare wrote it, or None when the folder has none (a
    `metadata.json` of another tool, without "format": "fastsp-latents", is not ours: None too).

    Raises `DataError` when the file cannot be read or parsed."""
    path = os.path.join(os.fspath(folder), METADATA_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(
            f"cannot read '{path}' ({e}); delete it and rerun python -m fastsp.prepare into "
            f"this folder with its options (the finished shards are checked and kept)"
        ) from e
    if not isinstance(metadata, dict) or metadata.get("format") != METADATA_FORMAT:
        return None
    return metadata


def read_null_context(folder) -> torch.Tensor | None:
    """The empty prompt's context [L, D] float32 of a folder fastsp.prepare wrote (what CFG
    dropout trains with and CFG sampling contrasts against), or None without fastsp metadata.

    Raises `DataError` when the metadata is there but the embedding is missing or unreadable."""
    metadata = read_metadata(folder)
    if metadata is None:
        return None
    path = os.path.join(os.fspath(folder), metadata.get("empty_prompt", EMPTY_PROMPT_FILE))
    from safetensors.torch import load_file

    try:
        context = load_file(path)["context"]
    except Exception as e:  # a missing file, a bad header or no "context" key
        raise DataError(
            f"cannot read the empty-prompt embedding '{path}' ({type(e).__name__}: {e}); "
            f"{RERUN_PREPARE} (it rewrites the embedding)"
        ) from e
    if context.ndim != 2:
        raise DataError(
            f"the empty-prompt embedding '{path}' has shape {list(context.shape)}, not [L, D]; "
            f"{RERUN_PREPARE} (it rewrites the embedding)"
        )
    return context.float()


def read_shard_manifest(path: str) -> dict | None:
    """The manifest fastsp.prepare wrote into a shard's header ({"options", "images": digest,
    "skipped"}), or None for a shard it did not write (or one safetensors cannot open)."""
    from safetensors import safe_open

    if not path.endswith(".safetensors"):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get(MANIFEST_KEY)
        return None if text is None else json.loads(text)
    except Exception:  # unreadable shards are named by inspect_shard
        return None


def _options_line(metadata: dict) -> str:
    options = metadata.get("options", {})
    shown = ", ".join(f"{k} {options[k]!r}" for k in ("resolution", "shard_size") if k in options)
    images = metadata.get("images_folder")
    return f"--images {images}, {shown}" if images else shown


def check_prepared_folder(root: str, metadata: dict | None, shard_names: list[str]) -> None:
    """Refuse (DataError) a folder whose preparation did not finish, or whose shard files and
    metadata.json's manifest disagree: a listed shard missing, a shard it does not list, or a
    shard holding other images than its entry (another preparation's, copied in)."""
    paths = {name: os.path.join(root, name) for name in shard_names}
    manifests = {name: read_shard_manifest(path) for name, path in paths.items()}
    if metadata is None:
        unfinished = [name for name, manifest in manifests.items() if manifest is not None]
        if unfinished:
            raise DataError(
                f"'{root}' holds shards of fastsp.prepare ('{unfinished[0]}' and "
                f"{len(unfinished) - 1} more) but no fastsp {METADATA_FILE}, which prepare "
                f"writes last: the preparation did not finish. Rerun the same "
                f"python -m fastsp.prepare command into this folder (it keeps the finished shards)"
            )
        return
    listed = {entry["name"]: entry for entry in metadata.get("shards", [])}
    fix = f"{RERUN_PREPARE} ({_options_line(metadata)}): it writes that shard again"
    missing = sorted(set(listed) - set(paths))
    if missing:
        raise DataError(
            f"'{os.path.join(root, missing[0])}' is listed in {METADATA_FILE} but missing "
            f"({len(missing)} of {len(listed)} shards are); {fix}"
        )
    for name in shard_names:
        if name not in listed:
            raise DataError(
                f"'{paths[name]}' is not a shard {METADATA_FILE} lists (a file of another "
                f"preparation or a stray copy; the trainer would read it too); move it out of "
                f"'{root}'"
            )
        manifest = manifests[name] or {}
        if manifest.get("images") != listed[name].get("images"):
            raise DataError(
                f"'{paths[name]}' holds other images than {METADATA_FILE} lists for it (a "
                f"shard of another preparation copied in?); delete it and {fix}"
            )


class LatentsDataset(Dataset):
    """A folder of precomputed VAE latent shards, read lazily (memory-mapped).

    A shard is `NAME.npy` ([N, C, H, W] float; optional siblings `NAME.labels.npy` [N] int and
    `NAME.context.npy` [N, L, D] float) or `NAME.safetensors` (keys "latents", optional "labels"
    and "context", same shapes). Shards are read in sorted name order; all must agree on C, H == W,
    on having labels and on the context shape. Items are `latents * latent_scale` in float32;
    flipping latents is off unless `random_flip` (valid for SD's VAE, not for every VAE).

    A folder fastsp.prepare wrote (module docstring) has `metadata` (its metadata.json) and
    `null_context` ([L, D], the empty prompt's context, which the trainer's CFG dropout uses); its
    latents already carry the VAE's factor, so `latent_scale` must be 1 there. Other folders have
    `metadata` and `null_context` None.

    Bad shards (unreadable, not [N, C, H, H], not floating point, bad labels or context) and
    shards that disagree with the others are found here, at construction. "The others" are the
    majority: the (C, H, W), labels and context that most readable shards share (ties: the
    earliest shard's), so one odd shard is the one named, even when it sorts first. With
    `on_bad_data="stop"` the first bad shard raises `DataError`; with "skip" each is left out with
    a `BadDataWarning` and listed in `bad_files`.
    """

    def __init__(
        self,
        root,
        latent_scale: float = 1.0,
        random_flip: bool = False,
        on_bad_data: str = "stop",
    ):
        check_policy(on_bad_data)
        root = os.fspath(root)
        if not os.path.exists(root):
            raise missing_folder("latents folder", root)
        if not os.path.isdir(root):
            raise DataError(f"latents folder '{root}' is a file, not a folder; {FIX_DATA}")
        self.on_bad_data = on_bad_data
        self.bad_files: list[tuple[str, str]] = []  # (path, reason), in the order found
        self.metadata = read_metadata(root)
        if self.metadata is not None and float(latent_scale) != 1.0:
            raise DataError(
                f"latent_scale {latent_scale} was given, but the latents in '{root}' already "
                f"carry the VAE's scaling factor {self.metadata.get('scaling_factor')} "
                f"({METADATA_FILE} of fastsp.prepare); drop --latent-scale (it must be 1 here)"
            )
        self.null_context = read_null_context(root) if self.metadata is not None else None
        names = sorted(e for e in os.listdir(root) if not e.startswith("."))
        if self.metadata is not None:  # the empty prompt's context is not a shard
            names = [n for n in names if n != EMPTY_PROMPT_FILE]
        shard_names = [
            n
            for n in names
            if n.endswith(".safetensors") or (n.endswith(".npy") and not n.endswith(_NPY_SIDE))
        ]
        for n in names:
            for suffix in _NPY_SIDE:
                base = n[: -len(suffix)] + ".npy"
                if n.endswith(suffix) and base not in shard_names:
                    self._reject(
                        DataError(
                            f"'{os.path.join(root, n)}' has no latents shard '{base}' beside it; "
                            f"add the shard or remove the file"
                        ),
                        os.path.join(root, n),
                    )
        check_prepared_folder(root, self.metadata, shard_names)
        if not shard_names:
            raise DataError(
                f"no latent shards (*.npy or *.safetensors) found in '{root}'; write the "
                f"precomputed latents there, or {FIX_DATA}"
            )

        self.root = root
        self.latent_scale = float(latent_scale)
        self.random_flip = random_flip
        found: list[ShardInfo] = []  # each readable shard
        for name in shard_names:
            path = os.path.join(root, name)
            try:
                found.append(inspect_shard(path))
            except DataError as e:
                self._reject(e, path)
        if not found:
            raise DataError(
                f"no readable latent shards in '{root}': all {len(shard_names)} are bad (e.g. "
                f"{self.bad_files[0][1]}); write the precomputed latents there, or {FIX_DATA}"
            )
        # The reference: what most shards agree on (Counter keeps first-seen order for ties).
        layouts = [shard.layout for shard in found]
        votes = collections.Counter(layouts)
        ref = found[layouts.index(max(votes, key=votes.__getitem__))]
        self.shards: list[str] = []
        sizes: list[int] = []
        label_counts: collections.Counter = collections.Counter()
        label_shard: dict[int, str] = {}  # the first shard holding each label, for messages
        for shard in found:
            if shard.layout != ref.layout:
                self._reject(_mismatch(shard, ref, votes[ref.layout] - 1), shard.path)
                continue
            for label, count in shard.label_counts:
                label_counts[label] += count
                label_shard.setdefault(label, shard.path)
            if shard.num_items:
                self.shards.append(shard.path)
                sizes.append(shard.num_items)
        if not sizes:
            raise DataError(f"every latent shard in '{root}' is empty; write latents into them")
        self.offsets = np.cumsum([0] + sizes).tolist()  # shard i holds [offsets[i], offsets[i+1])
        self.channels, self.resolution, _ = ref.item_shape
        self.has_labels = ref.has_labels
        self.context_shape = ref.context_shape
        self._label_shard = label_shard
        self.num_classes = max(label_counts) + 1 if self.has_labels else 0
        self.label_counts = dict(sorted(label_counts.items()))  # {label: items}, labels used
        self.has_context = self.context_shape is not None
        if self.null_context is not None and tuple(self.null_context.shape) != self.context_shape:
            raise DataError(
                f"the empty-prompt embedding of '{root}' has shape "
                f"{list(self.null_context.shape)} but its shards' context is "
                f"{self.context_shape}; run python -m fastsp.prepare again into a new folder"
            )
        # a diffusers family's conditions (fastsp.shard_conditions): pooled [P], time_ids [6]
        found = read_family_conditions(root, self.metadata, self.shards, EMPTY_PROMPT_FILE)
        self.family, self.pooled_dim, self.null_pooled = (
            found.family,
            found.pooled_dim,
            found.null_pooled,
        )
        self.has_time_ids, self.conditions = found.has_time_ids, found.keys
        self._open: dict[str, dict] = {}  # per process, never pickled to workers

    @property
    def class_counts(self) -> list[int]:
        """Items per label 0..num_classes-1 (a label no item has counts 0); call it after
        `check_label_range`, which bounds its length."""
        return [self.label_counts.get(label, 0) for label in range(self.num_classes)]

    def check_label_range(self) -> None:
        """Raise `DataError` when the labels go far beyond the number of distinct ones (see
        `_check_label_range`); the trainer asks before it trains a class-conditional model."""
        if self.has_labels:
            _check_label_range(self.root, self.label_counts, self._label_shard)

    def _reject(self, error: DataError, path: str) -> None:
        """A bad shard or file: raise `error` ("stop"), or warn and record it ("skip")."""
        if self.on_bad_data == "stop":
            raise error
        skip_bad_file(self.bad_files, path, str(error))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = {}  # memory maps and safetensors handles reopen in each worker
        return state

    def _handle(self, path: str) -> dict:
        h = self._open.get(path)
        if h is None:
            if path.endswith(".npy"):
                base = path[: -len(".npy")]
                h = {"latents": np.load(path, mmap_mode="r")}
                if self.has_labels:
                    h["labels"] = np.load(base + ".labels.npy", mmap_mode="r")
                if self.has_context:
                    h["context"] = np.load(base + ".context.npy", mmap_mode="r")
            else:
                from safetensors import safe_open

                f = safe_open(path, framework="pt")
                names = ("latents", "labels", "context", *CONDITION_KEYS)
                h = {k: f.get_slice(k) for k in names if k in f.keys()}
                h["_file"] = f
            self._open[path] = h
        return h

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        index, flip = split_key(key)
        index = check_index(index, len(self))
        shard = bisect.bisect_right(self.offsets, index) - 1
        row = index - self.offsets[shard]
        h = self._handle(self.shards[shard])

        def read(name: str) -> torch.Tensor:
            if isinstance(h[name], np.ndarray):
                return torch.from_numpy(np.array(h[name][row]))
            return h[name][row : row + 1][0]

        x = read("latents").float() * self.latent_scale
        if flip and self.random_flip:
            x = torch.flip(x, dims=(-1,))
        label = read("labels").to(torch.int64) if self.has_labels else torch.tensor(0)
        item = {"x": x.contiguous(), "label": label.reshape(()), "bad": torch.tensor(0)}
        if self.has_context:
            item["context"] = read("context").float().contiguous()
        for name in self.conditions:
            item[name] = read(name).float().contiguous()
        return item
