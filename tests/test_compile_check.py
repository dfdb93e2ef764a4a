"""fastsp.kernels.compile_check: the kernels compiled for sm_80 and sm_90a without a GPU.

The quick set (the fused forward and its backward, a gathered, an N % 16 != 0 and a grouped
forward) compiles in a child process with the interpreter off, as `python -m` runs it; the full
set is `python -m fastsp.kernels.compile_check` (benchmarks/results/compile_check_*.md).
"""

import os
import subprocess
import sys

import pytest
from fastsp.kernels import compile_check


@pytest.mark.slow
def test_quick_set_compiles_without_spills_and_with_vector_loads(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    out = tmp_path / "table.md"
    result = subprocess.run(
        [sys.executable, "-m", "fastsp.kernels.compile_check", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert lines[0].startswith("# Compile check") and "--quick" in lines[0]
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| kernel ")]
    rows = [line.split("|")[1:-1] for line in table]
    by_case = {(r[0].strip(), r[1].strip(), r[2].strip()): r for r in rows}
    assert {arch for _, _, arch in by_case} == {"sm_80", "sm_90a"}
    for arch in ("sm_80", "sm_90a"):
        fused = by_case[("fwd_kernel", "bf16 mean grad(x) flat", arch)]
        assert "x128" in fused[7] and "x16 " not in fused[7] + " "  # 128-bit loads only
        assert int(fused[8]) >= 64  # all four 128-bit loads of a thread issued before a use
        gathered = by_case[("fwd_kernel", "fp32 mean grad(x) channels_last vs NCHW", arch)]
        assert "x128" in gathered[7]  # the NCHW operand's contiguous runs load 128-bit
    assert all(int(r[5]) == 0 for r in rows)  # no spills


@pytest.mark.parametrize(
    "capability, registers, warps, shared, expected",
    # CUDA occupancy rules (64K registers in 256-register warp units, 64 warps, 32 blocks)
    [
        (90, 32, 8, 0, 1.0),
        (90, 40, 8, 1024, 0.75),
        (80, 64, 8, 0, 0.5),
        (80, 176, 8, 0, 0.125),
        (90, 24, 1, 0, 0.5),
        (80, 32, 8, 160 * 1024, 0.125),
    ],  # fmt: skip
)
def test_occupancy(capability, registers, warps, shared, expected):
    assert compile_check.occupancy(capability, registers, warps, shared) == expected


def test_sass_reading():
    # Bytes in flight: loads issued before the first instruction that reads one of them.
    sass = """
        /*0000*/                   LDG.E.128 R4, desc[UR6][R2.64] ;
        /*0010*/                   LDG.E.128 R8, desc[UR6][R2.64+0x10] ;
        /*0020*/              @!P0 LDG.E.U16 R12, desc[UR6][R2.64+0x20] ;
        /*0030*/                   FADD R13, R4, -R8 ;
        /*0040*/                   STL [R1], R13 ;
        /*0050*/                   LDG.E R14, desc[UR6][R2.64+0x40] ;
        /*0060*/                   CALL.REL.NOINC 0x100 ;
        /*0070*/                   FADD R15, R14, R14 ;
    """
    read = compile_check.read_sass(sass)
    assert read.loads == {128: 2, 16: 1, 32: 1}
    assert (read.spills, read.calls, read.in_flight) == (1, 1, 34)
