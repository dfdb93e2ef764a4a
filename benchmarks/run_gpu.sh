#!/usr/bin/env bash
# The GPU suite in one command (about 8 minutes on an H100):
#
#     bash benchmarks/run_gpu.sh [OUT]        # OUT defaults to benchmarks/results/gpu_suite_DATE
#
# 1. the CUDA-marked tests (tests that skip without a GPU), 2. the feature_mse kernel benchmark
# (sizes from the sd21 mid block up to 256M elements), 3. the step benchmark (reference / fast
# eager / graphed / compiled x mse / self-perceptual x tiny, digits, sd21 at 32 and 64 latents).
# Each part's full output goes to OUT/; OUT/gpu_suite.md and OUT/gpu_suite.json join them with
# the card, date and versions. Exit status: non-zero if any part failed (the others still run).
set -u
cd "$(dirname "$0")/.."
DATE=$(date -u +%Y-%m-%d)
OUT=${1:-benchmarks/results/gpu_suite_$DATE}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" \
    || { echo "no nvidia-smi: this suite needs an NVIDIA GPU" >&2; exit 2; }
status=0

start=$SECONDS
python -m pytest tests -m cuda -q -rs -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml" \
    > "$OUT/gpu_tests.log" 2>&1 || status=1
echo "gpu tests: $((SECONDS - start)) s, $(tail -n 1 "$OUT/gpu_tests.log")"

start=$SECONDS
python benchmarks/feature_mse_gpu.py --out "$OUT" --sizes 2621440 16777216 67108864 268435456 \
    > "$OUT/feature_mse.log" 2>&1 || status=1
echo "feature_mse benchmark: $((SECONDS - start)) s"

start=$SECONDS
python benchmarks/step_gpu.py --out "$OUT" --seconds 1.5 > "$OUT/step.log" 2>&1 || status=1
echo "step benchmark: $((SECONDS - start)) s"

python - "$OUT" "$status" <<'PY'
import json, sys, datetime, platform
from pathlib import Path
import torch, triton
out, status = Path(sys.argv[1]), int(sys.argv[2])
try:
    import xformers
    xformers_version = xformers.__version__
except ImportError:
    xformers_version = "not installed"
meta = {
    "gpu": (out / "gpu.txt").read_text().strip(),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
    "xformers": xformers_version, "python": platform.python_version(), "exit_status": status,
}
tests_tail = (out / "gpu_tests.log").read_text().strip().splitlines()[-1:]
parts = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))
         if p.name != "gpu_suite.json"}
(out / "gpu_suite.json").write_text(json.dumps({**meta, "gpu_tests": tests_tail, **parts}, indent=1))
md = [f"# fastsp GPU suite: {meta['gpu']}, {meta['date']}", "",
      f"torch {meta['torch']} (CUDA {meta['cuda']}), triton {meta['triton']}, "
      f"xformers {meta['xformers']}, python {meta['python']}; exit status {status}", "",
      "## GPU tests", "", "    " + " ".join(tests_tail), ""]
for p in sorted(out.glob("*.md")):
    if p.name != "gpu_suite.md":
        md += [f"## {p.stem}", "", p.read_text().replace("\n# ", "\n### "), ""]
(out / "gpu_suite.md").write_text("\n".join(md))
print(f"wrote {out / 'gpu_suite.md'} and {out / 'gpu_suite.json'}")
PY
exit $status
