"""Tiny random Stable Diffusion components saved to local folders, for the tests (no downloads):
a diffusers AutoencoderKL, a transformers CLIPTextModel and a CLIP tokenizer with a small vocab,
laid out as a pipeline folder (vae/, text_encoder/, tokenizer/)."""

import json
from pathlib import Path

import torch

# Words of the tiny vocab; any other word tokenizes to the unknown token.
WORDS = ("a", "photo", "of", "cat", "dog", "digit", "zero", "one", "red", "blue")
CONTEXT_DIM = 32
MAX_LENGTH = 8

# A tiny SD-1.x-layout diffusers UNet2DConditionModel over this module's context
# (UNet2DConditionModel(**TINY_UNET_CONFIG)).
TINY_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=CONTEXT_DIM,
    attention_head_dim=4,
    norm_num_groups=4,
)

# Stable Diffusion 2.1-base's scheduler/scheduler_config.json, as its pipeline folder holds it.
SD21_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def save_tokenizer(folder: Path) -> Path:
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for word in WORDS:
        vocab[f"{word}</w>"] = len(vocab)
    # single characters too, so that BPE can start from them
    for ch in sorted({c for w in WORDS for c in w}):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(f"{ch}</w>", len(vocab))
    merges = ["#version: 0.2"]
    for word in WORDS:  # merge each word left to right: c1 c2 -> c1c2, ...
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            merged = pieces[0] + pieces[1]
            vocab.setdefault(merged, len(vocab))
            pieces = [merged, *pieces[2:]]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_LENGTH
    )
    tokenizer.save_pretrained(folder)
    return folder


def save_text_encoder(folder: Path, vocab_size: int, seed: int = 0) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=CONTEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModel(config).eval().save_pretrained(folder)
    return folder


def save_vae(folder: Path, seed: int = 0) -> Path:
    """A 2-level AutoencoderKL: 4 latent channels at half the image size."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.18215,
    )
    vae.eval().save_pretrained(folder)
    return folder


def save_pipeline_components(root: Path) -> Path:
    """ROOT/vae, ROOT/text_encoder, ROOT/tokenizer (a pipeline folder's layout); returns ROOT."""
    tokenizer_folder = save_tokenizer(root / "tokenizer")
    vocab_size = len(json.loads((tokenizer_folder / "vocab.json").read_text()))
    save_text_encoder(root / "text_encoder", vocab_size)
    save_vae(root / "vae")
    return root
