"""Compile gates (no GPU needed): the Triton kernels compiled for sm_80 / sm_90 exactly as the
glue launches them, and csrc/*.cu compiled with nvcc; registers, spills and load widths read
from the cubin and PTX (gradguide/bench/compile_gates.py). The roofline cut (reduce, combine,
fused in fp32/fp16/bf16 at K = 2, 3, 8) compiles for all six architectures, sm_80/86/89/90/100/120,
and its SASS main loops are projected against eight GPUs' spec sheets (gradguide/bench/roofline.py).

CI runs the representative subset ``variants("ci")`` (every op, policy and dtype; K in
{1, 4/5, 8}; clamp on/off; aligned and unaligned); ``gradguide check-kernels`` compiles every
variant. Each subset compiles once, in a subprocess (the test session interprets Triton:
TRITON_INTERPRET=1) started in the background when the session starts (tests/background.py);
the CI subset through ``gradguide check-kernels`` itself, whose outputs the command's own test
then checks. The nvcc test skips only when
nvcc is absent, and fails instead when GRADGUIDE_REQUIRE_NVCC=1 (CI).
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import background
from gradguide.bench import compile_gates as cg

ARCHS = (80, 90)
ROOFLINE_ARCHS = (80, 86, 89, 90, 100, 120)


def _check_kernels(archs, subset):
    """``gradguide check-kernels`` in a subprocess (this session interprets Triton):
    ``(process, folder with gates.json and kernels-sm*.md)``; None without Triton."""
    if importlib.util.find_spec("triton") is None:
        return None
    folder = background.mkdtemp("gates")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = background.run([sys.executable, "-m", "gradguide.cli", "check-kernels", "--arch", ",".join(map(str, archs)),
                           "--subset", subset, "--no-nvcc", "--no-progress", "--quiet", "--json",
                           os.path.join(folder, "gates.json"), "--markdown-dir", folder], env=env)
    return proc, Path(folder)


def _rows(run):
    proc, folder = run
    # exit status 1 = some gate failed (the JSON says which; the tests below name it)
    assert proc.returncode in (0, 1) and (folder / "gates.json").exists(), proc.stdout + proc.stderr
    return json.loads((folder / "gates.json").read_text())


@background.job("roofline_gates")
def _roofline_job():
    return _check_kernels(ROOFLINE_ARCHS, "roofline-ci")


@background.job("gates_cli")
def _ci_job():
    return _check_kernels(ARCHS, "ci")


@background.job("nvcc_gate")
def _nvcc_job():
    return cg.nvcc_gate(ARCHS) if shutil.which("nvcc") else None


@pytest.fixture(scope="module")
def gates_cli():
    """``gradguide check-kernels`` on the CI subset for ARCHS, run once, in the background (a
    subprocess: this session interprets Triton): ``(process, folder with gates.json and
    kernels-sm*.md)``. The gate tests read its JSON; test_cli_check_kernels checks the command's
    own outputs."""
    pytest.importorskip("triton")
    return _ci_job.result()


@pytest.fixture(scope="module")
def gates(gates_cli):
    return _rows(gates_cli)


@pytest.fixture(scope="module")
def roofline_gates():
    pytest.importorskip("triton")
    return _rows(_roofline_job.result())


@pytest.fixture(scope="module")
def nvcc_gate():
    """csrc/*.cu compiled with nvcc for ARCHS (in the background), or None without nvcc."""
    return _nvcc_job.result()


def test_six_architectures_compile_and_meet_the_roofline(roofline_gates):
    """Every kernel x dtype (fp32/fp16/bf16) at K = 2, 3, 8 compiles for each of the six
    architectures without spills, and its SASS main loop projects at <= 1.25 x the memory-bound
    time on every GPU of that architecture (RTX 3090/4090/5090, L4, L40S, A100, H100, B200)."""
    from gradguide.bench import roofline
    assert set(cg.ARCHS) == set(ROOFLINE_ARCHS) == {g["arch"] for g in roofline.GPUS.values()}
    rows = [r for r in roofline_gates["rows"] if r["kernel"] != "_reduce_finish"]
    for arch in ROOFLINE_ARCHS:
        got = {(r["op"], r["dtype"], r["k"]) for r in rows if r["arch"] == arch}
        assert got == {(op, d, k) for op in ("reduce", "combine", "fused") for d in ("fp32", "fp16", "bf16")
                       for k in (2, 3, 8)}, arch
    for r in rows:
        assert r["roofline_gated"] and set(r["roofline"]) == set(roofline.gpus_for(r["arch"])), r["variant"]
        assert r["mix"].get("ldg_bytes", 0) >= 16 * r["k"], (r["arch"], r["variant"], r["mix"])
        for gpu, p in r["roofline"].items():
            assert p["ratio"] <= roofline.GATE, (r["arch"], r["variant"], gpu, p)
    assert not [(r["arch"], r["variant"], r["failures"]) for r in roofline_gates["rows"] if r["failures"]]


def test_fp32_reduce_needs_no_fp64_throughput_where_fp64_is_slow(roofline_gates):
    """fp32 reduce: float-float (fp32 instructions only, no fp64, no tensor cores) on sm_86/89/120;
    per-thread fp64 fma on sm_80/90/100; fp16/bf16 per-thread fp32; no padded 16 x 16 tile Gram."""
    for r in roofline_gates["rows"]:
        if r["op"] != "reduce" or r["kernel"] == "_reduce_finish":
            continue
        m = r["mix"]
        assert r["kernel"] == "_reduce_lanes" and not m.get("hmma_flops") and not m.get("dmma_flops")
        if r["dtype"] != "fp32":
            assert m.get("fp64", 0) == 0 and m["fp32"] > 0, (r["arch"], r["variant"], m)
        elif r["arch"] in (86, 89, 120):
            assert m.get("fp64", 0) == 0 and m["fp32"] > 0, (r["arch"], r["variant"], m)
        else:
            assert m["fp64"] > 0, (r["arch"], r["variant"], m)


def test_sass_mix_and_projection():
    """The main loop is the backward branch with the most loads; counts per pipe and bytes; a
    loop of 64 fp64 FMAs per 16 bytes is far over the bound on an RTX 3090, at it on an H100."""
    from gradguide.bench import roofline
    body = "\n".join(f"        /*{0x100 + 16 * i:04x}*/                   DFMA R2, R4, R6, R2 ;" for i in range(64))
    text = f"""
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/              @!P0 BRA 0x900 ;
        /*00f0*/              @!P0 LDG.E.128 R8, [R26.64] ;
{body}
        /*0500*/                   FFMA R3, R4, R5, R3 ;
        /*0510*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0520*/               @P0 BRA 0xf0 ;
        /*0530*/                   STG.E.64 [R2.64], R4 ;
        /*0540*/               @P1 BRA 0x530 ;
        /*0550*/                   EXIT ;
"""
    m = roofline.mix(text)
    assert m["LDG.128"] == 1 and m["ldg_bytes"] == 16 and "stg_bytes" not in m
    assert m["fp64"] == 64 and m["fp32"] == 1 and m["hmma_flops"] == 2 * 16 * 8 * 16 / 32 and m["issue"] == 68
    assert roofline.traffic(m, 1, 128, 4, 0) == 512   # one 128-bit load per thread: 128 fp32 per tile
    slow = roofline.project(m, roofline.GPUS["RTX 3090"], 32, 32 * 16)
    assert slow["limiter"] == "fp64" and slow["ratio"] > 10
    assert roofline.project(m, roofline.GPUS["H100"], 32, 32 * 16)["ratio"] <= 1.25
    # a load that only 1 thread in 16 really issues (tile-Gram rows): 16x less traffic, 16x the ratio
    masked = roofline.project(m, roofline.GPUS["H100"], 32, 32)
    assert masked["ratio"] > 10


def test_mufu_and_the_log_scale_in_the_roofline():
    """ex2 (MUFU) issues to its own pipe at 16 per SM and clock; a Σ-scaled kernel's tile also
    reads the log-scale: K + 1 input tiles per K + 1 128-bit loads."""
    from gradguide.bench import roofline
    body = "\n".join(f"        /*{0x100 + 16 * i:04x}*/                   MUFU.EX2 R2, R4 ;" for i in range(40))
    text = f"""
        /*00f0*/                   LDG.E.128 R8, [R26.64] ;
        /*00f8*/                   LDG.E.128 R12, [R28.64] ;
{body}
        /*0520*/               @P0 BRA 0xf0 ;
        /*0550*/                   EXIT ;
"""
    m = roofline.mix(text)
    assert m["mufu"] == 40 and m.get("fp32", 0) == 0 and m["issue"] == 43
    assert roofline.traffic(m, 1, 512, 4, 1, extra=1) == 3 * 512 * 4    # operand, log-scale, output
    p = roofline.project(m, roofline.GPUS["RTX 3090"], 128, 3 * 512 * 4)
    assert p["pipe"] == "mufu"
    sm_clk = roofline.GPUS["RTX 3090"]["fp32"] * 1e12 / (2 * 128)
    memory = 3 * 512 * 4 / (936e9)
    assert abs(p["compute"] - 128 * 40 / (16 * sm_clk) / memory) < 1e-9


def test_the_scaled_subset_covers_the_fused_step_kernels():
    """``--subset scaled``: row-strided, Σ-scaled reduce, fused pxp-a and linear (clamped) in
    fp32/fp16/bf16 at every K = 2..8 with a mixed mask, aligned (roofline-gated), plus every
    operand scaled at K = 2 and 8; part of ``all``; a cut of it in ``ci``."""
    full = cg.variants("scaled")
    mixed = {(v.op, v.policy, v.dtype, v.k) for v in full if v.aligned and v.strided
             and v.scaled == cg.mixed_mask(v.k)}
    assert mixed >= {(op, p, d, k) for op, p in (("reduce", None), ("fused", "pxp-a"), ("fused", "linear"))
                     for d in ("fp32", "fp16", "bf16") for k in range(2, 9)}
    assert all(0 < bin(cg.mixed_mask(k)).count("1") < k for k in range(2, 9))
    assert {(v.dtype, v.k) for v in full if v.scaled == (1 << v.k) - 1 and v.op == "reduce"} >= \
        {(d, k) for d in ("fp32", "fp16", "bf16") for k in (2, 8)}
    assert set(full) <= set(cg.variants("all")) and set(cg.variants("scaled-ci")) <= set(full)
    assert {v.op for v in cg.variants("ci") if v.scaled} == {"reduce", "fused"}
    assert len({v.name for v in cg.variants("all")}) == len(cg.variants("all"))


def _kernel_rows(gates, arch, variant):
    return [r for r in gates["rows"] if r["arch"] == arch and r["variant"] == variant.name]


def test_every_ci_variant_compiles_for_both_archs(gates):
    variants = cg.variants("ci")
    assert {v.op for v in variants} == {"reduce", "combine", "fused", "clip_shift"}
    assert {v.k for v in variants if v.op == "clip_shift" and v.dtype == "fp32"} == set(range(1, 9))
    assert {v.dtype for v in variants if v.op == "clip_shift"} == set(cg.DTYPES)
    assert {v.policy for v in variants if v.op == "fused"} == set(cg.POLICIES)
    assert {v.dtype for v in variants} == set(cg.DTYPES) and {1, 8} <= {v.k for v in variants}
    assert {v.aligned for v in variants} == {True, False} and {v.clamp for v in variants} == {True, False}
    for arch in ARCHS:
        for v in variants:
            main = [r for r in _kernel_rows(gates, arch, v) if r["kernel"] != "_reduce_finish"]
            assert len(main) == 1, (arch, v.name)  # one distinct specialisation per variant
            reduce = "_reduce_partials" if v.dtype == "fp64" else "_reduce_lanes"
            assert main[0]["kernel"] == {"reduce": reduce, "combine": "_combine", "fused": "_fused",
                                         "clip_shift": "_clip_shift"}[v.op]


def test_no_spills(gates):
    spilling = [(r["arch"], r["kernel"], r["variant"], r["local_bytes"], r["stack_bytes"]) for r in gates["rows"]
                if r["local_bytes"] or r["stack_bytes"]]
    assert not spilling


def test_registers(gates):
    """<= 64 registers for every kernel (combine, fused, clip_shift, both tile-Gram reduce stages,
    every K and dtype) but the per-thread reduce, which holds one accumulator per Gram entry
    (float-float: two) and may use up to 255 without spilling (its occupancy is reported), and the
    fused combine over 7-8 operands with Σ-scaled ones (a slope and an offset live per scaled
    operand: up to 168)."""
    def limit(r):
        if r["kernel"] == "_reduce_lanes":
            return cg.LANES_REG_LIMIT
        return cg.SCALED_FUSED_REG_LIMIT if r["kernel"] == "_fused" and r.get("scaled") and r["k"] >= 7 else 64
    over = [(r["arch"], r["variant"], r["kernel"], r["registers"]) for r in gates["rows"] if r["registers"] > limit(r)]
    assert not over
    assert cg.REG_LIMIT == 64 and {r["kernel"] for r in gates["rows"]} >= {"_reduce_partials", "_reduce_lanes",
                                                                       "_combine", "_fused", "_clip_shift"}
    small = [r["registers"] for r in gates["rows"] if r["kernel"] == "_reduce_lanes" and r["k"] <= 4
             and r["dtype"] != "fp32"]   # fp16/bf16 (one fp32 accumulator per entry) at few operands:
    assert small and max(small) <= 64      # as light as the other kernels (fp32 float-float K = 4: 72)


def test_operand_loads_are_128_bit_when_aligned(gates):
    """Aligned variants: every operand load is 128-bit and each of the K operands is loaded (and
    the log-scale of Σ-scaled ones); unaligned variants (operands one element off, odd rows or
    batch strides) get narrower loads: the check can tell them apart."""
    for r in gates["rows"]:
        if r["kernel"] == "_reduce_finish":
            continue
        loads = r["operand_loads"]
        assert len(loads) == r["k"] + (1 if r.get("scaled") else 0) and all(loads.values()), \
            (r["arch"], r["variant"], loads)
        widths = {w for ws in loads.values() for w in ws}
        if r["aligned"]:
            assert widths == {128}, (r["arch"], r["variant"], widths)
        else:
            assert 128 not in widths, (r["arch"], r["variant"], widths)
    assert not [r for r in gates["rows"] if r["failures"]]


def test_ptx_load_attribution():
    """The dataflow pass attributes a load to the pointer argument its address comes from."""
    ptx = """
    ld.param.b64 %rd1, [k_param_0];
    ld.param.b64 %rd2, [k_param_1];
    ld.param.b64 %rd3, [k_param_2];
    ld.param.b32 %r1, [k_param_3];
    mul.wide.s32 %rd4, %r1, 4;
    add.s64 %rd5, %rd1, %rd4;
    @%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd5 + 0 ];
    add.s64 %rd6, %rd2, %rd4;
    ld.global.b32 { %r6 }, [ %rd6 + 0 ];
    ld.global.b32 { %r7 }, [ %rd3 + 0 ];
    mul.wide.s32 %rd7, %r7, 4;
    add.s64 %rd8, %rd7, %rd4;
    ld.global.b16 { %rs1 }, [ %rd8 + 0 ];
    @%p2 st.global.v2.b32 [ %rd5 + 0 ], { %r2, %r3 };
    """
    got = cg.ptx_loads(ptx, ["x0", "x1", "coef", "n"], ["x0", "x1"])
    assert got["operand_loads"] == {"x0": [128], "x1": [32]}
    assert got["other_loads"] == [32, 16]  # coef's value, and a load at an address computed from it
    assert got["stores"] == [64]


def test_occupancy_bound():
    assert cg.occupancy(90, 32, 4, 1024)["occupancy"] == 1.0
    low = cg.occupancy(90, 128, 4, 1024)
    assert low["occupancy"] == 0.25 and low["limiter"] == "registers"


def test_ptxas_verbose_parser():
    text = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
ptxas info    : Compiling entry function '_Z3barPf' for 'sm_80'
ptxas info    : Function properties for _Z3barPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem"""
    rows = cg.parse_ptxas_verbose(text, "x.cu")
    assert [(r["function"], r["arch"], r["registers"]) for r in rows] == [("_Z3fooPf", 90, 255), ("_Z3barPf", 80, 40)]
    assert rows[0]["failures"] and not rows[1]["failures"]


def test_native_cuda_ops_compile_without_spills(nvcc_gate):
    """csrc/*.cu with nvcc for sm_80 and sm_90 (host and device code), 0 spills per function."""
    if nvcc_gate is None:
        if os.environ.get("GRADGUIDE_REQUIRE_NVCC", "") not in ("", "0"):
            pytest.fail("nvcc is required here (GRADGUIDE_REQUIRE_NVCC=1) but is not on PATH")
        pytest.skip("nvcc is not on PATH: the native CUDA ops cannot be compiled here")
    result = nvcc_gate
    assert result["nvcc"] is not None, result["reason"]
    rows = result["rows"]
    for arch in ARCHS:
        names = {r["function"] for r in rows if r["arch"] == arch}
        for kernel in ("reduce_partials_kernel", "reduce_finish_kernel", "combine_kernel", "fused_combine_kernel",
                       "clip_shift_kernel"):
            assert any(kernel in n for n in names), (arch, kernel)
    assert not [(r["arch"], r["function"], r["failures"]) for r in rows if r["failures"]]


def test_cli_check_kernels(gates_cli, gates):
    """``gradguide check-kernels`` end to end (the run the gate tests above read): JSON and
    per-arch markdown written, exit status 0."""
    proc, folder = gates_cli
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {r["arch"] for r in gates["rows"]} == set(ARCHS) and gates["subset"] == "ci"
    for arch in ARCHS:
        md = (folder / f"kernels-sm{arch}.md").read_text()
        assert "| `_combine` |" in md and "all pass" in md
    assert "pass" in proc.stdout and "0 fail" in proc.stdout


def test_the_roofline_subset_covers_every_gated_kernel_dtype_and_k():
    """``--subset roofline`` (what the committed results and docs/performance.md's per-GPU table
    come from) is reduce, combine and fused (CFG and APG) in fp32/fp16/bf16 at every K = 2…8,
    aligned; its CI cut keeps K = 2, 3, 8. Every one of them is gated (no compile needed to know)."""
    from gradguide.bench import roofline
    full = cg.variants("roofline")
    assert {(v.op, v.dtype, v.k) for v in full} == {(op, d, k) for op in ("reduce", "combine", "fused")
                                                    for d in ("fp32", "fp16", "bf16") for k in range(2, 9)}
    assert {v.policy for v in full if v.op == "fused"} == {"cfg", "apg"} and all(v.aligned for v in full)
    assert {v.k for v in cg.variants("roofline-ci")} == {2, 3, 8} and set(cg.variants("roofline-ci")) <= set(full)
    kernel = {"reduce": "_reduce_lanes", "combine": "_combine", "fused": "_fused"}
    assert all(roofline.gated({"kernel": kernel[v.op], "dtype": v.dtype, "k": v.k, "aligned": v.aligned}) for v in full)
    # the eight GPUs sit on the six compiled architectures
    assert sorted(roofline.GPUS) == sorted(["RTX 3090", "RTX 4090", "RTX 5090", "L4", "L40S", "A100", "H100", "B200"])
    assert {g["arch"] for g in roofline.GPUS.values()} == set(cg.ARCHS)
