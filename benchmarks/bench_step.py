"""The step benchmark: the trainer's own training step, every variant against the naive reference.

    python benchmarks/bench_step.py                                   # GPU: the full matrix
    python benchmarks/bench_step.py --device cpu --models tiny --variants reference fast_eager
    python benchmarks/bench_step.py --device cpu --models digits --objectives mse --rounds 20
    python benchmarks/bench_step.py --device cpu --models tiny --memory-formats channels_last
    python benchmarks/bench_step.py --device cpu --models dit_tiny dit_digits         # DiT rows

Every case is a training run built by `fastsp.training.loop.build_run` (the plan and the one
assembly, fastsp.training.assembly.assemble) from a preset and a few overrides, so what is timed
is `run.step`, the very step `run_loop` runs (capture included, by
`fastsp.training.loop.capture_step`). Variants (TrainConfig fields):

- ``reference``: --train-step reference: fastsp.reference's naive loss (fp32 eager, two full
  perceptual forwards with a hook, F.mse_loss) in the same loop, torch's default AdamW.
- ``fast_eager``: the fast step (bf16 autocast on CUDA, frozen network in bf16 cut at the tap,
  channels_last on CUDA, feature_mse, fused AdamW, foreach EMA) with --no-cuda-graph.
- ``fast_graphed``: the same step captured as one CUDA graph (eager on CPU: no graphs there).
- ``fast_batched``: fast_graphed with --batched-branches (self-perceptual only).
- ``fast_compiled``: fast_graphed with --compile.

Every fast variant runs in each memory format of --memory-formats (a column of the results):
``channels_last`` (--channels-last, tensor-core convolutions) and ``contiguous`` (NCHW). On CUDA
both by default: ATen's GroupNorm keeps channels_last only on the CPU and on CUDA makes its input
contiguous, so a channels_last UNet pays two copies per GroupNorm (in, and back for the next
convolution), forward and backward, and which format wins is the GPU's to measure; the presets'
default (sd21: channels_last) follows that measurement. On the CPU contiguous by default (oneDNN
convolutions and GroupNorm of these small models are slower in channels_last, measured). The
reference step is always contiguous.

Both objectives start from the same stage-1 checkpoint (random weights, zero-initialised layers
perturbed so no gradient is trivially zero), written once per model into a temporary folder; the
self-perceptual runs use it as their frozen perceptual network too. Before any case is timed,
the loss of its first step is checked against the reference run's first step (same weights,
batch, noise, t and t'): rel. 1e-4 in fp32, 3e-2 in bf16. A failed check is reported and the case
is not timed. Timing: median ms/step with p20/p80 over timed steps after warm-up. On a GPU the
cases of one model run one after another (peak memory per case); on the CPU they are interleaved
in ABBA rounds, since the load of a 2-core machine drifts by more than the differences measured.

Summary per model: fast self-perceptual / reference self-perceptual, self-perceptual / MSE per
variant (PAPER.md: about 1.5x), MFU. Judged: on a GPU for sd21_64 the targets below; on the CPU
the fast MSE step must not be slower than the reference's (+5%, the spread of repeated medians;
the fast step also clips and updates the EMA, which the reference does not). Exit status: 1 a
check failed or a case errored, 3 with --strict when a target was missed or none was judged.
Results (step_<device>_<date>.md and .json) go to runs/bench/, which git ignores; a result to
commit is written with --out benchmarks/results.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastsp import checkpoint as checkpoint_lib
from fastsp import config as config_lib
from fastsp import config_file
from fastsp.data_stream import make_loader
from fastsp.training.assembly import Run
from fastsp.training.loop import build_run, capture_step

# name: (preset, TrainConfig overrides). sd21 trains on synthetic latents with a [77, 1024] context.
MODELS = {
    "tiny": ("tiny", dict(resolution=16, batch_size=64)),
    "digits": ("digits", dict(batch_size=64)),
    "sd21_32": ("sd21", dict(resolution=32, batch_size=32)),
    "sd21_64": ("sd21", dict(resolution=64, batch_size=16)),
    # The DiT (fastsp.dit): tiny and the digits demo on the CPU, and the paper's XL/2 on 32x32x4
    # latents (256x256 images) with ImageNet's batch per GPU of the paper's runs, 32.
    "dit_tiny": ("dit_tiny", dict(batch_size=64)),
    "dit_digits": ("dit_digits", dict(batch_size=64)),
    "dit_xl2": ("dit_xl2", dict(resolution=32, batch_size=32)),
    # the regime map's widest guidance gap (benchmarks/quality/regime_map.py): 16x16 letters, base 8
    "letters_c8": ("digits", dict(data="letters", resolution=16, batch_size=64, cond="class")),
}
MODEL_OVERRIDES = {"letters_c8": dict(base_channels=8)}  # model-config fields, beside MODELS
VARIANTS = {
    "reference": dict(train_step="reference", cuda_graph=False),
    "fast_eager": dict(cuda_graph=False),
    "fast_graphed": dict(cuda_graph=True),
    "fast_batched": dict(cuda_graph=True, batched_branches=True),
    "fast_compiled": dict(cuda_graph=True, compile=True),
}
OBJECTIVES = ("mse", "self_perceptual")
MEMORY_FORMATS = ("channels_last", "contiguous")
# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
TARGET_MODEL = "sd21_64"
GPU_TARGETS = {"x_reference": 4.0, "sp_over_mse": 1.6, "mfu": 0.40}  # for TARGET_MODEL
CPU_PARITY = 1.05  # fast MSE step / reference MSE step, at most
LR = 1e-5
EMA_WEIGHT = 1e-3


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "n/a (CPU)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if key in name:
            return value, f"{value / 1e12:.1f} TFLOP/s dense bf16 ({key})"
    return None, f"unknown for {name}"


def case_config(
    model: str,
    objective: str,
    variant: str,
    device: torch.device,
    out: Path,
    memory_format: str = "contiguous",
):
    """The (TrainConfig, model config) of one case, as `fastsp/train.py` would resolve them."""
    preset, overrides = MODELS[model]
    fields = {**overrides, **VARIANTS[variant], "device": device.type, "out": str(out)}
    # The reference step stays plain (contiguous); see the module docstring for the formats.
    fields["channels_last"] = memory_format == "channels_last" and variant != "reference"
    fields["objective"] = objective
    fields["init"] = str(out.parent / "stage1")
    return config_lib.resolve(preset, fields, MODEL_OVERRIDES.get(model, {}))


def write_stage1(model: str, device: torch.device, root: Path) -> None:
    """A stage-1 checkpoint in ROOT/stage1: random weights, zero-initialised ones perturbed."""
    cfg, model_cfg = case_config(model, "mse", "fast_eager", device, root / "stage1")
    run = build_run(dataclasses.replace(cfg, init=""), model_cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in run.model.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))
        run.ema.load_state_dict(run.model.state_dict())
    checkpoint_lib.save_checkpoint(
        run.run_dir,
        0,
        run.model,
        run.ema,
        run.optimizer,
        {"samples_seen": 0, "world_size": 1},
        config_file.dumps(run.cfg, run.model_cfg),
    )


def first_batch(run: Run) -> dict[str, torch.Tensor]:
    cfg = run.cfg
    return next(iter(make_loader(run.dataset, cfg.batch_size, 0, 1, cfg.seed, 0, 0)))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_step_loss(run: Run, batch) -> float:
    """Capture where the variant does (as run_loop does), then train step 0; its loss."""
    capture_step(run, batch, log=lambda message: None)
    run.step.run(batch, 0, LR, EMA_WEIGHT)
    loss = run.step.loss_sum.item()
    run.step.reset_metrics()
    return loss


def count_flops(run: Run, batch) -> int:
    """FLOPs of one eager step (forward, perceptual pass, backward: matmuls and convolutions)."""
    run.step.load(batch, 1, LR, EMA_WEIGHT)
    with FlopCounterMode(display=False) as counter:
        run.step.compute()
    return counter.get_total_flops()


def time_interleaved(cases: dict, rounds: int, seconds: float, device) -> dict[str, list[float]]:
    """Seconds per step of each case; rounds in ABBA order, so that drift in the machine's load
    and the position within a round hit every case alike. At least `rounds` rounds, more while
    the time budget (`seconds` per case) lasts, at most 200."""
    names = list(cases)
    times = {name: [] for name in names}
    for _ in range(2):  # warm-up: allocator, autotuning, lazy inits
        for name in names:
            run, batch = cases[name]
            run.step.run(batch, 1, LR, EMA_WEIGHT)
    synchronize(device)
    deadline = time.perf_counter() + seconds * len(names)
    round_ = 0
    while round_ < rounds or (time.perf_counter() < deadline and round_ < 200):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            run, batch = cases[name]
            start = time.perf_counter()
            run.step.run(batch, 2 + round_, LR, EMA_WEIGHT)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
        round_ += 1
    return times


def result_row(model, objective, variant, run: Run, times: list[float]) -> dict:
    median = statistics.median(times)
    p20, *_, p80 = statistics.quantiles(times, n=5)
    return {
        "model": model,
        "objective": objective,
        "variant": variant,
        "memory_format": "channels_last" if run.cfg.channels_last else "contiguous",
        "batch": run.cfg.batch_size,
        "resolution": run.cfg.resolution,
        "backends": dict(run.backends),
        "precision": "bf16" if run.step.config.bf16 else "fp32",
        "cuda_graph": run.step.graph is not None,
        "steps_timed": len(times),
        "step_ms": 1e3 * median,
        "step_ms_p20": 1e3 * p20,
        "step_ms_p80": 1e3 * p80,
        "images_per_s": run.cfg.batch_size / median,
    }


def case_name(variant: str, memory_format: str) -> str:
    return variant if variant == "reference" else f"{variant} {memory_format}"


def bench_model(
    model, objectives, variants, memory_formats, device, args, log
) -> tuple[list, list]:
    """Every (objective, variant, memory format) case of one model: checks, then timings."""
    results, checks = [], []
    peak, _ = peak_flops(device)
    with tempfile.TemporaryDirectory(prefix=f"fastsp_bench_{model}_") as tmp:
        root = Path(tmp)
        write_stage1(model, device, root)
        for objective in objectives:
            names = [v for v in variants if not (v == "fast_batched" and objective == "mse")]

            def build(variant, memory_format="contiguous", objective=objective):
                folder = root / case_name(variant, memory_format).replace(" ", "_")
                cfg, model_cfg = case_config(
                    model, objective, variant, device, folder, memory_format
                )
                run = build_run(cfg, model_cfg)
                return run, first_batch(run)

            # The reference's first-step loss is the oracle of every variant's check.
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            reference_run, batch = build("reference")
            reference_loss = first_step_loss(reference_run, batch)
            built = {}
            if "reference" in names and device.type == "cuda":
                times = time_interleaved(
                    {"reference": (reference_run, batch)}, 5, args.seconds, device
                )
                row = result_row(model, objective, "reference", reference_run, times["reference"])
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                results.append(row)
                log(json.dumps(row))
            elif "reference" in names:
                built["reference"] = (reference_run, batch)
            del reference_run
            cases = [(v, f) for v in names if v != "reference" for f in memory_formats]
            for variant, memory_format in cases:
                name = case_name(variant, memory_format)
                case = dict(model=model, objective=objective, variant=variant)
                case["memory_format"] = memory_format
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    run, batch = build(variant, memory_format)
                    loss = first_step_loss(run, batch)
                except Exception as error:  # noqa: BLE001 (report every failure, go on)
                    message = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                    results.append(dict(case, error=message))
                    log(f"{model} {objective} {name}: {message}")
                    continue
                tolerance = 3e-2 if run.step.config.bf16 else 1e-4
                ok = abs(loss - reference_loss) <= tolerance * abs(reference_loss)
                detail = (
                    f"first step loss {loss:.6g} vs reference {reference_loss:.6g} "
                    f"(rel. tol. {tolerance:g})"
                )
                checks.append(dict(case, ok=ok, detail=detail))
                log(f"check {model} {objective} {name}: {'ok' if ok else 'FAILED'}, {detail}")
                if not ok:
                    results.append(dict(case, error="loss check failed"))
                    continue
                if device.type == "cuda":  # one case at a time: its own peak memory
                    times = time_interleaved({name: (run, batch)}, 5, args.seconds, device)
                    row = result_row(model, objective, variant, run, times[name])
                    row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    if variant == "fast_eager":
                        row["flops"] = count_flops(run, batch)
                    results.append(row)
                    log(json.dumps(row))
                    del run
                else:
                    built[name] = (run, batch)
            if built:
                times = time_interleaved(built, args.rounds, args.seconds, device)
                for name, (run, batch) in built.items():
                    variant = name.split()[0]
                    row = result_row(model, objective, variant, run, times[name])
                    if variant == "fast_eager":
                        row["flops"] = count_flops(run, batch)
                    results.append(row)
                    log(json.dumps(row))
            built.clear()
    flops = {
        (r["model"], r["objective"]): r["flops"] for r in results if r.get("flops") is not None
    }
    for row in results:  # every fast variant does the fast eager step's FLOPs
        if "step_ms" not in row or row["variant"] == "reference":
            continue
        row.setdefault("flops", flops.get((row["model"], row["objective"])))
        if peak and row["flops"]:
            row["mfu"] = row["flops"] / (row["step_ms"] / 1e3) / peak
    return results, checks


def summarise(results: list[dict], device: torch.device) -> tuple[list[dict], list[dict]]:
    """Ratios per model, and the verdicts of the targets that apply on this device."""
    timed = {
        (r["model"], r["objective"], case_name(r["variant"], r["memory_format"])): r
        for r in results
        if "step_ms" in r
    }
    rows, targets = [], []
    for model in dict.fromkeys(r["model"] for r in results):
        row = {"model": model}
        fast_sp = [
            timed[k] for k in timed if k[:2] == (model, "self_perceptual") and k[2] != "reference"
        ]
        if fast_sp:
            best = min(fast_sp, key=lambda r: r["step_ms"])
            row["best_fast_variant"] = case_name(best["variant"], best["memory_format"])
            reference = timed.get((model, "self_perceptual", "reference"))
            if reference:
                row["x_reference"] = reference["step_ms"] / best["step_ms"]
            if best.get("mfu") is not None:
                row["mfu"] = best["mfu"]
            fast_mse = [timed[k] for k in timed if k[:2] == (model, "mse") and k[2] != "reference"]
            if fast_mse:  # the fastest self-perceptual step over the fastest MSE step
                row["sp_over_mse"] = best["step_ms"] / min(r["step_ms"] for r in fast_mse)
        row["sp_over_mse_by_variant"] = {
            name: timed[(model, "self_perceptual", name)]["step_ms"] / r["step_ms"]
            for (m, objective, name), r in timed.items()
            if m == model and objective == "mse" and (model, "self_perceptual", name) in timed
        }
        # Per fast variant and objective: channels_last / contiguous (the GPU decides the default).
        row["channels_last_over_contiguous"] = {
            f"{objective} {r['variant']}": r["step_ms"] / other["step_ms"]
            for (m, objective, name), r in timed.items()
            if m == model
            and r["memory_format"] == "channels_last"
            and (other := timed.get((m, objective, case_name(r["variant"], "contiguous"))))
        }
        rows.append(row)
        if device.type == "cuda" and model == TARGET_MODEL:
            for key, bound in GPU_TARGETS.items():
                if key in row:
                    ok = row[key] <= bound if key == "sp_over_mse" else row[key] >= bound
                    targets.append(
                        dict(model=model, target=key, value=row[key], bound=bound, ok=ok)
                    )
        reference_mse = timed.get((model, "mse", "reference"))
        fast_eager_mse = [
            r for k, r in timed.items() if k[:2] == (model, "mse") and r["variant"] == "fast_eager"
        ]
        fast_mse = min(fast_eager_mse, key=lambda r: r["step_ms"]) if fast_eager_mse else None
        if device.type == "cpu" and reference_mse and fast_mse:
            ratio = fast_mse["step_ms"] / reference_mse["step_ms"]
            targets.append(
                dict(
                    model=model,
                    target="fast_mse_over_reference_mse",
                    value=ratio,
                    bound=CPU_PARITY,
                    ok=ratio <= CPU_PARITY,
                )
            )
    return rows, targets


def to_markdown(payload: dict) -> str:
    lines = [
        f"# Step benchmark: {payload['device_name']}, {payload['date']}",
        "",
        f"torch {payload['torch']}, triton {payload['triton']}, xformers {payload['xformers']}, "
        f"python {payload['python']}; peak for MFU: {payload['peak']}; command: "
        f"`{payload['command']}`",
        "",
        "| model | objective | variant | format | precision | batch | ms/step (p20-p80) | "
        "images/s | peak GiB | TFLOP/step | MFU | graph |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["results"]:
        if "step_ms" not in r:
            lines.append(
                f"| {r['model']} | {r['objective']} | {r['variant']} | "
                f"{r.get('memory_format', 'contiguous')} | | | FAILED: {r['error']} | | | | | |"
            )
            continue
        memory = f"{r['peak_memory_gib']:.2f}" if r.get("peak_memory_gib") is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        flops = f"{r['flops'] / 1e12:.3f}" if r.get("flops") else "-"
        lines.append(
            f"| {r['model']} | {r['objective']} | {r['variant']} | {r['memory_format']} | "
            f"{r['precision']} | {r['batch']} | "
            f"{r['step_ms']:.2f} ({r['step_ms_p20']:.2f}-{r['step_ms_p80']:.2f}) "
            f"| {r['images_per_s']:.0f} | {memory} | {flops} | {mfu} | {r['cuda_graph']} |"
        )
    lines += [
        "",
        "| model | best fast variant | fast SP / reference SP | SP / MSE (fastest) | "
        "SP / MSE by variant | channels_last / contiguous | MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in payload["summary"]:
        by_variant = ", ".join(f"{v} {x:.2f}x" for v, x in s["sp_over_mse_by_variant"].items())
        by_format = ", ".join(
            f"{v} {x:.2f}x" for v, x in s["channels_last_over_contiguous"].items()
        )
        cells = [
            f"{s['x_reference']:.2f}x" if "x_reference" in s else "-",
            f"{s['sp_over_mse']:.2f}x" if "sp_over_mse" in s else "-",
            by_variant or "-",
            by_format or "-",
            f"{100 * s['mfu']:.1f}%" if "mfu" in s else "-",
        ]
        lines.append(f"| {s['model']} | {s.get('best_fast_variant', '-')} | {' | '.join(cells)} |")
    lines += ["", "Targets:", ""]
    lines += [
        f"- {'PASS' if t['ok'] else 'FAIL'}: {t['model']} {t['target']} {t['value']:.3f} "
        f"(bound {t['bound']})"
        for t in payload["targets"]
    ] or ["- none judged on this device with these cases"]
    lines += ["", "Checks (first-step loss against the reference's, before timing):", ""]
    lines += [
        f"- {c['model']} {c['objective']} {case_name(c['variant'], c['memory_format'])}: "
        f"{'ok' if c['ok'] else 'FAILED'}, {c['detail']}"
        for c in payload["checks"]
    ]
    backends = {
        case_name(r["variant"], r["memory_format"]): r["backends"]
        for r in payload["results"]
        if "backends" in r
    }
    lines += ["", "Backends (as the run reports them in backends.json):", ""]
    lines += [f"- {variant}: {json.dumps(b)}" for variant, b in backends.items()]
    return "\n".join(lines) + "\n"


def versions() -> dict[str, str]:
    try:
        import xformers

        xformers_version = xformers.__version__
    except ImportError:
        xformers_version = "not installed"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "xformers": xformers_version,
        "python": platform.python_version(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--memory-formats",
        nargs="+",
        default=None,
        choices=MEMORY_FORMATS,
        help="memory formats of the fast variants (default: both on CUDA, contiguous on the CPU)",
    )
    parser.add_argument(
        "--no-compile-for",
        nargs="*",
        default=["sd21_32", "dit_xl2"],
        help="models to skip fast_compiled for (compiling the sd21 UNet or DiT-XL/2 costs minutes)",
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="timing budget per case")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds at least")
    parser.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent.parent / "runs" / "bench"),
        help="folder for the .md and .json results (default: runs/bench/, ignored by git; "
        "--out benchmarks/results for a result to commit)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 3 if a target is missed")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "error: --device cuda but torch sees no CUDA device; pass --device cpu", file=sys.stderr
        )
        return 2
    if device.type == "cpu":  # no CUDA graphs on the CPU: the graphed variants run eagerly
        args.variants = [v for v in args.variants if v not in ("fast_graphed", "fast_compiled")]
    if args.memory_formats is None:
        args.memory_formats = list(MEMORY_FORMATS) if device.type == "cuda" else ["contiguous"]
    results, checks = [], []
    for model in args.models:
        variants = [
            v for v in args.variants if not (v == "fast_compiled" and model in args.no_compile_for)
        ]
        part_results, part_checks = bench_model(
            model, args.objectives, variants, args.memory_formats, device, args, print
        )
        results += part_results
        checks += part_checks
    summary, targets = summarise(results, device)
    payload = {
        "device_name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu"
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **versions(),
        "command": " ".join(["python benchmarks/bench_step.py", *(argv or sys.argv[1:])]),
        "peak": peak_flops(device)[1],
        "results": results,
        "checks": checks,
        "summary": summary,
        "targets": targets,
    }
    markdown = to_markdown(payload)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"step_{device.type}_{payload['date'][:10]}"
    checkpoint_lib.atomic_write_text(stem.with_suffix(".json"), json.dumps(payload, indent=1))
    checkpoint_lib.atomic_write_text(stem.with_suffix(".md"), markdown)
    print(markdown)
    print(f"wrote {stem}.md and {stem}.json")
    if [c for c in checks if not c["ok"]] or [r for r in results if "error" in r]:
        return 1
    if args.strict and (not targets or not all(t["ok"] for t in targets)):
        print("--strict: a target was missed or none was judged", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
