"""Predicted cost of SDXL, SD3.5-medium and Flux.1-dev steps at 1024 px, from their published
configs, without downloading a weight: the dry run (fastsp.dryrun: fake CUDA, meta weights) of
`--model diffusers` on a model folder holding only the family's config.json.

    python benchmarks/families_dry_run.py                          # -> runs/bench/
    python benchmarks/families_dry_run.py --out benchmarks/results  # the committed table

For each family and batch (1 and a typical 4), `python -m fastsp.dryrun` runs the self-perceptual
step and the MSE step (its own pair), and this script tabulates TFLOP per step, the peak of live
tensor memory, images/s at 40% MFU of an H100 SXM's dense bf16 peak and the self-perceptual /
MSE FLOP ratio into families_dry_run.md (and .json). Predictions for a GPU, not measurements.

The configs are the published config.json values (the "_name_or_path"-free content of
unet/config.json of stabilityai/stable-diffusion-xl-base-1.0, transformer/config.json of
stabilityai/stable-diffusion-3.5-medium and of black-forest-labs/FLUX.1-dev). Fields a file
leaves out take diffusers' defaults. The conditions are each pipeline's: SDXL's two CLIP
encoders (77 tokens of 2048, pooled 1280, 6 time ids); SD3's CLIP + T5 (77 + 256 tokens of
4096, pooled 2048); Flux's T5 (512 tokens of 4096, CLIP pooled 768, guidance 3.5).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SD35_MEDIUM_TRANSFORMER = {
    "_class_name": "SD3Transformer2DModel",
    "_diffusers_version": "0.31.0.dev0",
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "dual_attention_layers": list(range(13)),
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}
FLUX_DEV_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel",
    "_diffusers_version": "0.30.0.dev0",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}
# family: (config, options of the run at 1024 px: 128x128 latents)
NAMES = {"sdxl": "SDXL base", "sd3.5-medium": "SD3.5-medium", "flux.1-dev": "Flux.1-dev"}
FAMILIES = {
    "sdxl": (
        SDXL_UNET,
        ["--diffusion", "ddpm", "--channels", "4", "--context-len", "77", "--channels-last"],
    ),
    "sd3.5-medium": (
        SD35_MEDIUM_TRANSFORMER,
        ["--diffusion", "flow", "--channels", "16", "--context-len", "333", "--no-channels-last"],
    ),
    "flux.1-dev": (
        FLUX_DEV_TRANSFORMER,
        ["--diffusion", "flow", "--channels", "16", "--context-len", "512", "--no-channels-last"]
        + ["--guidance", "3.5"],
    ),
}
BATCHES = (1, 4)


def command(folder: Path, options: list[str], batch: int) -> list[str]:
    return [
        "-m", "fastsp.dryrun", "--preset", "sd21", "--model", "diffusers", "--init", str(folder),
        "--cond", "context", "--resolution", "128", "--objective", "self_perceptual",
        "--batch-size", str(batch), *options,
    ]  # fmt: skip


def dry_run(folder: Path, options: list[str], batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "dryrun.json"
        args = command(folder, options, batch)
        done = subprocess.run(
            [sys.executable, *args, "--json", str(out)], capture_output=True, text=True, cwd=REPO
        )
        if done.returncode != 0:
            raise SystemExit(f"the dry run failed (exit {done.returncode}):\n{done.stderr}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "bench"))
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated names")
    args = parser.parse_args()
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.families.split(","):
            config, options = FAMILIES[name]
            folder = Path(tmp) / str(len(results))
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(config))
            for batch in BATCHES:
                figures = dry_run(folder, options, batch)
                results[f"{name}, batch {batch}"] = figures
                name_shown = NAMES[name]
                sp, mse = figures["steps"]["self_perceptual"], figures["steps"]["mse"]
                h100 = 0.4 * 989e12
                rows.append(
                    f"| {name_shown} | {batch} | {sp['parameters'] / 1e9:.2f} B | "
                    f"{sp['flops'] / 1e12:.1f} | {mse['flops'] / 1e12:.1f} | "
                    f"{figures['sp_mse_flop_ratio']:.3f} | {sp['peak_bytes'] / GIB:.1f} | "
                    f"{mse['peak_bytes'] / GIB:.1f} | {batch * h100 / sp['flops']:.2f} | "
                    f"{batch * h100 / mse['flops']:.2f} | {sp['cpu_seconds']:.0f} |"
                )
                print(rows[-1], flush=True)
    date = datetime.date.today().isoformat()
    shown = " ".join(command(Path("FOLDER"), ["..."], 1))
    text = "\n".join(
        [
            f"# Dry run of SDXL, SD3.5-medium and Flux.1-dev steps at 1024 px ({date})",
            "",
            "Predictions for a GPU, not GPU measurements: `python benchmarks/families_dry_run.py "
            "--out benchmarks/results` on "
            f"{platform.machine()} ({platform.processor() or 'CPU'}, torch "
            f"{next(iter(results.values()))['torch']}, CPU only), which runs `python {shown}` "
            "per family and batch on a folder holding only the family's published config.json "
            "(the script lists the values and their source), with the family's options (process, "
            "latent channels, prompt length). Full fine-tuning, bf16 autocast, fp32 master "
            "weights, fused AdamW, EMA, the frozen perceptual network in bf16 tapped at 'mid' "
            "(SDXL: mid_block; SD3.5-M: transformer_blocks.11; Flux: "
            "single_transformer_blocks.8). FLOPs: `torch.utils.flop_counter`'s formulas over one "
            "whole step (matmuls, convolutions, attention). Memory: the peak of live tensor bytes "
            "(the caching allocator reserves more). Images/s: batch x 40% of an H100 SXM's "
            "989 TFLOP/s dense bf16 / FLOPs per step. CPU s: the self-perceptual dry run's "
            "wall time on this shared 2-core machine.",
            "",
            "| model | batch | parameters | SP TFLOP/step | MSE TFLOP/step | SP/MSE FLOPs | "
            "SP peak GiB | MSE peak GiB | SP images/s (H100, 40% MFU) | MSE images/s | CPU s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "A peak above 80 GiB does not fit one H100 as configured (full fine-tuning of every "
            "weight with fp32 master weights, two AdamW moments and an EMA: 16 bytes per "
            "parameter before activations); such a model needs sharding (`--parallel fsdp`) or "
            "LoRA (`--lora-rank`): docs/lora_fsdp_memory.md.",
            "",
        ]
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "families_dry_run.md").write_text(text)
    (out / "families_dry_run.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {out / 'families_dry_run.md'}")


if __name__ == "__main__":
    main()
