"""Tiny random diffusers denoisers of each family (fastsp.families), their model folders and
latent shards in the issue-24 contract's format, written by hand (no downloads)."""

import json
from pathlib import Path

import torch
from sd_tiny import TINY_UNET_CONFIG

CONTEXT_LEN = 5
# Each family's constructor arguments (diffusers 0.42), the latent channels and the pooled width.
TINY = {
    "sd": dict(
        cls="UNet2DConditionModel",
        config={**TINY_UNET_CONFIG, "cross_attention_dim": 16},
        pooled=0,
    ),
    "sdxl": dict(
        cls="UNet2DConditionModel",
        config={  # SDXL's layout: attention in the lower block only, deeper there
            **TINY_UNET_CONFIG,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2),
            "attention_head_dim": (2, 4),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 4,
            "projection_class_embeddings_input_dim": 8 + 6 * 4,  # pooled 8 + 6 time ids x 4
            "cross_attention_dim": 16,
        },
        pooled=8,
    ),
    "sd3": dict(
        cls="SD3Transformer2DModel",
        config=dict(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            caption_projection_dim=16,
            pooled_projection_dim=8,
            out_channels=4,
        ),
        pooled=8,
    ),
    "flux": dict(
        cls="FluxTransformer2DModel",
        config=dict(
            patch_size=1,
            in_channels=16,  # 4 latent channels in 2x2 patches
            num_layers=1,
            num_single_layers=3,  # "mid" is single_transformer_blocks.0
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=16,
            pooled_projection_dim=8,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        ),
        pooled=8,
    ),
    "pixart": dict(
        cls="PixArtTransformer2DModel",
        config=dict(  # PixArt-alpha's layout: the size conditions and a learned variance half
            num_attention_heads=3,  # the size embeddings take a third of the width each
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            cross_attention_dim=24,
            caption_channels=16,
            sample_size=8,
            patch_size=2,
            use_additional_conditions=True,
        ),
        pooled=0,
    ),
    "sana": dict(
        cls="SanaTransformer2DModel",
        config=dict(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=2,
            num_cross_attention_heads=2,
            cross_attention_head_dim=8,
            cross_attention_dim=16,
            caption_channels=16,
            sample_size=8,
            patch_size=1,
            timestep_scale=0.5,  # not 1: the wrapper must apply it
        ),
        pooled=0,
    ),
}
PROCESS = {"sd": "ddpm", "sdxl": "ddpm", "sd3": "flow", "flux": "flow", "pixart": "ddpm",
           "sana": "flow"}  # fmt: skip


def tiny_denoiser(family: str, seed: int = 0) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(seed)
    spec = TINY[family]
    return getattr(diffusers, spec["cls"])(**spec["config"])


def write_pipeline_folder(family: str, folder: Path, seed: int = 0) -> Path:
    """A pipeline folder holding only the denoiser (unet/ or transformer/) and model_index.json."""
    sub = "unet" if family in ("sd", "sdxl") else "transformer"
    tiny_denoiser(family, seed).save_pretrained(folder / sub)
    index = {"_class_name": "TinyPipeline", "_diffusers_version": "0.42.0", sub: ["diffusers", "x"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def conditions(family: str, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random context [n, L, D], pooled [n, P] and (SDXL) time ids [n, 6] of `family`."""
    g = torch.Generator().manual_seed(seed)
    spec = TINY[family]
    config = spec["config"]
    width = config.get("caption_channels") or config.get("cross_attention_dim")
    width = width or config["joint_attention_dim"]
    out = {"context": torch.randn(n, CONTEXT_LEN, width, generator=g)}
    if spec["pooled"]:
        out["pooled"] = torch.randn(n, spec["pooled"], generator=g)
    if family == "sdxl":
        out["time_ids"] = torch.tensor([64.0, 64.0, 0.0, 0.0, 64.0, 64.0]).repeat(n, 1)
    return out


def write_shards(family: str, folder: Path, n: int = 8, side: int = 8, seed: int = 0) -> Path:
    """Two safetensors shards of latents [C, side, side] with `family`'s conditions."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(2):
        tensors = {"latents": torch.randn(n // 2, 4, side, side, generator=g)}
        tensors.update(conditions(family, n // 2, seed + i))
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(folder / f"{i:05d}.safetensors")
        )
    return folder
