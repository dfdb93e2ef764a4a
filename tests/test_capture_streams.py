"""CUDA-graph capture of the step, checked on the CPU with a fake torch.cuda stream API.

- DDP's construction (fastsp.training.assembly.wrap_ddp), every warm-up iteration and the
  capture run on one side stream, and that stream is the one handed to `torch.cuda.graph`
  (which captures on a stream of its own when given none: the mismatch this guards against).
- A failed capture: with DDP it stops the run (GraphCaptureError, exit status 5, one line, on every
  rank); without DDP the step runs eagerly and backends.json says why.
"""

import contextlib
import copy
import dataclasses
import json
import types

import pytest
import torch

from fastsp import cli, errors
from fastsp.diffusion import NoiseSchedule
from fastsp.errors import GraphCaptureError
from fastsp.model_config import UNET_PRESETS
from fastsp.step import WARMUP_STEPS, WARMUP_STEPS_DDP, StepConfig, TrainStep
from fastsp.training import assembly, loop
from fastsp.unet import UNet

B, RES = 4, 8


class FakeStream:
    def __init__(self, name: str):
        self.name = name
        self.waited_on: list[FakeStream] = []

    def wait_stream(self, other: "FakeStream") -> None:
        self.waited_on.append(other)

    def __repr__(self) -> str:
        return f"FakeStream({self.name})"


class FakeGraph:
    def __init__(self):
        self.generators = []

    def register_generator_state(self, generator) -> None:
        self.generators.append(generator)

    def replay(self) -> None:
        raise AssertionError("the tests do not replay the fake graph")


class FakeCuda:
    """torch.cuda's stream API as far as the capture uses it: a current stream, `stream(s)` to
    switch it (None: no switch, as torch's), and `graph(g, stream=None)`, which like torch's makes
    the given stream current, or its own capture stream when given none."""

    def __init__(self, fail_capture: str | None = None):
        self.default = FakeStream("default")
        self.graph_own_stream = FakeStream("torch.cuda.graph's own stream")
        self.current = self.default
        self.created: list[FakeStream] = []
        self.graph_calls: list[dict] = []
        self.fail_capture = fail_capture

    def Stream(self, device=None):  # noqa: N802 (torch's name)
        stream = FakeStream(f"side {len(self.created)}")
        self.created.append(stream)
        return stream

    def current_stream(self, device=None):
        return self.current

    @contextlib.contextmanager
    def stream(self, stream):
        before = self.current
        if stream is not None:
            self.current = stream
        try:
            yield
        finally:
            self.current = before

    @contextlib.contextmanager
    def graph(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        self.graph_calls.append(dict(stream=stream, capture_error_mode=capture_error_mode))
        with self.stream(stream if stream is not None else self.graph_own_stream):
            self.capturing = True
            try:
                if self.fail_capture:
                    raise RuntimeError(self.fail_capture)
                yield
            finally:
                self.capturing = False

    capturing = False


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    for name in ("Stream", "current_stream", "stream", "graph"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    return fake


class FakeDDP(torch.nn.Module):
    """Records the stream current while DDP is constructed; otherwise the wrapped module."""

    def __init__(self, module, device_ids=None, current=None):
        super().__init__()
        self.module = module
        self.built_on = current()

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self):
        return contextlib.nullcontext()


def _step(ddp: bool, online=None, stream=None) -> TrainStep:
    config = dataclasses.replace(UNET_PRESETS["tiny"], num_classes=10)
    torch.manual_seed(0)
    model = UNet(config)
    step = TrainStep(
        StepConfig(
            seed=3, global_batch=B, shape=(1, RES, RES), num_classes=10, world_size=2 if ddp else 1
        ),
        model=model,
        online=online(model) if online else model,
        ema=copy.deepcopy(model).requires_grad_(False),
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True),
        schedule=NoiseSchedule(),
        perceptual_loss=None,  # stage 1: the capture does not depend on the objective
        device=torch.device("cpu"),
        stream=stream,
    )
    return step


def _batch(step: TrainStep) -> dict[str, torch.Tensor]:
    """This rank's part of a batch (the local batch)."""
    g = torch.Generator().manual_seed(1)
    n = step.config.local_batch
    return {
        "x": torch.randn(n, 1, RES, RES, generator=g),
        "label": torch.randint(0, 10, (n,), generator=g),
    }


def _record_compute_streams(step: TrainStep, fake: FakeCuda) -> list:
    """Wrap step.compute so that each call records (current stream, capturing?)."""
    calls, compute = [], step.compute

    def recording(*args, **kwargs):
        calls.append((fake.current, fake.capturing))
        return compute(*args, **kwargs)

    step.compute = recording
    return calls


@pytest.mark.parametrize("ddp", [True, False])
def test_ddp_construction_warmup_and_capture_share_one_stream(fake_cuda, monkeypatch, ddp):
    monkeypatch.setattr(
        assembly,
        "DistributedDataParallel",
        lambda module, device_ids=None: FakeDDP(module, device_ids, fake_cuda.current_stream),
    )
    # As build_run: one stream for a captured step, DDP built on it, the step given it.
    stream = torch.cuda.Stream(torch.device("cpu"))
    online = None
    if ddp:
        online = lambda model: assembly.wrap_ddp(model, torch.device("cpu"), stream)  # noqa: E731
    step = _step(ddp, online=online, stream=stream)
    if ddp:
        assert step.online.built_on is stream
        assert fake_cuda.default.waited_on == [stream]  # the default stream waits for DDP's init
    assert fake_cuda.current is fake_cuda.default
    calls = _record_compute_streams(step, fake_cuda)

    assert step.capture(_batch(step), log=lambda message: None)
    warmups = WARMUP_STEPS_DDP if ddp else WARMUP_STEPS
    assert calls == [(stream, False)] * warmups + [(stream, True)]
    assert [call["stream"] for call in fake_cuda.graph_calls] == [stream]
    assert fake_cuda.created == [stream]  # no second side stream was made
    assert stream.waited_on[0] is fake_cuda.default  # the warm-up starts after the loads
    assert fake_cuda.current is fake_cuda.default
    assert step.graph.generators == [step.generator]


def test_a_step_without_a_given_stream_makes_one_and_captures_on_it(fake_cuda):
    step = _step(ddp=False)
    calls = _record_compute_streams(step, fake_cuda)
    assert step.capture(_batch(step), log=lambda message: None)
    (side,) = fake_cuda.created
    assert step.stream is side
    assert {stream for stream, _ in calls} == {side}
    assert fake_cuda.graph_calls[0]["stream"] is side


CAPTURE_ERROR = "CUDA error: operation not permitted when stream is capturing"


def test_a_failed_capture_without_ddp_runs_eagerly(fake_cuda):
    fake_cuda.fail_capture = CAPTURE_ERROR + "\nmore detail"
    step = _step(ddp=False)
    before = [p.detach().clone() for p in step.params]
    messages = []
    assert not step.capture(_batch(step), log=messages.append)
    assert step.graph is None and step.graph_error == CAPTURE_ERROR
    assert messages == [f"CUDA graph: capture failed ({CAPTURE_ERROR}); running the step eagerly"]
    # The warm-up left the weights alone and the eager step trains.
    assert all(torch.equal(a, p) for a, p in zip(before, step.params, strict=True))
    step.run(_batch(step), 0, 1e-3, 0.1)
    assert step.good_steps.item() == 1
    assert not all(torch.equal(a, p) for a, p in zip(before, step.params, strict=True))


def test_a_failed_capture_with_ddp_stops_the_run(fake_cuda):
    fake_cuda.fail_capture = CAPTURE_ERROR + "\nmore detail"
    step = _step(ddp=True, stream=torch.cuda.Stream())
    with pytest.raises(GraphCaptureError) as excinfo:
        step.capture(_batch(step), log=lambda message: None)
    status, message = cli.error_status(excinfo.value)
    assert status == errors.EXIT_CAPTURE_FAILED
    assert "\n" not in message
    assert CAPTURE_ERROR in message and "--no-cuda-graph" in message
    assert step.graph is None and not step.force_skip.item()  # the warm-up's skip is undone


def _run(step: TrainStep, tmp_path) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        plan=types.SimpleNamespace(graph=types.SimpleNamespace(captured=True)),
        info=types.SimpleNamespace(device=torch.device("cuda"), is_main=True),
        step=step,
        backends={"cuda_graph": "to be captured at the first step"},
        run_dir=tmp_path,
    )


def test_capture_step_records_the_eager_fallback_without_ddp(fake_cuda, tmp_path):
    fake_cuda.fail_capture = CAPTURE_ERROR
    run = _run(_step(ddp=False), tmp_path)
    loop.capture_step(run, _batch(run.step), log=lambda message: None)
    recorded = json.loads((tmp_path / "backends.json").read_text())
    assert recorded["cuda_graph"] == f"eager ({CAPTURE_ERROR})"


def test_capture_step_stops_every_rank_when_one_rank_failed(fake_cuda, monkeypatch, tmp_path):
    # This rank captured; another rank's capture failed (the host-side vote says so).
    votes = []
    monkeypatch.setattr(loop.dist, "any_rank", lambda flag: votes.append(flag) or True)
    run = _run(_step(ddp=True, stream=torch.cuda.Stream()), tmp_path)
    with pytest.raises(GraphCaptureError, match="another rank.*--no-cuda-graph"):
        loop.capture_step(run, _batch(run.step), log=lambda message: None)
    assert votes == [False]  # this rank voted "captured"
    assert not (tmp_path / "backends.json").exists()
