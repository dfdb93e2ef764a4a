"""Checkpoints: one folder per save, written atomically, loaded without executing code.

A checkpoint folder `RUN/checkpoints/step_00001000/` holds
    model.safetensors   the online weights            (safetensors: no code on load)
    ema.safetensors     the EMA weights
    optimizer.pt        optimizer state                (torch.load(weights_only=True))
    rng.pt              torch CPU/CUDA RNG states      (torch.load(weights_only=True))
    state.json          step, samples seen, world size
    config.json         the resolved configuration
It is assembled in a hidden temporary folder beside its final place, every file fsynced, then
renamed into place in one step: a crash or a full disk leaves either the whole checkpoint or none
of it, and the previous checkpoints untouched. Any command that takes a checkpoint accepts the
folder itself or a run folder (its latest complete checkpoint).

Faults are `CheckpointError`s that name the file and the fix: a missing, truncated or garbled file
("damaged: delete the folder to resume from the previous checkpoint"), a pickle that asks to run
code (refused, never retried unsafely), weights of another shape, a failed write (the OS error and
the intact previous checkpoint). `prune_checkpoints` keeps the newest k and never deletes the
newest good one; `verify_checkpoint` opens every file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fastsp import config as config_lib
from fastsp import config_file
from fastsp.checkpoint_files import (
    check_optimizer_state,
    check_rng,
    damaged,
    first_line,
    load_tensors,
    read_json,
    read_safetensors,
    unreadable,
)
from fastsp.errors import CheckpointError, CheckpointWriteError, ConfigError
from fastsp.faults import kill_point
from fastsp.model_config import DiTConfig, UNetConfig
from fastsp.models import build_model

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_FILES = (
    "model.safetensors",
    "ema.safetensors",
    "optimizer.pt",
    "rng.pt",
    "state.json",
    "config.json",
)
# A checkpoint of an FSDP2 run (fastsp.training.parallel): torch.distributed.checkpoint's
# folder of shards and metadata in place of the model, EMA and optimizer files.
SHARDED_FILES = ("dcp/.metadata", "rng.pt", "state.json", "config.json")
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_OLD_DIR = re.compile(r"^\.old-(step_\d{8})-[0-9a-f]+$")
_STALE_PREFIXES = (".tmp-", ".old-", ".deleting-")  # left by a crash mid-save or mid-delete
# The hint that a write failed for lack of room rather than for another reason.
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_NO_ROOM_TEXT = re.compile(r"no space left|file too large|quota", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Atomic writes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename (never a half-written file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Finding checkpoints


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first (hidden temporary folders are never listed)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def is_sharded(checkpoint: Path) -> bool:
    """A checkpoint written by torch.distributed.checkpoint (SHARDED_FILES)."""
    return (Path(checkpoint) / "dcp").is_dir()


def _missing_files(checkpoint: Path) -> list[str]:
    try:
        files = SHARDED_FILES if is_sharded(checkpoint) else CHECKPOINT_FILES
        return [name for name in files if not (checkpoint / name).is_file()]
    except PermissionError:  # a folder this user cannot search: not missing, unreadable
        raise unreadable(checkpoint) from None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint folder that holds all six files, or None."""
    for checkpoint in reversed(list_checkpoints(run_dir)):
        if not _missing_files(checkpoint):
            return checkpoint
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder meaning its latest complete checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint path '{path}' does not exist; pass a checkpoint folder or a run folder"
        )
    # config.json alone does not make a checkpoint: a run folder holds one too.
    if any((path / name).is_file() for name in CHECKPOINT_FILES if name != "config.json"):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        incomplete = list_checkpoints(path)
        if incomplete:
            raise CheckpointError(
                f"every checkpoint of '{path}' is incomplete (the newest, {incomplete[-1]}, "
                f"lacks {', '.join(_missing_files(incomplete[-1]))}); pass another checkpoint"
            )
        raise CheckpointError(
            f"'{path}' is neither a checkpoint folder (no state.json) nor a run folder with "
            f"checkpoints (no {CHECKPOINTS_DIR}/step_*); pass e.g. runs/digits or "
            f"runs/digits/{CHECKPOINTS_DIR}/step_00003000"
        )
    return latest


# ---------------------------------------------------------------------------------------------
# Saving


def _contiguous_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors stores dense row-major tensors; channels_last weights must be made contiguous.
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


class _KeepWriteError:
    """A file for torch.save that keeps the OSError of a failed write.

    torch.save's zip writer turns a failed write into a RuntimeError without the OS error
    ("unexpected pos ..."); keeping it lets a full disk be reported as one.
    """

    def __init__(self, file):
        self.file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def _torch_save(value: Any, path: Path) -> None:
    with open(path, "wb") as f:
        writer = _KeepWriteError(f)
        try:
            torch.save(value, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise writer.error from None


def _write_failed(root: Path, final: Path, error: BaseException) -> CheckpointWriteError:
    """The error for a save that failed (disk full, file too large, I/O error...)."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    no_room = getattr(error, "errno", None) in _NO_ROOM or _NO_ROOM_TEXT.search(str(error))
    try:
        free = f"; {shutil.disk_usage(root).free / 2**20:.0f} MiB free there"
    except OSError:
        free = ""
    previous = latest_checkpoint(root.parent)
    intact = (
        f"the previous checkpoint {previous} is intact"
        if previous is not None
        else "no earlier checkpoint exists"
    )
    fix = "Free space on that disk" if no_room else "Fix the cause"
    return CheckpointWriteError(
        f"cannot save checkpoint {final.name} in {root} ({detail}{free}); nothing of it was "
        f"kept. {fix} and resume with --resume: {intact}"
    )


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    config_text: str,
) -> Path:
    """Write RUN/checkpoints/step_XXXXXXXX atomically and return its path.

    A failed write (full disk, file size limit, I/O error) removes the partial copy, leaves every
    earlier checkpoint as it was and raises CheckpointError with the OS error.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    old, renamed = None, False
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        save_file(_contiguous_state(model), tmp / "model.safetensors")
        kill_point(f"checkpoint:{step}:model.safetensors")
        save_file(_contiguous_state(ema), tmp / "ema.safetensors")
        kill_point(f"checkpoint:{step}:ema.safetensors")
        _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        kill_point(f"checkpoint:{step}:optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        _torch_save(rng, tmp / "rng.pt")
        kill_point(f"checkpoint:{step}:rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2) + "\n")
        kill_point(f"checkpoint:{step}:state.json")
        (tmp / "config.json").write_text(config_text)
        kill_point(f"checkpoint:{step}:config.json")
        for file in tmp.iterdir():
            _fsync_file(file)
        _fsync_dir(tmp)
        kill_point(f"checkpoint:{step}:before-rename")
        if final.exists():  # a re-save of the same step: swap, so a good copy always exists
            old = root / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        renamed = True
        _fsync_dir(root)
        kill_point(f"checkpoint:{step}:after-rename")
    except (OSError, SafetensorError) as error:
        # safetensors reports a failed write as a SafetensorError with the OS error's text
        if renamed:  # every file is written and synced; only the folder's sync failed
            raise CheckpointError(
                f"checkpoint {final} was written but {root} could not be synced ({error}); it may "
                "not survive a power loss: check the disk"
            ) from error
        if old is not None and old.exists() and not final.exists():
            with contextlib.suppress(OSError):  # the swap failed half-way: put the old copy back
                os.replace(old, final)
        raise _write_failed(root, final, error) from error
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# Loading: every file is read through fastsp.checkpoint_files, and a damaged one is named


def read_configs(checkpoint: Path) -> tuple[config_lib.TrainConfig, Any]:
    """config.json of a checkpoint as validated configs (TrainConfig, the model's config),
    through the one reader every command uses (fastsp.config_file.configs_from_dict): a missing,
    unknown or mistyped field is a CheckpointError naming the file and the field."""
    file = Path(checkpoint) / "config.json"
    config = read_json(file)
    if not (
        isinstance(config, dict)
        and isinstance(config.get("model"), dict)
        and isinstance(config.get("train"), dict)
    ):
        raise damaged(file, "does not hold a configuration with 'model' and 'train' sections")
    try:
        return config_file.configs_from_dict(config, str(file))
    except ConfigError as error:
        raise CheckpointError(str(error)) from None


def read_config(checkpoint: Path) -> dict[str, Any]:
    """config.json of a checkpoint, validated (`read_configs`), as a dict: {"train": {...},
    "model": {...}}."""
    train, model = read_configs(checkpoint)
    return json.loads(json.dumps(config_file.to_dict(train, model)))


def read_state(checkpoint: Path) -> dict[str, Any]:
    """state.json of a checkpoint: {"step": int, ...}."""
    file = Path(checkpoint) / "state.json"
    state = read_json(file)
    step = state.get("step") if isinstance(state, dict) else None
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise damaged(file, "does not hold a training state with a step number")
    return state


def _read_weights(module: torch.nn.Module, file: Path) -> dict[str, torch.Tensor]:
    """The weights in `file`, checked to fit `module` (names and shapes)."""
    weights = read_safetensors(file)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        details = []
        if wrong:
            details.append(
                "shape differs for "
                + ", ".join(
                    f"{k} {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in wrong[:3]
                )
            )
        if missing:
            details.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        raise CheckpointError(
            f"{file} holds a model of another shape: {'; '.join(details)}. Use the model options "
            "the checkpoint was trained with (see its config.json), or another checkpoint"
        )
    return weights


def load_weights(module: torch.nn.Module, file: Path) -> None:
    """Load safetensors weights, with an error naming every mismatched tensor."""
    module.load_state_dict(_read_weights(module, Path(file)))


def load_training_state(
    checkpoint: Path, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore model, EMA, optimizer and RNG states in place; return state.json's contents.

    Every file is read and checked before anything is restored, so a damaged checkpoint raises
    CheckpointError and leaves the model, EMA and optimizer as they were.
    """
    checkpoint = Path(checkpoint)
    state = read_state(checkpoint)
    model_weights = _read_weights(model, checkpoint / "model.safetensors")
    ema_weights = _read_weights(ema, checkpoint / "ema.safetensors")
    optimizer_file, rng_file = checkpoint / "optimizer.pt", checkpoint / "rng.pt"
    optimizer_state = check_optimizer_state(optimizer_file, load_tensors(optimizer_file))
    rng = read_rng(rng_file)
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, TypeError) as error:  # torch checks the parameter groups
        raise CheckpointError(
            f"{optimizer_file} holds the state of another optimizer ({first_line(error)}); "
            "resume with the options the checkpoint was trained with, or pass another checkpoint"
        ) from None
    model.load_state_dict(model_weights)
    ema.load_state_dict(ema_weights)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def read_rng(file: Path) -> dict[str, Any]:
    """rng.pt: the torch RNG states of a checkpoint, checked."""
    return check_rng(file, load_tensors(file))


def sync_and_rename(tmp: Path, final: Path) -> None:
    """Sync every file and folder under `tmp`, then rename it to `final` in one step (a
    previous `final` is swapped out first and removed after)."""
    for path in sorted(tmp.rglob("*"), reverse=True):
        (_fsync_file if path.is_file() else _fsync_dir)(path)
    _fsync_dir(tmp)
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _load_sharded(module: torch.nn.Module, checkpoint: Path, weights: str) -> None:
    """The `weights` ("model" or "ema") of a sharded checkpoint into a whole `module`, in one
    process (torch.distributed.checkpoint reads without a process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load({weights: module.state_dict()}, checkpoint_id=checkpoint / "dcp")
    except (CheckpointException, Exception) as error:  # DCP's is a BaseException
        raise damaged(checkpoint / "dcp", dcp_failure(error)) from None


def dcp_failure(error: BaseException) -> str:
    """The last line of a CheckpointException (the reader's own error), or the error's first."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model rebuilt from a checkpoint, with the configuration it was trained with."""

    model: torch.nn.Module  # a UNet or a DiT, in eval mode, on the device asked for
    train_config: config_lib.TrainConfig  # its schedule and resolution are the model's to sample
    model_config: UNetConfig | DiTConfig
    checkpoint: Path  # the checkpoint folder it came from (a run folder's latest)
    step: int  # the training step it was saved at
    weights: str  # "ema" or "model": which of the checkpoint's weights it holds


def load_model(
    path: str | Path, weights: str = "ema", device: str | torch.device = "cpu", merge: bool = False
) -> LoadedModel:
    """The model (a UNet or a DiT, as config.json's model section says) rebuilt from a
    checkpoint's config.json with its `ema` or `model` weights, and the checkpoint's validated
    configuration and step. A LoRA run's model carries its peft adapters (fastsp.lora), or with
    `merge` is a plain network with them merged into its weights."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    checkpoint = resolve_checkpoint(path)
    train_config, model_config = read_configs(checkpoint)
    model = build_model(model_config)
    if train_config.lora_rank:
        from fastsp import lora

        model = lora.add_adapters(model, train_config, model_config)
    if is_sharded(checkpoint):
        _load_sharded(model, checkpoint, weights)
    else:
        load_weights(model, checkpoint / f"{weights}.safetensors")
    if train_config.lora_rank and merge:
        model = lora.merged(model, model_config)
    return LoadedModel(
        model=model.to(device).eval(),
        train_config=train_config,
        model_config=model_config,
        checkpoint=checkpoint,
        step=read_state(checkpoint)["step"],
        weights=weights,
    )


def verify_checkpoint(path: str | Path) -> None:
    """Open every file of a checkpoint folder; raise CheckpointError on the first problem.

    Reads all tensors (safetensors in full, the .pt files through weights_only loads) and both
    JSON files, and checks that model and EMA weights hold the same tensors. Nothing is executed.
    """
    checkpoint = Path(path)
    if not checkpoint.is_dir():
        raise CheckpointError(f"'{checkpoint}' is not a checkpoint folder")
    if is_sharded(checkpoint):
        load_model(checkpoint, "model")
        load_model(checkpoint, "ema")
        read_rng(checkpoint / "rng.pt")
        return
    model = read_safetensors(checkpoint / "model.safetensors")
    ema = read_safetensors(checkpoint / "ema.safetensors")
    shapes = {k: tuple(v.shape) for k, v in model.items()}
    if shapes != {k: tuple(v.shape) for k, v in ema.items()}:
        raise damaged(checkpoint / "ema.safetensors", "holds other tensors than model.safetensors")
    optimizer_file, rng_file = checkpoint / "optimizer.pt", checkpoint / "rng.pt"
    check_optimizer_state(optimizer_file, load_tensors(optimizer_file))
    check_rng(rng_file, load_tensors(rng_file))
    read_state(checkpoint)
    read_config(checkpoint)


# ---------------------------------------------------------------------------------------------
# Keeping the last k


def _looks_complete(checkpoint: Path) -> bool:
    """A cheap check that reads headers only: all six files, none truncated or unparsable."""
    try:
        if _missing_files(checkpoint):
            return False
        if is_sharded(checkpoint):
            read_state(checkpoint)
            read_config(checkpoint)
            return True
        for name in ("model.safetensors", "ema.safetensors"):
            with safe_open(str(checkpoint / name), framework="pt"):  # checks size vs. header
                pass
        for name in ("optimizer.pt", "rng.pt"):
            with zipfile.ZipFile(checkpoint / name):  # the zip directory sits at the file's end
                pass
        read_state(checkpoint)
        read_config(checkpoint)
    except Exception:  # any failure means "not known good"; loading it would name the problem
        return False
    return True


def _delete(folder: Path) -> bool:
    """Remove a folder crash-safely: first a rename out of sight, then the removal."""
    hidden = folder
    if not folder.name.startswith(".deleting-"):
        hidden = folder.with_name(f".deleting-{folder.name.lstrip('.')}-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(folder, hidden)
        except OSError:
            return False
        kill_point(f"prune:{folder.name}")
    shutil.rmtree(hidden, ignore_errors=True)  # leftovers go at the next prune
    return True


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[Path]:
    """Keep the newest `keep_last` good checkpoints of a run (0 keeps all); return those deleted.

    Also removes what crashes leave behind (hidden .tmp-*, .old-*, .deleting-* folders), first
    putting back an .old-* copy whose checkpoint a crash mid-swap left missing. Only folders older
    than the oldest kept checkpoint are deleted, so the newest good checkpoint always survives and
    a damaged newer one is left for its error message. Each folder is renamed to a hidden
    .deleting-* name before it is removed: a crash mid-delete never leaves a half-deleted step_*.
    """
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {keep_last}")
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    for old in sorted(root.iterdir()):
        match = _OLD_DIR.match(old.name)
        if match and not (root / match[1]).exists() and _looks_complete(old):
            os.replace(old, root / match[1])
    deleted = []
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and folder.name.startswith(_STALE_PREFIXES) and _delete(folder):
            deleted.append(folder)
    if keep_last == 0:
        return deleted
    checkpoints = list_checkpoints(run_dir)
    good = [p for p in checkpoints if _looks_complete(p)]
    if not good:
        return deleted
    oldest_kept = good[-keep_last:][0]
    for folder in checkpoints:
        if folder.name < oldest_kept.name and _delete(folder):
            deleted.append(folder)
    if deleted:
        _fsync_dir(root)
    return deleted
