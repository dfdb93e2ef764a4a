"""The dry run's predicted step times beside the GPU's measured ones: one table.

    python benchmarks/predicted_vs_measured.py PREDICTED.json STEP.json [--out OUT.md]

PREDICTED.json: benchmarks/predict_step.py's output (the roofline floor per case, objective and
GPU model); STEP.json: benchmarks/bench_step.py's output on a GPU. For every measured fast
variant of a predicted case (sd21_64, dit_xl2) and objective: predicted ms/step for this card
(H100 or H200, by the device name bench_step.py recorded), measured median ms/step, and
measured / predicted (1.0 would be every op at its datasheet peak with no gaps; the excess is
what kernels, launches and overheads lose). run_gpu.sh runs it after the step benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def card(device_name: str) -> str | None:
    """The predicted GPU model of a device name (H200 before H100: "H100" is no substring of it)."""
    for key, name in (("H200", "H200 SXM"), ("H100", "H100 SXM")):
        if key in device_name:
            return name
    return None


def table(predicted: dict, measured: dict) -> tuple[str, list[dict]]:
    gpu = card(measured["device_name"])
    if gpu is None:
        raise SystemExit(f"no prediction for {measured['device_name']}: the dry run models H100 "
                         "and H200 (fastsp.roofline.GPUS)")  # fmt: skip
    rows = []
    for result in measured["results"]:
        case = predicted["cases"].get(result["model"])
        if case is None or result["variant"] == "reference" or "step_ms" not in result:
            continue
        step = case["steps"].get(result["objective"])
        if step is None or case["batch_size"] != result["batch"]:
            continue
        predicted_ms = step["predicted"]["gpus"][gpu]["seconds"] * 1e3
        rows.append({
            "case": result["model"], "objective": result["objective"],
            "variant": result["variant"], "memory_format": result["memory_format"],
            "predicted_ms": predicted_ms, "measured_ms": result["step_ms"],
            "ratio": result["step_ms"] / predicted_ms,
        })  # fmt: skip
    lines = [
        f"Predicted (dry-run roofline floor, {gpu} datasheet peaks) against measured on "
        f"{measured['device_name']}:",
        "",
        "| case | objective | variant | predicted ms | measured ms | measured / predicted |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} | {r['objective']} | {r['variant']} {r['memory_format']} "
        f"| {r['predicted_ms']:.1f} | {r['measured_ms']:.1f} | {r['ratio']:.2f} |"
        for r in rows
    ]
    if not rows:
        lines.append("| (no measured case matches a prediction) | | | | | |")
    return "\n".join(lines) + "\n", rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predicted", type=Path)
    parser.add_argument("measured", type=Path)
    parser.add_argument("--out", type=Path, help="also write the table (and .json beside it)")
    args = parser.parse_args(argv)
    text, rows = table(
        json.loads(args.predicted.read_text()), json.loads(args.measured.read_text())
    )
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
