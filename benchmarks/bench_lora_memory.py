"""Peak RSS of a LoRA stage 2 on the CPU: the perceptual pass with the adapters off (no second
copy of the weights) against a frozen copy of the same stage-1 network, and a full fine-tune.

    python benchmarks/bench_lora_memory.py --preset digits --steps 20 --lora-rank 16

Each case is its own `fastsp/train.py` process on the CPU in fp32; its peak resident set comes
from the kernel (resource.getrusage of the child). The frozen-copy case passes
--perceptual-checkpoint a copy of the stage-1 checkpoint (identical weights, another path), which
is how the trainer is told to build a separate perceptual network.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# A fresh parent per case: RUSAGE_CHILDREN keeps the largest child a process ever waited for.
_MEASURE = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
    "capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def peak_rss_mib(argv: list[str]) -> float:
    """Peak RSS in MiB of fastsp/train.py run with `argv` (Linux reports ru_maxrss in KiB)."""
    train = [sys.executable, str(REPO / "fastsp" / "train.py"), *argv]
    child = subprocess.run(
        [sys.executable, "-c", _MEASURE, *train],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return int(child.stdout) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lora-rank", type=int, default=16)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        common = ["--preset", args.preset, "--device", "cpu", "--precision", "fp32"]
        common += ["--sample-every", "0", "--checkpoint-every", "0"]
        subprocess.run(
            [sys.executable, str(REPO / "fastsp" / "train.py"), *common]
            + ["--steps", "1", "--out", str(root / "stage1")],
            check=True,
            capture_output=True,
            cwd=REPO,
        )
        stage1 = sorted((root / "stage1" / "checkpoints").iterdir())[-1]
        shutil.copytree(stage1, root / "copy")
        stage2 = [*common, "--steps", str(args.steps), "--objective", "self_perceptual"]
        stage2 += ["--init", str(stage1)]
        lora = ["--lora-rank", str(args.lora_rank)]
        copy = ["--perceptual-checkpoint", str(root / "copy")]
        cases = {
            "full fine-tune, frozen copy": stage2,
            f"LoRA rank {args.lora_rank}, frozen copy": [*stage2, *lora, *copy],
            f"LoRA rank {args.lora_rank}, adapters off": [*stage2, *lora],
        }
        rows = []
        for i, (name, case) in enumerate(cases.items()):
            rows.append((name, peak_rss_mib([*case, "--out", str(root / f"run{i}")])))
    print(f"peak RSS, --preset {args.preset}, {args.steps} steps of self_perceptual on the CPU")
    for name, mib in rows:
        print(f"  {name:<34} {mib:8.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
