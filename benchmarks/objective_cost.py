"""Cost of a self-perceptual step relative to an MSE step of the same trainer (PAPER.md: ~1.5x).

    python benchmarks/objective_cost.py                      # digits preset, CPU
    python benchmarks/objective_cost.py --preset sd21 --device cuda --batch-size 32 --resolution 64

Times full optimizer steps (forward, backward, AdamW) of fastsp's trainer code (`training_loss`)
for the MSE and the self-perceptual objective, and of the naive reference (fastsp/reference.py)
for both, on the same model, batch and noise. Before timing, the fast self-perceptual loss is
checked against the reference on the same inputs. Prints medians with 20th/80th percentiles and
the ratios, and writes them as JSON with --json.
"""

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

from fastsp import reference
from fastsp.diffusion import NoiseSchedule
from fastsp.perceptual import SelfPerceptualLoss
from fastsp.step import training_loss
from fastsp.unet import UNET_PRESETS, UNet


def timed(step, warmup: int, iters: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        step()
    times: list[float] = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=10)
    return {"median_s": statistics.median(times), "p20_s": q[1], "p80_s": q[7]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="digits", choices=sorted(UNET_PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds over all variants")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model_cfg = UNET_PRESETS[args.preset]
    if model_cfg.context_dim:  # the benchmark conditions on labels only
        model_cfg = dataclasses.replace(model_cfg, context_dim=0)
    model_cfg = dataclasses.replace(model_cfg, num_classes=10)
    model = UNet(model_cfg).to(device)
    perceptual = reference.frozen_copy(model)
    schedule = NoiseSchedule()
    loss_fn = SelfPerceptualLoss(perceptual, schedule.alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, model_cfg.in_channels, args.resolution, args.resolution)
    x0 = torch.randn(shape, generator=g).to(device)
    noise = torch.randn(shape, generator=g).to(device)
    t = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)
    t_prime = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)
    labels = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    cond = {"labels": labels, "context": None}
    alphas_cumprod = schedule.alphas_cumprod.to(device, torch.float32)

    # Correctness before timing: the fast loss equals the naive reference on these inputs.
    with torch.no_grad():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            fast = training_loss(model, schedule, x0, noise, t, cond, loss_fn, t_prime)
            naive = reference.reference_self_perceptual_loss(
                model, perceptual, x0, noise, t, t_prime, alphas_cumprod, labels=labels
            )
    tolerance = 2e-2 if args.bf16 else 1e-4
    if not torch.allclose(fast.float(), naive.float(), rtol=tolerance, atol=1e-6):
        print(f"error: fast loss {fast.item()} != reference {naive.item()}", file=sys.stderr)
        return 1

    def trainer_step(objective):
        online = copy.deepcopy(model).requires_grad_(True)
        optimizer = torch.optim.AdamW(online.parameters(), lr=1e-4, fused=device.type == "cuda")

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                sp = loss_fn if objective == "self_perceptual" else None
                loss = training_loss(online, schedule, x0, noise, t, cond, sp, t_prime)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def reference_step(objective):
        online = copy.deepcopy(model).requires_grad_(True)
        optimizer = reference.make_reference_optimizer(online)
        if objective == "mse":
            return lambda: reference.reference_mse_step(
                online, optimizer, x0, noise, t, alphas_cumprod, labels=labels
            )
        return lambda: reference.reference_self_perceptual_step(
            online, perceptual, optimizer, x0, noise, t, t_prime, alphas_cumprod, labels=labels
        )

    # Interleave rounds of every variant so drift (clocks, caches, other load) hits all alike.
    steps = {
        f"{name}/{objective}": make(objective)
        for name, make in (("trainer", trainer_step), ("reference", reference_step))
        for objective in ("mse", "self_perceptual")
    }
    times = {key: [] for key in steps}
    for step in steps.values():
        timed(step, args.warmup, 0, device)
    for _ in range(args.rounds):
        for key, step in steps.items():
            times[key] += timed(step, 0, args.iters, device)
    results = {key: summary(values) for key, values in times.items()}
    ratios = {
        "trainer self_perceptual / mse": results["trainer/self_perceptual"]["median_s"]
        / results["trainer/mse"]["median_s"],
        "reference self_perceptual / mse": results["reference/self_perceptual"]["median_s"]
        / results["reference/mse"]["median_s"],
    }
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "preset": args.preset,
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "bf16": args.bf16,
        "steps": results,
        "ratios": ratios,
    }
    for key, value in results.items():
        print(
            f"{key:28s} median {value['median_s'] * 1e3:8.1f} ms  "
            f"(p20 {value['p20_s'] * 1e3:.1f}, p80 {value['p80_s'] * 1e3:.1f})"
        )
    for key, value in ratios.items():
        print(f"{key:34s} {value:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
