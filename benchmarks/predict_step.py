"""Predicted step times of the GPU benchmark's big cases, from the dry run on fake CUDA (no GPU).

    python benchmarks/predict_step.py                          # -> runs/bench/
    python benchmarks/predict_step.py --out benchmarks/results # a result to commit

For sd21 at batch 16 (64x64 latents: bench_step.py's sd21_64) and DiT-XL/2 at batch 32 (32x32
latents: its dit_xl2), runs `python -m fastsp.dryrun --preset P --objective self_perceptual
--batch-size B --json ...` in a child process (the dry run registers fake CUDA process-wide),
which dry-runs both objectives, and writes predicted_step_<date>.md and .json: per case and
objective the FLOPs, bytes moved, the roofline floor of the step time and images/s on an H100 SXM
and an H200 SXM (fastsp.roofline), and the ten most expensive ops. Predictions, not
measurements: benchmarks/predicted_vs_measured.py sets them beside bench_step.py's GPU timings.
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
# bench_step.py's model name: (preset, batch size)
CASES = {"sd21_64": ("sd21", 16), "dit_xl2": ("dit_xl2", 32)}


def dry_run(preset: str, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dryrun.json"
        command = [sys.executable, "-m", "fastsp.dryrun", "--preset", preset]
        command += ["--objective", "self_perceptual", "--batch-size", str(batch)]
        subprocess.run([*command, "--json", str(path)], cwd=REPO, check=True)
        result = json.loads(path.read_text())
    result["command"] = " ".join(["python", *command[1:]])
    return result


def to_markdown(payload: dict) -> str:
    lines = [
        f"# Predicted step times, dry run on fake CUDA ({payload['date'][:10]})",
        "",
        "Predictions for a GPU, not measurements: fastsp.roofline over every op of one training "
        "step (`python -m fastsp.dryrun`), each op at max(FLOPs / dense bf16 peak, bytes / HBM "
        "bandwidth) of NVIDIA's datasheets, summed: a floor (no launch gaps, no op below its "
        f"peak). torch {payload['torch']}, {payload['machine']}. Command: "
        "`python benchmarks/predict_step.py --out benchmarks/results`.",
        "",
        "| case | objective | TFLOP / step | GB moved / step | H100 SXM ms | H100 SXM images/s "
        "| H200 SXM ms | H200 SXM images/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, result in payload["cases"].items():
        for objective, step in result["steps"].items():
            p = step["predicted"]
            cells = [
                f"{p['gpus'][g]['seconds'] * 1e3:.1f} | {p['gpus'][g]['images_per_s']:.1f}"
                for g in ("H100 SXM", "H200 SXM")
            ]
            lines.append(
                f"| {case} (batch {result['batch_size']}) | {objective} "
                f"| {step['flops'] / 1e12:.2f} | {p['bytes'] / 1e9:.1f} | {cells[0]} | {cells[1]} |"
            )
    for case, result in payload["cases"].items():
        for objective, step in result["steps"].items():
            lines += [
                "",
                f"{case}, {objective}: the ten most expensive ops (H100 SXM)",
                "",
                "| op | calls | TFLOP | GB | ms |",
                "|---|---|---|---|---|",
            ]
            for op in step["predicted"]["top_ops"]:
                lines.append(
                    f"| {op['op']} | {op['calls']} | {op['flops'] / 1e12:.3f} "
                    f"| {op['bytes'] / 1e9:.2f} | {op['H100 SXM'] * 1e3:.2f} |"
                )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench", help="folder for the .md and .json")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args(argv)
    cases = {case: dry_run(*CASES[case]) for case in args.cases}
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": next(iter(cases.values()))["torch"],
        "machine": f"{platform.machine()} CPU only",
        "cases": cases,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"predicted_step_{payload['date'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    markdown = to_markdown(payload)
    stem.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
