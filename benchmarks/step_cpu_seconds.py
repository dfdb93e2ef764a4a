"""CPU seconds per training step (one thread, `time.process_time`): the step's cost on a CPU that
other work shares, where bench_step.py's wall-clock medians measure the other work as much.

    OMP_NUM_THREADS=1 python benchmarks/step_cpu_seconds.py dit_tiny dit_digits

The cases are bench_step.py's (the same presets, stage-1 checkpoint, `build_run`, first-step
batch): {reference, fast_eager} x {mse, self_perceptual}, one thread, ABBA rounds after a warm-up
step; the median CPU milliseconds of each, the self-perceptual / MSE ratios (PAPER.md: about 1.5)
and the FLOPs of the fast steps (torch.utils.flop_counter). Results: step_cpu_seconds_<date>.json
and .md in runs/bench/ (ignored by git); --out benchmarks/results for a result to commit.
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

ROUNDS = 8
CASES = [(o, v) for o in ("mse", "self_perceptual") for v in ("reference", "fast_eager")]


def measure(model: str) -> dict:
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix=f"fastsp_cpu_s_{model}_") as tmp:
        root = Path(tmp)
        bench_step.write_stage1(model, device, root)
        cases = {}
        for objective, variant in CASES:
            out = root / f"{objective}_{variant}"
            configs = bench_step.case_config(model, objective, variant, device, out)
            run = bench_step.build_run(*configs)
            cases[(objective, variant)] = (run, bench_step.first_batch(run))
        for run, batch in cases.values():  # warm-up
            run.step.run(batch, 1, bench_step.LR, bench_step.EMA_WEIGHT)
        times = {name: [] for name in cases}
        for r in range(ROUNDS):
            for name in list(cases) if r % 2 == 0 else list(cases)[::-1]:
                run, batch = cases[name]
                start = time.process_time()
                run.step.run(batch, 2 + r, bench_step.LR, bench_step.EMA_WEIGHT)
                times[name].append(time.process_time() - start)
        row = {"model": model, "batch": cases[CASES[0]][0].cfg.batch_size}
        for (objective, variant), values in times.items():
            row[f"{objective} {variant} cpu_ms"] = 1e3 * statistics.median(values)
        for objective in ("mse", "self_perceptual"):
            run, batch = cases[(objective, "fast_eager")]
            row[f"{objective} fast_eager flops"] = bench_step.count_flops(run, batch)
    for variant in ("reference", "fast_eager"):
        row[f"sp/mse {variant}"] = (
            row[f"self_perceptual {variant} cpu_ms"] / row[f"mse {variant} cpu_ms"]
        )
    row["sp/mse flops"] = row["self_perceptual fast_eager flops"] / row["mse fast_eager flops"]
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
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for model in args.models:
        rows.append(measure(model))
        print(json.dumps(rows[-1]), flush=True)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [
        f"# CPU seconds per step, one thread ({platform.processor() or 'cpu'}, {date})",
        "",
        f"torch {torch.__version__}; `OMP_NUM_THREADS=1 python benchmarks/step_cpu_seconds.py "
        f"{' '.join(args.models)}`; median of {ROUNDS} ABBA rounds",
        "",
        "| model | batch | MSE ref / fast ms | SP ref / fast ms | SP/MSE ref | SP/MSE fast | "
        "SP/MSE FLOPs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['mse reference cpu_ms']:.1f} / "
            f"{r['mse fast_eager cpu_ms']:.1f} | {r['self_perceptual reference cpu_ms']:.1f} / "
            f"{r['self_perceptual fast_eager cpu_ms']:.1f} | {r['sp/mse reference']:.2f}x | "
            f"{r['sp/mse fast_eager']:.2f}x | {r['sp/mse flops']:.3f}x |"
        )
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
