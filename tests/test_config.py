"""Config: presets resolve, every field is an option, invalid values are refused by name."""

import dataclasses

import pytest

from fastsp import config_cli, config_file, model_config
from fastsp import train as train_cli
from fastsp.config import PRESETS, TrainConfig
from fastsp.config_cli import parse_args
from fastsp.errors import ConfigError
from fastsp.model_config import UNetConfig


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_resolve(preset):
    train, model = parse_args(["--preset", preset])
    assert train.preset == preset and model == model_config.MODEL_PRESETS[preset]


def test_every_field_is_an_option():
    options = {o for a in config_cli.build_parser()._actions for o in a.option_strings}
    for cls in (TrainConfig, UNetConfig):
        for f in dataclasses.fields(cls):
            if f.name in ("preset", "in_channels", "num_classes"):
                continue
            assert "--" + f.name.replace("_", "-") in options, f.name


def _fields_with_options():
    """(field, option) for every field that is a command-line option."""
    skip = {"in_channels", "num_classes"}  # from the data set
    return [
        (f, "--" + f.name.replace("_", "-"))
        for cls in (TrainConfig, UNetConfig)
        for f in dataclasses.fields(cls)
        if not (cls is UNetConfig and f.name in skip)
    ]


def test_every_field_has_a_description():
    for cls in (TrainConfig, UNetConfig):
        for f in dataclasses.fields(cls):
            text = f.metadata.get("help")
            assert isinstance(text, str) and text.strip(), f"{cls.__name__}.{f.name}"
            assert "\n" not in text, f"{cls.__name__}.{f.name}: one line"
            choices = f.metadata.get("choices")
            assert choices is None or (choices and all(isinstance(c, str) for c in choices))
            if choices:  # the allowed values shown are the ones the config accepts
                assert getattr(cls(), f.name) in choices


def _help_entries(monkeypatch) -> dict[str, str]:
    """--help's entry of each option (its invocation and help text, whitespace collapsed)."""
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping inside a help text
    text = config_cli.build_parser().format_help()
    entries: list[str] = []
    for line in text[text.index("\noptions:") :].splitlines():
        if line.startswith("  -"):  # an option's invocation starts an entry
            entries.append(line)
        elif line.startswith("    ") and entries:  # its help, when on the next line
            entries[-1] += " " + line
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries}


def test_help_shows_each_option_with_its_description_default_and_choices(monkeypatch):
    entries = _help_entries(monkeypatch)
    for f, flag in _fields_with_options():
        entry = entries[flag]
        assert " ".join(f.metadata["help"].split()) in entry, (flag, entry)
        assert "(default: " in entry, (flag, entry)
        if f.metadata["choices"]:
            assert "one of " + ", ".join(f.metadata["choices"]) in entry, (flag, entry)
    # the default is the default preset's value; the other presets' values follow, named
    assert entries["--resolution"].endswith(
        "(default: 16 with --preset digits; tiny: 8; sd21: 64; dit_tiny: 8; dit_s2: 32; "
        "dit_b2: 32; dit_l2: 32; dit_xl2: 32)"
    )
    assert entries["--num-timesteps"].endswith("(default: 1000)")  # the same in every preset
    assert entries["--preset"].endswith(
        "one of tiny, digits, sd21, dit_tiny, dit_digits, dit_s2, dit_b2, dit_l2, dit_xl2 "
        "(default: digits)"
    )


def test_eps_at_zero_terminal_snr_is_one_rule_with_one_message():
    from fastsp.diffusion import NoiseSchedule

    with pytest.raises(ConfigError) as cli:
        TrainConfig(prediction_type="eps")
    with pytest.raises(ValueError) as api:
        NoiseSchedule(prediction_type="eps", zero_terminal_snr=True)
    # the same explanation; only the fix is worded for the caller (options vs keywords)
    explanation = str(cli.value).rsplit(": pass ", 1)[0]
    assert (
        explanation == str(api.value).rsplit(": pass ", 1)[0] and "divides by zero" in explanation
    )
    assert "--no-zero-terminal-snr" in str(cli.value) and "zero_terminal_snr=False" in str(
        api.value
    )


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
    values = config_file.to_dict(train, model)
    import json

    values = json.loads(json.dumps(values))
    assert config_file.train_config_from_dict(values["train"]) == train
    assert config_file.model_config_from_dict(values["model"]) == model


def test_unknown_fields_in_a_config_file_are_errors():
    with pytest.raises(ConfigError, match="unknown training fields"):
        config_file.train_config_from_dict({"stepz": 3})
    with pytest.raises(ConfigError, match="unknown model fields"):
        config_file.model_config_from_dict({"base_channel": 3})


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


# ---------------------------------------------------------------------------------------------
# Every field refuses its invalid values by name

NAN, INF = float("nan"), float("inf")

# field -> constructor overrides that must be refused. A cross-field rule sets the other fields it
# needs; each case must fail because of `field` (its name, or its --option, is in the message).
TRAIN_BAD: dict[str, list[dict]] = {
    "preset": [{"preset": "sd99"}],
    "data": [{"data": ""}, {"data": 3}, {"data_format": "synthetic", "data": "digits"}],
    "data_format": [{"data_format": "video"}],
    "resolution": [{"resolution": 0}, {"resolution": 100_000}, {"resolution": 16.0}],
    "channels": [{"channels": 0}, {"data_format": "images", "data": "imgs", "channels": 7}],
    "latent_scale": [{"latent_scale": 0.0}, {"latent_scale": INF}, {"latent_scale": NAN}],
    "random_flip": [{"random_flip": "yes"}],
    "num_workers": [{"num_workers": -1}],
    "on_bad_data": [{"on_bad_data": "ignore"}],
    "cond": [{"cond": "text"}],
    "label_dropout": [{"label_dropout": 1.0}, {"label_dropout": -0.1}, {"label_dropout": NAN}],
    "context_len": [{"context_len": 0}],
    "beta_schedule": [
        {"beta_schedule": "sigmoid"},
        {"diffusion": "flow", "beta_schedule": "cosine"},
    ],
    "num_timesteps": [{"num_timesteps": 1}, {"num_timesteps": 1000.0}],
    "beta_start": [{"beta_start": 0.0}, {"beta_start": NAN}, {"beta_start": -INF}],
    "beta_end": [{"beta_end": 1.0}, {"beta_end": 0.0001}, {"beta_end": INF}],
    "zero_terminal_snr": [{"zero_terminal_snr": 1}],
    "prediction_type": [
        {"prediction_type": "epsilon"},
        {"prediction_type": "eps"},
        {"diffusion": "flow", "prediction_type": "x0"},  # flow predicts the velocity
    ],
    "diffusion": [{"diffusion": "sde"}, {"diffusion": "flow", "beta_schedule": "linear"}],
    "flow_shift": [
        {"diffusion": "flow", "flow_shift": 0.0},
        {"diffusion": "flow", "flow_shift": NAN},
        {"flow_shift": 3.0},  # an option of flow, given to a DDPM run
    ],
    "flow_dynamic_shift": [
        {"diffusion": "flow", "flow_dynamic_shift": 1},
        {"flow_dynamic_shift": True},
        {"diffusion": "flow", "flow_dynamic_shift": True, "flow_shift": 3.0},
    ],
    "flow_t_sampling": [
        {"diffusion": "flow", "flow_t_sampling": "normal"},
        {"flow_t_sampling": "logit_normal"},
    ],
    "flow_logit_mean": [{"diffusion": "flow", "flow_logit_mean": NAN}, {"flow_logit_mean": 0.5}],
    "flow_logit_std": [
        {"diffusion": "flow", "flow_logit_std": 0.0},
        {"diffusion": "flow", "flow_logit_std": -1.0},
        {"flow_logit_std": 2.0},
    ],
    "objective": [
        {"objective": "lpips"},
        {"objective": "model_guidance", "cond": "none"},  # guides with the null condition
        {"objective": "model_guidance", "label_dropout": 0.0},  # which CFG dropout trains
    ],
    "init": [{"init": None}, {"objective": "self_perceptual", "init": ""}],
    "perceptual_checkpoint": [
        {"perceptual_checkpoint": 3},
        {"perceptual_source": "ema", "perceptual_checkpoint": "runs/stage1"},
    ],
    "perceptual_source": [{"perceptual_source": "online"}],
    "perceptual_layers": [
        {"perceptual_layers": ""},
        {"perceptual_layers": "mid:nan"},
        {"perceptual_layers": "mid:inf"},
        {"perceptual_layers": "mid:-1"},
        {"train_step": "reference", "perceptual_layers": "down1"},
    ],
    "perceptual_on_t": [
        {"perceptual_on_t": "noisiest"},
        {"perceptual_on_t": 3},
        {"perceptual_on_t": "700,699", "objective": "self_perceptual", "init": "runs/a"},
        {"perceptual_on_t": "0,1000", "objective": "self_perceptual", "init": "runs/a"},
        {"perceptual_on_t": "0,699"},  # gates a loss that --objective mse does not have
    ],
    "perceptual_t": [
        {"perceptual_t": "gaussian"},
        {"perceptual_t": "0,1000"},
        {"num_timesteps": 10, "sample_steps": 10, "perceptual_t": "0,10"},
    ],
    "predicted_noise": [
        {"predicted_noise": "x0"},
        {"train_step": "reference", "predicted_noise": "eps"},
    ],
    "distance": [{"distance": "cosine"}],
    "perceptual_norm": [
        {"perceptual_norm": "layer"},
        {"perceptual_norm": "energy"},  # normalises a loss that --objective mse does not have
    ],
    "mg_scale": [
        {"objective": "model_guidance", "mg_scale": 1.0},  # w >= 1: no fixed point
        {"objective": "model_guidance", "mg_scale": NAN},
        {"mg_scale": 0.3},  # an option of model guidance, given to an MSE run
    ],
    "mg_t_max": [{"objective": "model_guidance", "mg_t_max": 1.5}, {"mg_t_max": 1.0}],
    "mse_weight": [{"mse_weight": -0.1}, {"mse_weight": INF}],
    "lora_rank": [{"lora_rank": -1}, {"lora_rank": 2.0}],
    "model": [{"model": "transformers"}],
    "guidance": [{"guidance": -1.0}, {"guidance": NAN}],
    "lora_alpha": [{"lora_alpha": -1.0}, {"lora_alpha": NAN}],
    "lora_targets": [{"lora_targets": 3}],
    "lora_dropout": [{"lora_dropout": 1.0}, {"lora_dropout": -0.1}],
    "lora_init": [{"lora_init": None}],
    "parallel": [{"parallel": "zero3"}],
    "steps": [{"steps": 0}, {"steps": 1.5}],
    "batch_size": [{"batch_size": 0}, {"batch_size": True}],
    "grad_accum": [{"grad_accum": 0}],
    "lr": [{"lr": 0.0}, {"lr": -1e-3}, {"lr": INF}, {"lr": NAN}, {"lr": "1e-3"}],
    "lr_warmup_steps": [{"lr_warmup_steps": -1}],
    "weight_decay": [{"weight_decay": -0.01}, {"weight_decay": INF}],
    "adam_beta1": [{"adam_beta1": 1.0}, {"adam_beta1": NAN}],
    "adam_beta2": [{"adam_beta2": -0.1}, {"adam_beta2": INF}],
    "adam_eps": [{"adam_eps": 0.0}, {"adam_eps": INF}],
    "optimizer": [{"optimizer": "sgd"}],
    "grad_clip": [{"grad_clip": -1.0}, {"grad_clip": INF}],
    "max_bad_steps": [{"max_bad_steps": 0}],
    "ema_decay": [{"ema_decay": 1.0}, {"ema_decay": -INF}],
    "device": [{"device": "tpu"}],
    "precision": [{"precision": "fp16"}, {"train_step": "reference", "precision": "bf16"}],
    "channels_last": [{"channels_last": "no"}],
    "train_step": [{"train_step": "slow"}],
    "cuda_graph": [{"cuda_graph": None}],
    "compile": [{"compile": 0}],
    "deterministic": [{"deterministic": "yes"}],
    "batched_branches": [{"batched_branches": "true"}],
    "seed": [{"seed": -1}, {"seed": 2**32}],
    "out": [{"out": ""}],
    "resume": [{"resume": "yes"}],
    "log_every": [{"log_every": 0}],
    "checkpoint_every": [{"checkpoint_every": -1}],
    "keep_last": [{"keep_last": -1}],
    "sample_every": [{"sample_every": -1}],
    "sample_num": [{"sample_num": 0}],
    "sample_steps": [{"sample_steps": 0}, {"num_timesteps": 10, "sample_steps": 11}],
    "sample_sampler": [{"sample_sampler": "heun"}],
    "sample_cfg": [{"sample_cfg": -1.0}, {"sample_cfg": INF}],
    "sample_cfg_rescale": [{"sample_cfg_rescale": 1.5}, {"sample_cfg_rescale": NAN}],
}

UNET_BAD: dict[str, list[dict]] = {
    "in_channels": [{"in_channels": 0}],
    "base_channels": [{"base_channels": 0}, {"base_channels": "64"}],
    "channel_mult": [{"channel_mult": ()}, {"channel_mult": (1, 0)}, {"channel_mult": 2}],
    "num_res_blocks": [{"num_res_blocks": 0}],
    "attention_levels": [
        {"attention_levels": (3,)},
        {"attention_levels": (1, 1)},
        {"attention_levels": 1},
    ],
    "head_dim": [{"head_dim": 0}, {"head_dim": 48}],
    "transformer_depth": [{"transformer_depth": 0}],
    "context_dim": [{"context_dim": -1}],
    "num_classes": [{"num_classes": -1}],
    "scale_shift_norm": [{"scale_shift_norm": "yes"}],
    "norm_groups": [{"norm_groups": 0}, {"norm_groups": 7}],
    "dropout": [{"dropout": 1.0}, {"dropout": NAN}, {"dropout": INF}],
    "attention_backend": [{"attention_backend": "flash"}],
    "mid_attention": [{"mid_attention": 1}],
    "linear_projection": [{"linear_projection": "yes"}],
    "num_heads": [{"num_heads": (8,)}, {"num_heads": (8, 0, 8)}, {"num_heads": (8, 7, 8)}],
}

# "Class.field" -> why that field has no invalid value. Empty: every field has one (booleans
# refuse non-booleans). The tests below fail for a new field until it gets a case above or a
# reason here, and for a name listed here that has cases or no longer exists.
NO_INVALID_VALUE: dict[str, str] = {}


@pytest.mark.parametrize(
    ("cls", "field"),
    [(cls, f.name) for cls in (TrainConfig, UNetConfig) for f in dataclasses.fields(cls)],
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_every_field_refuses_invalid_values_by_name(cls, field):
    cases = (TRAIN_BAD if cls is TrainConfig else UNET_BAD).get(field)
    name = f"{cls.__name__}.{field}"
    if name in NO_INVALID_VALUE:
        assert not cases, f"{name} has invalid-value cases: drop it from NO_INVALID_VALUE"
        return
    assert cases, f"no invalid value for {name}: add a case, or a reason to NO_INVALID_VALUE"
    # the defaults are valid, so each refusal comes from the overrides
    cls()
    for overrides in cases:
        with pytest.raises(ValueError) as error:
            cls(**overrides)
        if cls is TrainConfig:  # UNetConfig raises ValueError; config.resolve converts it
            assert type(error.value) is ConfigError, overrides
        message = str(error.value)
        assert field in message or "--" + field.replace("_", "-") in message, (overrides, message)


def test_the_exempt_fields_are_exactly_those_without_a_case():
    fields, covered = set(), set()
    for cls, cases in ((TrainConfig, TRAIN_BAD), (UNetConfig, UNET_BAD)):
        fields |= {f"{cls.__name__}.{f.name}" for f in dataclasses.fields(cls)}
        covered |= {f"{cls.__name__}.{name}" for name in cases}
    assert covered <= fields, covered - fields  # a case for a field that no longer exists
    assert set(NO_INVALID_VALUE) == fields - covered


@pytest.mark.parametrize(
    "overrides",
    [
        {"resolution": 4096},
        {"num_timesteps": 2, "sample_steps": 2, "perceptual_t": "0,1"},
        {"seed": 2**32 - 1},
        {"beta_start": 0.01, "beta_end": 0.01},
        {"grad_clip": 0.0, "sample_cfg": 0.0, "sample_cfg_rescale": 1.0, "lr": 1},
        {"data": "synthetic", "channels": 4},
        {"data": "latents_dir", "data_format": "latents", "channels": 16},
        {"data": "imgs", "data_format": "images", "channels": 3},
        {"perceptual_layers": "mid:1,down1:0.5", "init": "runs/a", "objective": "self_perceptual"},
        {"perceptual_on_t": "0,999", "init": "runs/a", "objective": "self_perceptual"},
        {"perceptual_on_t": "500,500", "init": "runs/a", "objective": "self_perceptual"},
        {"perceptual_norm": "energy", "init": "runs/a", "objective": "self_perceptual"},
        {"objective": "model_guidance", "mg_scale": 0.0, "mg_t_max": 0.0},
        {"objective": "model_guidance", "mg_scale": 0.99, "mg_t_max": 1.0, "cond": "context"},
    ],
)
def test_boundary_values_are_accepted(overrides):
    TrainConfig(**overrides)


# ---------------------------------------------------------------------------------------------
# The same refusals through the command line: status 2, one short message, no files


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (40 * i, 80, 120)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--lr", "inf"], "lr"),
        (["--lr", "nan"], "lr"),
        (["--num-timesteps", "1"], "num_timesteps"),
        (["--resolution", "100000"], "resolution"),
        (["--channels", "7", "--data", "IMAGES", "--cond", "none"], "channels"),
        (["--channels", "7", "--data", "IMAGES", "--data-format", "images"], "channels"),
    ],
    ids=[
        "lr-inf",
        "lr-nan",
        "num-timesteps-1",
        "resolution-100000",
        "channels-7",
        "channels-7-fmt",
    ],
)
def test_cli_refuses_bad_values_with_status_2(tmp_path, capsys, image_folder, argv, field):
    argv = [str(image_folder) if a == "IMAGES" else a for a in argv]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:  # parse errors exit; data errors return 2
        raise SystemExit(train_cli.main(["--preset", "tiny", *argv, "--out", str(out)]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and field in err, err
    assert len(err.splitlines()) <= 2, err  # the message, and at most the --help hint
    assert not out.exists(), "a refused start must not write the run folder"
