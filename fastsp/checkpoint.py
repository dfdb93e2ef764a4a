"""Checkpoints: one folder per save, written atomically, loaded without executing code.

A checkpoint folder `RUN/checkpoints/step_00001000/` holds
    model.safetensors   the online weights            (safetensors: no code on load)
    ema.safetensors     the EMA weights
    optimizer.pt        optimizer state                (torch.load(weights_only=True))
    rng.pt              torch CPU/CUDA RNG states      (torch.load(weights_only=True))
    state.json          step, samples seen, world size
    config.json         the resolved configuration
It is assembled in a hidden temporary folder beside its final place, every file fsynced, then
renamed into place in one step: a crash leaves either the whole checkpoint or none of it. Any
command that takes a checkpoint accepts the folder itself or a run folder (its latest checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fastsp import config as config_lib
from fastsp.unet import UNet

CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path and the fix."""


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
    """Complete checkpoints of a run, oldest first (temporary folders are never listed)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder meaning its latest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint path '{path}' does not exist; pass a checkpoint folder or a run folder"
        )
    if (path / "state.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
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


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    config_text: str,
) -> Path:
    """Write RUN/checkpoints/step_XXXXXXXX atomically and return its path."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(_contiguous_state(model), tmp / "model.safetensors")
        save_file(_contiguous_state(ema), tmp / "ema.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2) + "\n")
        (tmp / "config.json").write_text(config_text)
        for file in tmp.iterdir():
            _fsync_file(file)
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step: swap, so a good copy always exists
            old = root / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# Loading


def read_config(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"cannot read {checkpoint}/config.json ({error}); the checkpoint is damaged"
        ) from None


def read_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(checkpoint) / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"cannot read {checkpoint}/state.json ({error}); the checkpoint is damaged"
        ) from None


def load_weights(module: torch.nn.Module, file: Path) -> None:
    """Load safetensors weights, with an error naming every mismatched tensor."""
    try:
        weights = load_file(str(file))
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise CheckpointError(
            f"cannot read weights from {file} ({error}); the checkpoint is damaged"
        ) from None
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
    module.load_state_dict(weights)


def load_training_state(
    checkpoint: Path, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore model, EMA, optimizer and RNG states in place; return state.json's contents."""
    checkpoint = Path(checkpoint)
    load_weights(model, checkpoint / "model.safetensors")
    load_weights(ema, checkpoint / "ema.safetensors")
    optimizer.load_state_dict(
        torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
    )
    rng = torch.load(checkpoint / "rng.pt", map_location="cpu", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return read_state(checkpoint)


def load_model(
    path: str | Path, weights: str = "ema", device: str | torch.device = "cpu"
) -> tuple[UNet, dict[str, Any]]:
    """A UNet rebuilt from a checkpoint's config.json with its `ema` or `model` weights.

    Returns the model in eval mode and the checkpoint's resolved configuration (a dict).
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    checkpoint = resolve_checkpoint(path)
    config = read_config(checkpoint)
    model = UNet(config_lib.model_config_from_dict(config["model"]))
    load_weights(model, checkpoint / f"{weights}.safetensors")
    return model.to(device).eval(), config
