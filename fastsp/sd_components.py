"""Stable Diffusion's frozen components from local folders: the VAE and the CLIP text encoder.

Data preparation (fastsp.prepare) encodes images and captions with them, and prompt sampling
(fastsp.sample --prompt) encodes prompts and decodes latents; both go through this module, so
both encode the way diffusers' StableDiffusionPipeline does:

    context = text_encoder(tokenizer(prompt, padding="max_length", truncation=True,
                                     max_length=tokenizer.model_max_length).input_ids)[0]
    latents = vae.encode(image).latent_dist.mean * vae.config.scaling_factor   # or .sample()
    image   = vae.decode(latents / vae.config.scaling_factor).sample

Every path is a local folder: a component folder (its `config.json` names the class) or a whole
pipeline folder (its `vae/`, `text_encoder/`, `tokenizer/`). Nothing is downloaded. diffusers and
transformers come with the `sd` extra (`pip install -e ".[sd]"`); without them these functions
raise a ConfigError naming the extra, which the command-line tools turn into exit status 2.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

from fastsp.errors import ConfigError

SD_EXTRA = 'pip install -e ".[sd]"'


def require(module: str, what: str) -> Any:
    """Import `module` (diffusers or transformers) or raise a ConfigError naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(
            f"{what} needs {module}, which is not importable ({error}); install the Stable "
            f"Diffusion extra: {SD_EXTRA}"
        ) from None


def component_folder(path: str | Path, subfolder: str, expected: str, option: str) -> Path:
    """`path` itself if it holds a config.json, else its `subfolder` (a pipeline folder); a
    one-line ConfigError naming what was expected otherwise."""
    root = Path(path)
    for folder in (root, root / subfolder):
        if (folder / "config.json").is_file() or (
            subfolder == "tokenizer" and (folder / "tokenizer_config.json").is_file()
        ):
            return folder
    if not root.exists():
        problem = "does not exist"
    elif not root.is_dir():
        problem = "is a file, not a folder"
    else:
        problem = f"holds neither a config.json nor a {subfolder}/ folder"
    raise ConfigError(
        f"{option} {root} {problem}; expected a local {expected} folder (config.json and its "
        f"weights) or a Stable Diffusion pipeline folder with {subfolder}/ in it"
    )


def _class_name(folder: Path) -> str | None:
    """The class a config.json names: diffusers' `_class_name`, or transformers' architecture."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return config.get("_class_name") or (config.get("architectures") or [None])[0]
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def _from_pretrained(cls, folder: Path, option: str, files: str):
    """`cls.from_pretrained(folder)` from local files; what the libraries raise for a folder
    without weights or with weights they refuse (a pickle that would run code is refused by
    torch's weights_only load) becomes a one-line ConfigError naming the option and folder."""
    try:
        return cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(
            f"{option} {folder}: cannot load it ({reason}); pass a folder with {files}"
        ) from None


def load_vae(path: str | Path, device: torch.device | str = "cpu", dtype=torch.float32):
    """A diffusers AutoencoderKL from a local VAE or pipeline folder, in eval mode, frozen."""
    diffusers = require("diffusers", "--vae")
    folder = component_folder(path, "vae", "diffusers AutoencoderKL", "--vae")
    name = _class_name(folder)
    if name not in (None, "AutoencoderKL"):
        raise ConfigError(
            f"--vae {folder} holds a {name}, not an AutoencoderKL; pass the VAE of the pipeline"
        )
    vae = _from_pretrained(
        diffusers.AutoencoderKL,
        folder,
        "--vae",
        "config.json and diffusion_pytorch_model.safetensors",
    )
    return vae.to(device, dtype).eval().requires_grad_(False)


def load_text_encoder(
    path: str | Path,
    tokenizer_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype=torch.float32,
):
    """(tokenizer, CLIPTextModel) from local folders: the text encoder's (or a pipeline's), and
    the tokenizer's (default: beside the text encoder, as a pipeline folder has it)."""
    transformers = require("transformers", "--text-encoder")
    folder = component_folder(path, "text_encoder", "transformers CLIPTextModel", "--text-encoder")
    name = _class_name(folder)
    if name not in (None, "CLIPTextModel"):
        raise ConfigError(
            f"--text-encoder {folder} holds a {name}, not a CLIPTextModel; pass the text encoder "
            "of the pipeline"
        )
    tokenizer = _from_pretrained(
        transformers.CLIPTokenizer,
        tokenizer_folder(path, tokenizer_path),
        "--tokenizer",
        "vocab.json, merges.txt and tokenizer_config.json",
    )
    encoder = _from_pretrained(
        transformers.CLIPTextModel, folder, "--text-encoder", "config.json and model.safetensors"
    )
    positions = encoder.config.max_position_embeddings
    if not 0 < tokenizer.model_max_length <= positions:  # else an OverflowError or IndexError
        raise ConfigError(
            f"--tokenizer {tokenizer.name_or_path} pads prompts to {tokenizer.model_max_length} "
            f"tokens, but the text encoder {folder} has {positions} positions; pass the "
            f"tokenizer of the same pipeline (its tokenizer_config.json sets model_max_length)"
        )
    return tokenizer, encoder.to(device, dtype).eval().requires_grad_(False)


def tokenizer_folder(text_encoder_path: str | Path, tokenizer_path: str | Path | None) -> Path:
    """The tokenizer's folder: `tokenizer_path`, or the one beside the text encoder (as a
    pipeline folder has it)."""
    if tokenizer_path is None:
        folder = component_folder(
            text_encoder_path, "text_encoder", "transformers CLIPTextModel", "--text-encoder"
        )
        tokenizer_path = folder.parent if folder.name == "text_encoder" else folder
    return component_folder(tokenizer_path, "tokenizer", "CLIP tokenizer", "--tokenizer")


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """[B, L, D] context of `prompts`, as StableDiffusionPipeline encodes them (padded to the
    tokenizer's max length, truncated, the last hidden state)."""
    tokens = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    return text_encoder(tokens.input_ids.to(device))[0]


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, generator: torch.Generator | None = None):
    """Latents [B, C, H/f, W/f] of images [B, 3, H, W] in [-1, 1], times the VAE's scaling
    factor: the latent distribution's mean, or a sample from it when `generator` is given."""
    parameters = next(vae.parameters())
    posterior = vae.encode(images.to(parameters.device, parameters.dtype)).latent_dist
    latents = posterior.mean if generator is None else posterior.sample(generator=generator)
    return latents * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] of latents that carry the VAE's scaling factor."""
    parameters = next(vae.parameters())
    latents = latents.to(parameters.device, parameters.dtype) / vae.config.scaling_factor
    return vae.decode(latents).sample.clamp(-1, 1)
