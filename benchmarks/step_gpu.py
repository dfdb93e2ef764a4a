"""The step benchmark: fastsp's training step against the naive reference step.

    python benchmarks/step_gpu.py                          # the GPU matrix, results in results/
    python benchmarks/step_gpu.py --models tiny digits --variants reference fast_eager --device cpu

Per (model, objective, variant) it reports images/s (median of timed steps, after warm-up), the
peak memory of the step, the FLOPs of one step (torch.utils.flop_counter on the fast step) and the
model FLOPs utilisation (FLOPs x steps/s / the card's dense bf16 peak). Variants:

- ``reference``: fastsp.reference's naive step (fp32 eager, two full perceptual forwards with a
  hook, F.mse_loss, torch's default AdamW, `.item()` per step); the baseline.
- ``fast_eager``: fastsp.step.TrainStep (bf16 autocast on CUDA, frozen network in bf16 cut at the
  tap, channels_last on CUDA, feature_mse, fused AdamW, foreach EMA), eagerly.
- ``fast_graphed``: the same step captured as one CUDA graph.
- ``fast_batched``: fast_graphed with the real and predicted perceptual branches in one forward
  of batch 2B (`--batched-branches`; self-perceptual only). On CPU graphs are off: eager.
- ``fast_compiled``: torch.compile of the online and perceptual networks, plus the CUDA graph.

Before anything is timed, the fast loss is checked against the reference loss on the same
weights and inputs (rel. 1e-4 in fp32, 3e-2 in bf16: bf16 keeps 8 significant bits and the loss
is a mean of squares of bf16 features); a failed check is reported and the case is not timed.
Targets (H100, sd21 at 64x64 latents, bf16): fast self-perceptual >= 4x the reference;
self-perceptual <= 1.6x the fast MSE step; >= 40% MFU. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastsp import reference
from fastsp.diffusion import NoiseSchedule
from fastsp.perceptual import SelfPerceptualLoss
from fastsp.step import TrainStep, reference_training_loss, step_randomness, training_loss
from fastsp.unet import UNET_PRESETS, UNet

# (UNet preset, resolution, batch). sd21 runs on latents with a [77, 1024] text context.
MODELS = {
    "tiny": ("tiny", 16, 64),
    "digits": ("digits", 16, 64),
    "sd21_32": ("sd21", 32, 32),
    "sd21_64": ("sd21", 64, 16),
}
VARIANTS = ("reference", "fast_eager", "fast_graphed", "fast_batched", "fast_compiled")
OBJECTIVES = ("mse", "self_perceptual")
# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
TARGETS = {"x_reference": 4.0, "sp_over_mse": 1.6, "mfu": 0.40}  # for TARGET_MODEL on a GPU
TARGET_MODEL = "sd21_64"
LR = 1e-5
CONTEXT = (77, 1024)


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "n/a (CPU)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if key in name:
            return value, f"{value / 1e12:.1f} TFLOP/s dense bf16 ({key})"
    return None, f"unknown for {name}"


@dataclasses.dataclass
class Case:
    model_name: str
    objective: str
    variant: str
    device: torch.device

    def __post_init__(self):
        preset, self.resolution, self.batch = MODELS[self.model_name]
        self.config = UNET_PRESETS[preset]
        self.shape = (self.config.in_channels, self.resolution, self.resolution)
        self.context_shape = CONTEXT if self.config.context_dim else None
        self.bf16 = self.device.type == "cuda" and self.variant != "reference"


def build_models(case: Case, seed: int = 0):
    """Online model (fp32 master weights) and a frozen perceptual copy; zero-initialised output
    layers get small random weights so the losses and gradients are not trivially zero."""
    torch.manual_seed(seed)
    model = UNet(case.config)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    perceptual = copy.deepcopy(model).eval().requires_grad_(False)
    return model.to(case.device), perceptual.to(case.device)


def make_batch(case: Case, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {"x": torch.randn(case.batch, *case.shape, generator=g)}
    if case.config.num_classes:
        batch["label"] = torch.randint(0, case.config.num_classes, (case.batch,), generator=g)
    if case.context_shape:
        batch["context"] = torch.randn(case.batch, *case.context_shape, generator=g)
    return {k: v.to(case.device) for k, v in batch.items()}


class ReferenceRunner:
    """fastsp.reference's step, with the noise, t and t' of each step drawn as the fast step's."""

    def __init__(self, case: Case):
        self.case = case
        self.model, self.perceptual = build_models(case)
        self.schedule = NoiseSchedule()
        self.alphas = self.schedule.alphas_cumprod.to(case.device, torch.float32)
        self.optimizer = reference.make_reference_optimizer(self.model, lr=LR)
        self.sp = (
            SelfPerceptualLoss(self.perceptual, self.alphas)
            if case.objective == "self_perceptual"
            else None
        )
        self.step = 0

    def __call__(self, batch):
        noise, t, _, t_prime = step_randomness(
            0,
            self.step,
            self.case.batch,
            self.case.shape,
            self.schedule,
            0.0,
            self.case.device,
            self.sp,
        )
        cond = {"labels": batch.get("label"), "context": batch.get("context")}
        if self.sp is None:
            reference.reference_mse_step(
                self.model, self.optimizer, batch["x"], noise, t, self.alphas, **cond
            )
        else:
            reference.reference_self_perceptual_step(
                self.model,
                self.perceptual,
                self.optimizer,
                batch["x"],
                noise,
                t,
                t_prime,
                self.alphas,
                **cond,
            )
        self.step += 1


class FastRunner:
    """fastsp.step.TrainStep as the trainer builds it (one process)."""

    def __init__(self, case: Case):
        batched_branches = case.variant == "fast_batched"
        self.case = case
        model, perceptual = build_models(case)
        # channels_last on CUDA (tensor-core convolutions); on CPU it slows GroupNorm and the
        # oneDNN convolutions of these small models (measured), and no CPU preset uses it.
        channels_last = case.device.type == "cuda"
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        perceptual = perceptual.to(
            dtype=torch.bfloat16 if case.bf16 else torch.float32, memory_format=memory_format
        )
        schedule = NoiseSchedule()
        sp = (
            SelfPerceptualLoss(
                perceptual, schedule.alphas_cumprod, batched_branches=batched_branches
            )
            if case.objective == "self_perceptual"
            else None
        )
        online = model
        if case.variant == "fast_compiled":
            online = torch.compile(model)
            if sp is not None:
                sp.features.network = torch.compile(sp.features.network)
        cuda = case.device.type == "cuda"
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=True, capturable=cuda)
        self.step_fn = TrainStep(
            model=model,
            online=online,
            ema=copy.deepcopy(model).requires_grad_(False),
            optimizer=optimizer,
            schedule=schedule,
            perceptual_loss=sp,
            device=case.device,
            seed=0,
            global_batch=case.batch,
            local_batch=case.batch,
            rank=0,
            shape=case.shape,
            num_classes=case.config.num_classes,
            context_shape=case.context_shape,
            grad_clip=1.0,
            bf16=case.bf16,
            channels_last=channels_last,
        )
        self.step = 0
        self.graphed = False

    def prepare(self, batch, log) -> None:
        if self.case.variant in ("fast_graphed", "fast_batched", "fast_compiled"):
            self.graphed = self.step_fn.capture(batch, log=log)

    def __call__(self, batch):
        self.step_fn.run(batch, self.step, LR, 1e-3)
        self.step += 1


def check_loss(case: Case) -> tuple[bool, str]:
    """The fast loss against the reference loss on the same weights, inputs, noise, t and t'."""
    model, perceptual = build_models(case)
    schedule = NoiseSchedule()
    batch = make_batch(case)
    fast_perceptual = perceptual.to(torch.bfloat16) if case.bf16 else perceptual
    sp = SelfPerceptualLoss(fast_perceptual, schedule.alphas_cumprod)
    sp = sp if case.objective == "self_perceptual" else None
    noise, t, _, t_prime = step_randomness(
        0, 0, case.batch, case.shape, schedule, 0.0, case.device, sp
    )
    cond = {"labels": batch.get("label"), "context": batch.get("context")}
    with torch.no_grad():
        with torch.autocast(case.device.type, torch.bfloat16, enabled=case.bf16):
            fast = training_loss(model, schedule, batch["x"], noise, t, cond, sp, t_prime)
        ref_sp = SelfPerceptualLoss(perceptual, schedule.alphas_cumprod) if sp else None
        ref = reference_training_loss(model, schedule, batch["x"], noise, t, cond, ref_sp, t_prime)
    fast, ref = fast.item(), ref.item()
    tolerance = 3e-2 if case.bf16 else 1e-4
    ok = abs(fast - ref) <= tolerance * abs(ref)
    return ok, f"fast {fast:.6g} vs reference {ref:.6g} (rel. tol. {tolerance:g})"


def count_flops(case: Case) -> int:
    """FLOPs of one fast eager step (forward, perceptual pass, backward; the optimizer's and
    EMA's elementwise work is not counted, as usual for MFU)."""
    runner = FastRunner(dataclasses.replace(case, variant="fast_eager"))
    batch = make_batch(case)
    with FlopCounterMode(display=False) as counter:
        runner(batch)
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(case: Case, seconds: float, log) -> dict:
    device = case.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    runner = ReferenceRunner(case) if case.variant == "reference" else FastRunner(case)
    batch = make_batch(case)
    if isinstance(runner, FastRunner):
        runner.prepare(batch, log)
    for _ in range(3):  # warm-up (compilation, autotuning, allocator)
        runner(batch)
    synchronize(device)
    times = []
    budget_end = time.perf_counter() + seconds
    while len(times) < 5 or (time.perf_counter() < budget_end and len(times) < 200):
        start = time.perf_counter()
        runner(batch)
        synchronize(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    result = {
        "model": case.model_name,
        "objective": case.objective,
        "variant": case.variant,
        "batch": case.batch,
        "resolution": case.resolution,
        "precision": "bf16" if case.bf16 else "fp32",
        "steps_timed": len(times),
        "step_ms": 1e3 * median,
        "step_ms_p20": 1e3 * statistics.quantiles(times, n=5)[0],
        "step_ms_p80": 1e3 * statistics.quantiles(times, n=5)[-1],
        "images_per_s": case.batch / median,
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        ),
    }
    if isinstance(runner, FastRunner):
        result["cuda_graph"] = runner.graphed
        result["cuda_graph_error"] = runner.step_fn.graph_error
    del runner
    return result


def summarise(results: list[dict], peak: float | None) -> list[dict]:
    """Ratios per model: fast / reference, self-perceptual / MSE, and the targets' verdicts."""
    by_key = {(r["model"], r["objective"], r["variant"]): r for r in results if "step_ms" in r}
    rows = []
    for model in dict.fromkeys(r["model"] for r in results):
        fast = [v for v in VARIANTS[1:] if (model, "self_perceptual", v) in by_key]
        if not fast:
            continue
        best = min(fast, key=lambda v: by_key[(model, "self_perceptual", v)]["step_ms"])
        sp = by_key[(model, "self_perceptual", best)]
        row = {"model": model, "best_fast_variant": best}
        ref = by_key.get((model, "self_perceptual", "reference"))
        if ref:
            row["x_reference"] = ref["step_ms"] / sp["step_ms"]
        mse = [by_key[(model, "mse", v)] for v in VARIANTS[1:] if (model, "mse", v) in by_key]
        if mse:  # the fastest self-perceptual step over the fastest MSE step
            row["sp_over_mse"] = sp["step_ms"] / min(r["step_ms"] for r in mse)
        if peak and sp.get("flops"):
            row["mfu"] = sp["flops"] / (sp["step_ms"] / 1e3) / peak
        rows.append(row)
    return rows


def to_markdown(payload: dict) -> str:
    lines = [
        f"# Step benchmark: {payload['device_name']}, {payload['date']}",
        "",
        f"torch {payload['torch']}, triton {payload['triton']}, xformers {payload['xformers']}, "
        f"python {payload['python']}; peak for MFU: {payload['peak']}",
        "",
        "| model | objective | variant | precision | batch | ms/step (p20-p80) | images/s | "
        "peak GiB | TFLOP/step | MFU | graph |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["results"]:
        if "step_ms" not in r:
            lines.append(
                f"| {r['model']} | {r['objective']} | {r['variant']} | | | FAILED: {r['error']} "
                "| | | | | |"
            )
            continue
        memory = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        flops = f"{r['flops'] / 1e12:.3f}" if r.get("flops") else "-"
        lines.append(
            f"| {r['model']} | {r['objective']} | {r['variant']} | {r['precision']} | "
            f"{r['batch']} | {r['step_ms']:.2f} ({r['step_ms_p20']:.2f}-{r['step_ms_p80']:.2f}) "
            f"| {r['images_per_s']:.0f} | {memory} | {flops} | {mfu} | "
            f"{r.get('cuda_graph', '-')} |"
        )
    lines += ["", "| model | best fast variant | fast SP / reference SP | SP / MSE | MFU |"]
    lines += ["|---|---|---|---|---|"]
    for s in payload["summary"]:
        cells = []
        for key, fmt in (("x_reference", "{:.2f}x"), ("sp_over_mse", "{:.2f}x"), ("mfu", "{:.1%}")):
            if key not in s:
                cells.append("-")
                continue
            text = fmt.format(s[key])
            if s["model"] == TARGET_MODEL and payload["device_type"] == "cuda":
                target = TARGETS[key]
                met = s[key] <= target if key == "sp_over_mse" else s[key] >= target
                text += " (target met)" if met else " (target NOT met)"
            cells.append(text)
        lines.append(f"| {s['model']} | {s['best_fast_variant']} | " + " | ".join(cells) + " |")
    lines += ["", "Checks (fast loss vs reference loss, before timing):", ""]
    lines += [
        f"- {c['model']} {c['objective']} {c['precision']}: {'ok' if c['ok'] else 'FAILED'}"
        f" - {c['detail']}"
        for c in payload["checks"]
    ]
    return "\n".join(lines) + "\n"


def run(models, objectives, variants, device, seconds, log=print) -> dict:
    peak, peak_text = peak_flops(device)
    results, checks = [], []
    for model_name in models:
        for objective in objectives:
            precisions = {Case(model_name, objective, v, device).bf16: v for v in variants}
            for variant in precisions.values():  # one check per precision the variants run in
                case = Case(model_name, objective, variant, device)
                try:
                    ok, detail = check_loss(case)
                except Exception as error:  # noqa: BLE001 (report every failure, go on)
                    ok, detail = False, f"{type(error).__name__}: {error}"
                precision = "bf16" if case.bf16 else "fp32"
                checks.append(
                    {
                        "model": model_name,
                        "objective": objective,
                        "precision": precision,
                        "ok": ok,
                        "detail": detail,
                    }
                )
                log(f"check {model_name} {objective} {precision}: {detail}")
            flops = None
            for variant in variants:
                if variant == "fast_batched" and objective == "mse":
                    continue  # no perceptual branches to batch
                case = Case(model_name, objective, variant, device)
                check = next(
                    c
                    for c in checks
                    if c["model"] == model_name
                    and c["objective"] == objective
                    and c["precision"] == ("bf16" if case.bf16 else "fp32")
                )
                if not check["ok"]:
                    results.append(
                        {
                            "model": model_name,
                            "objective": objective,
                            "variant": variant,
                            "error": "loss check failed",
                        }
                    )
                    continue
                try:
                    result = time_case(case, seconds, log)
                    if variant != "reference":
                        flops = flops if flops is not None else count_flops(case)
                        result["flops"] = flops
                        if peak:
                            result["mfu"] = flops / (result["step_ms"] / 1e3) / peak
                except Exception as error:  # noqa: BLE001
                    result = {
                        "model": model_name,
                        "objective": objective,
                        "variant": variant,
                        "error": f"{type(error).__name__}: {str(error).splitlines()[0]}",
                    }
                results.append(result)
                log(json.dumps(result))
    try:
        import xformers

        xformers_version = xformers.__version__
    except ImportError:
        xformers_version = "not installed"
    import triton

    return {
        "device_name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu"
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "xformers": xformers_version,
        "python": platform.python_version(),
        "peak": peak_text,
        "device_type": device.type,
        "results": results,
        "checks": checks,
        "summary": summarise(results, peak),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--no-compile-for",
        nargs="*",
        default=["sd21_32"],
        help="models to skip fast_compiled for (compiling the sd21 UNet costs minutes)",
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="timing budget per case")
    parser.add_argument("--out", default=None, help="folder for the .md and .json results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "error: --device cuda but torch sees no CUDA device; pass --device cpu", file=sys.stderr
        )
        return 2
    payload = {"results": [], "checks": []}
    for model in args.models:
        variants = [
            v for v in args.variants if not (v == "fast_compiled" and model in args.no_compile_for)
        ]
        part = run([model], args.objectives, variants, device, args.seconds)
        payload = {
            **part,
            "results": payload["results"] + part["results"],
            "checks": payload["checks"] + part["checks"],
        }
    payload["summary"] = summarise(payload["results"], peak_flops(device)[0])
    markdown = to_markdown(payload)
    out = Path(args.out) if args.out else Path(__file__).parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"step_{device.type}_{payload['date'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    stem.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {stem}.md and {stem}.json")
    failed = [c for c in payload["checks"] if not c["ok"]] + [
        r for r in payload["results"] if "error" in r
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
