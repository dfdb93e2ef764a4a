"""What a resume, an --init and a frozen perceptual network may differ in from the run.

The rule of each TrainConfig field is declared beside the field (fastsp.config's
`option(..., resume=SAME | MAY_CHANGE | SAID)`); here it is applied. Every field of the model
(either kind) defines what the run learns, except the choice of attention kernels.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from fastsp import checkpoint as checkpoint_lib
from fastsp import config_fields, config_file, diffusers_unet, model_config
from fastsp.config import SAID, SAME, DiTConfig, TrainConfig, UNetConfig
from fastsp.errors import CheckpointError

MODEL_MAY_CHANGE = ("attention_backend",)


def resume_rule(field: dataclasses.Field) -> str:
    """A TrainConfig field's resume rule (fastsp.config.RESUME_RULES); undeclared: SAME."""
    return field.metadata.get("resume", SAME)


def check_resume(
    checkpoint: Path, cfg: TrainConfig, model_cfg: UNetConfig | DiTConfig
) -> list[str]:
    """Refuse a resume that changes what the run learns (the SAME fields), listing every
    difference; return the lines that say what it does change (the SAID fields)."""
    saved, saved_model = checkpoint_lib.read_configs(checkpoint)
    differ, said = [], []
    for field in dataclasses.fields(cfg):
        name, rule = field.name, resume_rule(field)
        ours, theirs = getattr(cfg, name), getattr(saved, name)
        if same_value(ours, theirs):
            continue
        option = config_fields.option_flag(name)
        if rule == SAME:
            differ.append(f"{option} {show_pair(ours, theirs)}")
        elif rule == SAID:
            said.append(
                f"{option} {config_fields.show_value(ours)} from here on (the checkpoint's: "
                f"{config_fields.show_value(theirs)})"
            )
    if type(saved_model) is not type(model_cfg):
        differ.append(
            f"model kind {model_config.model_kind(model_cfg)} "
            f"(checkpoint: {model_config.model_kind(saved_model)})"
        )
    else:
        for field in dataclasses.fields(model_cfg):
            ours, theirs = getattr(model_cfg, field.name), getattr(saved_model, field.name)
            line = f"{config_fields.option_flag(field.name)} {show_pair(ours, theirs)}"
            # a diffusers model's guidance and T are the run's options, said once above
            if field.name not in MODEL_MAY_CHANGE and not same_value(ours, theirs):
                differ += [line] if line not in differ else []
    if differ:
        raise CheckpointError(
            f"{checkpoint} cannot be resumed with other settings than it was trained with: "
            f"{'; '.join(differ)}. They define what the run learns (the README lists what a "
            "resume may change). Resume with the original values, or pass another --out to "
            f"start a new run (--init {checkpoint} starts it from these weights)"
        )
    return said


def check_same_shape(checkpoint: Path, model_cfg: UNetConfig | DiTConfig, fix: str) -> None:
    """Refuse a checkpoint (or diffusers UNet folder) whose model config differs from
    `model_cfg`, naming every field."""
    saved = {"kind": "unet", **diffusers_unet.source_model_config(checkpoint)}  # no kind: a UNet
    ours = json.loads(json.dumps(config_file.model_to_dict(model_cfg)))  # tuples -> lists, as saved
    differ = {
        k: (saved.get(k), v)
        for k, v in ours.items()
        if k not in MODEL_MAY_CHANGE and not same_value(saved.get(k), v)
    }
    if differ:  # typed: a "16" in a hand-made config is not 16, and says so
        details = ", ".join(f"{k}: {show_pair(b, a)}" for k, (a, b) in differ.items())
        raise CheckpointError(f"{checkpoint} holds a model of another shape ({details}); {fix}")


def check_same_process(source: Path, cfg: TrainConfig, what: str) -> None:
    """Refuse a fastsp checkpoint trained under another process (--diffusion) as `what` (--init,
    the perceptual network): its weights predict another quantity at another time scale. A
    diffusers folder does not say; it is taken as it is."""
    if diffusers_unet.diffusers_unet_folder(source) == source:
        return
    saved, _ = checkpoint_lib.read_configs(source)
    if saved.diffusion != cfg.diffusion:
        raise CheckpointError(
            f"{what} {source} was trained with --diffusion {saved.diffusion}, this run trains "
            f"with --diffusion {cfg.diffusion}; pass --diffusion {saved.diffusion}, or a "
            f"checkpoint trained with --diffusion {cfg.diffusion}"
        )


def same_value(a: Any, b: Any) -> bool:
    """Equal values of one type (an int and a float count as one: JSON writes 1e-3 and 0.001
    alike); "8" is not 8."""
    number = (int, float)
    same_type = type(a) is type(b) or (
        isinstance(a, number)
        and isinstance(b, number)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    )
    return same_type and a == b


def show_pair(ours: Any, theirs: Any, where: str = "checkpoint") -> str:
    """'x0 (checkpoint: v)', with the types when they differ: "8 (int; checkpoint: '8', str)"."""
    if type(ours) is type(theirs) or same_value(ours, theirs):
        return f"{config_fields.show_value(ours)} ({where}: {config_fields.show_value(theirs)})"
    return f"{ours!r} ({type(ours).__name__}; {where}: {theirs!r}, {type(theirs).__name__})"
