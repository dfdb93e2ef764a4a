"""The sd21 dry run: FLOPs and live-memory peak of the fast step on fake CUDA (fastsp.dryrun).

    python benchmarks/bench_dryrun.py                      # sd21, 64x64 latents, batch 16, bf16
    python benchmarks/bench_dryrun.py --batch-size 32 --out /tmp/results

Runs `python -m fastsp.dryrun --preset sd21 --objective self_perceptual --batch-size B` in a
child process (the dry run registers fake CUDA process-wide), which dry-runs the self-perceptual
step and the MSE step of that config, and writes dryrun_sd21_<date>.md (and .json) into runs/bench/
(--out benchmarks/results for a result to commit) with the figures beside the reference figures
of issue 13 (measured by another session the same way: 53.3 / 39.6 TFLOP per step, ratio 1.35,
peaks about 39.7 / 34.5 GiB at batch 16).
These are predictions for a GPU, not measurements on one: FLOPs by torch.utils.flop_counter's
formulas, memory as the peak of live tensor bytes (the CUDA caching allocator's reserve is above
it), and images/s at an assumed 40% model FLOPs utilisation of the datasheet's dense bf16 peak.
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
# Issue 13's figures for --preset sd21 --batch-size 16 (64x64 latents, bf16)
REFERENCE = {
    "self_perceptual": {"tflops": 53.3, "peak_gib": 39.7},
    "mse": {"tflops": 39.6, "peak_gib": 34.5},
    "ratio": 1.35,
}


def dry_run(batch_size: int) -> tuple[dict, list[str]]:
    command = [
        sys.executable,
        "-m",
        "fastsp.dryrun",
        "--preset",
        "sd21",
        "--objective",
        "self_perceptual",
        "--batch-size",
        str(batch_size),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "dryrun.json"
        result = subprocess.run(
            [*command, "--json", str(out)], capture_output=True, text=True, cwd=REPO
        )
        if result.returncode != 0:
            raise SystemExit(f"the dry run failed (exit {result.returncode}):\n{result.stderr}")
        printed = result.stdout.strip()
        figures = json.loads(out.read_text())
    figures["printed"] = printed
    return figures, command[1:]


def markdown(figures: dict, command: list[str], batch_size: int) -> str:
    steps = figures["steps"]
    compare = batch_size == 16
    lines = [
        f"# Dry run of the sd21 step on fake CUDA ({datetime.date.today().isoformat()})",
        "",
        "Predictions for a GPU, not GPU measurements: `python " + " ".join(command) + "` on "
        f"{platform.processor() or platform.machine()} (torch {figures['torch']}, CPU only). "
        "FLOPs: `torch.utils.flop_counter`'s formulas over one whole step (matmuls, "
        "convolutions, flash attention; elementwise ops, the MSE, clipping, AdamW and EMA are "
        "not counted). Memory: the peak of live CUDA tensor bytes during the step, after a first "
        "step has created the optimizer state (the caching allocator reserves more); state: "
        "what outlives a step (weights, EMA, AdamW moments, the frozen network). CPU s: building "
        "the step and running it twice.",
        "",
        "| step | TFLOP / step | peak live tensors (GiB) | of which state (GiB) | CPU s |"
        + (" issue 13: TFLOP | issue 13: GiB |" if compare else ""),
        "|---|---|---|---|---|" + ("---|---|" if compare else ""),
    ]
    for objective, step in steps.items():
        row = (
            f"| {objective} | {step['flops'] / 1e12:.3f} | {step['peak_bytes'] / GIB:.2f} | "
            f"{step['state_bytes'] / GIB:.2f} | {step['cpu_seconds']:.0f} |"
        )
        if compare:
            ref = REFERENCE[objective]
            row += f" {ref['tflops']} | {ref['peak_gib']} |"
        lines.append(row)
    lines += [
        "",
        f"Self-perceptual / MSE FLOP ratio: {figures['sp_mse_flop_ratio']:.3f}"
        + (f" (issue 13: {REFERENCE['ratio']})" if compare else ""),
        "",
        "| GPU | dense bf16 peak (datasheet) | memory | self-perceptual images/s at 40% MFU | "
        "MSE images/s at 40% MFU |",
        "|---|---|---|---|---|",
    ]
    for name, gpu in figures["gpus"].items():
        rates = [
            batch_size * figures["mfu"] * gpu["bf16_tflops"] * 1e12 / steps[o]["flops"]
            for o in ("self_perceptual", "mse")
        ]
        lines.append(
            f"| {name} | {gpu['bf16_tflops']:.0f} TFLOP/s | {gpu['memory_gb']} GB | "
            f"{rates[0]:.1f} | {rates[1]:.1f} |"
        )
    if compare:
        sp, mse = steps["self_perceptual"], steps["mse"]
        bf16_copy = mse["parameters"] * 2 / GIB
        lines += [
            "",
            "Against issue 13's figures: FLOPs "
            + ", ".join(
                f"{o} {100 * (steps[o]['flops'] / 1e12 / REFERENCE[o]['tflops'] - 1):+.2f}%"
                for o in ("self_perceptual", "mse")
            )
            + "; peak "
            + ", ".join(
                f"{o} {steps[o]['peak_bytes'] / GIB - REFERENCE[o]['peak_gib']:+.2f} GiB"
                for o in ("self_perceptual", "mse")
            )
            + f". The state is the same in both steps but for the frozen network: "
            f"{mse['state_bytes'] / GIB:.2f} GiB for MSE (fp32 weights, EMA and two AdamW moments "
            f"of {mse['parameters'] / 1e6:.1f}M parameters, 4 x 4 B each) and "
            f"{sp['state_bytes'] / GIB:.2f} GiB for self-perceptual (plus its bf16 copy, "
            f"{bf16_copy:.2f} GiB). Issue 13 does not say how its peaks were taken.",
        ]
    by_op = "\n".join(
        f"| {objective} | {op} | {flops / 1e12:.3f} |"
        for objective, step in steps.items()
        for op, flops in sorted(step["flops_by_op"].items(), key=lambda kv: -kv[1])
    )
    lines += [
        "",
        "FLOPs by op:",
        "",
        "| step | op | TFLOP |",
        "|---|---|---|",
        by_op,
        "",
        "The dry run's output:",
        "",
        "```",
        figures["printed"],
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--out",
        default=str(REPO / "runs" / "bench"),
        help="folder for the results (default: runs/bench/, ignored by git; "
        "--out benchmarks/results for a result to commit)",
    )
    args = parser.parse_args()
    figures, command = dry_run(args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"dryrun_sd21_{datetime.date.today().isoformat()}"
    if args.batch_size != 16:
        stem += f"_batch{args.batch_size}"
    (out / f"{stem}.json").write_text(json.dumps(figures, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(figures, command, args.batch_size))
    print(figures["printed"])
    print(f"wrote {out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
