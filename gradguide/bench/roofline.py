"""A SASS-based roofline of the Triton kernels (a PROJECTION: no GPU runs here).

For a compiled kernel (``compile_gates``), ``cuobjdump -sass`` gives the machine code; the main
loop is the backward branch whose body holds the most global loads (one iteration = one tile:
one vector per thread and operand). Its instruction mix is counted per thread and iteration,
by the pipe it issues to, and projected on each GPU of :data:`GPUS`:

    memory time  = bytes the iteration's tiles read and write (from the launch: K operand tiles,
                   and the output tile of combine / fused) / bandwidth
    compute time = max over pipes (count / the pipe's rate), every instruction also taking an
                   issue slot (4 warp instructions per SM and clock)
    ratio        = max(memory, compute) / memory

Assumptions (every table says so): spec-sheet peak bandwidth and throughputs, no efficiency
factor; the loop's instructions are all that is issued per tile (the prologue and the final
reduction are amortised over a row's tiles); occupancy hides latency (``compile_gates``
reports the occupancy bound separately); FMA, add and multiply count once each, whatever their
flops; tensor-core instructions by their flops (an m16n8k16 MMA is 2·16·8·16 per warp); MUFU
(ex2, rcp, rsqrt) at 16 results per SM and clock (the same table, compute capability 8.0-12.0).
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

# Spec-sheet figures (dense, no sparsity). Sources: NVIDIA GeForce RTX 3090 / GA102 Ampere
# architecture whitepaper; NVIDIA Ada Lovelace architecture whitepaper (RTX 4090) and the L4 and
# L40S datasheets; NVIDIA RTX Blackwell GPU architecture whitepaper (RTX 5090); A100 SXM4 80GB,
# H100 SXM5 and HGX B200 datasheets. Per-SM, per-clock rates (fp32 lanes, fp64 on GA10x/AD10x/
# GB20x at 1/64 of fp32, 16 conversions to/from 64-bit types, 4 warp schedulers) from the CUDA
# C++ Programming Guide's table of arithmetic instruction throughput. TFLOP/s and GB/s.
#   bw: DRAM bandwidth; fp32 / fp64: CUDA-core peaks (fp64 without tensor cores); tc16: fp16/bf16
#   tensor cores with fp32 accumulation; tc64: fp64 tensor cores (DMMA; 0 where absent);
#   lanes: fp32 results per SM and clock (sets how many SM-clocks per second the fp32 peak implies)
GPUS: Dict[str, dict] = {
    "RTX 3090": dict(arch=86, bw=936, fp32=35.6, fp64=0.556, tc16=71.0, tc64=0.0, lanes=128),
    "RTX 4090": dict(arch=89, bw=1008, fp32=82.6, fp64=1.29, tc16=165.2, tc64=0.0, lanes=128),
    "L4": dict(arch=89, bw=300, fp32=30.3, fp64=0.47, tc16=121.0, tc64=0.0, lanes=128),
    "L40S": dict(arch=89, bw=864, fp32=91.6, fp64=1.43, tc16=362.0, tc64=0.0, lanes=128),
    "RTX 5090": dict(arch=120, bw=1792, fp32=104.8, fp64=1.64, tc16=209.5, tc64=0.0, lanes=128),
    "A100": dict(arch=80, bw=2039, fp32=19.5, fp64=9.7, tc16=312.0, tc64=19.5, lanes=64),
    "H100": dict(arch=90, bw=3350, fp32=66.9, fp64=33.5, tc16=989.0, tc64=66.9, lanes=128),
    "B200": dict(arch=100, bw=8000, fp32=80.0, fp64=40.0, tc16=2250.0, tc64=40.0, lanes=128),
}
GATE = 1.25  # projected / memory-bound time, per kernel, dtype and K

FP32 = {"FFMA", "FADD", "FMUL", "FFMA32I", "FADD32I", "FMUL32I", "HFMA2", "HADD2", "HMUL2", "HFMA2MMA",
        "FHFMA", "FHADD", "FHMUL"}   # FH*: sm_120's fp32 ops with a half-precision operand
FP32_PAIRED = {"FFMA2", "FADD2", "FMUL2"}   # two fp32 operations per lane (sm_100): count twice
FP64 = {"DFMA", "DADD", "DMUL", "DSETP", "DMNMX"}
CONV = {"F2F", "F2I", "I2F", "F2FP", "I2FP"}
MUFU = {"MUFU"}   # the special-function unit: ex2 of a Σ-scaled operand (gradguide/kernels/scaling.py), rcp, rsqrt
MMA = {"HMMA", "DMMA", "IMMA", "HGMMA"}


def triton_bin(tool: str) -> str:
    """A CUDA binary tool (cuobjdump, nvdisasm, ptxas) as shipped inside the triton wheel."""
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([triton_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")


def instructions(text: str) -> List[Tuple[int, str, str]]:
    """(address, opcode with modifiers, operands) of every SASS instruction."""
    return [(int(m.group(1), 16), m.group(3), m.group(4)) for m in map(_LINE.search, text.splitlines()) if m]


def main_loop(instrs):
    """The instructions of the loop body with the most global loads (all of them if no loop)."""
    best, best_loads = instrs, -1
    for i, (addr, op, args) in enumerate(instrs):
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", args)
            if m and int(m.group(1), 16) < addr:
                body = [x for x in instrs[:i + 1] if x[0] >= int(m.group(1), 16)]
                loads = sum(x[1].startswith("LDG") for x in body)
                if loads > best_loads:
                    best, best_loads = body, loads
    return best


def _bytes(op: str) -> int:
    """Bytes per thread of an LDG/STG (``LDG.E.128`` -> 16; no size suffix: 32-bit)."""
    m = re.search(r"\.(128|64|U16|S16|U8|S8)\b", op)
    return {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}[m.group(1)] if m else 4


def _mma_flops(op: str) -> int:
    """Flops of one warp-wide MMA instruction from its shape (``HMMA.16816.F32`` -> 2·16·8·16,
    ``DMMA.884`` or ``DMMA.8x8x4`` -> 2·8·8·4)."""
    shapes = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "16832": (16, 8, 32),
              "1684": (16, 8, 4), "8816": (8, 8, 16)}
    tok = op.split(".")[1] if "." in op else ""
    if re.fullmatch(r"\d+x\d+x\d+", tok):  # sm_90 spells it DMMA.8x8x4
        a, b, c = map(int, tok.split("x"))
        return 2 * a * b * c
    if tok not in shapes:
        raise ValueError(f"unknown MMA shape in {op}")
    a, b, c = shapes[tok]
    return 2 * a * b * c


def mix(text: str) -> Dict[str, float]:
    """Per-thread counts of one main-loop iteration: pipes, loads/stores and their bytes."""
    body = main_loop(instructions(text))
    c: Counter = Counter()
    for _, op, _ in body:
        base = op.split(".")[0]
        c["issue"] += 1
        if base in FP32:
            c["fp32"] += 1
        elif base in FP32_PAIRED:
            c["fp32"] += 2
        elif base in FP64:
            c["fp64"] += 1
        elif base in CONV:
            c["conv"] += 1
        elif base in MUFU:
            c["mufu"] += 1
        elif base in MMA:
            c["dmma_flops" if base == "DMMA" else "hmma_flops"] += _mma_flops(op) / 32  # per thread
            c[base] += 1
        elif base in ("LDG", "STG"):
            c[f"{base.lower()}_bytes"] += _bytes(op)
            c[f"{base}.{_bytes(op) * 8}"] += 1
        if base in ("FFMA", "FADD", "FMUL", "DFMA", "DADD", "DMUL"):
            c[base] += 1
    return dict(c)


def traffic(m: Dict[str, float], k: int, tile: int, esize: int, stores: int, extra: int = 0) -> float:
    """DRAM bytes of one main-loop iteration for the whole program (CTA): the iteration covers
    ``u`` tiles of ``tile`` elements per operand (u = 128-bit operand loads per thread / (K +
    extra), the compiler may unroll), each reading K operand tiles and ``extra`` more (the
    log-scale of Σ-scaled operands) and writing ``stores`` output tiles. From the launch, not
    from the SASS: a thread's load predicated off (the tile-Gram reduce loads operand k only in
    tile row k) moves no bytes."""
    u = max(1, round(m.get("LDG.128", 0) / (k + extra))) if m.get("LDG.128") else 1
    return u * (k + extra + stores) * tile * esize


def project(m: Dict[str, float], gpu: dict, threads: int, nbytes: float) -> Dict[str, float]:
    """Projected / memory-bound time of one loop iteration of a program of ``threads`` threads
    moving ``nbytes`` (:func:`traffic`) on ``gpu`` (see the header)."""
    sm_clk = gpu["fp32"] * 1e12 / (2 * gpu["lanes"])  # SM-clocks per second implied by the fp32 peak
    per_s = {"fp32": gpu["fp32"] * 1e12 / 2, "fp64": gpu["fp64"] * 1e12 / 2, "conv": 16 * sm_clk, "mufu": 16 * sm_clk,
             "issue": 128 * sm_clk, "hmma_flops": gpu["tc16"] * 1e12,
             "dmma_flops": gpu["tc64"] * 1e12 if gpu["tc64"] else gpu["fp64"] * 1e12}
    if not nbytes:
        return {"ratio": float("nan"), "compute": float("nan"), "limiter": "no memory traffic", "pipe": ""}
    memory = nbytes / (gpu["bw"] * 1e9)
    times = {k: threads * m.get(k, 0) / r for k, r in per_s.items()}
    limiter = max(times, key=times.get)
    return {"ratio": max(memory, times[limiter]) / memory, "compute": times[limiter] / memory,
            "limiter": limiter if times[limiter] > memory else "memory", "pipe": limiter}


def gpus_for(arch: int) -> List[str]:
    return [g for g, spec in GPUS.items() if spec["arch"] == arch]


def gated(row: Dict[str, object]) -> bool:
    """Kernels and variants the roofline gate applies to (fp64 data runs at fp64 speed anyway)."""
    return (row["kernel"] in ("_reduce_partials", "_reduce_lanes", "_combine", "_fused")
            and row["dtype"] in ("fp32", "fp16", "bf16") and 2 <= row["k"] <= 8 and row["aligned"])


def table(rows: List[Dict[str, object]], ops=("reduce", "combine", "fused")) -> str:
    """Markdown: per GPU, the worst projected / memory-bound ratio over K of each op and dtype
    among the gated rows, with the busiest pipe's time over the memory time at that K in
    parentheses (below 1: memory-bound with that much headroom), and the gate verdict."""
    gated_rows = [r for r in rows if r.get("roofline_gated")]
    dtypes = [d for d in ("fp32", "fp16", "bf16") if any(r["dtype"] == d for r in gated_rows)]
    cols = [(op, d) for op in ops for d in dtypes]
    lines = ["| GPU (arch) | " + " | ".join(f"{op} {d}" for op, d in cols) + " | gate ≤ %.2f |" % GATE,
             "|---|" + "---:|" * len(cols) + "---|"]
    for gpu, spec in GPUS.items():
        cells, ok = [], True
        for op, d in cols:
            rs = [(r["roofline"][gpu]["ratio"], r["roofline"][gpu].get("compute", 0), r["k"]) for r in gated_rows
                  if r["op"] == op and r["dtype"] == d and gpu in r["roofline"]]
            if not rs:
                cells.append("-")
                continue
            worst, compute, k = max(rs)
            ok = ok and worst <= GATE
            cells.append(f"{worst:.2f} ({compute:.2f}, K={k})")
        lines.append(f"| {gpu} (sm_{spec['arch']}) | " + " | ".join(cells) + f" | {'pass' if ok else 'FAIL'} |")
    return "\n".join(lines) + "\n"
