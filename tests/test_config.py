"""Config: presets resolve, every field is an option, invalid values are refused by name."""

import dataclasses

import pytest

from fastsp import config as config_lib
from fastsp.config import PRESETS, ConfigError, TrainConfig, parse_args
from fastsp.unet import UNET_PRESETS, UNetConfig


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_resolve(preset):
    train, model = parse_args(["--preset", preset])
    assert train.preset == preset and model == UNET_PRESETS[preset]


def test_every_field_is_an_option():
    options = {o for a in config_lib.build_parser()._actions for o in a.option_strings}
    for cls in (TrainConfig, UNetConfig):
        for f in dataclasses.fields(cls):
            if f.name in ("preset", "in_channels", "num_classes"):
                continue
            assert "--" + f.name.replace("_", "-") in options, f.name


def test_overrides_types_and_booleans():
    train, model = parse_args(
        [
            "--preset",
            "tiny",
            "--steps",
            "7",
            "--lr",
            "3e-4",
            "--no-zero-terminal-snr",
            "--prediction-type",
            "eps",
            "--channel-mult",
            "1,2,3",
            "--channels-last",
        ]
    )
    assert train.steps == 7 and train.lr == 3e-4 and train.zero_terminal_snr is False
    assert train.prediction_type == "eps" and train.channels_last is True
    assert model.channel_mult == (1, 2, 3)


def test_config_round_trips_through_json():
    train, model = parse_args(["--preset", "digits", "--attention-levels", "2"])
    values = config_lib.to_dict(train, model)
    import json

    values = json.loads(json.dumps(values))
    assert config_lib.train_config_from_dict(values["train"]) == train
    assert config_lib.model_config_from_dict(values["model"]) == model


def test_unknown_fields_in_a_config_file_are_errors():
    with pytest.raises(ConfigError, match="unknown training fields"):
        config_lib.train_config_from_dict({"stepz": 3})
    with pytest.raises(ConfigError, match="unknown model fields"):
        config_lib.model_config_from_dict({"base_channel": 3})


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("steps", 0, ">= 1"),
        ("lr", -1.0, "> 0"),
        ("ema_decay", 1.0, "[0, 1)"),
        ("device", "tpu", "auto, cpu, cuda"),
        ("sample_sampler", "heun", "ddim, euler"),
        ("grad_clip", -1.0, ">= 0"),
    ],
)
def test_invalid_values_name_the_field(field, value, needle):
    with pytest.raises(ConfigError) as error:
        TrainConfig(**{field: value})
    assert (
        field in str(error.value) and needle in str(error.value) and repr(value) in str(error.value)
    )
