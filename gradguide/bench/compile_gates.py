"""Compile gates: every Triton kernel variant the glue can launch, compiled for sm_80, 86, 89,
90, 100 and 120 on a machine without a GPU, and checked from its PTX, cubin and SASS
(docs/performance.md, "SASS roofline per GPU").

How: Triton's active driver is replaced by :class:`FakeCudaDriver`, which reports a CUDA
target, and ``JITFunction.run`` is made to compile instead of launch (``warmup=True``). Then
the real glue (``gradguide.ops.triton_backend``) is called on CPU tensors shaped and aligned
as a variant needs, so each kernel is specialised exactly as a real launch would be (pointer
alignment, ``do_not_specialize`` ints, constexprs). Triton compiles through its own
``ptxas``; ``cuobjdump -res-usage`` (shipped with triton) reads registers, stack, local memory
and shared memory from the cubin; the PTX shows every global load's width, and a small
dataflow pass over the PTX tells which loads read an operand (their address derives from a
pointer argument ``x0..x7``).

Gates, per compiled kernel:
- **no spills**: ``LOCAL`` and ``STACK`` are 0 bytes (spills go to local memory);
- **registers** <= 64 per thread for every kernel but the per-thread reduce
  (gradguide/kernels/reduce_lanes.py: K(K+1)/2 + K accumulators per thread, float-float twice
  that; <= LANES_REG_LIMIT, no spills, occupancy reported) and the fused combine with Σ-scaled
  operands over 7-8 operands (a slope and offset per scaled operand live in the loop;
  <= SCALED_FUSED_REG_LIMIT);
- **SASS roofline** (gradguide/bench/roofline.py): the main loop's instruction mix projected on
  the GPUs of each architecture at <= 1.25x the memory-bound time (reduce, combine, fused;
  fp32/fp16/bf16; K = 2..8; aligned);
- **128-bit operand loads**: when the variant's operands are 16-byte aligned and rows are a
  multiple of the vector width (8 elements covers every dtype), every operand load is
  ``ld.global.v4.b32`` (or ``v2.b64``).

``variants("ci")`` is a representative subset (every op, policy and dtype, K in {1, 4/5, 8},
clamp on/off, aligned and unaligned) for the test suite; ``variants("all")`` is every
combination (``gradguide check-kernels``), with ``variants("scaled")``: row-strided operands
and Σ-scaled ones (gradguide/kernels/scaling.py) in reduce and fused, whose log-scale counts
as an operand for the 128-bit load gate and as one more input tile for the roofline. Triton caches compiled kernels on disk
(``~/.triton/cache``), so a second run is fast.

Must run with ``TRITON_INTERPRET`` unset (the interpreter replaces the JIT when the kernels
are defined): :func:`run` starts a subprocess when the variable is set.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..ops.policies import POLICIES as POLICY_TABLE
from .roofline import triton_bin

REG_LIMIT = 64
ARCHS = (80, 86, 89, 90, 100, 120)
# per-SM limits used for the occupancy bound (CUDA occupancy rules, the CUDA C++ Programming
# Guide's table of technical specifications per compute capability)
SM = {80: dict(gpu="A100", regs=65536, max_warps=64, max_blocks=32, smem=167936),
      86: dict(gpu="RTX 3090", regs=65536, max_warps=48, max_blocks=16, smem=102400),
      89: dict(gpu="RTX 4090, L4, L40S", regs=65536, max_warps=48, max_blocks=24, smem=102400),
      90: dict(gpu="H100", regs=65536, max_warps=64, max_blocks=32, smem=233472),
      100: dict(gpu="B200", regs=65536, max_warps=64, max_blocks=32, smem=233472),
      120: dict(gpu="RTX 5090", regs=65536, max_warps=48, max_blocks=32, smem=102400)}
# the per-thread reduce keeps K(K+1)/2 + K (float-float: twice that) accumulators per thread: up
# to ~200 registers for K = 8; its gate is no spills and this limit (occupancy is reported)
LANES_REG_LIMIT = 255
# the fused combine with Σ-scaled operands over 7-8 operands: no spills within
# gradguide.kernels.fused.SCALED_MAXNREG_WIDE (up to 6 operands: REG_LIMIT, as every other kernel)
SCALED_FUSED_REG_LIMIT = 168
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
POLICIES = tuple(POLICY_TABLE)   # every fused program of gradguide/ops/policies.py
ALIGNED_N, UNALIGNED_N = 4096, 4095  # row lengths: a multiple of every vector width, and odd


@dataclasses.dataclass(frozen=True)
class Variant:
    op: str  # "reduce", "combine", "fused" or "clip_shift" (always clamped: clamp=True)
    dtype: str
    k: int
    aligned: bool  # 16-byte aligned operands and rows of a multiple of 8 elements
    clamp: bool = False
    policy: Optional[str] = None
    scaled: int = 0         # Σ-scaled operands: the mask (reduce and fused; gradguide/kernels/scaling.py)
    strided: bool = False   # row-strided operands and log-scale: halves of [B, 2N] buffers

    @property
    def name(self) -> str:
        op = f"fused[{self.policy}]" if self.op == "fused" else self.op
        return (f"{op} {self.dtype} K={self.k} {'aligned' if self.aligned else 'unaligned'}"
                + (" clamp" if self.clamp else "") + (" strided" if self.strided else "")
                + (f" scaled={self.scaled:#0{self.k + 2}b}" if self.scaled else ""))


SUBSETS = ("all", "ci", "roofline", "roofline-ci", "scaled", "scaled-ci")


def mixed_mask(k: int) -> int:
    """Every other operand Σ-scaled (operands 0, 2, 4, 6): a mixed mask of K bits."""
    return 0b01010101 & ((1 << k) - 1)


def _scaled_variants(ci: bool) -> List[Variant]:
    """Row-strided, Σ-scaled reduce and fused (pxp-a; linear with a clamp): fp32/fp16/bf16 at
    K = 2..8 with a mixed mask (aligned: roofline-gated), every operand scaled at K = 2 and 8,
    fp64 and unaligned ones for the register/spill gates, and row-strided unscaled ones. The
    CI cut: K = 2, 5, 8 in fp32 and bf16, every kind once."""
    out: List[Variant] = []
    dtypes = ("fp32", "bf16") if ci else ROOFLINE_DTYPES
    for dt in dtypes:
        for k in ((2, 5, 8) if ci else range(2, 9)):
            m = mixed_mask(k)
            out += [Variant("reduce", dt, k, True, scaled=m, strided=True),
                    Variant("fused", dt, k, True, False, "pxp-a", scaled=m, strided=True),
                    Variant("fused", dt, k, True, True, "linear", scaled=m, strided=True)]
        for k in ((8,) if ci else (2, 8)):
            full = (1 << k) - 1
            out += [Variant("reduce", dt, k, True, scaled=full, strided=True),
                    Variant("fused", dt, k, True, False, "pxp-a", scaled=full, strided=True)]
    out += [Variant("reduce", "fp64", 8, True, scaled=mixed_mask(8), strided=True),
            Variant("fused", "fp64", 8, True, True, "linear", scaled=mixed_mask(8), strided=True),
            Variant("reduce", "fp32", 3, False, scaled=0b101, strided=True),
            Variant("fused", "fp16", 5, False, False, "pxp-a", scaled=0b10101, strided=True),
            Variant("reduce", "fp16", 4, True, strided=True),
            Variant("fused", "fp32", 4, True, False, "pxp-a", strided=True)]
    if not ci:
        out += [Variant("reduce", "fp64", 2, True, scaled=0b11, strided=True),
                Variant("fused", "fp64", 2, True, False, "pxp-a", scaled=0b01, strided=True),
                Variant("reduce", "bf16", 7, False, scaled=mixed_mask(7), strided=True),
                Variant("fused", "fp32", 8, False, True, "linear", scaled=mixed_mask(8), strided=True)]
    return out
ROOFLINE_DTYPES = ("fp32", "fp16", "bf16")


def variants(subset: str = "all") -> List[Variant]:
    """Every variant the glue can launch (``"all"``), the representative CI subset (``"ci"``),
    the roofline-gated ones (``"roofline"``: reduce, combine and fused[cfg / apg] in fp32, fp16
    and bf16, K = 2..8, aligned) or their CI cut (``"roofline-ci"``: every kernel x dtype at
    K = 2, 3, 8, fused as APG: compile time matters when six architectures run in CI)."""
    if "+" in subset:  # a union, e.g. "ci+roofline", in order, without repeats
        return list(dict.fromkeys(v for part in subset.split("+") for v in variants(part)))
    if subset not in SUBSETS:
        raise ValueError(f"subset: expected one of {SUBSETS} (or a union joined by '+'), got {subset!r}")
    out: List[Variant] = []
    if subset.startswith("scaled"):
        return _scaled_variants(subset == "scaled-ci")
    if subset.startswith("roofline"):
        ks = range(2, 9) if subset == "roofline" else (2, 3, 8)
        policies = ("cfg", "apg") if subset == "roofline" else ("apg",)
        for dt in ROOFLINE_DTYPES:
            for k in ks:
                out += [Variant("reduce", dt, k, True), Variant("combine", dt, k, True)]
                out += [Variant("fused", dt, k, True, False, p) for p in policies]
        return out
    if subset == "all":
        for dt in DTYPES:
            for k in range(1, 9):
                for aligned in (True, False):
                    out.append(Variant("reduce", dt, k, aligned))
                    for clamp in (False, True):
                        out.append(Variant("combine", dt, k, aligned, clamp))
                        out.extend(Variant("fused", dt, k, aligned, clamp, p) for p in POLICIES)
                    out.append(Variant("clip_shift", dt, k, aligned, True))
        return out + _scaled_variants(False)
    for dt in DTYPES:
        for k in (1, 4, 8):
            out.append(Variant("reduce", dt, k, True))
        out.append(Variant("combine", dt, 1, True, False))
        out.append(Variant("combine", dt, 8, True, True))
    out += [Variant("reduce", "fp16", 8, False), Variant("combine", "fp32", 3, False, True)]
    for i, p in enumerate(POLICIES):
        out.append(Variant("fused", "fp32", 8, True, i % 2 == 0, p))
        out.append(Variant("fused", "bf16", 5, True, i % 2 == 1, p))
    out += [Variant("fused", "fp16", 8, True, True, "pxp-b"), Variant("fused", "fp64", 4, True, False, "apg"),
            Variant("fused", "fp32", 4, False, True, "lookahead")]
    # clip_shift: every K in fp32 (two accumulators per operand load: the register-heaviest
    # streaming loop), K = 1 and 8 in the other dtypes, two unaligned row lengths
    out += [Variant("clip_shift", "fp32", k, True, True) for k in range(1, 9)]
    out += [Variant("clip_shift", dt, k, True, True) for dt in ("fp16", "bf16", "fp64") for k in (1, 8)]
    out += [Variant("clip_shift", "fp32", 3, False, True), Variant("clip_shift", "bf16", 5, False, True)]
    # row-strided, Σ-scaled reduce and fused (gradguide/kernels/scaling.py)
    out += [Variant("reduce", "fp32", 5, True, scaled=mixed_mask(5), strided=True),
            Variant("reduce", "bf16", 8, True, scaled=0xFF, strided=True),
            Variant("fused", "fp32", 8, True, True, "linear", scaled=mixed_mask(8), strided=True),
            Variant("fused", "fp16", 4, True, False, "pxp-a", scaled=0b1111, strided=True),
            Variant("reduce", "fp32", 3, False, scaled=0b101, strided=True)]
    return out


# -- compiling for a CUDA target without a GPU -------------------------------------------------

class _FakeUtils:
    def __init__(self, arch):
        self.arch = arch

    def get_device_properties(self, device):
        return {"max_shared_mem": SM[self.arch]["smem"] - 1024, "multiprocessor_count": 132}


class FakeCudaDriver:
    """The part of Triton's driver interface that compiling (not launching) uses."""

    def __init__(self, arch: int):
        self.arch = arch
        self.utils = _FakeUtils(arch)

    def get_current_device(self):
        return f"fake-sm{self.arch}"  # keys Triton's per-device kernel caches: one per arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def compiling_for(arch: int):
    """Inside, Triton kernels compile for ``sm_<arch>`` and are recorded instead of launched."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction
    records = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        records.append(kernel)
        return kernel

    previous = driver._active  # None on a machine without a GPU driver
    driver.set_active(FakeCudaDriver(arch))
    JITFunction.run = run
    try:
        yield records
    finally:
        JITFunction.run = original
        driver._active = previous


def _operands(v: Variant, count: Optional[int] = None) -> List[torch.Tensor]:
    """``count`` (default K) tensors [2, n]; row-strided (``v.strided``): the second halves of
    [2, 2n] buffers (batch stride 2n, a multiple of 8 elements when aligned; 2n + 1 when not)."""
    dtype = DTYPES[v.dtype]
    n = ALIGNED_N if v.aligned else UNALIGNED_N
    ops = []
    for _ in range(v.k if count is None else count):
        if v.strided:
            width = 2 * n if v.aligned else 2 * n + 1
            ops.append(torch.zeros(2, width, dtype=dtype)[:, width - n:])
            continue
        flat = torch.zeros(2 * n + 1, dtype=dtype)  # CPU tensors: data_ptr is 64-byte aligned
        ops.append((flat[:-1] if v.aligned else flat[1:]).view(2, n))
    return ops


def _scaling(v: Variant):
    """A fused step's Σ-scaling (gradguide.ops.reference.Scaling): the log-scale laid out like the
    operands, float64 [1, K] slope and [B, K] offset views (strides, no copy)."""
    if not v.scaled:
        return None
    from gradguide.ops.reference import Scaling
    table = torch.zeros(3 * v.k, dtype=torch.float64)
    return Scaling(_operands(v, 1)[0], table[:v.k].view(1, v.k), table[v.k:].view(2, v.k), v.scaled)


def launch(v: Variant) -> None:
    """Call the glue for variant ``v`` (inside :func:`compiling_for`: compiles, launches nothing)."""
    from gradguide.ops import policies, triton_backend
    ops = _operands(v)
    acc = torch.float64 if v.dtype == "fp64" else torch.float32
    clamp = (-1.0, 1.0) if v.clamp else None
    scaling = _scaling(v)
    if v.op == "reduce":
        triton_backend.reduce(ops, 1, scaling=scaling) if scaling is not None else triton_backend.reduce(ops, 1)
    elif v.op == "combine":
        triton_backend.combine(torch.zeros(2, 1, v.k, dtype=acc), ops, clamp=clamp)
    elif v.op == "clip_shift":
        # as a fused step launches it (stepplan.run_stages): [1, K] float64 views of the table column
        column = torch.zeros(2 * v.k, dtype=torch.float64)
        triton_backend.clip_shift(column[:v.k].view(1, v.k), column[v.k:].view(1, v.k), ops, clamp)
    else:
        # as a fused step launches it (gradguide.stepplan.run_stages): the coefficient vectors
        # are [1, 1, K] float64 views into the step's table column, the scalars 1-element float64
        # views of it (or a [B] tensor: G_loss's target), the Gram the reduce kernel's own output
        # over the first Kg operands
        vec_names, scalar_names = policies.POLICIES[v.policy]
        column = torch.zeros(len(vec_names) * v.k + len(scalar_names), dtype=torch.float64)
        vectors = [column[j * v.k:(j + 1) * v.k].view(1, 1, v.k) for j in range(len(vec_names))]
        scalars = [column[len(vec_names) * v.k + j:len(vec_names) * v.k + j + 1] for j in range(len(scalar_names))]
        if v.policy == "lookahead":
            scalars[3] = torch.zeros(2, dtype=torch.float64)   # the per-sample target
        gram = None
        if policies.NEEDS_GRAM[v.policy]:
            gram = torch.zeros(2, 1, max(1, v.k - 1), max(1, v.k - 1), dtype=acc)
        extra = {} if scaling is None else {"scaling": scaling}
        triton_backend.fused_combine(v.policy, gram, vectors, scalars, ops, clamp=clamp, **extra)


# -- reading PTX and cubin ---------------------------------------------------------------------

def resource_usage(cubin: bytes) -> Dict[str, int]:
    """``cuobjdump -res-usage``: REG, STACK, SHARED, LOCAL (bytes) of the cubin's one kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([triton_bin("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if set(fields) != {"REG", "STACK", "SHARED", "LOCAL"}:
        raise RuntimeError(f"cannot read cuobjdump -res-usage output:\n{text}")
    return {k.lower(): int(x) for k, x in fields.items()}


_REG = re.compile(r"%[A-Za-z]+\d*")
_LOAD = re.compile(r"^(?:@!?%\w+\s+)?ld\.global\S*\s+(\{[^}]*\}|%\w+),\s*\[\s*(%\w+)")
_STORE = re.compile(r"^(?:@!?%\w+\s+)?st\.global\S*")


def _width(instr: str) -> int:
    """Bits moved by one ld/st.global instruction (``ld.global.v4.b32`` -> 128)."""
    op = instr.split()[0] if not instr.startswith("@") else instr.split()[1]
    vec = re.search(r"\.v(\d)\b", op)
    bits = re.findall(r"\.[bfsu](\d+)\b", op)
    return (int(vec.group(1)) if vec else 1) * int(bits[-1])


def ptx_loads(ptx: str, params: List[str], operand_params: List[str]) -> Dict[str, object]:
    """Global loads and stores of a kernel's PTX; operand loads are found by a flow-insensitive
    taint pass: a register is tainted by ``x_k`` when it is computed from ``ld.param [x_k]``
    (loaded values do not carry the taint: a loaded number is data, not an address)."""
    taint: Dict[str, set] = defaultdict(set)
    rules = []  # (destinations, sources)
    loads = []  # (width, address register)
    stores = []
    for raw in ptx.splitlines():
        line = raw.strip()
        m = re.match(r"ld\.param\.\S+\s+(%\w+),\s*\[\w+_param_(\d+)\]", line)
        if m:
            name = params[int(m.group(2))] if int(m.group(2)) < len(params) else None
            if name in operand_params:
                taint[m.group(1)].add(name)
            continue
        m = _LOAD.match(line)
        if m:
            loads.append((_width(line), m.group(2)))
            continue
        if _STORE.match(line):
            stores.append(_width(line))
            continue
        body = re.sub(r"^@!?%\w+\s+", "", line)
        if not body or body[0] in "./{}" or not body.endswith(";"):
            continue
        parts = body[:-1].split(None, 1)
        if len(parts) < 2 or parts[0].startswith(("setp", "bra", "st.", "bar", "ret")):
            continue
        args = parts[1]
        if args.startswith("{"):
            dst_text, _, src_text = args.partition("}")
            dsts, srcs = _REG.findall(dst_text), _REG.findall(src_text)
        else:
            regs = _REG.findall(args)
            dsts, srcs = regs[:1], regs[1:]
        rules.append((dsts, srcs))
    changed = True
    while changed:
        changed = False
        for dsts, srcs in rules:
            t = set().union(*(taint[s] for s in srcs)) if srcs else set()
            for d in dsts:
                if not t <= taint[d]:
                    taint[d] |= t
                    changed = True
    per_operand: Dict[str, List[int]] = {p: [] for p in operand_params}
    other: List[int] = []
    for width, addr in loads:
        owners = taint[addr]
        if owners:
            for o in owners:
                per_operand[o].append(width)
        else:
            other.append(width)
    return {"operand_loads": per_operand, "other_loads": other, "stores": stores}


def occupancy(arch: int, regs: int, num_warps: int, smem: int) -> Dict[str, object]:
    """Upper bound on resident warps per SM from registers, shared memory and warp/block limits."""
    lim = SM[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    bounds = {"warps": lim["max_warps"] // num_warps, "blocks": lim["max_blocks"],
              "registers": (lim["regs"] // regs_per_warp) // num_warps,
              "shared memory": lim["smem"] // smem if smem else lim["max_blocks"]}
    limiter = min(bounds, key=bounds.get)
    blocks = bounds[limiter]
    return {"blocks_per_sm": blocks, "occupancy": blocks * num_warps / lim["max_warps"], "limiter": limiter}


def analyse(kernel, arch: int, variant: Variant) -> Dict[str, object]:
    sig = kernel.src.signature
    params = [name for name, ty in sig.items() if ty != "constexpr"]
    operand_params = [p for p in params if re.fullmatch(r"x[0-7]", p)][:variant.k]
    if variant.scaled and "xv" in params:   # the log-scale: loaded like an operand
        operand_params.append("xv")
    res = resource_usage(kernel.asm["cubin"])
    num_warps = kernel.metadata.num_warps
    smem = kernel.metadata.shared + res["shared"]
    loads = ptx_loads(kernel.asm["ptx"], params, operand_params)
    row = {"arch": arch, "kernel": kernel.name, "variant": variant.name, "op": variant.op, "dtype": variant.dtype,
           "k": variant.k, "aligned": variant.aligned, "clamp": variant.clamp, "policy": variant.policy,
           "scaled": variant.scaled, "strided": variant.strided,
           "num_warps": num_warps, "registers": res["reg"], "stack_bytes": res["stack"],
           "local_bytes": res["local"], "shared_bytes": smem, **occupancy(arch, res["reg"], num_warps, smem),
           **loads, "hash": kernel.hash}
    from . import roofline
    text = roofline.sass(kernel.asm["cubin"])
    row["mix"] = roofline.mix(text)
    names = kernel.src.fn.arg_names
    consts = {names[key[0]]: val for key, val in kernel.src.constants.items() if len(key) == 1}
    tile = consts.get("BLOCK", consts.get("BK"))
    row["tile_bytes"] = None
    if tile is not None:   # not _reduce_finish
        stores = 1 if variant.op in ("combine", "fused", "clip_shift") else 0
        row["tile_bytes"] = roofline.traffic(row["mix"], variant.k, tile, DTYPES[variant.dtype].itemsize, stores,
                                             extra=1 if variant.scaled else 0)
    row["roofline"] = ({g: roofline.project(row["mix"], roofline.GPUS[g], 32 * num_warps, row["tile_bytes"])
                        for g in roofline.gpus_for(arch)} if row["tile_bytes"] else {})
    row["roofline_gated"] = roofline.gated(row)
    row["failures"] = gate_failures(row)
    return row


def gate_failures(row: Dict[str, object]) -> List[str]:
    """What a compiled kernel breaks (empty: it passes)."""
    fails = []
    if row["local_bytes"] or row["stack_bytes"]:
        fails.append(f"spills: {row['local_bytes']} B local, {row['stack_bytes']} B stack")
    limit = LANES_REG_LIMIT if row["kernel"] == "_reduce_lanes" else \
        SCALED_FUSED_REG_LIMIT if row["kernel"] == "_fused" and row.get("scaled") and row["k"] >= 7 else REG_LIMIT
    if row["registers"] > limit:
        fails.append(f"{row['registers']} registers > {limit}")
    from .roofline import GATE
    if row.get("roofline_gated"):
        over = {g: round(p["ratio"], 2) for g, p in row["roofline"].items() if not p["ratio"] <= GATE}
        if over:
            fails.append(f"projected / memory-bound time > {GATE}: {over}")
    if row["kernel"] != "_reduce_finish":
        missing = [o for o, w in row["operand_loads"].items() if not w]
        if missing:
            fails.append(f"no load found for operands {missing}")
        if row["aligned"]:
            narrow = {o: sorted(set(w) - {128}) for o, w in row["operand_loads"].items() if set(w) - {128}}
            if narrow:
                fails.append(f"operand loads narrower than 128 bits: {narrow}")
    return fails


# -- nvcc: the native CUDA ops (csrc/*.cu) --------------------------------------------------------

CUDA_MACROS_HEADER = """#pragma once
// Written by gradguide.bench.compile_gates: CMake generates this header in CUDA builds of torch
// and CPU wheels lack it. Its CUDA-build content is empty apart from the guard.
"""


def nvcc_gate(archs=ARCHS, sources=None) -> Dict[str, object]:
    """Compile ``csrc/*.cu`` with nvcc (host and device code, every arch in one call, the flags
    torch's CUDAExtension uses) against this torch's headers; parse ``-Xptxas -v``.

    Returns ``{"nvcc": version or None, "reason", "rows": [{arch, function, registers,
    spill_stores, spill_loads, stack_bytes, failures}], "command"}``; ``nvcc`` is None when no
    nvcc is on PATH (the caller decides whether that is a skip or a failure)."""
    import shutil
    import sysconfig
    from torch.utils import cpp_extension
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return {"nvcc": None, "reason": "nvcc is not on PATH", "rows": []}
    root = Path(__file__).resolve().parents[2]
    sources = sources or sorted(str(p) for p in (root / "csrc").glob("*.cu"))
    if not sources:
        return {"nvcc": None, "reason": f"no csrc/*.cu under {root} (not a source checkout)", "rows": []}
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    version = (re.findall(r"release [\d.]+, V[\d.]+", version) or ["unknown version"])[0]
    rows, commands = [], []
    with tempfile.TemporaryDirectory() as tmp:
        header = Path(tmp) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        header.parent.mkdir(parents=True)
        header.write_text(CUDA_MACROS_HEADER)
        includes = [tmp] + cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
        for src in sources:
            cmd = [nvcc, "-c", src, "-o", os.path.join(tmp, "out.o"), "-std=c++20", "-O3", "--use_fast_math",
                   "-DGRADGUIDE_WITH_CUDA=1", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
                   *cpp_extension.COMMON_NVCC_FLAGS, "-Xptxas", "-v"]
            for a in archs:
                cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
            cmd += [f"-I{i}" for i in includes]
            commands.append(" ".join(Path(c).name if c == nvcc else c for c in cmd).replace(tmp, "$TMP"))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"nvcc failed on {src} (exit status {proc.returncode}):\n{proc.stderr[-4000:]}")
            rows += parse_ptxas_verbose(proc.stderr, Path(src).name)
    return {"nvcc": version, "reason": None, "rows": rows, "command": commands}


def parse_ptxas_verbose(text: str, source: str = "") -> List[Dict[str, object]]:
    """One row per (entry function, arch) from ``-Xptxas -v`` output."""
    rows: List[Dict[str, object]] = []
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            rows.append({"source": source, "function": m.group(1), "arch": int(m.group(2))})
            continue
        if not rows:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            rows[-1].update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            rows[-1]["registers"] = int(m.group(1))
    for r in rows:
        if "spill_stores" not in r or "registers" not in r:
            raise RuntimeError(f"cannot read ptxas -v output for {r['function']} (sm_{r['arch']})")
        r["failures"] = ([f"spills: {r['spill_stores']} B stores, {r['spill_loads']} B loads"]
                         if r["spill_stores"] or r["spill_loads"] else [])
    return rows


# -- running ----------------------------------------------------------------------------------

def compile_all(archs=ARCHS, subset: str = "all", progress: bool = True) -> List[Dict[str, object]]:
    """Compile every variant of ``subset`` for each arch (in this process: TRITON_INTERPRET unset)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: the kernels are interpreted, not compiled; use run()")
    todo = [(a, v) for a in archs for v in variants(subset)]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc="compiling kernels", unit="variant", file=sys.stderr,
                   disable=None)  # None: off when stderr is not a terminal
    rows, seen = [], set()
    for arch, v in todo:
        with compiling_for(arch) as records:
            launch(v)
        for kernel in records:
            key = (arch, kernel.hash)
            if key not in seen:
                seen.add(key)
                rows.append(analyse(kernel, arch, v))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return rows


def environment() -> Dict[str, str]:
    import triton
    from . import meta
    ptxas = subprocess.run([triton_bin("ptxas"), "--version"], capture_output=True, text=True).stdout
    return {"date": meta.now(), "machine": f"{platform.node()} ({meta.cpu_name()}, no GPU)",
            "torch": torch.__version__, "triton": triton.__version__,
            "ptxas": (re.findall(r"release [\d.]+, V[\d.]+", ptxas) or ["?"])[0], "git_commit": meta.git_commit()}


def run(archs=ARCHS, subset: str = "all", progress: bool = True) -> Dict[str, object]:
    """``{"environment", "subset", "rows"}``; in a subprocess when TRITON_INTERPRET is set here."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return {"environment": environment(), "subset": subset, "rows": compile_all(archs, subset, progress)}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "gates.json")
        cmd = [sys.executable, "-m", "gradguide.bench.compile_gates", "--arch", ",".join(map(str, archs)),
               "--subset", subset, "--json", path, "--quiet", "--no-nvcc"] + ([] if progress else ["--no-progress"])
        proc = subprocess.run(cmd, env=env)  # exit status 1 = some gate failed: the JSON says which
        if proc.returncode not in (0, 1) or not os.path.exists(path):
            raise RuntimeError(f"{' '.join(cmd)} failed with exit status {proc.returncode}")
        with open(path) as f:
            return json.load(f)


def _loads_cell(row) -> str:
    widths = [w for ws in row["operand_loads"].values() for w in ws]
    if not widths:
        return "-"
    wide = sum(w == 128 for w in widths)
    return f"{wide}/{len(widths)} × 128-bit" if wide else f"0/{len(widths)} (widths {sorted(set(widths))})"


def markdown(result: Dict[str, object], arch: int, command: str) -> str:
    rows = [r for r in result["rows"] if r["arch"] == arch]
    env = result["environment"]
    fails = [r for r in rows if r["failures"]]
    lines = [f"# Triton kernels compiled for sm_{arch} ({SM[arch]['gpu']}) without a GPU", "",
             f"- command: `{command}`", f"- date: {env['date']}; machine: {env['machine']}",
             f"- torch {env['torch']}, triton {env['triton']}, ptxas {env['ptxas']}; git commit {env['git_commit']}",
             f"- variants: {result['subset']} ({len(rows)} distinct compiled kernels); "
             f"gates: 0 spill bytes, ≤ {REG_LIMIT} registers (the per-thread reduce `_reduce_lanes`: "
             f"≤ {LANES_REG_LIMIT}; the fused combine over 7-8 operands with Σ-scaled ones: "
             f"≤ {SCALED_FUSED_REG_LIMIT}), "
             "128-bit operand loads when aligned, SASS roofline ≤ 1.25 where gated",
             f"- result: **{'all pass' if not fails else f'{len(fails)} fail'}**", "",
             "Compiled by Triton's own compiler for a CUDA target, specialised as the glue launches them "
             "(`gradguide/bench/compile_gates.py`); registers, stack/local (spill) bytes and shared memory "
             "from `cuobjdump -res-usage`; load widths from the PTX (operand loads: address derived from "
             "an operand pointer). Occupancy is the CUDA occupancy bound from registers, shared memory and "
             "warp/block limits, not a measurement. 'aligned': 16-byte aligned operands, rows of 4096 "
             "elements; 'unaligned': operands offset by one element, rows of 4095 (scalar loads expected).",
             "", "Note on the reduce: fp16/bf16 (and fp64) operands go through `_reduce_partials`, a tile "
             "Gram on tensor cores (`tl.dot` of a [16, BK] tile with itself), whose accumulators are spread "
             "over the warp; fp32 operands through `_reduce_lanes`, one accumulator per Gram entry and thread "
             "(float-float on GPUs with slow fp64, fp64 fma on sm_80/90/100; gradguide/kernels/reduce_lanes.py), "
             "which for K ≥ 5 trades registers (occupancy) for no padded products.",
             "", "| kernel | variant | warps | regs | spill B | smem B | occupancy bound (limiter) | "
             "operand loads | other loads (bits) | stores (bits) | gates |", "|" + "---|" * 11]
    for r in rows:
        other = ",".join(f"{w}×{c}" for w, c in sorted(_count(r["other_loads"]).items())) or "-"
        stores = ",".join(f"{w}×{c}" for w, c in sorted(_count(r["stores"]).items())) or "-"
        lines.append(f"| `{r['kernel']}` | {r['variant']} | {r['num_warps']} | {r['registers']} | "
                     f"{r['local_bytes'] + r['stack_bytes']} | {r['shared_bytes']} | "
                     f"{r['occupancy']:.0%} ({r['limiter']}) | {_loads_cell(r)} | {other} | {stores} | "
                     f"{'pass' if not r['failures'] else '; '.join(r['failures'])} |")
    from . import roofline
    gpus = roofline.gpus_for(arch)
    if gpus and any(r.get("roofline") for r in rows):
        lines += ["", f"## SASS roofline on {', '.join(gpus)} (a PROJECTION)", "",
                  "Per thread and main-loop iteration (one tile) from `cuobjdump -sass`: issued instructions, "
                  "fp32 / fp64 / conversion instructions, tensor-core flops; the DRAM bytes of the iteration's "
                  "tiles for the whole program (from the launch); "
                  "projected time over memory-bound time with spec-sheet throughputs "
                  "(`gradguide/bench/roofline.py`; gated rows: reduce, combine, fused in fp32/fp16/bf16, "
                  f"K = 2..8, aligned, at ≤ {roofline.GATE}).", "",
                  "| kernel | variant | issue | fp32 | fp64 | conv | MMA flops | program bytes | " +
                  " | ".join(gpus) + " |", "|---|---|" + "---:|" * (6 + len(gpus))]
        for r in rows:
            if not r.get("roofline") or r["kernel"] == "_reduce_finish":
                continue
            m = r["mix"]
            cells = [f"{r['roofline'][g]['ratio']:.2f} ({r['roofline'][g]['limiter']})" for g in gpus]
            lines.append(f"| `{r['kernel']}` | {r['variant']} | {m.get('issue', 0):.0f} | {m.get('fp32', 0):.0f} | "
                         f"{m.get('fp64', 0):.0f} | {m.get('conv', 0):.0f} | "
                         f"{m.get('hmma_flops', 0) + m.get('dmma_flops', 0):.0f} | "
                         f"{r['tile_bytes']:.0f} | " + " | ".join(cells) + " |")
    native = result.get("nvcc")
    if native is not None:
        lines += ["", f"## Native CUDA ops (`csrc/*.cu`) compiled with nvcc for sm_{arch}", ""]
        if native["nvcc"] is None:
            lines.append(f"Not compiled: {native['reason']}.")
        else:
            nrows = [r for r in native["rows"] if r["arch"] == arch]
            lines += [f"- nvcc {native['nvcc']}; command: `{native['command'][0]}` (`$TMP` holds the generated "
                      "`c10/cuda/impl/cuda_cmake_macros.h` that CPU torch wheels lack)",
                      f"- {len(nvcc_rows_failed(nrows))} of {len(nrows)} functions spill; registers from "
                      f"`-Xptxas -v`", "", "| function | regs | stack B | spill stores B | spill loads B |",
                      "|---|---|---|---|---|"]
            names = demangle([r["function"] for r in nrows])
            for r, name in zip(nrows, names):
                lines.append(f"| `{name}` | {r['registers']} | {r['stack_bytes']} | {r['spill_stores']} | "
                             f"{r['spill_loads']} |")
    return "\n".join(lines) + "\n"


def nvcc_rows_failed(rows):
    return [r for r in rows if r["failures"]]


def demangle(names: List[str]) -> List[str]:
    """C++ names for mangled CUDA kernel names (c++filt when present)."""
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                             timeout=30).stdout.splitlines()
        return out if len(out) == len(names) else names
    except Exception:
        return names


def _count(xs):
    out: Dict[int, int] = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default=",".join(map(str, ARCHS)),
                   help=f"comma-separated compute capabilities (default: {','.join(map(str, ARCHS))})")
    p.add_argument("--subset", default="all",
                   help="all: every variant the glue can launch (default); ci: the test suite's subset; "
                        "roofline: the roofline-gated variants (reduce, combine, fused; fp32/fp16/bf16; "
                        "K = 2..8); roofline-ci: those at K = 2, 3, 8; scaled: row-strided, Σ-scaled reduce and fused "
                        "(pxp-a, linear; fp32/fp16/bf16, K = 2..8, mixed and full masks; part of all); scaled-ci: a cut "
                        "of it; a union joined by '+', e.g. ci+roofline")
    p.add_argument("--json", default=None, help="write every compiled kernel's figures to this JSON file")
    p.add_argument("--markdown-dir", default=None,
                   help="write kernels-sm<arch>.md tables into this directory (default: none)")
    p.add_argument("--no-nvcc", action="store_true",
                   help="skip compiling csrc/*.cu with nvcc (default: compile it when nvcc is on PATH)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="print only failures and the summary")


def run_cli(args) -> int:
    archs = tuple(int(a) for a in str(args.arch).split(",") if a.strip())
    for a in archs:
        if a not in SM:
            raise SystemExit(f"--arch: expected compute capabilities in {tuple(SM)}, got {a}")
    try:
        variants(args.subset)
    except ValueError as e:
        raise SystemExit(f"--subset: {e}")
    from ..tools import outputs
    if args.json:   # refused before compiling, not after
        outputs.claim(args.json, option="--json")
    if args.markdown_dir:
        outputs.claim(*(str(Path(args.markdown_dir) / f"kernels-sm{a}.md") for a in archs), option="--markdown-dir")
    result = run(archs, args.subset, progress=not args.no_progress)
    if not args.no_nvcc:
        result["nvcc"] = nvcc_gate(archs)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    command = "gradguide check-kernels " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["check-kernels"] else \
        f"gradguide check-kernels --arch {args.arch} --subset {args.subset}"
    if args.markdown_dir:
        for a in archs:
            path = Path(args.markdown_dir) / f"kernels-sm{a}.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(markdown(result, a, command))
    rows = result["rows"]
    failed = [r for r in rows if r["failures"]]
    native = result.get("nvcc")
    if native is not None:
        if native["nvcc"] is None:
            print(f"nvcc gate skipped: {native['reason']}")
        else:
            bad = [r for r in native["rows"] if r["failures"]]
            for r in bad:
                print(f"FAIL nvcc sm_{r['arch']} {r['function']}: {'; '.join(r['failures'])}")
            print(f"nvcc ({native['nvcc']}): {len(native['rows'])} CUDA functions of csrc/*.cu, "
                  f"{len(native['rows']) - len(bad)} without spills, {len(bad)} with")
            failed = failed + bad
    if not args.quiet:
        for r in rows:
            print(f"sm_{r['arch']} {r['kernel']:<18} {r['variant']:<38} regs {r['registers']:>3}  "
                  f"spill {r['local_bytes'] + r['stack_bytes']}  loads {_loads_cell(r)}")
    for r in failed:
        print(f"FAIL sm_{r['arch']} {r['kernel']} {r['variant']}: {'; '.join(r['failures'])}")
    if any(r.get("roofline_gated") for r in rows):
        from . import roofline
        print("SASS roofline (a PROJECTION): worst projected / memory-bound time over K, busiest pipe / memory "
              "in parentheses\n" + roofline.table(rows))
    bad_triton = [r for r in rows if r["failures"]]
    print(f"Triton: {len(rows)} compiled kernels for sm_{', sm_'.join(map(str, archs))}: "
          f"{len(rows) - len(bad_triton)} pass, {len(bad_triton)} fail")
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gradguide.bench.compile_gates", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
