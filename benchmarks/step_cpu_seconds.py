"""CPU seconds per training step (one thread, `time.process_time`): the step's cost on a CPU that
other work shares, where bench_step.py's wall-clock medians measure the other work as much.

    OMP_NUM_THREADS=1 python benchmarks/step_cpu_seconds.py dit_tiny dit_digits
    OMP_NUM_THREADS=1 python benchmarks/step_cpu_seconds.py letters_c8 \
        --objectives mse,self_perceptual,model_guidance   # the regime map's objectives

The cases are bench_step.py's (the same presets, stage-1 checkpoint, `build_run`, first-step
batch): {reference, fast_eager} x the objectives (default mse, self_perceptual), one thread, ABBA
rounds after a warm-up step; the median CPU milliseconds of each, each objective's ratio to MSE
(self-perceptual, PAPER.md: about 1.5) and the FLOPs of the fast steps (torch.utils.flop_counter).
Results: step_cpu_seconds_<date>.json and .md in runs/bench/ (ignored by git); --out
benchmarks/results for a result to commit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402

from fastsp import checkpoint as checkpoint_lib  # noqa: E402

ROUNDS = 8  # the default of --rounds
VARIANTS = ("reference", "fast_eager")
OBJECTIVES = ("mse", "self_perceptual")  # the default; --objectives adds model_guidance
SHORT = {"mse": "MSE", "self_perceptual": "SP", "model_guidance": "MG"}


def measure(model: str, objectives: tuple[str, ...], rounds: int = ROUNDS) -> dict:
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix=f"fastsp_cpu_s_{model}_") as tmp:
        root = Path(tmp)
        bench_step.write_stage1(model, device, root)
        cases = {}
        for objective in objectives:
            for variant in VARIANTS:
                out = root / f"{objective}_{variant}"
                configs = bench_step.case_config(model, objective, variant, device, out)
                run = bench_step.build_run(*configs)
                cases[(objective, variant)] = (run, bench_step.first_batch(run))
        for run, batch in cases.values():  # warm-up
            run.step.run(batch, 1, bench_step.LR, bench_step.EMA_WEIGHT)
        times = {name: [] for name in cases}
        for r in range(rounds):
            for name in list(cases) if r % 2 == 0 else list(cases)[::-1]:
                run, batch = cases[name]
                start = time.process_time()
                run.step.run(batch, 2 + r, bench_step.LR, bench_step.EMA_WEIGHT)
                times[name].append(time.process_time() - start)
        row = {"model": model, "batch": next(iter(cases.values()))[0].cfg.batch_size}
        for (objective, variant), values in times.items():
            row[f"{objective} {variant} cpu_ms"] = 1e3 * statistics.median(values)
        for objective in objectives:
            run, batch = cases[(objective, "fast_eager")]
            row[f"{objective} fast_eager flops"] = bench_step.count_flops(run, batch)
    for objective in objectives[1:]:  # each against MSE, the first
        for variant in VARIANTS:
            row[f"{objective}/mse {variant}"] = (
                row[f"{objective} {variant} cpu_ms"] / row[f"mse {variant} cpu_ms"]
            )
        row[f"{objective}/mse flops"] = (
            row[f"{objective} fast_eager flops"] / row["mse fast_eager flops"]
        )
    return row


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["dit_tiny", "dit_digits"])
    parser.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent.parent / "runs" / "bench"),
        help="folder for the results (default: runs/bench/, ignored by git; "
        "--out benchmarks/results for a result to commit)",
    )
    parser.add_argument(
        "--objectives",
        default=",".join(OBJECTIVES),
        help="comma-separated, MSE first (default mse,self_perceptual; model_guidance needs a "
        "class-conditional model: letters_c8)",
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"default {ROUNDS}")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    objectives = tuple(dict.fromkeys(args.objectives.split(",")))
    if objectives[0] != "mse" or len(objectives) < 2 or not set(objectives) <= set(SHORT):
        parser.error(
            f"--objectives {args.objectives}: pass mse first, then one or more of "
            "self_perceptual, model_guidance"
        )
    unknown = [m for m in args.models if m not in bench_step.MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}: choose from {', '.join(bench_step.MODELS)}")
    torch.set_num_threads(1)
    rows = []
    for model in args.models:
        rows.append(measure(model, objectives, args.rounds))
        print(json.dumps(rows[-1]), flush=True)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [
        f"# CPU seconds per step, one thread ({platform.processor() or 'cpu'}, {date})",
        "",
        f"torch {torch.__version__}; `OMP_NUM_THREADS=1 python benchmarks/step_cpu_seconds.py "
        f"{' '.join(args.models)} --objectives {','.join(objectives)} --rounds {args.rounds}`; "
        f"median of {args.rounds} "
        "ABBA rounds; ref = the reference step, fast = the fast step, eager",
        "",
        "| model | batch | "
        + " | ".join(f"{SHORT[o]} ref / fast ms" for o in objectives)
        + " | "
        + " | ".join(f"{SHORT[o]}/MSE ref / fast / FLOPs" for o in objectives[1:])
        + " |",
        "|---" * (2 + 2 * len(objectives) - 1) + "|",
    ]
    for r in rows:
        times = [
            f"{r[f'{o} reference cpu_ms']:.1f} / {r[f'{o} fast_eager cpu_ms']:.1f}"
            for o in objectives
        ]
        ratios = [
            f"{r[f'{o}/mse reference']:.2f}x / {r[f'{o}/mse fast_eager']:.2f}x / "
            f"{r[f'{o}/mse flops']:.3f}x"
            for o in objectives[1:]
        ]
        lines.append(f"| {r['model']} | {r['batch']} | " + " | ".join(times + ratios) + " |")
    markdown = "\n".join(lines) + "\n"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stem = Path(args.out) / f"step_cpu_seconds_{date[:10]}"
    payload = {"date": date, "torch": torch.__version__, "rows": rows}
    checkpoint_lib.atomic_write_text(stem.with_suffix(".json"), json.dumps(payload, indent=1))
    checkpoint_lib.atomic_write_text(stem.with_suffix(".md"), markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
