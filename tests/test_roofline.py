"""fastsp.roofline: each op's FLOPs, bytes and roofline time against hand counts."""

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
