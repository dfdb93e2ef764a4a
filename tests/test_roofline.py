"""fastsp.roofline: each op's FLOPs, bytes and roofline time against hand counts; the table that
sets its predictions beside measured step times (benchmarks/predicted_vs_measured.py)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from fastsp.roofline import GPUS, Roofline, predict


def _seconds(flops, nbytes, gpu, peak="bf16_tflops"):
    return max(flops / (GPUS[gpu][peak] * 1e12), nbytes / (GPUS[gpu]["hbm_tb_s"] * 1e12))


def test_ops_counted_by_hand():
    a = torch.randn(256, 512, dtype=torch.bfloat16)
    b = torch.randn(512, 128, dtype=torch.bfloat16)
    row = torch.randn(1, 128)
    x = torch.randn(256, 128)
    with Roofline() as roofline:
        c = a @ b  # mm: 2 M N K FLOPs, reads a and b, writes c
        c.t()  # a view: nothing moves
        y = x + row.expand(256, 128)  # the broadcast row is read once
        y.mul_(2.0)  # in place: read and written
    ops = roofline.ops
    assert set(ops) == {"mm", "add", "mul_"}
    mm_bytes = (256 * 512 + 512 * 128 + 256 * 128) * 2
    assert (ops["mm"]["flops"], ops["mm"]["bytes"]) == (2 * 256 * 512 * 128, mm_bytes)
    assert ops["add"]["bytes"] == (256 * 128 * 2 + 128) * 4
    assert ops["mul_"]["bytes"] == 256 * 128 * 4 * 2
    for gpu in GPUS:
        assert ops["mm"][gpu] == pytest.approx(_seconds(2 * 256 * 512 * 128, mm_bytes, gpu))
        assert ops["add"][gpu] == pytest.approx(_seconds(0, ops["add"]["bytes"], gpu))
    prediction = predict(roofline, batch=8)
    for gpu in GPUS:
        seconds = sum(op[gpu] for op in ops.values())
        assert prediction["gpus"][gpu]["seconds"] == pytest.approx(seconds)
        assert prediction["gpus"][gpu]["images_per_s"] == pytest.approx(8 / seconds)
    first = next(iter(GPUS))
    assert [op["op"] for op in prediction["top_ops"]] == sorted(ops, key=lambda n: -ops[n][first])


def test_fp32_matmul_uses_the_fp32_peak():
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    with Roofline() as roofline:
        a @ b
    flops, nbytes = 2 * 2048**3, 3 * 2048**2 * 4
    for gpu in GPUS:
        expected = _seconds(flops, nbytes, gpu, "fp32_tflops")
        assert roofline.ops["mm"][gpu] == pytest.approx(expected)


def _script(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_predicted_vs_measured_table():
    # run_gpu.sh's table: the prediction for the card's model beside bench_step.py's medians.
    table = _script("predicted_vs_measured").table

    def predicted_step(h100_s, h200_s):
        gpus = {"H100 SXM": {"seconds": h100_s}, "H200 SXM": {"seconds": h200_s}}
        return {"predicted": {"gpus": gpus}}

    steps = {"mse": predicted_step(0.1, 0.08), "self_perceptual": predicted_step(0.13, 0.11)}
    predicted = {"cases": {"sd21_64": {"batch_size": 16, "steps": steps}}}
    rows = [("sd21_64", "mse", "fast_graphed", 16, 250.0),
            ("sd21_64", "mse", "reference", 16, 900),  # the naive step: not predicted
            ("sd21_64", "self_perceptual", "fast_eager", 16, 390.0),
            ("tiny", "mse", "fast_eager", 64, 1),  # no prediction for this model
            ("sd21_64", "mse", "fast_eager", 32, 500.0)]  # another batch size  # fmt: skip
    measured = {"device_name": "NVIDIA H200", "results": [
        {"model": m, "objective": o, "variant": v, "batch": b, "step_ms": ms,
         "memory_format": "channels_last"} for m, o, v, b, ms in rows]}  # fmt: skip
    text, out = table(predicted, measured)
    assert [(r["objective"], r["variant"]) for r in out] == [
        ("mse", "fast_graphed"),
        ("self_perceptual", "fast_eager"),
    ]
    assert out[0]["predicted_ms"] == pytest.approx(80.0) and out[0]["ratio"] == pytest.approx(3.125)
    assert out[1]["ratio"] == pytest.approx(390.0 / 110.0)
    assert "NVIDIA H200" in text and "| 80.0 | 250.0 | 3.12 |" in text
    with pytest.raises(SystemExit, match="no prediction for NVIDIA A100"):
        table(predicted, {**measured, "device_name": "NVIDIA A100-SXM4-80GB"})
