"""A diffusers denoiser as the run's model (`--model diffusers --init FOLDER`): its families, the
model config a run records (`DiffusersConfig`), and finding the denoiser in a model or pipeline
folder.

A leaf module (the standard library, fastsp.errors and fastsp.config_fields only): the command line
resolves the configs without torch; fastsp.families builds the module. A family is what the data
and the process must match, decided from the folder's config.json:

    family  class                   process  conditions (prepared shards)
    sd      UNet2DConditionModel    ddpm     context
    sdxl    UNet2DConditionModel    ddpm     context, pooled, time_ids  (addition_embed_type
                                                                         "text_time")
    sd3     SD3Transformer2DModel   flow     context, pooled
    flux    FluxTransformer2DModel  flow     context, pooled  (+ guidance with guidance_embeds)
    pixart  PixArtTransformer2DModel ddpm    context  (PixArt-alpha's resolution and aspect ratio
                                                       from the latents' size)
    sana    SanaTransformer2DModel  flow     context

PixArt and Sana train on the context without the prompt's attention mask their pipelines pass
(every token attended, as SD3 and Flux do); Sana-Sprint (guidance_embeds) is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastsp.config_fields import (
    ATTENTION_BACKENDS,
    is_int,
    option,
    option_flag,
    require,
    require_choice,
    require_int,
    require_number,
)
from fastsp.errors import ConfigError

FAMILIES = ("sd", "sdxl", "sd3", "flux", "pixart", "sana")
# The attention backends of diffusers' processors (fastsp.family_attention): no "math" there
_BACKENDS = tuple(b for b in ATTENTION_BACKENDS if b != "math")
# The diffusers classes a run trains, each with its family (a UNet's is decided by its config)
DENOISER_CLASSES = {
    "UNet2DConditionModel": "sd",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "PixArtTransformer2DModel": "pixart",
    "SanaTransformer2DModel": "sana",
}
# The process each family was trained under: its weights predict that process's target
FAMILY_PROCESS = {
    "sd": "ddpm", "sdxl": "ddpm", "sd3": "flow", "flux": "flow", "pixart": "ddpm", "sana": "flow"
}  # fmt: skip
# The diffusers config key of each family's prompt-embedding width (sd, sdxl: cross_attention_dim)
_CONTEXT_KEY = {"sd3": "joint_attention_dim", "flux": "joint_attention_dim",
                "pixart": "caption_channels", "sana": "caption_channels"}  # fmt: skip
# The subfolder of a pipeline folder that holds the denoiser
_PIPELINE_SUBFOLDERS = ("unet", "transformer")
# SDXL's added time ids: original size (h, w), crop top-left, target size (h, w)
SDXL_TIME_IDS = 6


def family_of(class_name: str, config: dict[str, Any]) -> str:
    """The family of a diffusers denoiser config (see the module docstring)."""
    if class_name not in DENOISER_CLASSES:
        raise ConfigError(
            f"{class_name} is not a denoiser fastsp trains; supported: "
            f"{', '.join(DENOISER_CLASSES)}"
        )
    if class_name == "UNet2DConditionModel" and config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if class_name == "SanaTransformer2DModel" and config.get("guidance_embeds"):
        raise ConfigError(
            "a SanaTransformer2DModel with guidance_embeds (Sana-Sprint, trained by consistency "
            "distillation) is not supported; pass a Sana model folder without it"
        )
    return DENOISER_CLASSES[class_name]


@dataclass
class DiffusersConfig:
    """A diffusers denoiser trained in place: its class, family and diffusers config; validated
    on construction. in_channels, num_classes, context_dim and attention_backend mean what they
    mean in UNetConfig (the trainer's data checks read them)."""

    family: str = option("sd", "the model family (the process and conditions it needs)", FAMILIES)
    class_name: str = option("UNet2DConditionModel", "the diffusers class (config.json)")
    diffusers: dict = field(
        default_factory=dict, metadata={"help": "the diffusers config.json", "choices": None}
    )
    in_channels: int = option(4, "latent channels of the unpacked latents (from the data)")
    num_classes: int = option(0, "always 0: the families are text-conditioned")
    context_dim: int = option(0, "the prompt embeddings' width (from the data)")
    attention_backend: str = option(
        "auto", "xformers where it runs, else diffusers' SDPA (fastsp.family_attention)", _BACKENDS
    )
    guidance: float = option(1.0, "flux with guidance_embeds: the guidance value it is given")
    num_timesteps: int = option(1000, "fastsp's T: the model time t is sigma T under flow")

    def __post_init__(self):
        require_choice("family", self.family, FAMILIES)
        require(self, "diffusers", isinstance(self.diffusers, dict), "a config.json object")
        if family_of(self.class_name, self.diffusers) != self.family:
            raise ConfigError(
                f"family {self.family!r} does not match the {self.class_name} config "
                f"(a {family_of(self.class_name, self.diffusers)} model)"
            )
        require_int(self, "in_channels", 1)
        require_int(self, "num_classes", 0, 0, note=" (the families take no class labels)")
        require_int(self, "context_dim", 0)
        require_choice("attention_backend", self.attention_backend, _BACKENDS)
        require_number(self, "guidance", 0)
        require_int(self, "num_timesteps", 2)

    # ---- what the module takes, read from its diffusers config --------------------------------
    @property
    def latent_channels(self) -> int:
        return latent_channels(self.family, self.diffusers)

    @property
    def out_latent_channels(self) -> int:
        out = self.diffusers.get("out_channels") or self.diffusers.get("in_channels", 64)
        if self.family in ("pixart", "sana") and out == 2 * self.latent_channels:
            return self.latent_channels  # a learned variance half, which the pipelines drop
        return out // 4 if self.family == "flux" else out

    @property
    def context_width(self) -> int:
        """D of the prompt embeddings the module takes."""
        width = self.diffusers.get(_CONTEXT_KEY.get(self.family, "cross_attention_dim"))
        return width if is_int(width) else -1  # a per-block list: refused by check_data

    @property
    def pooled_dim(self) -> int:
        """P of the pooled prompt embedding the module takes (0: none)."""
        if self.family == "sdxl":
            total = self.diffusers.get("projection_class_embeddings_input_dim") or 0
            return total - SDXL_TIME_IDS * (self.diffusers.get("addition_time_embed_dim") or 0)
        if self.family in ("sd3", "flux"):
            return self.diffusers.get("pooled_projection_dim", 0)  # pixart, sana: none
        return 0

    @property
    def uses_time_ids(self) -> bool:
        return self.family == "sdxl"


def latent_channels(family: str, diffusers: dict[str, Any]) -> int:
    """Channels of the unpacked latents a module takes (Flux packs 2x2 patches of them)."""
    channels = diffusers.get("in_channels", 64 if family == "flux" else 4)
    return channels // 4 if family == "flux" else channels


def find_denoiser_folder(path: str | Path) -> Path | None:
    """The diffusers denoiser folder at `path`: the folder itself when its config.json names a
    class, else a pipeline folder's unet/ or transformer/ (as its model_index.json lists them);
    None when neither (a fastsp checkpoint or run folder)."""
    root = Path(path)
    folders = [root]
    index = _read_json(root / "model_index.json")
    if isinstance(index, dict):
        folders += [root / name for name in _PIPELINE_SUBFOLDERS if name in index]
    for folder in folders:
        config = _read_json(folder / "config.json")
        if isinstance(config, dict) and "_class_name" in config and "_diffusers_version" in config:
            return folder
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def diffusers_model_config(train: Any, model_overrides: dict[str, Any]) -> DiffusersConfig:
    """The model config of `--model diffusers --init FOLDER` (`train`: the TrainConfig): the
    folder's class and config, its family checked against the process, the run's guidance and T.
    Model options are refused (the folder's config.json is the architecture), but for
    --attention-backend."""
    init, diffusion = train.init, train.diffusion
    run = dict(guidance=train.guidance, num_timesteps=train.num_timesteps)
    model_overrides = dict(model_overrides)
    if "attention_backend" in model_overrides:
        run["attention_backend"] = model_overrides.pop("attention_backend")
    saved = _read_json(Path(init) / "config.json") if init else None  # a run or checkpoint folder
    if isinstance(saved, dict) and saved.get("model", {}).get("kind") == "diffusers":
        model = {k: v for k, v in saved["model"].items() if k != "kind"}
        return DiffusersConfig(**{**model, **run})
    folder = find_denoiser_folder(init) if init else None
    index = (_read_json(Path(init) / "model_index.json") if init else None) or {}
    parts = [part for part in _PIPELINE_SUBFOLDERS if part in index]
    if folder is None and parts:
        raise ConfigError(
            f"{init} is a pipeline folder whose model_index.json lists {parts[0]}/, but "
            f"{Path(init) / parts[0] / 'config.json'} is missing or unreadable: download that part"
        )
    if folder is None:
        raise ConfigError(
            f"--model diffusers needs --init a diffusers model folder (config.json), a pipeline "
            f"folder (model_index.json with unet/ or transformer/) or a run of one; "
            f"{init or 'none'} is none of them"
        )
    config = _read_json(folder / "config.json")
    family = family_of(config["_class_name"], config)
    if FAMILY_PROCESS[family] != diffusion:
        raise ConfigError(
            f"{folder} is a {family} model, trained under --diffusion {FAMILY_PROCESS[family]}; "
            f"pass --diffusion {FAMILY_PROCESS[family]} (this run has --diffusion {diffusion})"
        )
    if model_overrides:
        raise ConfigError(
            f"--model diffusers takes its architecture from {folder}/config.json; drop "
            f"{', '.join(option_flag(k) for k in model_overrides)}"
        )
    diffusers = {k: v for k, v in config.items() if not k.startswith("_")}
    return DiffusersConfig(
        family=family,
        class_name=config["_class_name"],
        diffusers=diffusers,
        in_channels=latent_channels(family, diffusers),
        **run,
    )


def check_data(model: DiffusersConfig, data_family: str, conditions: dict[str, Any]) -> None:
    """Refuse data prepared for another family or with conditions the module does not take.
    `conditions`: the data set's {"channels", "context_dim", "pooled_dim", "time_ids"}."""
    if data_family not in (None, model.family):  # None: hand-made shards or synthetic data
        raise ConfigError(
            f"the data was prepared for the {data_family} family, the model is a {model.family} "
            f"{model.class_name}; prepare it with the {model.family} pipeline "
            "(python -m fastsp.prepare --pipeline)"
        )
    expected = {
        "channels": model.latent_channels,
        "context_dim": model.context_width,
        "pooled_dim": model.pooled_dim,
        "time_ids": model.uses_time_ids,
    }
    differ = [f"{k} {conditions[k]} vs {v}" for k, v in expected.items() if conditions[k] != v]
    if model.out_latent_channels != model.latent_channels:
        differ.append(f"out_channels {model.out_latent_channels} vs {model.latent_channels}")
    if differ:
        raise ConfigError(
            f"the data does not fit the {model.class_name} ({'; '.join(differ)}: data vs "
            "model); prepare it with this model's pipeline"
        )


def check_run(train: Any, model: DiffusersConfig, resolution: int) -> None:
    """What a run of a diffusers denoiser needs (`train`: the TrainConfig): a text context
    and a resolution its patches and levels divide."""
    if train.cond != "context":
        raise ConfigError(
            f"a {model.family} model is text-conditioned: pass --cond context (not {train.cond})"
        )
    if model.family in ("sd", "sdxl"):
        multiple = 2 ** (len(model.diffusers.get("block_out_channels", (0,))) - 1)
    else:
        multiple = 2 if model.family == "flux" else model.diffusers.get("patch_size", 2)
    if resolution % multiple:
        raise ConfigError(
            f"--resolution {resolution} (the latent side) must be a multiple of {multiple} for "
            f"the {model.class_name}; pick a multiple of it"
        )


def check_source(folder: Path, model: DiffusersConfig) -> None:
    """Refuse a denoiser folder (--init, --perceptual-checkpoint) of another architecture."""
    config = _read_json(Path(folder) / "config.json") or {}
    theirs = {k: v for k, v in config.items() if not k.startswith("_")}
    differ = sorted(
        k for k in set(theirs) | set(model.diffusers) if theirs.get(k) != model.diffusers.get(k)
    )
    if config.get("_class_name") != model.class_name or differ:
        raise ConfigError(
            f"{folder} holds a {config.get('_class_name')} of another architecture than the "
            f"run's {model.class_name} (differs in {', '.join(differ) or '_class_name'}); pass "
            "a folder of the same model"
        )
