"""Tiny random diffusers pipelines saved to local folders, for the tests (no downloads): SD,
SDXL, SD3 and Flux, each a folder its pipeline class's `from_pretrained` loads (model_index.json
and one subfolder per component). The CLIP tokenizer is tests/sd_tiny.py's; the T5 tokenizer is
a Unigram vocabulary built here (transformers' T5Tokenizer over the `tokenizers` library, no
sentencepiece file).

save_pipeline(family, folder) writes one; PIPELINE_SEEDS fixes each family's weights."""

import json
from pathlib import Path

import torch
from sd_tiny import MAX_LENGTH, TINY_UNET_CONFIG, WORDS, save_tokenizer

T5_DIM = 64  # SD3 pads its CLIP contexts (2 x 32) to T5's width
T5_LENGTH = 6  # --max-sequence-length of the tests: short T5 contexts
FAMILIES = ("sd", "sdxl", "sd3", "flux")


def save_t5_tokenizer(folder: Path) -> Path:
    """A T5 tokenizer over WORDS and single letters ("\u2581" marks a word start)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(f"\u2581{word}", -1.0) for word in WORDS] + [("\u2581", -2.0)]
    vocab += [(letter, -5.0) for letter in "abcdefghijklmnopqrstuvwxyz"]
    T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512).save_pretrained(folder)
    return folder


def _clip_config(vocab_size: int, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _t5(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=T5_DIM,
        d_kv=16,
        d_ff=37,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def _vae(latent_channels: int, shift_factor: float | None, scaling_factor: float):
    """A 2-level AutoencoderKL: latents at half the image size."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


def _unet(cross_attention_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    config = {**TINY_UNET_CONFIG, "cross_attention_dim": cross_attention_dim, **extra}
    return UNet2DConditionModel(**config).eval()


def _sd(clip_tokenizer, vocab_size):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    return StableDiffusionPipeline(
        vae=_vae(4, None, 0.18215),
        text_encoder=CLIPTextModel(_clip_config(vocab_size)).eval(),
        tokenizer=clip_tokenizer,
        unet=_unet(32),
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),  # fmt: skip
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl(clip_tokenizer, vocab_size):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = _unet(
        64,  # both CLIP encoders' widths, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,  # pooled projection + 6 time ids
    )
    return StableDiffusionXLPipeline(
        vae=_vae(4, None, 0.13025),
        text_encoder=CLIPTextModel(_clip_config(vocab_size)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(vocab_size, 16)).eval(),
        tokenizer=clip_tokenizer,
        tokenizer_2=clip_tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
        add_watermarker=False,
    )


def _sd3(clip_tokenizer, vocab_size, t5_tokenizer):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=64,  # both CLIP projections, concatenated
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(4, 0.0609, 1.5305),
        text_encoder=CLIPTextModelWithProjection(_clip_config(vocab_size)).eval(),
        tokenizer=clip_tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(vocab_size)).eval(),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=_t5(len(t5_tokenizer)),
        tokenizer_3=t5_tokenizer,
    )


def _flux(clip_tokenizer, vocab_size, t5_tokenizer):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2 x 2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_DIM,
        pooled_projection_dim=32,  # CLIP's pooled output
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    ).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(4, 0.1159, 0.3611),
        text_encoder=CLIPTextModel(_clip_config(vocab_size)).eval(),
        tokenizer=clip_tokenizer,
        text_encoder_2=_t5(len(t5_tokenizer)),
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


PIPELINE_SEEDS = {"sd": 0, "sdxl": 1, "sd3": 2, "flux": 3}


def save_pipeline(family: str, folder: Path) -> Path:
    """A tiny random pipeline of `family` ("sd", "sdxl", "sd3", "flux") saved into folder."""
    from transformers import CLIPTokenizer, T5Tokenizer

    scratch = folder.parent / f"{folder.name}-tokenizers"
    clip_folder = save_tokenizer(scratch / "clip")
    clip_tokenizer = CLIPTokenizer.from_pretrained(clip_folder)
    vocab_size = len(json.loads((clip_folder / "vocab.json").read_text()))
    t5_tokenizer = T5Tokenizer.from_pretrained(save_t5_tokenizer(scratch / "t5"))
    torch.manual_seed(PIPELINE_SEEDS[family])
    if family == "sd":
        pipeline = _sd(clip_tokenizer, vocab_size)
    elif family == "sdxl":
        pipeline = _sdxl(clip_tokenizer, vocab_size)
    elif family == "sd3":
        pipeline = _sd3(clip_tokenizer, vocab_size, t5_tokenizer)
    else:
        pipeline = _flux(clip_tokenizer, vocab_size, t5_tokenizer)
    pipeline.save_pretrained(folder)
    return folder
