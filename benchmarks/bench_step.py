"""pytest-benchmark of one training step: the naive reference against fastsp's fast step.

    python -m pytest benchmarks/bench_step.py --benchmark-only -q        # run this file alone

{reference, fast_eager} x {mse, self_perceptual} x {tiny, digits} (on CUDA also fast_graphed and
sd21 at 32x32 latents); each case's fast loss is checked against the reference loss before it is
timed (benchmarks/step_gpu.py `check_loss`). `test_fast_is_not_slower_than_reference_on_digits`
times both steps interleaved on the digits preset and fails if the fast step is slower. The full
matrix with a results file (memory, FLOPs, MFU, targets) is benchmarks/step_gpu.py.
"""

import os
import statistics
import time

import pytest
import torch
from step_gpu import Case, FastRunner, ReferenceRunner, check_loss, make_batch

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_MODELS = ["tiny", "digits"] + (["sd21_32"] if _DEVICE.type == "cuda" else [])
_VARIANTS = ["reference", "fast_eager"] + (["fast_graphed"] if _DEVICE.type == "cuda" else [])

pytestmark = pytest.mark.skipif(
    _DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1",
    reason="TRITON_INTERPRET=1 would time the Triton interpreter, not a CPU step: run "
    "`python -m pytest benchmarks/bench_step.py --benchmark-only` on its own",
)


def _sync():
    if _DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _runner(case: Case):
    runner = ReferenceRunner(case) if case.variant == "reference" else FastRunner(case)
    batch = make_batch(case)
    if isinstance(runner, FastRunner):
        runner.prepare(batch, log=lambda message: None)
    for _ in range(2):  # warm-up
        runner(batch)
    return runner, batch


@pytest.mark.parametrize("model", _MODELS)
@pytest.mark.parametrize("objective", ["mse", "self_perceptual"])
@pytest.mark.parametrize("variant", _VARIANTS)
def test_step(benchmark, model, objective, variant):
    case = Case(model, objective, variant, _DEVICE)
    ok, detail = check_loss(case)
    assert ok, detail
    runner, batch = _runner(case)

    def one_step():
        runner(batch)
        _sync()

    benchmark.pedantic(one_step, rounds=10, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = case.batch / benchmark.stats.stats.median


@pytest.mark.parametrize("objective", ["mse", "self_perceptual"])
def test_fast_is_not_slower_than_reference_on_digits(objective):
    # Interleaved in ABBA order, so that a change in the machine's load and the position within
    # a round (measured: up to 10% on this CPU) hit both alike; medians of 20 steps each.
    runners = {v: _runner(Case("digits", objective, v, _DEVICE)) for v in _VARIANTS[:2]}
    times = {v: [] for v in runners}
    for round_ in range(20):
        order = list(runners.items())
        for variant, (runner, batch) in order if round_ % 2 == 0 else reversed(order):
            start = time.perf_counter()
            runner(batch)
            _sync()
            times[variant].append(time.perf_counter() - start)
    reference, fast = (statistics.median(times[v]) for v in _VARIANTS[:2])
    print(f"digits {objective}: reference {1e3 * reference:.1f} ms, fast {1e3 * fast:.1f} ms")
    # "Not slower": the fast step's median is at most the reference's plus 5%, the spread of
    # repeated medians on a 2-core machine. (The fast step also does what the reference does
    # not: clipping and the EMA update.)
    assert fast <= 1.05 * reference, f"fast {fast:.4f} s/step > reference {reference:.4f} s/step"
