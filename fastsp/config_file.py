"""config.json: the resolved configuration as a run folder and every checkpoint record it, and
the one reader of such a file.

A leaf module (the standard library, fastsp.errors and the config modules only). Resuming,
sampling and evaluating all read through `configs_from_dict`, so they accept and refuse the same
files.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastsp.config import TrainConfig
from fastsp.errors import ConfigError
from fastsp.model_config import MODEL_KINDS, DiTConfig, UNetConfig, model_kind


def model_to_dict(model: UNetConfig | DiTConfig) -> dict[str, Any]:
    """config.json's model section: the model's kind ("unet" or "dit") and its fields."""
    return {"kind": model_kind(model), **dataclasses.asdict(model)}


def to_dict(train: TrainConfig, model: UNetConfig | DiTConfig) -> dict[str, Any]:
    """The resolved configuration as written to config.json (tuples become lists)."""
    return {"train": dataclasses.asdict(train), "model": model_to_dict(model)}


def _from_dict(cls: type, values: Any, what: str, source: str = "config.json") -> Any:
    """A config dataclass from a config.json section. Every field must be there, nothing else,
    each of its type and range: a missing field is not filled with today's default (the file
    would then describe a run that never was) unless its option says that default is what runs
    before it did (`absent_is_default`), an unknown one is not ignored, and the
    dataclass's own validation names a mistyped one. One line, naming the file and the field."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: the {what} section is not a JSON object")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"{source} has unknown {what} fields {unknown}: from another version, or edited by "
            "hand? Remove them"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = [
        name
        for name in names
        if name not in values and not fields[name].metadata.get("absent_is_default")
    ]
    if missing:
        raise ConfigError(
            f"{source} lacks the {what} fields {missing}: from another version, or edited by "
            "hand? Add them with the values the run used"
        )
    try:  # JSON has lists where the dataclasses have tuples; absent fields take their default
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except ValueError as error:  # a ConfigError naming the field, its value and what is allowed
        raise ConfigError(f"{source}: {error}") from None


def model_config_from_dict(
    values: dict[str, Any], source: str = "config.json"
) -> UNetConfig | DiTConfig:
    """The model config of config.json's model section; without a "kind" (config.json files
    written before the DiT) it is a UNet."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: the model section is not a JSON object")
    values = dict(values)
    kind = values.pop("kind", "unet")
    if kind not in MODEL_KINDS:
        raise ConfigError(
            f"{source} has an unknown model kind {kind!r}: choose one of "
            f"{', '.join(MODEL_KINDS)} (from another version?)"
        )
    return _from_dict(MODEL_KINDS[kind], values, "model", source)


def train_config_from_dict(values: Any, source: str = "config.json") -> TrainConfig:
    return _from_dict(TrainConfig, values, "training", source)


CONFIG_SECTIONS = ("train", "model")


def configs_from_dict(values: Any, source: str = "config.json") -> tuple[TrainConfig, Any]:
    """The one reader of a config.json (a run folder's or a checkpoint's): its {"train": ...,
    "model": ...} as validated configs (the model's class from its kind). Resuming, sampling and
    evaluating all read through it, so they accept and refuse the same files."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source} does not hold a JSON object with sections {CONFIG_SECTIONS}")
    unknown = sorted(set(values) - set(CONFIG_SECTIONS))
    missing = [name for name in CONFIG_SECTIONS if name not in values]
    if unknown or missing:
        raise ConfigError(
            f"{source} must hold exactly the sections {list(CONFIG_SECTIONS)}"
            + (f"; unknown: {unknown}" if unknown else "")
            + (f"; missing: {missing}" if missing else "")
        )
    return (
        train_config_from_dict(values["train"], source),
        model_config_from_dict(values["model"], source),
    )


def read_config_file(path: str | Path) -> tuple[TrainConfig, Any]:
    """A config.json file through `configs_from_dict`; an unreadable file is a ConfigError."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path} cannot be read: {error.strerror or error}") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{path} is not valid JSON ({error})") from None
    return configs_from_dict(values, str(path))


def dumps(train: TrainConfig, model: UNetConfig | DiTConfig) -> str:
    return json.dumps(to_dict(train, model), indent=2, sort_keys=True) + "\n"
