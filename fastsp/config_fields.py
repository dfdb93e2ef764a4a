"""What a config field may hold: the option vocabularies, the field declaration, the validators
and the parsers of option values.

A leaf module (the standard library and fastsp.errors only). The modules that use an option's
vocabulary (the schedules, the samplers, the losses, the attention backends, the data readers)
import it from here, as do the config dataclasses (fastsp.model_config, fastsp.config): each
vocabulary, each value parser and each rule between options is defined once. Every validator
raises a ConfigError that names the field, its value and what is allowed, with the field written
as its command-line option where the fix is one (`option_flag`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from fastsp.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Vocabularies: the allowed values of each option, imported from here by the modules that use them

# fastsp.diffusion and fastsp.flow
DIFFUSIONS = ("ddpm", "flow")
FLOW_T_SAMPLING = ("uniform", "logit_normal")
PREDICTION_TYPES = ("v", "eps", "x0")
BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
SAMPLERS = ("ddim", "euler")
# fastsp.perceptual
PERCEPTUAL_T = ("uniform", "same")  # or a (low, high) range of timesteps, inclusive
PREDICTED_NOISE = ("eps_hat", "eps")
DISTANCES = ("l2", "l1")
# none (the paper) | channel (LPL's per-channel "shared" normalisation) | energy (per example)
FEATURE_NORMS = ("none", "channel", "energy")
FEATURE_NORM_EPS = 1e-6  # added to the real features' variance (channel) or energy (energy)
# fastsp.attention
ATTENTION_BACKENDS = ("auto", "xformers", "sdpa", "math")
# fastsp.data
CONDITIONINGS = ("none", "class", "context")
DATA_FORMATS = ("auto", "digits", "images", "latents", "letters", "synthetic")
BUILTIN_DATA = ("digits", "letters", "synthetic")  # data sets that read no files
ON_BAD_DATA = ("stop", "skip")  # what a bad file does: stop the run, or leave the file out
# the trainer
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adamw", "apex_fused_adam")
TRAIN_STEPS = ("fast", "reference")
OBJECTIVES = ("mse", "self_perceptual", "model_guidance")
PERCEPTUAL_SOURCES = ("frozen", "ema")
PARALLELS = ("ddp", "fsdp")  # fastsp.training.parallel
MODEL_SOURCES = ("fastsp", "diffusers")  # fastsp.models, fastsp.families


# What a resume may change, declared on each TrainConfig field (`option(..., resume=...)`; a test
# checks that every field has a rule; fastsp.training.resume applies them). SAME: the field
# defines what the run learns (data, conditioning, diffusion, objective, optimizer and EMA
# settings) or what the checkpoint's state means (the global batch and the seed fix the data
# stream); a resume with another value is refused. MAY_CHANGE: how the run executes, how long,
# what it logs and writes. SAID: may change, and the start says so. The optimizer's
# hyperparameters besides the learning rate are SAME: load_state_dict would put the checkpoint's
# back into the optimizer while config.json claimed the new ones.
SAME, MAY_CHANGE, SAID = "same", "may change", "said"
RESUME_RULES = (SAME, MAY_CHANGE, SAID)


def option(
    default: Any,
    help: str,
    choices: tuple[str, ...] | None = None,
    resume: str | None = None,
    absent_is_default: bool = False,
) -> Any:
    """A config field with its one-line description (and allowed values) as the field's metadata,
    and for a TrainConfig field what a resume may do to it (one of RESUME_RULES).

    `absent_is_default`: a field added after config.json files were written, whose default is
    what those runs did (the DDPM process, no LoRA, DDP): a file without it reads as the default,
    so the runs of an earlier version still resume, sample and export
    (fastsp.config_file). Any other missing field is refused.

    fastsp.config_cli shows both in `--help`; the dataclass default is `default` (tuples are
    immutable, so they are plain defaults too).
    """
    metadata = {"help": help, "choices": choices, "absent_is_default": absent_is_default}
    if resume is not None:
        if resume not in RESUME_RULES:
            raise ValueError(f"resume={resume!r}: one of {', '.join(RESUME_RULES)}")
        metadata["resume"] = resume
    return dataclasses.field(default=default, metadata=metadata)


def added_option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A TrainConfig option added after runs were written without it, whose default is what
    those runs did: kept on resume (SAME), and absent from an earlier config.json means default."""
    return option(default, help, choices, resume=SAME, absent_is_default=True)


# ---------------------------------------------------------------------------------------------
# Validation helpers: each raises a ConfigError that names the field, the value and what's allowed


def require(config: Any, name: str, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(
            f"invalid value {getattr(config, name)!r} for {name}: it must be {allowed}"
        )


def require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"invalid value {value!r} for {name}: choose one of {', '.join(choices)}")


def is_int(value: Any) -> bool:
    """An integer that is not a bool (True is an int in Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def require_int(config: Any, name: str, low: int, high: int | None = None, note: str = "") -> None:
    value = getattr(config, name)
    ok = is_int(value) and value >= low and (high is None or value <= high)
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    require(config, name, ok, allowed + note)


def require_number(
    config: Any,
    name: str,
    low: float,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    what: str = "a finite number",
    note: str = "",
) -> None:
    """A real, finite value in the interval; an int is taken where a float is expected."""
    value = getattr(config, name)
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and (high is None or (value < high if high_open else value <= high))
    )
    if high is None:
        allowed = f"{what} {'>' if low_open else '>='} {low}"
    else:
        allowed = f"{what} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    require(config, name, ok, allowed + note)


def option_flag(name: str) -> str:
    """A field's command-line option: num_timesteps -> --num-timesteps."""
    return "--" + name.replace("_", "-")


def show_value(value: Any) -> str:
    """A value as it is written on the command line (a default in --help, a value in a refusal)."""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return "''" if value == "" else str(value)


def require_bool(config: Any, name: str) -> None:
    flag = option_flag(name)
    require(
        config,
        name,
        isinstance(getattr(config, name), bool),
        f"True or False ({flag} / --no-{flag[2:]})",
    )


def require_str(config: Any, name: str, allowed: str, empty_ok: bool = False) -> None:
    """A string; `empty_ok` for the optional paths, where "" means "not given"."""
    value = getattr(config, name)
    require(config, name, isinstance(value, str) and (empty_ok or value != ""), allowed)


def is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


# ---------------------------------------------------------------------------------------------
# Rules between options, and the parsers of option values (pure: strings and flags in)


def refuse_eps_at_zero_terminal_snr(
    prediction_type: str, zero_terminal_snr: bool, *, cli: bool = False
) -> None:
    """Raise ConfigError for eps-prediction on a schedule with zero terminal SNR (PAPER.md).

    x0_hat = (x_t - s_t eps_hat) / a_t, and zero terminal SNR makes a_{T-1} = 0. The callers
    reduce what they hold to the flag: a config's zero_terminal_snr, a schedule whose
    alphas_cumprod reaches 0, a batch whose a_t is 0. `cli` words the fix as command-line
    options instead of keyword arguments.
    """
    if prediction_type != "eps" or not zero_terminal_snr:
        return
    fix = (
        "pass --prediction-type v, or --no-zero-terminal-snr"
        if cli
        else 'pass prediction_type="v", or zero_terminal_snr=False'
    )
    raise ConfigError(
        "prediction_type 'eps' cannot be used with zero terminal SNR (zero_terminal_snr=True, or "
        "any zero-terminal-SNR schedule: alphas_cumprod reaches 0): at the last timestep "
        "a_t = sqrt(alpha_bar_t) = 0, so x0_hat = (x_t - s_t * eps_hat) / a_t divides by zero. "
        "Use prediction_type 'v' (the paper's choice) or 'x0', or a schedule without zero "
        f"terminal SNR: {fix}."
    )


# The fields of each process; a run of the other one refuses any of them set off its default.
DDPM_FIELDS = ("beta_schedule", "beta_start", "beta_end", "zero_terminal_snr", "prediction_type")
FLOW_FIELDS = ("flow_shift", "flow_dynamic_shift", "flow_t_sampling", "flow_logit_mean")
FLOW_FIELDS += ("flow_logit_std",)


def check_process_options(config: Any) -> None:
    """The process's fields of a TrainConfig `config`, then a ConfigError for an option of the
    process the run does not train with (--diffusion flow with --no-zero-terminal-snr, ddpm with
    --flow-shift, ...): it would be ignored. Set means off its default."""
    require_choice("diffusion", config.diffusion, DIFFUSIONS)
    require_number(config, "flow_shift", 0, low_open=True)
    require_bool(config, "flow_dynamic_shift")
    require_choice("flow_t_sampling", config.flow_t_sampling, FLOW_T_SAMPLING)
    mean = config.flow_logit_mean
    real = isinstance(mean, numbers.Real) and not isinstance(mean, bool)
    require(config, "flow_logit_mean", real and math.isfinite(mean), "a finite number")
    require_number(config, "flow_logit_std", 0, low_open=True)
    other = FLOW_FIELDS if config.diffusion == "ddpm" else DDPM_FIELDS
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    owner = "flow" if config.diffusion == "ddpm" else "ddpm"
    for name in other:
        value = getattr(config, name)
        if value != defaults[name]:
            flag = option_flag(name)
            given = flag if value is True else f"--no-{flag[2:]}" if value is False else None
            raise ConfigError(
                f"{given or f'{flag} {show_value(value)}'} is an option of --diffusion {owner}, "
                f"but this run trains with --diffusion {config.diffusion}; drop it, or pass "
                f"--diffusion {owner}"
            )
    if config.diffusion == "flow" and config.flow_dynamic_shift and config.flow_shift != 1:
        raise ConfigError(
            f"--flow-dynamic-shift sets the shift from the resolution (Flux); drop --flow-shift "
            f"{show_value(config.flow_shift)}"
        )


# The options of one objective: set off their defaults with another objective they would be
# ignored, so a config refuses them (check_objective_options) and the dry run's comparison steps
# reset them (with_objective).
OBJECTIVE_OPTIONS = {
    "perceptual_on_t": "self_perceptual",
    "perceptual_norm": "self_perceptual",
    "mg_scale": "model_guidance",
    "mg_t_max": "model_guidance",
}


def check_objective_options(config: Any) -> None:
    """The options of --perceptual-norm and model guidance on a TrainConfig `config`, then a
    ConfigError for an option of one objective (OBJECTIVE_OPTIONS) set off its default with
    another, and for model guidance without what it guides with: a condition and CFG dropout."""
    require_choice("perceptual_norm", config.perceptual_norm, FEATURE_NORMS)
    require_number(config, "mg_scale", 0, 1, high_open=True, note=" (w >= 1 has no fixed point)")
    require_number(config, "mg_t_max", 0, 1)
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for name, objective in OBJECTIVE_OPTIONS.items():
        value = getattr(config, name)
        if value != defaults[name] and config.objective != objective:
            raise ConfigError(
                f"{option_flag(name)} {show_value(value)} is an option of --objective "
                f"{objective}, but --objective is {config.objective}; drop it, or pass "
                f"--objective {objective}"
            )
    if config.objective == "model_guidance" and (
        config.cond == "none" or config.label_dropout == 0
    ):
        raise ConfigError(
            f"--objective model_guidance guides with the null condition CFG dropout trains, but "
            f"this run has --cond {config.cond} and --label-dropout {config.label_dropout}; pass "
            "--cond class or --cond context and a --label-dropout above 0 (e.g. 0.1)"
        )


def with_objective(config: Any, objective: str) -> Any:
    """`config` (a TrainConfig) with `objective`, the other objectives' options at their
    defaults (the dry run's steps of the other objectives)."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    reset = {n: defaults[n] for n, owner in OBJECTIVE_OPTIONS.items() if owner != objective}
    return dataclasses.replace(config, objective=objective, **reset)


def parse_layers(spec: str | Sequence[str] | Mapping[str, float]) -> dict[str, float]:
    """ "mid" | "mid:1,down2:0.5" | ["mid", "down2"] | {"mid": 1.0} -> {layer: weight}."""
    if isinstance(spec, Mapping):
        layers = {str(k): float(v) for k, v in spec.items()}
    else:
        items = spec.split(",") if isinstance(spec, str) else list(spec)
        layers = {}
        for item in (i.strip() for i in items):
            name, _, weight = item.partition(":")
            try:
                layers[name.strip()] = float(weight) if weight else 1.0
            except ValueError:
                raise ValueError(
                    f"layer weight {weight!r} in {item!r} is not a number; "
                    "write e.g. 'mid:1,down2:0.5'"
                ) from None
    if not layers or any(not name for name in layers):
        raise ValueError(f"no layer names in {spec!r}; write e.g. 'mid' or 'mid:1,down2:0.5'")
    if any(w < 0 for w in layers.values()):
        raise ValueError(f"layer weights must be >= 0, got {layers}")
    return layers


def parse_perceptual_on_t(
    spec: str | tuple[int, int] | None, num_timesteps: int
) -> tuple[int, int] | None:
    """ "all" (or None) | "LOW,HIGH" (inclusive) -> None (the self-perceptual loss at every
    online timestep, the paper) | (low, high): the loss only where LOW <= t <= HIGH."""
    if spec is None or spec == "all":
        return None
    try:
        low, high = (int(v) for v in (spec.split(",") if isinstance(spec, str) else spec))
    except (TypeError, ValueError):
        raise ValueError(
            f"perceptual_on_t {spec!r} must be 'all' or a range 'LOW,HIGH' of online timesteps "
            "(e.g. 0,699: the self-perceptual loss there, MSE at the noisiest 30%)"
        ) from None
    if not 0 <= low <= high < num_timesteps:
        raise ValueError(
            f"perceptual_on_t range {spec!r} must satisfy 0 <= LOW <= HIGH < {num_timesteps}"
        )
    return low, high


def parse_perceptual_t(spec: str | tuple[int, int], num_timesteps: int) -> str | tuple[int, int]:
    """ "uniform" | "same" | "LOW,HIGH" (inclusive) -> "uniform" | "same" | (low, high)."""
    if isinstance(spec, str) and spec in PERCEPTUAL_T:
        return spec
    try:
        low, high = (int(v) for v in (spec.split(",") if isinstance(spec, str) else spec))
    except (TypeError, ValueError):
        raise ValueError(
            f"perceptual_t {spec!r} must be 'uniform', 'same', or a range 'LOW,HIGH' of timesteps"
        ) from None
    if not 0 <= low <= high < num_timesteps:
        raise ValueError(
            f"perceptual_t range {spec!r} must satisfy 0 <= LOW <= HIGH < {num_timesteps}"
        )
    return low, high


def check_reference_step(cfg) -> None:
    """The naive reference step (--train-step reference) implements only the paper's defaults
    (PAPER.md Algorithm 1): any other value of `cfg` (a TrainConfig) is refused, naming it."""
    paper = {
        "perceptual_layers": "mid",
        "predicted_noise": "eps_hat",
        "distance": "l2",
        "mse_weight": 0.0,
        "precision": ("auto", "fp32"),
        "optimizer": "adamw",
    }
    for name, allowed in paper.items():
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        if getattr(cfg, name) not in allowed:
            raise ConfigError(
                f"--train-step reference runs the paper's defaults in fp32 only; "
                f"--{name.replace('_', '-')} {getattr(cfg, name)!r} needs --train-step fast "
                f"(or pass --{name.replace('_', '-')} {allowed[-1]})"
            )
