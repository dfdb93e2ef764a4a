"""Sample quality of a checkpoint: FID, precision/recall, an Inception-Score analogue, accuracy.

python -m fastsp.evaluate --checkpoint runs/digits                       # 1,000 samples, no CFG
python -m fastsp.evaluate --checkpoint runs/digits --cfg 7.5 --cfg-rescale 0.7 --steps 50
python -m fastsp.evaluate --checkpoint runs/faces --inception-weights \
        weights-inception-2015-12-05-6726825d.pth --real-data /data/faces_heldout
python -m fastsp.evaluate --checkpoint runs/digits --real-split train    # for model selection
python -m fastsp.evaluate --checkpoint runs/digits --cfg-sweep 1,1.25,1.5,2,3 --cfg-rescale 0.7

A command over fastsp.evaluation, whose docstring says what is measured, against which real
images and in which feature space: digits and letters models through fastsp's own classifier
(trained on the training split on first use, cached under $FASTSP_CACHE, default
~/.cache/fastsp), other image models through Inception-v3 (torch-fidelity, from a local weights
file). `--cfg-sweep W1,W2,...` scores every scale from one model load; `--real-split train`
measures against the training split, for choosing settings without the held-out split.

The results are printed as a table and written as JSON (--out, or by default RUN/eval/STEP/
eval_<settings>.json for a checkpoint RUN/checkpoints/STEP: outside the checkpoint folders that
the trainer's --keep-last prunes; CHECKPOINT/eval_<settings>.json for a checkpoint outside a run
folder). The output path is checked before any sample is drawn. Exit status 0, 2 on invalid
input with a one-line error naming the problem and the fix, 130 on Ctrl-C (nothing written).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fastsp.builtin_classifier import BUILTIN
from fastsp.checkpoint import CHECKPOINTS_DIR, atomic_write_text, resolve_checkpoint
from fastsp.cli import error_status
from fastsp.config_fields import SAMPLERS
from fastsp.errors import CheckpointError, DataError
from fastsp.evaluation import (
    INCEPTION_FILE,
    NEAREST_K,
    EvaluationSettings,
    cfg_scales,
    evaluate,
    reference_key,
)
from fastsp.run_folder import check_output_file


def default_out(checkpoint: Path, args: argparse.Namespace) -> Path:
    """FOLDER/eval_<sampler>_s<steps>_cfg<w>_phi<phi>_n<num>_<weights>_seed<seed>[_train]
    [_inception].json (_train: measured against the training split; a sweep's cfg<w> is
    cfgsweep<w1>-<w2>-...). FOLDER: RUN/eval/STEP for a checkpoint RUN/checkpoints/STEP (never
    inside a checkpoint folder, which --keep-last prunes), else the checkpoint folder itself."""
    cfg = (
        f"cfg{args.cfg:g}"
        if args.cfg_sweep is None
        else "cfgsweep" + "-".join(f"{x:g}" for x in cfg_scales(args))
    )
    tag = (
        f"{args.sampler}_s{args.steps}_{cfg}_phi{args.cfg_rescale:g}_n{args.num}_"
        f"{args.weights}_seed{args.seed}"
    )
    if args.real_split != "heldout":
        tag += f"_{args.real_split}"
    suffix = "_inception" if args.inception_weights is not None else ""
    folder = checkpoint
    if checkpoint.parent.name == CHECKPOINTS_DIR:
        folder = checkpoint.parent.parent / "eval" / checkpoint.name
    return folder / f"eval_{tag}{suffix}.json"


def format_table(result: dict[str, Any]) -> str:
    """The results as a two-column text table (metric | value)."""
    rows = [
        ("checkpoint", result["checkpoint"]),
        ("generated images", str(result["generated_images"])),
    ]
    if "metrics" in result:
        split = result.get("real_split", "heldout")
        m, ref = result["metrics"], result[reference_key(split)]
        net = result["feature_network"]
        other = "train" if split == "heldout" else "heldout"
        names = {"heldout": "held-out", "train": "train"}
        data = result.get("data", "digits")
        classes = BUILTIN[data][0].num_classes
        sweep = result.get("cfg_sweep")
        if sweep is not None:
            for row in sweep["rows"]:
                r = row["metrics"]
                rows.append(
                    (
                        f"cfg {row['cfg']:g}: FID / precision / recall (train-split FID)",
                        f"{r['fid']:.3f} / {r['precision']:.4f} / {r['recall']:.4f} "
                        f"({row['train_split_fid']:.3f})",
                    )
                )
            best = f"{sweep['best_cfg']:g}"
            rows.append(("best CFG (lowest train-split FID); its metrics below", best))
        rows += [
            (f"real images ({data} {names[split]})", str(result["real_images"])),
            (f"FID ({data} classifier features)", f"{m['fid']:.3f}"),
            (f"precision (k={NEAREST_K})", f"{m['precision']:.4f}"),
            (f"recall (k={NEAREST_K})", f"{m['recall']:.4f}"),
            (f"Inception Score analogue (max {classes})", f"{m['inception_score_analogue']:.3f}"),
        ]
        if m["class_accuracy"] is not None:
            rows.append(("class accuracy (requested class)", f"{m['class_accuracy']:.4f}"))
        rows += [
            (
                f"reference FID, {ref[f'{other}_images']} real {names[other]} images",
                f"{ref['fid']:.3f}",
            ),
            ("reference precision / recall", f"{ref['precision']:.4f} / {ref['recall']:.4f}"),
            (f"reference IS analogue ({names[other]})", f"{ref['inception_score_analogue']:.3f}"),
            ("classifier held-out accuracy", f"{net['heldout_accuracy']:.4f}"),
        ]
    if "inception" in result:
        inc = result["inception"]
        rows += [
            ("real images (Inception)", str(inc["real_images"])),
            ("FID (Inception-v3)", f"{inc['fid']:.3f}"),
            (
                "Inception Score",
                f"{inc['inception_score']:.3f} +- {inc['inception_score_std']:.3f}",
            ),
        ]
    rows.append(
        (
            "seconds (generation / total)",
            f"{result['seconds']['generate']:.1f} / {result['seconds']['total']:.1f}",
        )
    )
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}} | value", f"{'-' * width}-|-{'-' * 10}"]
    lines += [f"{name:<{width}} | {value}" for name, value in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line: EvaluationSettings' fields as options, with their defaults, and --out."""
    defaults = EvaluationSettings(checkpoint="")
    parser = argparse.ArgumentParser(
        prog="python -m fastsp.evaluate", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a checkpoint folder, or a run folder (its latest)"
    )
    parser.add_argument(
        "--num",
        type=int,
        default=defaults.num,
        help=f"samples to generate (default {defaults.num})",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=defaults.steps,
        help=f"sampler steps (default {defaults.steps})",
    )
    parser.add_argument("--sampler", default=defaults.sampler, choices=SAMPLERS)
    parser.add_argument(
        "--cfg", type=float, default=defaults.cfg, help="classifier-free guidance scale (1 = none)"
    )
    parser.add_argument(
        "--cfg-sweep",
        default=defaults.cfg_sweep,
        metavar="W1,W2,...",
        help="score each of these CFG scales (e.g. 1,1.25,1.5,2,3) from one model load, the "
        "same noise and labels, and name the one of lowest FID on the training split",
    )
    parser.add_argument(
        "--cfg-rescale", type=float, default=defaults.cfg_rescale, help="CFG rescale phi in [0, 1]"
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of the sampling noise"
    )
    parser.add_argument("--device", default=defaults.device, choices=("cpu", "cuda"))
    parser.add_argument(
        "--weights",
        default=defaults.weights,
        choices=("ema", "model"),
        help="EMA (default) or online weights",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help=f"samples generated at once (default {defaults.batch_size})",
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default CHECKPOINT/eval_<settings>.json)"
    )
    parser.add_argument(
        "--inception-weights",
        default=defaults.inception_weights,
        help=f"a local {INCEPTION_FILE} (torch-fidelity's Inception-v3) for Inception FID and IS",
    )
    parser.add_argument(
        "--real-data",
        default=defaults.real_data,
        help="folder of real images for --inception-weights",
    )
    parser.add_argument(
        "--real-split",
        default=defaults.real_split,
        metavar="{heldout,train}",
        help="digits split the samples are measured against: heldout (default, for reporting) "
        "or train (for choosing settings without the held-out split)",
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> EvaluationSettings:
    """The settings of a parsed command line: every option but --out."""
    return EvaluationSettings(
        **{name: value for name, value in vars(args).items() if name != "out"}
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        # before any sample is drawn: a result that cannot be written is refused now
        checkpoint = resolve_checkpoint(args.checkpoint).resolve()
        out = Path(args.out) if args.out else default_out(checkpoint, args)
        check_output_file(out, "--out" if args.out else "the default --out")
        result = evaluate(settings_from_args(args), log=log)
    except (ValueError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        status, message = error_status(error, "nothing was written; rerun the command")
        print(message, file=sys.stderr)
        return status
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    except OSError as error:
        print(f"error: cannot write {out} ({error}); pass another --out", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
