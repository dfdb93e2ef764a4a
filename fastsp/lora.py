"""LoRA adapters through peft on fastsp's UNet and DiT and on the diffusers families (SD, SDXL,
SD3, Flux: fastsp.families), and the perceptual pass with them off.

With `--lora-rank R` the online model is the stage-1 weights W, frozen, plus an adapter per
targeted layer, W + (alpha / R) B A, with B initialised to zero (peft's LoraConfig). The base
network with its adapters switched off is then exactly the frozen perceptual network f* of
PAPER.md's Algorithm 1, at step 0 and ever after, so stage 2 needs no second copy of the weights:
`adapters_off(model)` runs the perceptual pass through the online model itself. The switch is a
host-side flag on each peft layer (BaseTunerLayer.enable_adapters): it reads no tensor, and a
captured step records the two adapters-off passes and the adapters-on pass as the kernels they
launch.

peft does the work (inject_adapter_in_model, the adapter switches, get/set_peft_model_state_dict,
LoraLayer.merge); this module owns the rest: the default targets of each model kind and the
refusals, the EMA of the adapters alone (its base tensors are the model's), the diffusers LoRA
format of `fastsp.export` and `--lora-init`, and merging into a plain network. On a family model
the adapters go into the diffusers module itself (`DiffusersDenoiser.denoiser`, as diffusers'
`add_adapter` puts them), so peft's names are diffusers' and its file is the one diffusers'
training scripts write: `unet.` + names for SD and SDXL, `transformer.` + names for SD3 and Flux.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from peft import (
    LoraConfig,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from fastsp.errors import CheckpointError, ConfigError
from fastsp.families import DiffusersDenoiser, named_by_path
from fastsp.family_config import DiffusersConfig
from fastsp.model_config import DiTConfig, UNetConfig, model_kind
from fastsp.models import build_model

ModelConfig = UNetConfig | DiTConfig | DiffusersConfig

# SD3's and Flux's joint attention: the image stream's projections and the context stream's
_JOINT_ATTENTION = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
# Attention projections and feed-forward layers of each model kind (matched as peft matches
# target_modules: a module whose name is the target or ends in "." + target).
DEFAULT_TARGETS = {
    "unet": (
        "attn1.to_qkv",
        "attn1.to_out",
        "attn2.to_q",
        "attn2.to_kv",
        "attn2.to_out",
        "ff.proj_in",
        "ff.proj_out",
    ),
    "dit": ("attn.to_qkv", "attn.to_out", "mlp.fc1", "mlp.fc2"),
    # The diffusers families: the defaults of diffusers' own LoRA scripts
    # (examples/dreambooth/train_dreambooth_lora_sdxl.py: to_k, to_q, to_v, to_out.0 of every
    # attention; train_dreambooth_lora_sd3.py and _flux.py without --lora_layers: the joint
    # attention's image projections and its context projections add_*_proj and to_add_out)
    "sd": ("to_k", "to_q", "to_v", "to_out.0"),
    "sdxl": ("to_k", "to_q", "to_v", "to_out.0"),
    "sd3": _JOINT_ATTENTION,
    "flux": _JOINT_ATTENTION,
    # PixArt's self- and cross-attention (attn1, attn2) as SD's; Sana: to_k, to_q, to_v, the
    # default of examples/dreambooth/train_dreambooth_lora_sana.py
    "pixart": ("to_k", "to_q", "to_v", "to_out.0"),
    "sana": ("to_k", "to_q", "to_v"),
}
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' name of an adapter file
_OPTIONS = ("lora_alpha", "lora_targets", "lora_dropout", "lora_init")  # they need --lora-rank


def _kind(model_cfg: ModelConfig) -> str:
    """The key of DEFAULT_TARGETS: the model kind, or a diffusers model's family."""
    return model_cfg.family if isinstance(model_cfg, DiffusersConfig) else model_kind(model_cfg)


def _describe(model_cfg: ModelConfig) -> str:
    if isinstance(model_cfg, DiffusersConfig):
        return f"{model_cfg.family} {model_cfg.class_name}"
    return model_kind(model_cfg)


def targets(cfg, model_cfg: ModelConfig) -> tuple[str, ...]:
    """The module names (peft's suffix match) that get adapters: --lora-targets or the
    defaults of the model kind (a diffusers model: of its family)."""
    if cfg.lora_targets:
        return tuple(name.strip() for name in cfg.lora_targets.split(",") if name.strip())
    return DEFAULT_TARGETS[_kind(model_cfg)]


def lora_config(cfg, model_cfg: ModelConfig) -> LoraConfig:
    """peft's LoraConfig of a run of `cfg` (a TrainConfig with lora_rank > 0)."""
    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha or cfg.lora_rank,  # 0: alpha = rank, a scale of 1
        lora_dropout=cfg.lora_dropout,
        target_modules=list(targets(cfg, model_cfg)),
    )


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def check_options(cfg, model_cfg: ModelConfig) -> None:
    """Refuse LoRA options without --lora-rank, and targets that name no layer of the model
    (listing the layer names it has). Builds the model on the meta device (a diffusers model:
    its class's from_config there): reads nothing."""
    if cfg.lora_rank == 0:
        given = [
            "--" + name.replace("_", "-") for name in _OPTIONS if getattr(cfg, name) not in (0, "")
        ]
        if given:
            raise ConfigError(
                f"{', '.join(given)}: LoRA options, but --lora-rank is 0 (a full fine-tune); "
                "pass --lora-rank R (e.g. 16), or drop them"
            )
        return
    with torch.device("meta"):
        model = named_by_path(build_model(model_cfg))
    layers = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    unmatched = [t for t in targets(cfg, model_cfg) if not any(_matches(n, t) for n in layers)]
    if (cfg.lora_targets and unmatched) or len(unmatched) == len(targets(cfg, model_cfg)):
        names = sorted({_short_name(n) for n in layers})
        given = "--lora-targets" if cfg.lora_targets else "the default --lora-targets"
        raise ConfigError(
            f"{given} {','.join(unmatched)}: no layer of the {_describe(model_cfg)} is named "
            f"so; pass --lora-targets with names its Linear and Conv2d layers end in: "
            f"{', '.join(names)}"
        )


def _short_name(name: str) -> str:
    """A layer's name as a target: its last part, with its parent's unless that is an index."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if len(parts) > 1 and not parts[-2].isdigit() else parts[-1]


def add_adapters(model: torch.nn.Module, cfg, model_cfg: ModelConfig):
    """`model` with peft's LoRA layers injected in place (B = 0: the same function), its base
    weights frozen: only the adapters require gradients."""
    inject_adapter_in_model(lora_config(cfg, model_cfg), named_by_path(model))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return model


def has_adapters(model: torch.nn.Module) -> bool:
    return any(isinstance(module, LoraLayer) for module in model.modules())


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module):
    """Inside: `model` is its frozen base network (every adapter off, eval mode), PAPER.md's f*.
    Host-side flags only (no tensor is read): safe inside a captured step."""
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    training = model.training
    model.eval()
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        model.train(training)


def ema_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The EMA network of a LoRA model: a copy whose frozen base tensors are the model's own
    (no second copy of the weights) and whose adapters are its own, in eval mode."""
    frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
    return copy.deepcopy(model, memo=dict(frozen)).requires_grad_(False).eval()


def tie_frozen(ema: torch.nn.Module, model: torch.nn.Module) -> None:
    """Point `ema`'s frozen base parameters at `model`'s again (after `to_empty` gave each
    module fresh storage), so the EMA holds the adapters alone."""
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            owner, _, leaf = name.rpartition(".")
            ema.get_submodule(owner)._parameters[leaf] = parameter


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of `model` under peft's names (`...to_qkv.lora_A.weight`; a family
    model's under diffusers' module names)."""
    return get_peft_model_state_dict(named_by_path(model))


def merged(model: torch.nn.Module, model_cfg: ModelConfig) -> torch.nn.Module:
    """A plain network (no peft layers) holding W + (alpha / R) B A for every adapted layer
    (peft's LoraLayer.merge on a copy); `model` is left as it was."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.merge()
    state = {
        name.replace(".base_layer.", "."): tensor
        for name, tensor in model.state_dict().items()
        if "lora_" not in name
    }
    plain = build_model(model_cfg).to(next(model.parameters()).dtype)
    plain.load_state_dict(state)
    return plain


# ---- the diffusers LoRA format: a pipeline's "unet." or "transformer." + diffusers' names ------


def _pipeline_family(model: torch.nn.Module):
    """fastsp.family_pipelines' Family whose pipeline loads `model`'s adapters: a fastsp UNet's
    is Stable Diffusion's."""
    from fastsp.family_pipelines import FAMILIES, SUPPORTED

    name = model.family if isinstance(model, DiffusersDenoiser) else "sd"
    family = next((family for family in FAMILIES.values() if family.name == name), None)
    if family is None:
        raise ConfigError(
            f"a LoRA adapter of a {name} model: adapters are written in the format of the "
            f"pipelines fastsp supports ({SUPPORTED}); pass --merge --model-only to write the "
            f"merged {name} model folder instead"
        )
    return family


def _their_modules(model: torch.nn.Module, module: str) -> list[str]:
    """The diffusers module names of an adapted layer of `model`: a family model's own name,
    a fastsp UNet's diffusers names (three for a fused to_qkv, two for to_kv)."""
    if isinstance(model, DiffusersDenoiser):
        return [module]
    from fastsp.diffusers_unet import diffusers_names

    return [name.removesuffix(".weight") for name in diffusers_names(module + ".weight")]


def diffusers_lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters of a fastsp UNet or a family model under diffusers' module names, as a
    pipeline's `load_lora_weights` reads them. A fused projection (to_qkv, to_kv) splits
    exactly: each part W_i + B_i A keeps the shared A and takes its rows of B."""
    out = {}
    for key, tensor in adapter_state(model).items():
        module, kind = key.split(".lora_")
        theirs = _their_modules(model, module)
        if kind == "B.weight":
            parts = tensor.chunk(len(theirs))
        else:  # one A per part: a file holds no two names of one tensor
            parts = [tensor.clone() for _ in theirs]
        for name, part in zip(theirs, parts, strict=True):
            out[f"{name}.lora_{kind}"] = part.detach().contiguous()
    return out


def diffusers_lora_metadata(cfg, state: dict[str, torch.Tensor]) -> dict:
    """The LoraConfig diffusers rebuilds the adapter from (rank, alpha, its module names)."""
    modules = sorted({key.split(".lora_")[0] for key in state})
    return {
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha or cfg.lora_rank,
        "target_modules": modules,
    }


def save_diffusers_lora(model: torch.nn.Module, cfg, out_dir: Path) -> Path:
    """OUT/pytorch_lora_weights.safetensors through diffusers' own writer, the save_lora_weights
    of the pipeline that loads it (StableDiffusionPipeline for a fastsp UNet and SD,
    StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline), with the LoraConfig as
    metadata."""
    import diffusers

    family = _pipeline_family(model)
    state = diffusers_lora_state(model)
    getattr(diffusers, family.pipeline_class).save_lora_weights(
        out_dir,
        **{
            f"{family.denoiser}_lora_layers": state,
            f"{family.denoiser}_lora_adapter_metadata": diffusers_lora_metadata(cfg, state),
        },
    )
    return out_dir / LORA_WEIGHTS_NAME


def load_adapter(model: torch.nn.Module, source: Path) -> None:
    """--lora-init: the adapter weights of `source` into `model` (adapters of the same rank and
    targets): the EMA adapters of a fastsp LoRA checkpoint (or run folder: its latest), or a
    diffusers LoRA file (or a folder holding pytorch_lora_weights.safetensors) as
    `save_diffusers_lora` writes it."""
    source = Path(source)
    if source.is_dir() and (source / LORA_WEIGHTS_NAME).is_file():
        source = source / LORA_WEIGHTS_NAME
    if source.is_file():
        state = _from_diffusers(model, load_file(str(source)), source)
    else:  # a checkpoint or run folder, whole or sharded
        from fastsp.checkpoint import load_model

        loaded = load_model(source, "ema")
        if not loaded.train_config.lora_rank:
            raise CheckpointError(
                f"--lora-init {source} is a full fine-tune, not a LoRA run; pass it as --init"
            )
        state = adapter_state(loaded.model)
    ours = adapter_state(model)
    if {k: tuple(v.shape) for k, v in state.items()} != {
        k: tuple(v.shape) for k, v in ours.items()
    }:
        raise CheckpointError(
            f"--lora-init {source} holds adapters of another rank or on other layers than "
            f"--lora-rank {next(iter(ours.values())).shape[0]} with these targets; pass the "
            "--lora-rank and --lora-targets it was trained with"
        )
    set_peft_model_state_dict(named_by_path(model), state)


def _from_diffusers(model, weights: dict[str, torch.Tensor], source: Path) -> dict:
    """diffusers LoRA tensors ("unet." or "transformer." + diffusers names) under peft's names
    of `model`: the inverse of `diffusers_lora_state`. A fused projection needs one A shared by
    its parts."""
    prefix = _pipeline_family(model).denoiser + "."
    state = {}
    for key in adapter_state(model):
        module, kind = key.split(".lora_")
        theirs = [f"{prefix}{name}.lora_{kind}" for name in _their_modules(model, module)]
        missing = [name for name in theirs if name not in weights]
        if missing:
            raise CheckpointError(
                f"--lora-init {source} has no adapter {missing[0]}; pass an adapter trained "
                "with the same --lora-targets"
            )
        parts = [weights[name] for name in theirs]
        if kind == "A.weight":
            if any(not torch.equal(part, parts[0]) for part in parts[1:]):
                raise CheckpointError(
                    f"--lora-init {source}: the adapters of {', '.join(theirs)} differ in A, "
                    "which fastsp's fused projection cannot hold at this rank; pass an adapter "
                    "exported by fastsp"
                )
            state[key] = parts[0]
        else:
            state[key] = torch.cat(parts)
    return state
