"""pytest-benchmark sweep of feature_mse: fused Triton vs eager F.mse_loss vs torch.compile.

    python -m pytest benchmarks/bench_feature_mse.py --benchmark-only -q

Provider x mode (fwd under no_grad, fwd+bwd) x case. The cases: the production feature map, the
sd21 mid block at batch 32 ([32, 1280, 8, 8] bf16, its own benchmark group named "production"),
then dtype (bf16, fp32) x size. Each case is checked against an fp32 F.mse_loss before it is
timed; ``extra_info`` holds GB/s counted from the bytes that must move and the percentage of the
copy bandwidth measured in the same session. On CPU (kernels in Triton's interpreter,
torch.compile with the aot_eager backend) the sweep sizes are small and nothing is claimed: every
case's ``extra_info["claims"]`` says so. The full GPU sweep with a results file, the production
map's speed-ups over eager and compile, and the targets' PASS/FAIL is benchmarks/feature_mse_gpu.py.
"""

import pytest
import torch
from feature_mse_gpu import (
    CPU_CLAIMS,
    PRODUCTION,
    cases,
    check,
    copy_bandwidth,
    make_step,
    providers_for,
)

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The production map, then 64M elements on GPU; small sizes on CPU
_SIZES = [64 * 2**20] if _DEVICE.type == "cuda" else [3000, 2 * 64 * 8 * 8]
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_CASES = cases(sorted(_DTYPES), _SIZES)
_PROVIDERS = providers_for(_DEVICE)


def _case_id(case):
    name, shape, dtype = case
    kind = "production" if case == PRODUCTION else name
    return f"{kind}-{'x'.join(map(str, shape))}-{dtype}"


@pytest.fixture(scope="module")
def copy_gbs():
    return copy_bandwidth(_DEVICE, 2**28 if _DEVICE.type == "cuda" else 2**16)


def _sync():
    if _DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("case", _CASES, ids=_case_id)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", sorted(_PROVIDERS))
def test_feature_mse(benchmark, provider, mode, case, copy_gbs):
    name, shape, dtype = case
    loss_fn, dt = _PROVIDERS[provider], _DTYPES[dtype]
    x = torch.randn(shape, device=_DEVICE, dtype=dt, requires_grad=True)
    y = torch.randn(shape, device=_DEVICE, dtype=dt)
    g = torch.tensor(1.0, device=_DEVICE, dtype=dt)
    check(loss_fn, x, y, g, dt)
    fn = make_step(loss_fn, x, y, mode, g)

    def timed():
        fn()
        _sync()

    benchmark.group = f"{mode} {name} {list(shape)} {dtype}"
    benchmark.pedantic(timed, rounds=5 if _DEVICE.type == "cpu" else 50, warmup_rounds=1)
    must_move = x.numel() * x.element_size() * (2 if mode == "fwd" else 3)
    gbs = must_move / benchmark.stats.stats.median / 1e9
    benchmark.extra_info.update(case=name, gb_per_s=gbs, pct_copy_bw=100 * gbs / copy_gbs)
    if _DEVICE.type != "cuda":
        benchmark.extra_info["claims"] = CPU_CLAIMS
