#!/usr/bin/env bash
# The GPU suite in one command (about 8 minutes on an H100):
#
#     bash benchmarks/run_gpu.sh [OUT]        # OUT defaults to benchmarks/results/gpu_suite_DATE
#
# 1. the CUDA-marked tests (tests that skip without a GPU), 2. the feature_mse kernel benchmark
# (sizes from the sd21 mid block up to 256M elements), 3. the step benchmark (reference / fast
# eager / graphed / compiled x mse / self-perceptual x tiny, digits, sd21 at 32 and 64 latents,
# each fast variant in channels_last and contiguous memory format).
# Each part's full output goes to OUT/; OUT/gpu_suite.md and OUT/gpu_suite.json join them with
# the card, date and versions, and list the feature_mse targets (>= 85% of copy bandwidth, >= 2.0x
# eager, >= 1.4x torch.compile for bf16 fwd+bwd at >= 64M elements; from the bytes moved, eager
# 7 N, compile 5 N, fused 3 N, no kernel can beat 2.33x eager or 1.67x compile) as PASS/FAIL lines,
# each speed-up with its ceiling. They also record what ran: torch's CUDA version, the output of
# `python -m xformers.info` (OUT/xformers_info.txt: whether xformers' CUDA extensions load beside
# this torch; an xformers wheel built for another CUDA fails to load and `auto` attention falls
# back to SDPA) and, per step case, the backends it reports (attention, feature MSE, optimizer,
# precision, compile, CUDA graph).
# 4. the dry run's predicted step times (the newest benchmarks/results/predicted_step_*.json,
# benchmarks/predict_step.py) beside the step benchmark's measured ones: one table, predicted,
# measured, ratio (OUT/predicted_vs_measured.md).
# Exit status: non-zero if any part failed or a target was missed (the other parts still run).
set -u
cd "$(dirname "$0")/.."
DATE=$(date -u +%Y-%m-%d)
OUT=${1:-benchmarks/results/gpu_suite_$DATE}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" \
    || { echo "no nvidia-smi: this suite needs an NVIDIA GPU" >&2; exit 2; }
status=0
# Recorded, never judged: a missing or broken xformers is a finding, not a failure of the suite.
python -m xformers.info > "$OUT/xformers_info.txt" 2>&1 \
    || echo "python -m xformers.info failed (exit $?): xformers is absent or does not import" \
        >> "$OUT/xformers_info.txt"

start=$SECONDS
python -m pytest tests -m cuda -q -rs -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml" \
    > "$OUT/gpu_tests.log" 2>&1 || status=1
echo "gpu tests: $((SECONDS - start)) s, $(tail -n 1 "$OUT/gpu_tests.log")"

start=$SECONDS
python benchmarks/feature_mse_gpu.py --strict --out "$OUT" \
    --sizes 2621440 16777216 67108864 268435456 > "$OUT/feature_mse.log" 2>&1
rc=$?
case $rc in  # feature_mse_gpu.py --strict: 1 a wrong result, 3 a target missed or none judged
    0) targets="all met" ;;
    3) targets="MISSED or not judged"; status=1 ;;
    *) targets="not judged: the benchmark failed (exit $rc)"; status=1 ;;
esac
echo "feature_mse benchmark: $((SECONDS - start)) s, targets: $targets"
grep -E '^(PASS|FAIL|--strict)' "$OUT/feature_mse.log" | sed 's/^/    /'

start=$SECONDS
python benchmarks/bench_step.py --out "$OUT" --seconds 1.5 > "$OUT/step.log" 2>&1 || status=1
echo "step benchmark: $((SECONDS - start)) s"

predicted=$(ls benchmarks/results/predicted_step_*.json 2>/dev/null | sort | tail -n 1)
measured=$(ls "$OUT"/step_cuda_*.json 2>/dev/null | sort | tail -n 1)
if [ -n "$predicted" ] && [ -n "$measured" ]; then
    python benchmarks/predicted_vs_measured.py "$predicted" "$measured" \
        --out "$OUT/predicted_vs_measured.md" || status=1
else
    echo "predicted vs measured: missing ${predicted:-a prediction} ${measured:-a step result}"
    status=1
fi

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
targets = [t for name, part in parts.items() if name.startswith("feature_mse_")
           for t in part.get("targets", [])]
missed = [t for t in targets if not t["ok"]]
verdict = (f"{len(missed)} of {len(targets)} missed" if targets
           else "NOT JUDGED (the benchmark wrote no target rows)")
meta["feature_mse_targets"] = verdict
xformers_info = out / "xformers_info.txt"
info = xformers_info.read_text().strip().splitlines() if xformers_info.exists() else ["(missing)"]
meta["xformers_info"] = info
(out / "gpu_suite.json").write_text(json.dumps({**meta, "gpu_tests": tests_tail, **parts}, indent=1))
md = [f"# fastsp GPU suite: {meta['gpu']}, {meta['date']}", "",
      f"torch {meta['torch']} (CUDA {meta['cuda']}), triton {meta['triton']}, "
      f"xformers {meta['xformers']}, python {meta['python']}; exit status {status}", "",
      "## GPU tests", "", "    " + " ".join(tests_tail), "",
      f"## feature_mse targets: {verdict}", ""]
md += [f"- {'PASS' if t['ok'] else 'FAIL'}: bf16 fwd+bwd {t['numel']}: {t['label']} "
       f"{t['value']:.2f} (needs >= {t['bound']}"
       + (f", ceiling {t['ceiling']:.2f})" if t.get("ceiling") is not None else ")")
       for t in targets] + [""]
md += ["## xformers (`python -m xformers.info`, in xformers_info.txt)", ""]
md += ["    " + line for line in info] + [""]
# Per step case, the backends that actually ran (bench_step.py's results[*]["backends"]).
step_rows = [r for name, part in parts.items() if name.startswith("step_")
             for r in part.get("results", []) if "backends" in r]
keys = ["attention", "feature_mse", "optimizer", "precision", "compile", "cuda_graph"]
md += ["## Step cases: backends that ran", ""]
if step_rows:
    md += ["| model | objective | variant | format | " + " | ".join(keys) + " |",
           "|---|---|---|---|" + "---|" * len(keys)]
    md += ["| " + " | ".join([r["model"], r["objective"], r["variant"],
                              r.get("memory_format", "contiguous")]
                             + [str(r["backends"].get(k, "-")).replace("|", "/") for k in keys])
           + " |" for r in step_rows]
else:
    md += ["No step results (the step benchmark wrote no results with backends)."]
md += [""]
for p in sorted(out.glob("*.md")):
    if p.name != "gpu_suite.md":
        md += [f"## {p.stem}", "", p.read_text().replace("\n# ", "\n### "), ""]
(out / "gpu_suite.md").write_text("\n".join(md))
print(f"feature_mse targets: {verdict}")
print(f"wrote {out / 'gpu_suite.md'} and {out / 'gpu_suite.json'}")
PY
exit $status
