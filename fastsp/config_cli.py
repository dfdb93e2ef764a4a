"""The command line over the configs: every field of TrainConfig, UNetConfig and DiTConfig as an
option, resolved through the presets (fastsp.config.resolve).

On the command line every field is `--field-name VALUE` (booleans: `--field-name` /
`--no-field-name`; tuples: comma-separated); the DiT's fields it shares with the UNet (context_dim,
attention_backend) are one option, and an option of the model kind the preset does not build is
refused. `--help` shows each field's description, allowed values and default under every preset.
Allowed values are checked by the configs, not by argparse, so that a refusal reads the same from
the command line and from Python; a bad value exits with status 2. A leaf module: the standard
library, fastsp.errors and the config modules only.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from typing import Any

from fastsp.config import DEFAULT_PRESET, PRESETS, TrainConfig, resolve
from fastsp.config_fields import option_flag, show_value
from fastsp.errors import ConfigError
from fastsp.model_config import DIT_PRESETS, UNET_PRESETS, DiTConfig, UNetConfig


class _Parser(argparse.ArgumentParser):
    """argparse with a short error that suggests the closest option and exits with status 2."""

    def error(self, message: str):
        hint = ""
        if message.startswith("unrecognized arguments:"):
            words = [w.split("=")[0] for w in message.split(":", 1)[1].split() if w.startswith("-")]
            options = [o for action in self._actions for o in action.option_strings]
            for word in words:
                close = difflib.get_close_matches(word, options, n=1)
                if close:
                    hint = f" (did you mean {close[0]}?)"
                    break
        sys.stderr.write(f"error: {message}{hint}\nrun with --help to list every option\n")
        raise SystemExit(2)


def _base_type(annotation: Any) -> Any:
    """`int | None` -> int; `tuple[int, ...]` -> tuple."""
    hint = annotation
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip() != "")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _help(f: dataclasses.Field, by_preset: dict[str, Any]) -> str:
    """The field's description, its allowed values, and its default: the default preset's
    value, followed by the other presets' values where they differ from it."""
    text = f.metadata["help"]
    if f.metadata["choices"]:
        text += f"; one of {', '.join(f.metadata['choices'])}"
    # the DiT's options have no value under the default (UNet) preset: their first preset's
    first = DEFAULT_PRESET if DEFAULT_PRESET in by_preset else next(iter(by_preset))
    default = by_preset[first]
    others = [f"{name}: {show_value(v)}" for name, v in by_preset.items() if v != default]
    where = "".join(f"; {other}" for other in others)
    where = f" with --preset {first}{where}" if others else ""
    return f"{text} (default: {show_value(default)}{where})".replace("%", "%%")


def _add_dataclass_options(
    parser: argparse.ArgumentParser, cls: type, skip: set[str], presets: dict[str, Any]
) -> None:
    """One option per field of `cls`; `presets` maps each preset name to its `cls` instance."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = _base_type(hints[f.name])
        dest = f"{cls.__name__}.{f.name}"
        help = _help(f, {name: getattr(c, f.name) for name, c in presets.items()})
        if kind is bool:
            parser.add_argument(
                option_flag(f.name),
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help,
            )
        elif kind is tuple:
            parser.add_argument(
                option_flag(f.name),
                dest=dest,
                type=_int_tuple,
                default=None,
                metavar="A,B,...",
                help=help,
            )
        else:
            parser.add_argument(
                option_flag(f.name),
                dest=dest,
                type=kind,
                default=None,
                metavar=kind.__name__.upper(),
                help=help,
            )


TRAIN_COMMAND = (
    "fastsp/train.py",
    "Train a diffusion model with the MSE or the self-perceptual objective.",
)


def build_parser(command: tuple[str, str] = TRAIN_COMMAND) -> argparse.ArgumentParser:
    """Every field of TrainConfig, UNetConfig and DiTConfig as an option, with its description,
    allowed values and default in --help (allowed values are checked by the configs, not by
    argparse, so that a refusal reads the same from the command line and from Python).
    `command`: (the name --help shows, what the command does), for commands that take a run's
    options (fastsp/train.py, the dry run)."""
    prog, purpose = command
    parser = _Parser(
        prog=prog,
        description=f"{purpose} "
        "Every config field is an option; a preset supplies the defaults, and each option "
        f"shows its default under --preset {DEFAULT_PRESET} and where other presets differ.",
        allow_abbrev=False,
    )
    preset = next(f for f in dataclasses.fields(TrainConfig) if f.name == "preset")
    parser.add_argument(
        "--preset", default=DEFAULT_PRESET, help=_help(preset, {DEFAULT_PRESET: DEFAULT_PRESET})
    )
    train_presets = {name: TrainConfig(**values, preset=name) for name, values in PRESETS.items()}
    _add_dataclass_options(
        parser.add_argument_group("training options"), TrainConfig, {"preset"}, train_presets
    )
    # in_channels and num_classes come from the data set; the rest of the UNet shape is an option.
    _add_dataclass_options(
        parser.add_argument_group("UNet options"),
        UNetConfig,
        {"in_channels", "num_classes"},
        UNET_PRESETS,
    )
    # The DiT's own fields; the ones it shares with the UNet (--context-dim,
    # --attention-backend) are the UNet options above, and apply to whichever model the preset
    # builds.
    shared = {f.name for f in dataclasses.fields(UNetConfig)}
    _add_dataclass_options(
        parser.add_argument_group(
            "DiT options (with a dit_* preset; --context-dim and --attention-backend apply too)"
        ),
        DiTConfig,
        shared,
        DIT_PRESETS,
    )
    return parser


def parse_args(
    argv: list[str] | None = None, command: tuple[str, str] = TRAIN_COMMAND
) -> tuple[TrainConfig, UNetConfig | DiTConfig]:
    """Parse the command line into validated configs; a bad value exits with status 2."""
    parser = build_parser(command)
    args = vars(parser.parse_args(argv))
    train_overrides = {
        k.split(".", 1)[1]: v
        for k, v in args.items()
        if k.startswith("TrainConfig.") and v is not None
    }
    model_overrides = {
        k.split(".", 1)[1]: v
        for k, v in args.items()
        if k.startswith(("UNetConfig.", "DiTConfig.")) and v is not None
    }
    try:
        return resolve(args["preset"], train_overrides, model_overrides)
    except ConfigError as error:
        parser.error(str(error))
