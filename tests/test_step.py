"""The fast training step (fastsp.step) against the naive reference step (fastsp.reference).

- fp32 and float64, graphs off: loss, gradients and updated parameters equal the reference's.
- bf16: a 200-step trajectory of the tiny preset stays within a stated tolerance of fp32.
- Capture safety: the step runs under a dispatch mode that fails on any read of a tensor by the
  host (what a CUDA graph cannot contain), and the mode is shown to catch one.
- CUDA only: the graphed step equals the eager step.
"""

import contextlib
import copy
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastsp import reference
from fastsp.diffusion import NoiseSchedule
from fastsp.errors import ConfigError
from fastsp.model_config import UNET_PRESETS
from fastsp.perceptual import SelfPerceptualLoss
from fastsp.step import StepConfig, TrainStep, step_randomness
from fastsp.unet import UNet

B, RES, LR = 8, 16, 1e-3


# Fused and foreach AdamW round differently; where a gradient element is near 0, Adam's
# normalised update m / sqrt(v) turns that rounding into differences of a few 1e-6 after a few
# steps (seen on the CI machine: 2.5e-6 on a 6e-3 weight), so the absolute tolerance is 1e-5.
ADAM_ATOL = 1e-5


def _models(dtype=torch.float32, seed=0, num_classes=10, device="cpu"):
    """A tiny online UNet with every weight randomised and a different frozen perceptual one."""
    config = dataclasses.replace(UNET_PRESETS["tiny"], num_classes=num_classes)
    torch.manual_seed(seed)
    model = UNet(config).to(device, dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    perceptual = copy.deepcopy(model)
    with torch.no_grad():
        for p in perceptual.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, perceptual.eval().requires_grad_(False)


def _batch(dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(B, 1, RES, RES, generator=g).to(dtype),
        "label": torch.randint(0, 10, (B,), generator=g),
    }


def _fast_step(model, perceptual, objective, *, fused=True, **options):
    schedule = NoiseSchedule()
    perceptual_loss = (
        SelfPerceptualLoss(
            perceptual,
            schedule.alphas_cumprod,
            batched_branches=options.pop("batched_branches", False),
        )
        if objective == "self_perceptual"
        else None
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=fused)
    ema = copy.deepcopy(model).requires_grad_(False)
    device = options.pop("device", torch.device("cpu"))
    config = StepConfig(seed=3, global_batch=B, shape=(1, RES, RES), num_classes=10, **options)
    return TrainStep(
        config,
        model=model,
        online=model,
        ema=ema,
        optimizer=optimizer,
        schedule=schedule,
        perceptual_loss=perceptual_loss,
        device=device,
    )


@pytest.mark.parametrize("objective", ["mse", "self_perceptual"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_step_equals_the_reference_step(objective, dtype):
    # Same weights, data, noise, t and t'; the fast step (truncated perceptual forwards, fused
    # feature loss, fused AdamW, graphs off) against fastsp.reference's naive step.
    model, perceptual = _models(dtype)
    ref_model = copy.deepcopy(model)
    batch = _batch(dtype)
    step = _fast_step(model, perceptual, objective)
    step.load(batch, 5, LR, 0.1)
    step.compute(zero_grad=False)

    schedule = NoiseSchedule()
    noise, t, _, t_prime = step_randomness(
        3, 5, B, (1, RES, RES), schedule, 0.0, torch.device("cpu"), step.perceptual_loss, dtype
    )
    alphas = schedule.alphas_cumprod.to(dtype)
    ref_optimizer = reference.make_reference_optimizer(ref_model, lr=LR)
    args = (batch["x"], noise, t)
    if objective == "mse":
        ref_loss = reference.reference_mse_step(
            ref_model, ref_optimizer, *args, alphas, labels=batch["label"]
        )
    else:
        ref_loss = reference.reference_self_perceptual_step(
            ref_model, perceptual, ref_optimizer, *args, t_prime, alphas, labels=batch["label"]
        )

    tight = dtype == torch.float64
    loss = step.loss_sum.item()
    assert loss == pytest.approx(ref_loss, rel=1e-12 if tight else 1e-5)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        scale = q.grad.abs().max().item() + 1e-30
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=(1e-12 if tight else 1e-5) * scale), name
        # One AdamW step moves each weight by about lr. The fast step's lr is an fp32 device
        # tensor (fused AdamW reads it on the device), whose rounding (relative 2^-24) is the only
        # difference in float64; in fp32, fused and foreach AdamW also round differently.
        atol = 2 * LR * 2**-24 if tight else 1e-6
        assert torch.allclose(p, q, rtol=0, atol=atol), (name, (p - q).abs().max())
    assert step.good_steps.item() == 1


def test_batched_branches_equal_separate_branches():
    losses, grads = [], []
    for batched in (False, True):
        model, perceptual = _models(torch.float64)
        step = _fast_step(model, perceptual, "self_perceptual", batched_branches=batched)
        step.load(_batch(torch.float64), 0, LR, 0.1)
        step.compute(zero_grad=False)
        losses.append(step.loss_sum.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    assert torch.allclose(grads[0], grads[1], rtol=1e-9, atol=1e-14)


class HostSyncError(AssertionError):
    pass


class FailOnHostSync(TorchDispatchMode):
    """Fails on every op that hands a tensor's value to the host: `.item()`, `bool(tensor)`,
    `if tensor:`, `torch.equal`, data-dependent output shapes (`nonzero`, boolean indexing). On
    CUDA each of these is a device synchronisation, and none can be captured in a CUDA graph."""

    HOST_READS = {
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.equal.default,
        torch.ops.aten.allclose.default,
        torch.ops.aten.nonzero.default,
        torch.ops.aten.masked_select.default,
        torch.ops.aten._unique2.default,
    }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.HOST_READS:
            raise HostSyncError(f"host sync in the step: {func}")
        return func(*args, **(kwargs or {}))


def test_the_dispatch_mode_catches_a_host_sync():
    with pytest.raises(HostSyncError), FailOnHostSync():
        x = torch.ones(3)
        if x.sum() > 0:  # a data-dependent Python branch
            pass
    with pytest.raises(HostSyncError), FailOnHostSync():
        torch.ones(3).sum().item()


@pytest.mark.parametrize(
    "objective, options",
    [
        ("mse", {}),
        ("self_perceptual", {"grad_clip": 1.0, "label_dropout": 0.1}),
        ("self_perceptual", {"grad_accum": 2, "batched_branches": True}),
        ("self_perceptual", {"mse_weight": 1.0, "bf16": True, "channels_last": True}),
    ],
)
def test_the_step_is_capture_safe(objective, options):
    # Everything in compute() (randomness, forward, perceptual pass, loss, backward, clipping,
    # fused AdamW with found_inf, EMA, metrics) stays on the device.
    model, perceptual = _models()
    if options.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    step = _fast_step(model, perceptual, objective, **options)
    for i in range(2):  # the second step runs with optimizer state
        step.load(_batch(seed=i), i, LR, 0.1)
        with FailOnHostSync():
            step.compute()
    assert step.good_steps.item() == 2


def test_a_non_finite_step_is_skipped_on_the_device():
    model, perceptual = _models()
    step = _fast_step(model, perceptual, "self_perceptual")
    before = [p.detach().clone() for p in model.parameters()]
    ema_before = [p.clone() for p in step.ema.parameters()]
    batch = _batch()
    batch["x"][0, 0, 0, 0] = float("nan")
    step.load(batch, 0, LR, 0.1)
    with FailOnHostSync():
        step.compute()
    assert step.good_steps.item() == 0 and step.bad_in_a_row.item() == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(torch.equal(a, p) for a, p in zip(ema_before, step.ema.parameters(), strict=True))


class RecordOps(TorchDispatchMode):
    """Records every aten op with its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [
            t
            for t in torch.utils._pytree.tree_leaves((args, kwargs or {}))
            if isinstance(t, torch.Tensor)
        ]
        self.calls.append((func, tensors))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("weight", [0.1, 0.0])
def test_the_ema_update_is_fused_foreach_ops_on_dense_tensors(weight):
    # torch's fused multi-tensor path needs dense tensors (ATen's ForeachUtils.h): the update
    # must be foreach ops only, with no stride-0 (expanded) argument and no per-parameter op.
    model, perceptual = _models(torch.float64)
    step = _fast_step(model, perceptual, "mse")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema_before = [p.clone() for p in step.ema_params]
    step.ema_step_weight.fill_(weight)
    with RecordOps() as recorded, FailOnHostSync():
        step.update_ema()
    ops = [func for func, _ in recorded.calls]
    assert ops and all(func.__name__.startswith("_foreach_") for func in ops), ops
    for func, tensors in recorded.calls:
        assert all(0 not in t.stride() for t in tensors if t.dim() > 0), func
    ema = list(step.ema.parameters())
    for e, before, m in zip(ema, ema_before, model.parameters(), strict=True):
        if weight == 0:  # a skipped step leaves the EMA bit-exact
            assert (
                torch.equal(e, before) and (e.view(torch.int64) == before.view(torch.int64)).all()
            )
        else:
            # 1e-12 relative to the tensor's scale (lerp may round through an fma)
            scale = before.abs().max().item()
            expected = torch.lerp(before, m, weight)
            torch.testing.assert_close(e, expected, rtol=1e-12, atol=1e-12 * scale)


def test_the_longest_run_of_bad_steps_is_kept_until_the_next_log():
    # The trainer reads the streak only at log intervals: a run of 3 bad steps that ends before
    # the log must still be seen there (so --max-bad-steps 3 stops training).
    model, perceptual = _models()
    step = _fast_step(model, perceptual, "mse")
    bad = _batch()
    bad["x"][0, 0, 0, 0] = float("nan")
    for i, batch in enumerate([bad, bad, bad, _batch(), _batch()]):
        step.load(batch, i, LR, 0.1)
        with FailOnHostSync():
            step.compute()
    assert step.bad_in_a_row.item() == 0 and step.worst_bad_in_a_row.item() == 3
    step.reset_metrics()  # a log: the next window starts from the run still going on (none)
    assert step.worst_bad_in_a_row.item() == 0
    for i in range(2):
        step.load(bad, 5 + i, LR, 0.1)
        step.compute()
    step.reset_metrics()
    assert step.worst_bad_in_a_row.item() == 2  # a run across a log carries over
    step.load(bad, 7, LR, 0.1)
    step.compute()
    assert step.worst_bad_in_a_row.item() == 3


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mse", "self_perceptual"])
def test_training_loss_compiles_without_graph_breaks(objective):
    # What --compile traces: the online forward, the perceptual pass cut at the tap and the fused
    # feature loss, as one graph (fullgraph=True fails on any break), forward and backward.
    from fastsp.objectives import training_loss

    model, perceptual = _models()
    schedule = NoiseSchedule()
    sp = SelfPerceptualLoss(perceptual, schedule.alphas_cumprod)
    sp = sp if objective == "self_perceptual" else None
    batch = _batch()
    noise, t, _, t_prime = step_randomness(
        0, 0, B, (1, RES, RES), schedule, 0.0, torch.device("cpu"), sp
    )

    def loss_of(x0, noise, t, t_prime, labels):
        return training_loss(model, schedule, x0, noise, t, {"labels": labels}, sp, t_prime)

    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss_of, compiled):
        loss = fn(batch["x"], noise, t, t_prime, batch["label"])
        results.append((loss, *torch.autograd.grad(loss, list(model.parameters()))))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _trajectory(bf16: bool, steps: int) -> torch.Tensor:
    """Per-step losses of the tiny preset trained with the self-perceptual loss."""
    model, perceptual = _models()
    if bf16:  # as the trainer does: the frozen network is held in bf16
        perceptual = perceptual.to(torch.bfloat16)
    step = _fast_step(model, perceptual, "self_perceptual", bf16=bf16, grad_clip=1.0)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(64, 1, RES, RES, generator=g).cumsum(-1).tanh()  # smooth "images"
    labels = torch.randint(0, 10, (64,), generator=g)
    losses = []
    for i in range(steps):
        index = torch.randint(0, 64, (B,), generator=g)
        step.load({"x": data[index], "label": labels[index]}, i, LR, 0.05)
        step.compute()
        losses.append(step.loss_sum.item())
        step.reset_metrics()
    return torch.tensor(losses)


@pytest.mark.slow
def test_bf16_trajectory_stays_close_to_fp32():
    # Same data, noise, t and t' for both runs; fp32 vs bf16 autocast with the frozen network
    # held in bf16. Measured (200 steps, 20-step windows): the bf16 window means sit 0.8-1.2%
    # above fp32 (max 1.16%), and the first steps differ by 0.5-2.3%. The excess is expected, not
    # drift: bf16 keeps 8 significant bits, so each feature carries a rounding error of relative
    # size up to 2^-9, which adds its variance to the mean squared feature distance (here the
    # loss is ~1e-4 while the features are O(0.1)). A 3% tolerance on every window mean (2.6x
    # the measured gap) catches a real bf16 fault (a loss reduced in bf16, a lost gradient path,
    # a missing fp32 master copy) while allowing rounding; the windows themselves change by
    # 1-24% from one to the next, and the loss falls by a quarter over the run.
    steps, window = 200, 20
    fp32 = _trajectory(False, steps).view(-1, window).mean(1)
    bf16 = _trajectory(True, steps).view(-1, window).mean(1)
    assert fp32[-1] < 0.9 * fp32[0]  # it trains
    gap = (bf16 / fp32 - 1).abs()
    assert gap.max() < 0.03, gap


@pytest.mark.cuda
@pytest.mark.parametrize("objective", ["mse", "self_perceptual"])
def test_graphed_step_equals_eager_step_on_cuda(objective, monkeypatch):
    # The CUDA graph replays the step's kernels; the generator is re-seeded per step through the
    # graph's registered generator state, so graphed and eager draw the same noise.
    # Bit equality of two separate runs needs deterministic kernels: flash attention's backward
    # (SDPA runs its deterministic variant only under torch.use_deterministic_algorithms) and
    # cuDNN's default algorithms are not run-to-run deterministic otherwise; cuBLAS needs a fixed
    # workspace (PyTorch's reproducibility notes; fastsp.training.loop.use_deterministic_algorithms,
    # the same switch as --deterministic). fastsp's Triton kernels use no atomics. Exact, not a
    # tolerance: any difference in what the graph replays shows up.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        _check_graphed_step_equals_eager_step(objective)
    finally:  # the rest of the suite runs with the settings it had
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


def _check_graphed_step_equals_eager_step(objective):
    results = []
    for graphed in (False, True):
        model, perceptual = _models(device="cuda")
        step = _fast_step(
            model,
            perceptual,
            objective,
            device=torch.device("cuda"),
            bf16=True,
            grad_clip=1.0,
        )
        for group in step.optimizer.param_groups:
            group["capturable"] = True
        batches = [{k: v.cuda() for k, v in _batch(seed=i).items()} for i in range(3)]
        if graphed:
            assert step.capture(batches[0]), step.graph_error
        losses = []
        for i, batch in enumerate(batches):
            step.run(batch, i, LR, 0.1)
            losses.append(step.loss_sum.clone())
            step.reset_metrics()
        results.append((torch.stack(losses), [p.detach().clone() for p in model.parameters()]))
    (eager_losses, eager_params), (graph_losses, graph_params) = results
    assert torch.equal(eager_losses, graph_losses)
    for a, b in zip(eager_params, graph_params, strict=True):
        assert torch.equal(a, b)


def _train(argv):
    from fastsp import config_cli
    from fastsp.training.loop import train

    cfg, model_cfg = config_cli.parse_args(argv)
    return train(cfg, model_cfg)


def test_trainer_fast_and_reference_steps_train_the_same_weights(tmp_path):
    # The trainer end to end: stage 1 (MSE) and stage 2 (self-perceptual) with --train-step fast
    # and --train-step reference on CPU in fp32 (same data, noise, t and t'): the weights agree
    # up to fused-vs-foreach AdamW rounding.
    from safetensors.torch import load_file

    common = ["--preset", "tiny", "--steps", "6", "--device", "cpu", "--precision", "fp32"]
    stage1 = _train([*common, "--out", str(tmp_path / "stage1")])
    for objective in ("mse", "self_perceptual"):
        weights = {}
        for kind in ("fast", "reference"):
            out = tmp_path / f"{objective}_{kind}"
            extra = ["--init", str(stage1)] if objective == "self_perceptual" else []
            checkpoint = _train(
                [*common, *extra, "--objective", objective, "--train-step", kind, "--out", str(out)]
            )
            weights[kind] = load_file(checkpoint / "model.safetensors")
        for name, fast in weights["fast"].items():
            assert torch.allclose(fast, weights["reference"][name], rtol=1e-4, atol=ADAM_ATOL), name


def test_reference_step_refuses_options_it_does_not_implement():
    from fastsp.config import TrainConfig

    with pytest.raises(ConfigError, match="--perceptual-layers 'down1' needs --train-step fast"):
        TrainConfig(train_step="reference", perceptual_layers="down1")
    with pytest.raises(ConfigError, match="--precision 'bf16' needs --train-step fast"):
        TrainConfig(train_step="reference", precision="bf16")


class _ContextRecorder(torch.nn.Module):
    """The online model, recording the context each forward receives."""

    def __init__(self, model):
        super().__init__()
        self.model, self.contexts = model, []

    def forward(self, x, t, labels=None, context=None):
        self.contexts.append(context.detach().clone())
        return self.model(x, t, labels=labels, context=context)


@pytest.mark.parametrize("reference_loss", [False, True])
def test_cfg_dropout_gives_dropped_rows_exactly_the_null_context(reference_loss):
    # Text conditioning is trained as Stable Diffusion is: a dropped item's context is the empty
    # prompt's embedding (the data set's null_context), not zeros; in the fast step (without a
    # host read) and in the reference step alike.
    length, dim = 5, 16
    config = dataclasses.replace(UNET_PRESETS["tiny"], num_classes=0, context_dim=dim)
    torch.manual_seed(0)
    model = UNet(config)
    g = torch.Generator().manual_seed(2)
    batch = {"x": torch.randn(B, 1, RES, RES, generator=g)}
    batch["context"] = torch.randn(B, length, dim, generator=g)
    null_context = torch.randn(length, dim, generator=g)
    recorder = _ContextRecorder(model)
    schedule = NoiseSchedule()
    step_config = StepConfig(
        seed=3,
        global_batch=B,
        shape=(1, RES, RES),
        context_shape=(length, dim),
        label_dropout=0.5,
        reference_loss=reference_loss,
    )
    step = TrainStep(
        step_config,
        model=model,
        online=recorder,
        ema=copy.deepcopy(model).requires_grad_(False),
        optimizer=torch.optim.AdamW(model.parameters(), lr=LR, fused=True),
        schedule=schedule,
        perceptual_loss=None,
        device=torch.device("cpu"),
        null_context=null_context,
    )
    step.load(batch, 5, LR, 0.1)
    with FailOnHostSync() if not reference_loss else contextlib.nullcontext():
        step.compute()
    drop = step_randomness(3, 5, B, (1, RES, RES), schedule, 0.5, torch.device("cpu"))[2]
    assert 0 < int(drop.sum()) < B
    seen = recorder.contexts[0]
    assert torch.equal(seen[drop], null_context.expand(int(drop.sum()), -1, -1))
    assert torch.equal(seen[~drop], batch["context"][~drop])
