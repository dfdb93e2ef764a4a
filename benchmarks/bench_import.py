"""Import of a full-size Stable Diffusion 2.1-base UNet: wall seconds and peak host memory.

    python benchmarks/bench_import.py [--dtypes fp16 fp32] [--out benchmarks/results]

A randomly initialised diffusers UNet2DConditionModel of the real SD 2.1-base config is saved to a
temporary folder (diffusion_pytorch_model.safetensors, in each stored dtype), then
`fastsp.load_unet(folder, dtype)` runs in a fresh subprocess per case (fp32 parameters from
each file, and fp16 kept as fp16), which reports
its wall time and its peak resident memory (VmHWM) and the resident memory after its
imports, before the load. The target (issue 12): seconds, not minutes, and a peak under 2x the
weights' size. The files were just written, so they are read from the page cache: this measures
fastsp's import, not the disk. Writes import_<host>_<date>.md and .json into runs/bench/ (--out
benchmarks/results for a result to commit).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30


def _status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (the peak) of this process, from /proc (Linux). Not
    getrusage's ru_maxrss: Linux keeps that across execve, so a subprocess would report the
    peak of the parent it was forked from (which here holds the diffusers model)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(folder: str, dtype_name: str) -> None:
    """Runs in the fresh subprocess: one timed load_unet, then one JSON line on stdout."""
    import torch

    import fastsp
    import fastsp.diffusers_unet  # noqa: F401 (imports outside the timed region)

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype_name]
    before = _status_bytes("VmRSS")
    start = time.perf_counter()
    model = fastsp.load_unet(folder, dtype=dtype)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    params = sum(p.numel() for p in model.parameters())
    assert all(p.dtype == dtype for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        json.dumps(
            dict(
                seconds=seconds,
                rss_before_bytes=before,
                peak_rss_bytes=peak,
                params=params,
                model_bytes=model_bytes,
            )
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "fp32"], choices=["fp16", "fp32"])
    parser.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent.parent / "runs" / "bench"),
        help="folder for the results (default: runs/bench/, ignored by git; "
        "--out benchmarks/results for a result to commit)",
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0

    import diffusers
    import safetensors
    import torch

    from fastsp.diffusers_unet import SD21_BASE_CONFIG

    rows = []
    with tempfile.TemporaryDirectory(prefix="fastsp-bench-import-") as tmp:
        torch.manual_seed(0)
        start = time.perf_counter()
        theirs = diffusers.UNet2DConditionModel(**SD21_BASE_CONFIG).eval()
        print(f"built the diffusers SD 2.1-base UNet in {time.perf_counter() - start:.1f} s")
        for name in sorted(args.dtypes, key=["fp32", "fp16"].index):  # fp32 before .half()
            if name == "fp16":
                theirs = theirs.half()
            theirs.save_pretrained(Path(tmp) / name)
        del theirs
        os.sync()  # the writes flushed: the loads below do not compete with the writeback
        # (stored dtype, parameters' dtype): fp32 masters from either file, and fp16 kept as is
        cases = [(name, "fp32") for name in args.dtypes] + (
            [("fp16", "fp16")] if "fp16" in args.dtypes else []
        )
        for stored, loaded in cases:
            folder = Path(tmp) / stored
            file_bytes = (folder / "diffusion_pytorch_model.safetensors").stat().st_size
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(folder), loaded],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(done.stdout.strip().splitlines()[-1])
            load_peak = result["peak_rss_bytes"] - result["rss_before_bytes"]
            row = dict(
                stored=stored,
                loaded=loaded,
                file_bytes=file_bytes,
                **result,
                load_peak_bytes=load_peak,
                peak_over_file=result["peak_rss_bytes"] / file_bytes,
                load_peak_over_file=load_peak / file_bytes,
                load_peak_over_model=load_peak / result["model_bytes"],
            )
            rows.append(row)
            print(
                f"{stored} file -> {loaded}: file {file_bytes / GIB:.2f} GiB, load_unet "
                f"{result['seconds']:.2f} s, peak RSS {result['peak_rss_bytes'] / GIB:.2f} GiB "
                f"(after imports {result['rss_before_bytes'] / GIB:.2f} GiB; load's own "
                f"{load_peak / GIB:.2f} GiB = {row['load_peak_over_file']:.2f}x the file, "
                f"{row['load_peak_over_model']:.2f}x the loaded model)"
            )

    today = datetime.date.today().isoformat()
    meta = dict(
        date=today,
        host=platform.node(),
        cpu=platform.processor() or platform.machine(),
        cores=os.cpu_count(),
        python=platform.python_version(),
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        safetensors=safetensors.__version__,
        config="stabilityai/stable-diffusion-2-1-base unet (random weights)",
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"import_cpu_{today}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    lines = [
        f"# fastsp.load_unet: SD 2.1-base UNet ({today})",
        "",
        ", ".join(f"{k} {v}" for k, v in meta.items()),
        "",
        "| stored | loaded as | file GiB | load s | peak RSS GiB | RSS after imports GiB "
        "| load's peak GiB | load's peak / file | load's peak / loaded model |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stored']} | {r['loaded']} | {r['file_bytes'] / GIB:.2f} | {r['seconds']:.2f} | "
            f"{r['peak_rss_bytes'] / GIB:.2f} | {r['rss_before_bytes'] / GIB:.2f} | "
            f"{r['load_peak_bytes'] / GIB:.2f} | {r['load_peak_over_file']:.2f} | "
            f"{r['load_peak_over_model']:.2f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
