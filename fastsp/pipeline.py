"""The main job: PAPER.md's two stages on the built-in digits, and a side-by-side comparison.

    python fastsp/pipeline.py                                   # digits preset on the CPU
    python fastsp/pipeline.py --stage1-steps 4000 --cond none   # extra options go to every stage
    torchrun --nproc_per_node=2 fastsp/pipeline.py --device cpu

1. OUT/stage1_mse               MSE pretraining from scratch (--stage1-steps)
2. OUT/stage2_self_perceptual   self-perceptual training initialised from stage 1, with stage 1's
                                model as the frozen perceptual network (--stage2-steps)
3. OUT/stage2_mse               the same number of steps continued with MSE from stage 1: the fair
                                comparison (same total training, same data, same noise)
4. OUT/comparison.png           EMA samples of both stage-2 models without guidance, from the same
                                noise and labels, side by side

Every stage resumes: rerunning the command continues where it stopped and skips finished stages.
Any option of fastsp/train.py not listed by --help here is passed to every stage.
"""

import argparse
import dataclasses
import os
import sys
from pathlib import Path

# See fastsp/train.py: running as a script must not put fastsp/ itself on sys.path.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

if __name__ == "__main__":
    from fastsp import preemption  # first: see fastsp/train.py

    preemption.install()

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from fastsp import checkpoint as checkpoint_lib  # noqa: E402
from fastsp import config as config_lib  # noqa: E402
from fastsp import config_cli, dist  # noqa: E402
from fastsp.cli import run_command  # noqa: E402
from fastsp.errors import EXIT_INVALID_INPUT, ConfigError  # noqa: E402
from fastsp.flow import process_from_config  # noqa: E402
from fastsp.sampling import (  # noqa: E402
    default_labels,
    display_scale,
    generate,
    image_grid,
    save_png,
)
from fastsp.training.loop import train  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastsp/pipeline.py", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument(
        "--preset", default="digits", help="training preset of every stage (default digits)"
    )
    parser.add_argument(
        "--out", default="runs/pipeline", help="folder holding the three runs and comparison.png"
    )
    parser.add_argument(
        "--stage1-steps", type=int, default=2000, help="MSE pretraining steps (default 2000)"
    )
    parser.add_argument(
        "--stage2-steps", type=int, default=1000, help="steps of each stage-2 run (default 1000)"
    )
    parser.add_argument(
        "--stage2-lr", type=float, default=2e-4, help="learning rate of both stage-2 runs"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="stage 1 uses SEED, both stage-2 runs SEED+1"
    )
    parser.add_argument(
        "--compare-num", type=int, default=100, help="samples per model in comparison.png"
    )
    parser.add_argument(
        "--compare-steps", type=int, default=50, help="sampler steps for comparison.png"
    )
    return parser


def labelled(grid: np.ndarray, title: str, scale: int) -> Image.Image:
    """A grid image enlarged `scale` times with a title strip above it."""
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).convert("RGB")
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    canvas = Image.new("RGB", (image.width, image.height + 24), "white")
    canvas.paste(image, (0, 24))
    ImageDraw.Draw(canvas).text((4, 6), title, fill="black")
    return canvas


def write_comparison(
    path: Path,
    runs: dict[str, Path],
    num: int,
    steps: int,
    seed: int,
    device,
    guidance: dict[str, tuple[float, float]] | None = None,
    columns: int | None = None,
    stacked: bool = False,
) -> None:
    """EMA samples of each run, same noise and labels, in one PNG: without guidance, or for the
    titles in `guidance` with its (CFG scale, rescale phi). Each run's panel has `columns` images
    a row (default: one row per cycle through the classes, else a square); the panels stand side
    by side, or with `stacked` one above the other, so that sample i of every run (the same noise
    and label) sits in the same column."""
    panels = []
    for title, run_dir in runs.items():
        scale, rescale = (guidance or {}).get(title, (1.0, 0.0))
        loaded = checkpoint_lib.load_model(run_dir, device=device)
        model, train_cfg = loaded.model, loaded.train_config
        classes = model.config.num_classes
        labels = default_labels(num, classes, None)
        shape = (model.config.in_channels, train_cfg.resolution, train_cfg.resolution)
        images = generate(
            model,
            process_from_config(train_cfg),
            num,
            shape,
            labels=labels,
            num_steps=steps,
            guidance_scale=scale,
            guidance_rescale=rescale,
            seed=seed,
            device=device,
        )
        per_row = columns or (classes if classes > 0 and num % classes == 0 else None)
        panels.append(
            labelled(
                image_grid(images, columns=per_row),
                title,
                display_scale(train_cfg.resolution) // 2 or 1,
            )
        )
    gap = 16
    along = [p.height if stacked else p.width for p in panels]
    across = max(p.width if stacked else p.height for p in panels)
    length = sum(along) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (across, length) if stacked else (length, across), "white")
    offset = 0
    for panel, size in zip(panels, along, strict=True):
        canvas.paste(panel, (0, offset) if stacked else (offset, 0))
        offset += size + gap
    save_png(np.asarray(canvas), path)


def stage_configs(args: argparse.Namespace, extra: list[str]):
    """The three stages' (TrainConfig, model config), each a `dataclasses.replace` of the one
    config that the preset and the options passed through (`extra`) make; all are validated
    before the first stage starts."""
    base, model_cfg = config_cli.parse_args(["--preset", args.preset, *extra])
    out = Path(args.out)
    # The comparison is the last output: its options are checked before the first stage trains.
    if args.compare_steps > base.num_timesteps:
        raise ConfigError(
            f"--compare-steps {args.compare_steps} is more than the {base.num_timesteps} "
            f"timesteps of the schedule (--num-timesteps); pass at most {base.num_timesteps}"
        )
    if args.seed + 1 > config_lib.MAX_SEED:
        raise ConfigError(
            f"--seed {args.seed}: both stage-2 runs use seed + 1 = {args.seed + 1}, above the "
            f"largest seed {config_lib.MAX_SEED}; pass --seed {config_lib.MAX_SEED - 1} or less"
        )

    def stage(name: str, **fields):
        try:
            cfg = dataclasses.replace(base, out=str(out / name), resume=True, **fields)
        except ValueError as error:  # a value this stage sets itself (its steps, lr, seed)
            raise ConfigError(f"stage {name}: {error}") from None
        return cfg, model_cfg

    stage1 = stage("stage1_mse", steps=args.stage1_steps, seed=args.seed)
    # Both stage-2 runs see the same data order and noise (seed + 1): they differ only in the loss.
    stage2 = dict(
        steps=args.stage2_steps,
        lr=args.stage2_lr,
        seed=args.seed + 1,
        init=str(out / "stage1_mse"),
    )
    sp = stage("stage2_self_perceptual", objective="self_perceptual", **stage2)
    mse = stage("stage2_mse", objective="mse", **stage2)
    return stage1, sp, mse


def run_pipeline(args: argparse.Namespace, extra: list[str]) -> None:
    out = Path(args.out)
    stage1_config, sp_config, mse_config = stage_configs(args, extra)
    asked_resume = resume_asked(extra)
    stage1 = train_stage(*stage1_config, asked_resume)
    sp = train_stage(*sp_config, asked_resume)
    mse = train_stage(*mse_config, asked_resume)
    device = stage1_config[0].device
    info = dist.init(device)
    if info.is_main:
        comparison = out / "comparison.png"
        write_comparison(
            comparison,
            {"MSE (no CFG)": mse, "self-perceptual (no CFG)": sp},
            args.compare_num,
            args.compare_steps,
            seed=args.seed,
            device=info.device,
        )
        print(
            f"\npipeline done:\n  stage 1 (MSE): {stage1}\n  stage 2 self-perceptual: {sp}\n"
            f"  stage 2 MSE continuation: {mse}\n  comparison (no CFG): {comparison}"
        )
    dist.barrier()


def resume_asked(extra: list[str]) -> bool:
    """Whether the user passed --resume among the options for every stage (the last of
    --resume / --no-resume counts, as argparse reads them)."""
    flags = [a for a in extra if a in ("--resume", "--no-resume")]
    return bool(flags) and flags[-1] == "--resume"


def train_stage(cfg, model_cfg, asked_resume: bool) -> Path:
    """Train one stage, continuing it where it stopped (its config resumes). A stage with no
    checkpoint yet starts fresh without the trainer's "--resume: no checkpoint" note, which
    answers a --resume the user gave, unless the user did give one."""
    if not asked_resume and checkpoint_lib.latest_checkpoint(Path(cfg.out)) is None:
        cfg = dataclasses.replace(cfg, resume=False)
    return train(cfg, model_cfg)


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    counts = (args.stage1_steps, args.stage2_steps, args.compare_num, args.compare_steps)
    if min(counts) < 1 or args.stage2_lr <= 0:
        print(
            "error: --stage1-steps, --stage2-steps, --compare-num and --compare-steps must be "
            ">= 1 and --stage2-lr > 0",
            file=sys.stderr,
        )
        return EXIT_INVALID_INPUT
    return run_command(run_pipeline, args, extra)


if __name__ == "__main__":
    sys.exit(main())
