"""A diffusers denoiser trained in place: `DiffusersDenoiser` wraps diffusers' own module
(`UNet2DConditionModel` for SD 1.x/2.x and SDXL, `SD3Transformer2DModel`, `FluxTransformer2DModel`,
`PixArtTransformer2DModel`, `SanaTransformer2DModel`) behind fastsp's model call, and names its
feature taps.

    forward(x, t, *, labels=None, context=None, pooled=None, time_ids=None) -> prediction like x

x is the UNPACKED latents [B, C, H, W] and t fastsp's time (DDPM: the integer step; flow:
sigma * T). Each family's conventions are written once, here (what diffusers' pipelines pass):

    sd     unet(x, t, encoder_hidden_states=context)
    sdxl   + added_cond_kwargs {"text_embeds": pooled, "time_ids": time_ids}
    sd3    transformer(x, timestep=1000 sigma, encoder_hidden_states=context,
                       pooled_projections=pooled)                      (StableDiffusion3Pipeline)
    flux   transformer(pack(x), timestep=sigma, guidance=g, pooled_projections=pooled,
                       encoder_hidden_states=context, img_ids, txt_ids), unpacked (FluxPipeline:
                       2x2 patches of the latents as tokens; img_ids (0, row, col) per token,
                       txt_ids zeros; the guidance value g with guidance_embeds)
    pixart transformer(x, timestep=t, encoder_hidden_states=context, added_cond_kwargs
                       {"resolution": 8 (H, W), "aspect_ratio": H / W} where the module uses
                       them (PixArt-alpha at 1024 px), else None)        (PixArtAlphaPipeline)
    sana   transformer(x, timestep=1000 sigma timestep_scale, encoder_hidden_states=context)
                                                                          (SanaPipeline)

PixArt's and Sana's pipelines keep the first C output channels where out_channels is 2 C (a
learned variance), and so does the wrapper: the variance half is not trained.

Feature taps (`feature_taps`, read by fastsp.perceptual.FeatureExtractor, which stops the forward
after the deepest): "mid" is the UNet's mid_block, and for the transformers the image-token hidden
states after the first depth // 2 blocks. Flux's blocks count in the order they run, the 19
double-stream `transformer_blocks` then the 38 single-stream `single_transformer_blocks` of
Flux.1 (57: "mid" is single_transformer_blocks.8, whose output ends the first 28); every block of
both lists returns (text tokens, image tokens), the single-stream ones having split their joint
sequence back at the text length, so a block's tap is its second output. PixArt's and Sana's
blocks (cross-attention to the text, no text stream) return the image tokens alone: "mid" of
PixArt-alpha's 28 is transformer_blocks.13. Any module path of the diffusers module is a tap too
(an SD3 or Flux block: its image tokens; another module: its first output).

The module's state_dict keeps diffusers' key names (no "denoiser." prefix), so a checkpoint's
model.safetensors loads with `cls.from_config(config); load_state_dict(...)`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from fastsp.family_config import DiffusersConfig

_PREFIX = "denoiser."
# A transformer block, whose output is (text tokens, image tokens)
_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.\d+")
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
# PixArt's VAE (SD's): 8 pixels per latent, 2 ** (len(block_out_channels) - 1)
_PIXART_VAE_SCALE = 8


def denoiser_class(config: DiffusersConfig) -> type[nn.Module]:
    import diffusers

    return getattr(diffusers, config.class_name)


def _strip_prefix(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _PREFIX)]:
        state_dict[prefix + key[len(prefix + _PREFIX) :]] = state_dict.pop(key)


def _add_prefix(module, state_dict, prefix, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + _PREFIX + key[len(prefix) :]] = state_dict.pop(key)


class DiffusersDenoiser(nn.Module):
    """The diffusers module of `config` (freshly initialised by `from_config`, or `denoiser`)."""

    def __init__(self, config: DiffusersConfig, denoiser: nn.Module | None = None):
        super().__init__()
        self.config = config
        if denoiser is None:
            denoiser = denoiser_class(config).from_config(config.diffusers)
        self.denoiser = denoiser
        self.register_state_dict_post_hook(_strip_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)
        self.family = config.family
        self.mid_name = mid_tap_name(config)

    def forward(self, x, t, *, labels=None, context=None, pooled=None, time_ids=None):
        if labels is not None:
            raise ValueError(f"a {self.family} model takes no class labels")
        if self.family in ("sd", "sdxl"):
            added = {"text_embeds": pooled, "time_ids": time_ids} if self.family == "sdxl" else None
            return self.denoiser(
                x, t, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False
            )[0]
        if self.family == "pixart":
            return self._pixart(x, t, context)
        sigma = t.to(x.dtype) / self.config.num_timesteps  # fastsp's flow time t = sigma T
        if self.family == "sana":
            timestep = 1000 * sigma * self.denoiser.config.timestep_scale
            out = self.denoiser(x, context, timestep, return_dict=False)[0]
            return out[:, : x.shape[1]]  # SanaPipeline: a learned variance half is dropped
        if self.family == "sd3":
            return self.denoiser(
                hidden_states=x,
                timestep=1000 * sigma,
                encoder_hidden_states=context,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        return self._flux(x, sigma, context, pooled)

    def _pixart(self, x, t, context):
        b, _, h, w = x.shape
        added = {"resolution": None, "aspect_ratio": None}
        if self.denoiser.use_additional_conditions:  # PixArtAlphaPipeline: the size in pixels
            size = [torch.full((b,), float(_PIXART_VAE_SCALE * n), device=x.device) for n in (h, w)]
            added = {
                "resolution": torch.stack(size, dim=1).to(x.dtype),
                "aspect_ratio": torch.full((b, 1), h / w, device=x.device, dtype=x.dtype),
            }
        out = self.denoiser(
            x, encoder_hidden_states=context, timestep=t, added_cond_kwargs=added, return_dict=False
        )[0]
        return out[:, : x.shape[1]]  # PixArtAlphaPipeline: the learned variance half is dropped

    def _flux(self, x, sigma, context, pooled):
        b, c, h, w = x.shape
        # FluxPipeline._pack_latents: [B, C, H, W] -> [B, (H/2)(W/2), 4C], 2x2 patches as tokens
        tokens = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        tokens = tokens.reshape(b, (h // 2) * (w // 2), c * 4)
        # FluxPipeline._prepare_latent_image_ids: (0, row, col) per token; text ids are zeros
        rows = torch.arange(h // 2, device=x.device, dtype=x.dtype)[:, None].expand(-1, w // 2)
        cols = torch.arange(w // 2, device=x.device, dtype=x.dtype)[None, :].expand(h // 2, -1)
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
        txt_ids = torch.zeros(context.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:  # FluxPipeline: the guidance scale itself
            guidance = torch.full((b,), self.config.guidance, device=x.device, dtype=x.dtype)
        out = self.denoiser(
            hidden_states=tokens,
            timestep=sigma,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=context,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        # FluxPipeline._unpack_latents
        out = out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, h, w)

    # ---- feature taps ---------------------------------------------------------------------------
    def feature_taps(self, layers) -> dict[str, tuple[nn.Module, int | None]]:
        """{tap: (module, which output)} of the taps `layers` ("mid" or module paths of the
        diffusers module): index 1 for a transformer block's image tokens, None for the module's
        first output. Raises ValueError naming the valid taps."""
        modules = dict(self.denoiser.named_modules())
        paths = {name: self.mid_name if name == "mid" else name for name in layers}
        unknown = [name for name, path in paths.items() if path not in modules or not path]
        if unknown:
            blocks = [n for n in modules if n and ("." not in n or _BLOCK.fullmatch(n))]
            raise ValueError(
                f"unknown perceptual layer(s) {unknown} of the {self.config.class_name}; valid: "
                f"mid ({self.mid_name}), or a module path such as {', '.join(blocks[:40])}"
            )
        containers = [n for n, p in paths.items() if isinstance(modules[p], _CONTAINERS)]
        if containers:
            raise ValueError(
                f"perceptual layer(s) {containers}: a module list, which never runs itself; "
                "tap one of its modules (e.g. transformer_blocks.3)"
            )
        return {name: (modules[path], self.output_index(path)) for name, path in paths.items()}

    def output_index(self, path: str) -> int | None:
        return 1 if self.family in ("sd3", "flux") and _BLOCK.fullmatch(path) else None

    @property
    def mid_tap(self) -> tuple[nn.Module, int | None]:
        """The "mid" tap's module and output index (the reference step hooks it)."""
        return dict(self.denoiser.named_modules())[self.mid_name], self.output_index(self.mid_name)


def named_by_path(model: nn.Module) -> nn.Module:
    """The module of `model` whose parameter paths are its checkpoint keys: a DiffusersDenoiser's
    diffusers module (the wrapper keeps diffusers' key names through state-dict hooks, which
    lookups by module path, peft's and torch.distributed.checkpoint's, do not follow); any other
    model itself."""
    return model.denoiser if isinstance(model, DiffusersDenoiser) else model


def mid_tap_name(config: DiffusersConfig) -> str:
    """The module path of the "mid" tap (module docstring)."""
    if config.family in ("sd", "sdxl"):
        return "mid_block"
    double = config.diffusers.get("num_layers", 0)
    single = config.diffusers.get("num_single_layers", 0) if config.family == "flux" else 0
    first = (double + single) // 2  # the tap is the output of the first `first` blocks
    if first <= double:
        return f"transformer_blocks.{first - 1}"
    return f"single_transformer_blocks.{first - double - 1}"


def from_pretrained(config: DiffusersConfig, folder: Path) -> DiffusersDenoiser:
    """The wrapper around diffusers' own `from_pretrained` of a model folder (fp32)."""
    denoiser = denoiser_class(config).from_pretrained(folder, torch_dtype=torch.float32)
    return DiffusersDenoiser(config, denoiser)
