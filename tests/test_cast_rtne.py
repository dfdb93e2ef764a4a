"""kernels/_common.py ``_cast_rtne``: fp32 -> bf16 / fp16 bit-exact with torch's own conversion.

Fed fp32 bit patterns: every special value (NVIDIA's canonical NaN 0x7FFFFFFF among them, which
the bf16 rounding once carried into the sign bit: bf16 -0.0), ties to even, the largest finite
value (rounds to inf in bf16) and random patterns. NaN in, NaN out; everything else bit-equal to
``Tensor.to``.
"""

import fastsp.kernels._common as kcommon
import pytest
import torch
import triton
import triton.language as tl

_SPECIAL = [
    0x7FFFFFFF,  # NVIDIA's canonical NaN (PTX ISA: "canonical NaN")
    0xFFFFFFFF,  # negative NaN, all payload bits
    0x7FC00000,  # quiet NaN (torch / numpy)
    0xFFC00000,  # negative quiet NaN
    0x7F800001,  # signalling NaN, lowest payload bit only
    0x7F808000,  # signalling NaN whose payload sits in the rounded-off half
    0x7F800000,  # +inf
    0xFF800000,  # -inf
    0x00000000,  # +0
    0x80000000,  # -0
    0x00000001,  # smallest denormal
    0x80000001,  # its negative
    0x007FFFFF,  # largest denormal
    0x00008000,  # denormal tie, even -> down
    0x00018000,  # denormal tie, odd -> up
    0x00800000,  # smallest normal
    0x7F7FFFFF,  # largest finite: rounds to inf in bf16 and fp16
    0xFF7FFFFF,  # its negative
    0x7F7F7FFF,  # just below the bf16 overflow tie: stays finite
    0x7F7F8000,  # the tie itself, odd -> rounds up to inf
    0x3F808000,  # 1 + 2^-8: tie, even -> down (bf16 0x3F80)
    0x3F818000,  # tie, odd -> up (bf16 0x3F82)
    0x3F808001,  # just above the tie -> up
    0x3F807FFF,  # just below the tie -> down
    0x477FF000,  # 65520: the fp16 overflow tie -> inf
    0x477FEFFF,  # just below it -> 65504
    0x33800000,  # 2^-24: fp16's smallest denormal
    0x33000000,  # 2^-25: fp16 tie with 0 -> +0
]


@triton.jit
def _cast_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):  # x [N] fp32, out [N] bf16 or fp16
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    v = tl.load(x_ptr + idx, mask=mask, other=0.0)
    tl.store(out_ptr + idx, kcommon._cast_rtne(v, out_ptr.dtype.element_ty), mask=mask)


def _patterns() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(-(2**31), 2**31, (4000,), generator=g, dtype=torch.int64)
    special = torch.tensor(_SPECIAL, dtype=torch.int64)
    bits = torch.cat([special, rand]).to(torch.int64)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)  # uint32 -> int32 bits
    return bits.view(torch.float32)


# numpy warns when the interpreter's fp16 astype overflows to inf, which is the expected result.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_rtne_matches_torch(dtype):
    x = _patterns()
    out = torch.full(x.shape, 1.5, dtype=dtype)  # poisoned: 1.5 is no result of these inputs
    block = 1024
    _cast_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), BLOCK=block)
    ref = x.to(dtype)
    nan = torch.isnan(x)
    assert nan[:5].all() and nan.sum() >= 6  # the special NaNs are there (and random ones)
    assert torch.isnan(out[nan]).all(), "a NaN came out as a number"
    assert not torch.isnan(out[~nan]).any()
    got_bits = out[~nan].view(torch.int16)
    ref_bits = ref[~nan].view(torch.int16)
    bad = (got_bits != ref_bits).nonzero().flatten()
    assert bad.numel() == 0, [
        (hex(int(x[~nan][i].view(torch.int32)) & 0xFFFFFFFF), hex(int(got_bits[i]) & 0xFFFF))
        for i in bad[:10]
    ]


def test_cast_rtne_special_values_bf16():
    # The values the issue names, checked against the bf16 bit patterns written out.
    cases = {
        0x7F800000: 0x7F80,  # +inf
        0xFF800000: 0xFF80,  # -inf
        0x00000000: 0x0000,
        0x80000000: 0x8000,
        0x00000001: 0x0000,  # smallest denormal rounds to +0
        0x7F7FFFFF: 0x7F80,  # largest finite -> inf
        0x3F808000: 0x3F80,  # tie to even, down
        0x3F818000: 0x3F82,  # tie to even, up
    }
    bits = torch.tensor([b - 2**32 if b >= 2**31 else b for b in cases], dtype=torch.int32)
    x = bits.view(torch.float32)
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, out, x.numel(), BLOCK=16)
    got = [int(b) & 0xFFFF for b in out.view(torch.int16)]
    assert got == list(cases.values())
