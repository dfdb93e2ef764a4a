"""The frozen encoders fastsp.prepare turns images and captions into tensors with: Stable
Diffusion's VAE and CLIP text encoder from component folders (--vae/--text-encoder), or a
diffusers pipeline folder's own (--pipeline: SD 1/2, SDXL, SD3/3.5, Flux.1).

prepare owns the folder (shards, manifest, resume, torchrun); an encoder here owns only how a
batch of images and captions becomes tensors, and what metadata.json says about that:

    latents = (vae.encode(image).latent_dist.mean - shift_factor) * scaling_factor  # or .sample()
    context, pooled = Pipeline.encode_prompt(caption)    # the pipeline class's own

shift_factor is the VAE config's (SD3 and Flux; 0 where it has none), exactly what the
pipeline's decode inverts (`latents / scaling_factor + shift_factor`). The prompt embeddings
are `encode_prompt`'s, unchanged: SD's context [77, 768 or 1024]; SDXL's penultimate-layer
context of both CLIP encoders [77, 2048] and the second's pooled projection [1280]; SD3's two
CLIP contexts beside T5's [77 + T, 4096] and both pooled projections [2048]; Flux's T5 context
[T, 4096] and CLIP's pooled output [768] (T: --max-sequence-length, default the pipeline's own:
SD3 256, Flux 512). SDXL also conditions on each image's size and crop: its time ids are
(original height, width, crop top, left, target height, width), the order SDXL's pipeline builds
`add_time_ids` in, from the image before and after fastsp.image_folder's resize and center crop.

The pipeline is loaded without its denoiser's weights: the denoiser is built on the meta device
from its config (SD3's `encode_prompt` reads the transformer's `joint_attention_dim` for a
pipeline without T5), and the components prompt encoding does not use (safety checker, image
encoder, feature extractor) are not loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fastsp import sd_components
from fastsp.errors import ConfigError
from fastsp.family_pipelines import load_pipeline, pipeline_family, read_model_index
from fastsp.sd_components import require

__all__ = [
    "PipelineEncoders",
    "SDComponentEncoders",
    "encoder_options",
    "load_encoders",
    "time_ids",
]

# The components prompt encoding and latent encoding use (with the denoiser's config).
_ENCODING_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")
# The pipeline's default T5 prompt length of the families that have one.
_T5_LENGTH = {"sd3": 256, "flux": 512}


def time_ids(original_size, crop_top_left, resolution: int) -> torch.Tensor:
    """SDXL's added time ids [6] of one image: original (height, width), the crop's (top,
    left), the target (height, width) (StableDiffusionXLPipeline's `add_time_ids` order)."""
    return torch.tensor(
        [*original_size, *crop_top_left, resolution, resolution], dtype=torch.float32
    )


def _latent_shape(vae, resolution: int) -> tuple[int, int, int]:
    """[C, h, w] of one latent; refuses a resolution the VAE cannot halve evenly."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise ConfigError(
            f"--resolution {resolution} must be divisible by {factor} (the VAE's downsampling "
            f"factor); pick a multiple of {factor}"
        )
    side = resolution // factor
    return (vae.config.latent_channels, side, side)


def _json_config(config) -> dict:
    import json

    return json.loads(json.dumps(dict(config), default=str))


class SDComponentEncoders:
    """Stable Diffusion's VAE and CLIP text encoder from component (or pipeline) folders, encoding
    as StableDiffusionPipeline does (fastsp.sd_components): today's --vae/--text-encoder path."""

    image_option, text_option = "--vae", "--text-encoder"
    time_ids = False

    def __init__(self, vae: str, text_encoder: str, tokenizer: str | None, device) -> None:
        self.vae = sd_components.load_vae(vae, device=device)
        self.tokenizer, self.text_encoder = sd_components.load_text_encoder(
            text_encoder, tokenizer, device=device
        )
        self.folders = self.options(vae, text_encoder, tokenizer)

    @staticmethod
    def options(vae: str, text_encoder: str, tokenizer: str | None) -> dict:
        """What the shards depend on besides the images and the prepare options: the folders."""
        vae_folder = sd_components.component_folder(vae, "vae", "diffusers AutoencoderKL", "--vae")
        encoder_folder = sd_components.component_folder(
            text_encoder, "text_encoder", "transformers CLIPTextModel", "--text-encoder"
        )
        tokenizer_folder = sd_components.tokenizer_folder(text_encoder, tokenizer)
        return {
            "vae": os.path.abspath(vae_folder),
            "text_encoder": os.path.abspath(encoder_folder),
            "tokenizer": os.path.abspath(tokenizer_folder),
        }

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        return _latent_shape(self.vae, resolution)

    def encode_images(self, pixels: torch.Tensor, generator) -> torch.Tensor:
        return sd_components.encode_images(self.vae, pixels, generator)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"context": sd_components.encode_text(self.tokenizer, self.text_encoder, prompts)}

    def metadata(self) -> dict:
        return {
            "scaling_factor": float(self.vae.config.scaling_factor),
            "vae": {"folder": self.folders["vae"], "config": _json_config(self.vae.config)},
            "text_encoder": {
                "folder": self.folders["text_encoder"],
                "config": _json_config(self.text_encoder.config.to_dict()),
            },
            "tokenizer": {
                "folder": self.folders["tokenizer"],
                "model_max_length": self.tokenizer.model_max_length,
            },
        }


def _encode_sd(pipeline, prompts, device, length):
    return pipeline.encode_prompt(prompts, device, 1, False)[0], None


def _encode_sdxl(pipeline, prompts, device, length):
    context, _, pooled, _ = pipeline.encode_prompt(
        prompts, device=device, do_classifier_free_guidance=False
    )
    return context, pooled


def _encode_sd3(pipeline, prompts, device, length):
    context, _, pooled, _ = pipeline.encode_prompt(
        prompts,
        None,
        None,
        device=device,
        do_classifier_free_guidance=False,
        max_sequence_length=length,
    )
    return context, pooled


def _encode_flux(pipeline, prompts, device, length):
    context, pooled, _ = pipeline.encode_prompt(
        prompts, None, device=device, max_sequence_length=length
    )
    return context, pooled


# family -> the call of its pipeline's encode_prompt: (context [B, L, D], pooled [B, P] or None)
_PROMPT_ENCODERS = {
    "sd": _encode_sd,
    "sdxl": _encode_sdxl,
    "sd3": _encode_sd3,
    "flux": _encode_flux,
}


class PipelineEncoders:
    """A diffusers pipeline folder's VAE and text encoders, encoding through the pipeline class's
    own `encode_prompt` (module docstring)."""

    image_option = text_option = "--pipeline"

    def __init__(self, folder: str, max_sequence_length: int | None, device) -> None:
        self.family = pipeline_family(folder)
        self.folder = os.path.abspath(folder)
        self.max_sequence_length = self.sequence_length(self.family.name, max_sequence_length)
        self.time_ids = self.family.name == "sdxl"
        self.device = torch.device(device)
        diffusers = require("diffusers", "--pipeline")
        denoiser_class = getattr(diffusers, self.family.denoiser_class)
        try:
            config = denoiser_class.load_config(Path(folder) / self.family.denoiser)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"--pipeline {folder}: its {self.family.denoiser}/ has no readable config.json "
                f"({type(error).__name__}); copy the complete pipeline folder"
            ) from None
        with torch.device("meta"):  # its config only: no weights are read or allocated
            denoiser = denoiser_class.from_config(config)
        unused = {
            name: None
            for name, entry in read_model_index(folder).items()
            if isinstance(entry, list)
            and name != self.family.denoiser
            and not name.startswith(_ENCODING_PARTS)
        }
        self.pipeline = load_pipeline(folder, denoiser, **unused)
        for name, component in self.pipeline.components.items():
            if isinstance(component, torch.nn.Module) and name != self.family.denoiser:
                component.to(self.device).eval().requires_grad_(False)
        self.vae = self.pipeline.vae
        if getattr(self.vae.config, "latents_mean", None) is not None:
            raise ConfigError(
                f"--pipeline {folder}: its VAE normalizes latents with latents_mean/latents_std, "
                f"which fastsp's shards do not describe; supported VAEs scale (and shift) only"
            )
        self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @staticmethod
    def sequence_length(family: str, requested: int | None) -> int | None:
        """The T5 prompt length of SD3 and Flux (the pipeline's default unless requested);
        a ConfigError for a request to a family without T5."""
        if family not in _T5_LENGTH:
            if requested is not None:
                raise ConfigError(
                    f"--max-sequence-length sets the T5 prompt length of SD3 and Flux, but the "
                    f"pipeline is {family}, which has no T5 encoder; drop the option"
                )
            return None
        if requested is not None and requested < 1:
            raise ConfigError("--max-sequence-length must be >= 1")
        return requested or _T5_LENGTH[family]

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        return _latent_shape(self.vae, resolution)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator) -> torch.Tensor:
        """[B, C, h, w] of images [B, 3, R, R] in [-1, 1]: (mean or sample - shift) * scale."""
        parameters = next(self.vae.parameters())
        posterior = self.vae.encode(pixels.to(parameters.device, parameters.dtype)).latent_dist
        latents = posterior.mean if generator is None else posterior.sample(generator=generator)
        return (latents - self.shift_factor) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """{"context": [B, L, D], "pooled": [B, P] (not for SD)}: encode_prompt's outputs."""
        encode = _PROMPT_ENCODERS[self.family.name]
        context, pooled = encode(self.pipeline, prompts, self.device, self.max_sequence_length)
        return {"context": context} if pooled is None else {"context": context, "pooled": pooled}

    def metadata(self) -> dict:
        return {
            "family": self.family.name,
            "pipeline_class": self.family.pipeline_class,
            "pipeline_folder": self.folder,
            "scaling_factor": float(self.vae.config.scaling_factor),
            "shift_factor": self.shift_factor,
            "time_ids": self.time_ids,
            "max_sequence_length": self.max_sequence_length,
            "vae": {
                "folder": os.path.join(self.folder, "vae"),
                "config": _json_config(self.vae.config),
            },
        }


def encoder_options(
    pipeline: str | None,
    max_sequence_length: int | None,
    vae: str | None,
    text_encoder: str | None,
    tokenizer: str | None,
) -> dict:
    """The encoders' folders (and the T5 length) as the shards' options record them, checked
    before any model is loaded: --pipeline, or --vae with --text-encoder, never both."""
    given = {"--vae": vae, "--text-encoder": text_encoder, "--tokenizer": tokenizer}
    components = [option for option, value in given.items() if value is not None]
    if pipeline is not None:
        if components:
            raise ConfigError(
                f"--pipeline takes the VAE and text encoders from the pipeline folder; drop "
                f"{' and '.join(components)}"
            )
        family = pipeline_family(pipeline)
        return {
            "pipeline": os.path.abspath(pipeline),
            "max_sequence_length": PipelineEncoders.sequence_length(
                family.name, max_sequence_length
            ),
        }
    if vae is None or text_encoder is None:
        raise ConfigError(
            "pass the encoders: --pipeline PIPELINE (a diffusers pipeline folder), or --vae and "
            "--text-encoder (Stable Diffusion's component or pipeline folders)"
        )
    if max_sequence_length is not None:
        raise ConfigError(
            "--max-sequence-length sets the T5 prompt length of a --pipeline; drop it"
        )
    return SDComponentEncoders.options(vae, text_encoder, tokenizer)


def load_encoders(pipeline, max_sequence_length, vae, text_encoder, tokenizer, device):
    """The encoders `encoder_options` checked, loaded onto `device`."""
    if pipeline is not None:
        return PipelineEncoders(pipeline, max_sequence_length, device)
    return SDComponentEncoders(vae, text_encoder, tokenizer, device)
