"""The GPU compile check: every kernel specialisation fastsp launches, compiled for A100 and H100.

    python -m fastsp.kernels.compile_check            # the full set, a table, exit 1 on a failure
    python -m fastsp.kernels.compile_check --quick    # a few representative launches (the tests)

`TRITON_INTERPRET=1` runs the kernels' arithmetic on the CPU but never compiles them, so register
use, spills, vector widths and occupancy, which decide how close a memory-bound kernel gets to the
copy bandwidth, are invisible to the test suite. Triton compiles for a GPU target without a GPU,
and ships ptxas and cuobjdump, so this command checks them on any machine:

1. Record the launches. The real host launchers of both ops (``feature_mse_fwd``/``_bwd``/
   ``_scale`` and their ``_multi`` twins) run on meta tensors over the cases the product uses
   (dtypes, reductions, fused or not, flat or strided layouts, N not a multiple of 16,
   N >= 2^31, 1 or 3 pairs, weights as numbers or a tensor). A stand-in Triton driver answers
   "device 0, an sm_90 GPU", and Triton's ``jit_cache_hook`` records each launch's
   specialisation (signature, constexprs, divisibility attributes, options) and returns True,
   which tells Triton not to compile or launch it. Distinct specialisations are kept once.
2. Compile each for sm_80 (A100) and sm_90a (H100) with ``triton.compile``.
3. Read the cubin with cuobjdump: registers, local memory, the SASS. From the SASS: spill
   instructions (STL/LDL), global loads by width, subroutine calls (the int64 division routine of
   strided index math), and the bytes of loads a thread issues before it first uses one (what is
   in flight per thread). Occupancy follows from registers, warps and shared memory with the
   CUDA occupancy rules for the architecture.

It fails (exit 1) on a compile error, a spill, or a flat path with aligned operands (N and every
pointer divisible by 16) whose streaming loads are narrower than 128 bits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import triton
from fastsp.kernels import feature_mse as fm
from fastsp.kernels import feature_mse_multi as fmm
from fastsp.kernels._common import INTERPRETED
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.driver import driver

ARCHS = {"sm_80": 80, "sm_90a": 90}  # A100, H100 (Triton compiles capability 90 as sm_90a)
# Per-SM limits (CUDA C Programming Guide, compute capabilities table): registers, warps,
# resident blocks, shared memory per SM, shared memory the runtime reserves per block.
_SM_LIMITS = {80: (65536, 64, 32, 167936, 1024), 90: (65536, 64, 32, 233472, 1024)}
_REG_GRANULE = 256  # registers are allocated per warp in units of 256
_META = torch.device("meta")


# ---------------------------------------------------------------------------- recording
class _StandInDriver:
    """What Triton's JIT asks of the active driver before it compiles: a device, a stream, a
    target. Nothing is launched: the cache hook below stops every launch before compilation."""

    def __init__(self, capability: int):
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return _META


@dataclasses.dataclass
class Launch:
    """One distinct specialisation: the JIT function and what Triton would compile it with."""

    label: str
    kernel: object  # triton.JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def constexpr(self, name: str):
        index = self.kernel.arg_names.index(name)
        return self.constexprs.get((index,))

    def divisible_by_16(self, name: str) -> bool:
        """Whether integer or pointer argument ``name`` (every element of a tuple) was
        specialised as divisible by 16 (or to the constant 1, never here for a size)."""
        index = self.kernel.arg_names.index(name)
        keys = [k for k in self.attrs if k[0] == index]
        if not keys:
            return False
        return all(["tt.divisibility", 16] in map(list, self.attrs[k]) for k in keys)


@contextmanager
def _recording(launches: dict, label: list[str]) -> Iterator[None]:
    def hook(*, key, fn, compile, **_):
        jit = fn.jit_function
        recorded = json.loads(compile["specialization_data"])["options"]
        options = {
            k: recorded[k] for k in ("num_warps", "num_stages", "enable_fp_fusion", "maxnreg")
        }
        launch = Launch(
            label[0],
            jit,
            compile["signature"],
            compile["constants"],
            compile["configs"][0],
            options,
        )
        launches.setdefault((jit.__name__, key), launch)
        return True  # do not compile, do not launch

    previous_hook, previous_driver = knobs.runtime.jit_cache_hook, driver._active
    driver.set_active(_StandInDriver(90))
    knobs.runtime.jit_cache_hook = hook
    try:
        yield
    finally:
        knobs.runtime.jit_cache_hook = previous_hook
        driver._active = previous_driver


# ---------------------------------------------------------------------------- the cases
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SHAPES = {
    "flat": (16, 64, 32, 32),  # N a multiple of 16
    "odd": (3, 5, 7, 11),  # N = 1155
    "many_tiles": (64, 1024, 1024),  # N = 2^26: 4 tiles per program
    "huge": (2**31 + 2**12,),  # N >= 2^31: 64-bit sizes
}


def _pair(layout: str, dtype_x: torch.dtype, dtype_y: torch.dtype):
    """(x, y) on the meta device for a named layout."""
    if layout in _SHAPES:
        shape = _SHAPES[layout]
        return torch.empty(shape, dtype=dtype_x, device=_META), torch.empty(
            shape, dtype=dtype_y, device=_META
        )
    shape = _SHAPES["flat"]
    if layout == "channels_last_vs_nchw":
        x = torch.empty(shape, dtype=dtype_x, device=_META).to(memory_format=torch.channels_last)
        return x, torch.empty(shape, dtype=dtype_y, device=_META)
    if layout == "sliced":
        base = torch.empty((*shape[:-1], shape[-1] + 3), dtype=dtype_x, device=_META)
        return base[..., :-3], torch.empty(shape, dtype=dtype_y, device=_META)
    if layout == "broadcast":
        y = torch.empty((1, *shape[1:]), dtype=dtype_y, device=_META).expand(shape)
        return torch.empty(shape, dtype=dtype_x, device=_META), y
    raise ValueError(layout)


def _single_op(dtype_x, dtype_y, layout, reduction, grads, backward=True) -> Callable[[], None]:
    def run():
        x, y = _pair(layout, dtype_x, dtype_y)
        r = fm.REDUCTIONS[reduction]
        write_gx, write_gy = "x" in grads, "y" in grads
        out, gx, gy = fm.feature_mse_fwd(x, y, r, write_gx, write_gy)
        if not backward:
            return
        if reduction == "none":  # the elementwise backward, always unfused
            fm.feature_mse_bwd(x, y, torch.empty_like(out), r, True, False)
            return
        g = torch.empty((), dtype=out.dtype, device=_META)
        if grads:  # the fused backward: fp32 buffers scaled, bf16/fp16 ones recomputed
            if all(t.dtype == torch.float32 for t in (gx, gy) if t.numel()):
                fm.feature_mse_scale(gx, gy, g, True)
                fm.feature_mse_scale(gx, gy, g, False)
            else:
                fm.feature_mse_bwd(x, y, g, r, write_gx, write_gy, into=(gx, gy))
        # the unfused backward (a second backward through a retained graph)
        fm.feature_mse_bwd(x, y, g, r, write_gx or not grads, write_gy)

    return run


def _multi_op(dtype, numels, weight_tensor, grads, backward=True) -> Callable[[], None]:
    def run():
        xs = [torch.empty(n, dtype=dtype, device=_META) for n in numels]
        ys = [torch.empty(n, dtype=dtype, device=_META) for n in numels]
        weights = torch.empty(len(xs), device=_META) if weight_tensor else None
        values = [0.5] * len(xs)
        write_gx, write_gy = "x" in grads, "y" in grads
        _, _, gxs, gys = fmm.feature_mse_multi_fwd(xs, ys, weights, values, write_gx, write_gy)
        if not backward:
            return
        g = torch.empty((), device=_META)
        if grads:
            if dtype == torch.float32:
                fmm.feature_mse_multi_scale(gxs, gys, g, True)
                fmm.feature_mse_multi_scale(gxs, gys, g, False)
            else:
                fmm.feature_mse_multi_bwd(
                    xs, ys, g, weights, values, write_gx, write_gy, into=(gxs, gys)
                )
        fmm.feature_mse_multi_bwd(xs, ys, g, weights, values, write_gx or not grads, write_gy)

    return run


def cases(quick: bool) -> list[tuple[str, Callable[[], None]]]:
    """(label, a call of the host launchers) for the full set, or the quick set of the tests."""
    if quick:  # the fused forward and its backward, then one forward of each other path
        bf16, fp32 = torch.bfloat16, torch.float32
        return [
            ("bf16 mean grad(x) flat", _single_op(bf16, bf16, "flat", "mean", "x")),
            (
                "fp32 mean grad(x) channels_last vs NCHW",
                _single_op(fp32, fp32, "channels_last_vs_nchw", "mean", "x", backward=False),
            ),
            ("bf16 mean grad(x) N=1155", _single_op(bf16, bf16, "odd", "mean", "x", False)),
            ("multi fp32 3 pairs", _multi_op(fp32, (4096, 1155, 2**20), True, "x", False)),
        ]
    out = []
    layouts = ["flat", "odd", "many_tiles", "huge", "channels_last_vs_nchw", "sliced", "broadcast"]
    for layout in layouts:
        for name, dtype in _DTYPES.items():
            pairs = [(name, dtype, dtype)]
            if name == "bf16" and layout == "flat":
                pairs.append(("bf16/fp32", dtype, torch.float32))
            for pname, dx, dy in pairs:
                for reduction in ("mean", "sum", "none"):
                    for grads in ("", "x", "xy") if reduction != "none" else ("",):
                        label = f"{pname} {reduction} grad({grads or '-'}) {layout}"
                        out.append((label, _single_op(dx, dy, layout, reduction, grads)))
    for name, dtype in _DTYPES.items():
        for numels in ((2**20,), (4096, 1155, 2**20)):
            for weight_tensor in (False, True):
                for grads in ("", "x", "xy"):
                    w = "tensor" if weight_tensor else "number"
                    label = f"multi {name} {len(numels)} pairs {w} weights grad({grads or '-'})"
                    out.append((label, _multi_op(dtype, numels, weight_tensor, grads)))
    return out


def record(quick: bool) -> list[Launch]:
    """Every distinct specialisation the host launchers issue over ``cases(quick)``."""
    if INTERPRETED:
        raise SystemExit(
            "compile_check: TRITON_INTERPRET is set, so the kernels are interpreted, not "
            "compiled; run it with TRITON_INTERPRET=0"
        )
    launches: dict = {}
    label = [""]
    with _recording(launches, label):
        for label[0], run in cases(quick):
            run()
    return list(launches.values())


# ---------------------------------------------------------------------------- the SASS
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_REGISTER = re.compile(r"\bR(\d+)(?:\.64)?\b")
_LOAD_BITS = {".128": 128, ".64": 64, ".U16": 16, ".S16": 16, ".U8": 8, ".S8": 8}
_NO_DEST = ("ST", "RED", "ATOM", "BRA", "EXIT", "CALL", "RET", "BAR", "BSYNC", "BSSY", "WARPSYNC")


def _load_bits(opcode: str) -> int:
    return next((b for s, b in _LOAD_BITS.items() if s in opcode), 32)


def _registers(operand: str, bits: int = 32) -> set[int]:
    m = _REGISTER.search(operand)
    if not m:
        return set()
    first = int(m.group(1))
    return set(range(first, first + max(bits // 32, 1)))


@dataclasses.dataclass
class Sass:
    loads: dict[int, int]  # bits -> number of LDG instructions
    spills: int  # STL + LDL instructions
    calls: int  # CALL instructions (the int64 division routine of strided indexing)
    in_flight: int  # most bytes of global loads a thread issues before using one of them


def read_sass(sass: str) -> Sass:
    loads: dict[int, int] = {}
    spills = calls = in_flight = pending_bytes = 0
    pending: set[int] = set()
    for opcode, operands in _INSTRUCTION.findall(sass):
        parts = [p.strip() for p in operands.split(",")] if operands else []
        if opcode.startswith(("STL", "LDL")):
            spills += 1
        if opcode.startswith("CALL"):
            calls += 1
        sources = parts if opcode.startswith(_NO_DEST) else parts[1:]
        if pending and any(_registers(p) & pending for p in sources):
            in_flight = max(in_flight, pending_bytes)
            pending, pending_bytes = set(), 0
        if opcode.startswith("LDG"):
            bits = _load_bits(opcode)
            loads[bits] = loads.get(bits, 0) + 1
            pending |= _registers(parts[0], bits)
            pending_bytes += bits // 8
    return Sass(loads, spills, calls, max(in_flight, pending_bytes))


def occupancy(capability: int, registers: int, warps: int, shared: int) -> float:
    """Resident warps per SM over the most an SM holds (CUDA occupancy rules)."""
    regs_per_sm, max_warps, max_blocks, shared_per_sm, reserved = _SM_LIMITS[capability]
    warp_regs = -(-max(registers, 1) * 32 // _REG_GRANULE) * _REG_GRANULE
    blocks = min(
        max_blocks,
        max_warps // warps,
        (regs_per_sm // warp_regs) // warps,
        shared_per_sm // (shared + reserved),
    )
    return blocks * warps / max_warps


# ---------------------------------------------------------------------------- compiling
@dataclasses.dataclass
class Row:
    launch: Launch
    arch: str
    error: str = ""
    registers: int = 0
    local_bytes: int = 0
    shared: int = 0
    occupancy: float = 0.0
    sass: Sass | None = None

    def failures(self) -> list[str]:
        where = f"{self.launch.name} [{self.launch.label}] {self.arch}"
        if self.error:
            return [f"{where}: compile error: {self.error}"]
        out = []
        if self.sass.spills or self.local_bytes:
            out.append(
                f"{where}: {self.sass.spills} spill instructions, {self.local_bytes} B local"
            )
        if _flat_aligned(self.launch) and 128 not in self.sass.loads:
            out.append(f"{where}: a flat aligned path without 128-bit loads ({self.loads_text()})")
        return out

    def loads_text(self) -> str:
        return " ".join(f"{n}x{b}" for b, n in sorted(self.sass.loads.items())) or "-"


def _flat_aligned(launch: Launch) -> bool:
    """A streaming kernel reading flat memory whose sizes and pointers are 16-divisible."""
    if "finalize" in launch.name:
        return False
    flags = [n for n in ("X_ACCESS", "Y_ACCESS", "G_ACCESS") if n in launch.kernel.arg_names]
    flat = all(launch.constexpr(n) == 2 for n in flags)
    sizes = [n for n in ("N", "ns") if n in launch.kernel.arg_names]
    pointers = [n for n, t in launch.signature.items() if isinstance(t, str) and t.startswith("*")]
    return bool(flat) and all(launch.divisible_by_16(n) for n in sizes + pointers)


def _tool(name: str) -> str:
    return getattr(knobs.nvidia, name).path


def compile_row(launch: Launch, arch: str) -> Row:
    capability = ARCHS[arch]
    row = Row(launch, arch)
    src = ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs)
    try:
        compiled = triton.compile(
            src, target=GPUTarget("cuda", capability, 32), options=launch.options
        )
    except Exception as e:  # any compiler failure is the check's finding, reported per row
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return row
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(re.findall(r"(REG|LOCAL|STACK|SHARED):(\d+)", usage))
    row.registers = int(fields.get("REG", 0))
    row.local_bytes = int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0))
    row.shared = compiled.metadata.shared
    row.occupancy = occupancy(capability, row.registers, launch.options["num_warps"], row.shared)
    row.sass = read_sass(sass)
    return row


# ---------------------------------------------------------------------------- the table
_HEADER = (
    "| kernel | case | arch | regs | occupancy | spills | local B | global loads (count x bits) "
    "| B in flight | calls |"
)


def table(rows: list[Row]) -> str:
    lines = [_HEADER, "|" + "---|" * 10]
    for r in rows:
        if r.error:
            lines.append(
                f"| {r.launch.name} | {r.launch.label} | {r.arch} | compile error: "
                f"{r.error} | | | | | | |"
            )
            continue
        lines.append(
            f"| {r.launch.name.removeprefix('_feature_mse_')} | {r.launch.label} | {r.arch} "
            f"| {r.registers} | {r.occupancy:.0%} | {r.sass.spills} | {r.local_bytes} "
            f"| {r.loads_text()} | {r.sass.in_flight} | {r.sass.calls} |"
        )
    return "\n".join(lines)


def run_check(quick: bool, archs: list[str]) -> tuple[list[Row], list[str]]:
    rows = [compile_row(launch, arch) for launch in record(quick) for arch in archs]
    return rows, [f for r in rows for f in r.failures()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastsp.kernels.compile_check",
        description="Compile every Triton kernel specialisation of fastsp for sm_80 and sm_90a "
        "(no GPU needed) and check registers, spills and load widths.",
    )
    parser.add_argument("--quick", action="store_true", help="a few representative launches")
    parser.add_argument("--arch", choices=list(ARCHS), action="append", help="default: both")
    parser.add_argument("--out", help="also write the table (Markdown) to this file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows, failures = run_check(args.quick, args.arch or list(ARCHS))
    specs = len({(r.launch.name, id(r.launch)) for r in rows})
    summary = (
        f"{specs} specialisations, {len(rows)} compiles in {time.perf_counter() - start:.0f} s "
        f"(triton {triton.__version__}): {len(failures)} failures"
    )
    text = table(rows) + "\n\n" + summary + "\n" + "\n".join(failures)
    print(text)
    if args.out:
        date = time.strftime("%Y-%m-%d", time.gmtime())
        command = " ".join(["python -m fastsp.kernels.compile_check", *(argv or sys.argv[1:])])
        header = f"# Compile check, {date}: `{command}`, triton {triton.__version__}, no GPU\n\n"
        with open(args.out, "w") as f:
            f.write(header + text + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
