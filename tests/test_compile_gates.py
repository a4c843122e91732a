"""Compile gates (no GPU needed): the Triton kernels compiled for sm_80 / sm_90 exactly as the
glue launches them, and csrc/*.cu compiled with nvcc; registers, spills and load widths read
from the cubin and PTX (gradguide/bench/compile_gates.py).

CI runs the representative subset ``variants("ci")`` (every op, policy and dtype; K in
{1, 4/5, 8}; clamp on/off; aligned and unaligned); ``gradguide check-kernels`` compiles every
variant. The compiles run once per session in a subprocess (the test session interprets
Triton: TRITON_INTERPRET=1) and Triton caches them on disk. The nvcc test skips only when
nvcc is absent, and fails instead when GRADGUIDE_REQUIRE_NVCC=1 (CI).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from gradguide.bench import compile_gates as cg

ARCHS = (80, 90)


@pytest.fixture(scope="module")
def gates():
    pytest.importorskip("triton")
    return cg.run(ARCHS, "ci", progress=False)


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
            assert main[0]["kernel"] == {"reduce": "_reduce_partials", "combine": "_combine", "fused": "_fused",
                                         "clip_shift": "_clip_shift"}[v.op]


def test_no_spills(gates):
    spilling = [(r["arch"], r["kernel"], r["variant"], r["local_bytes"], r["stack_bytes"]) for r in gates["rows"]
                if r["local_bytes"] or r["stack_bytes"]]
    assert not spilling


def test_registers(gates):
    """<= 64 registers for every kernel: combine, fused, clip_shift, both reduce stages, every K and dtype."""
    over = [(r["arch"], r["variant"], r["kernel"], r["registers"]) for r in gates["rows"] if r["registers"] > 64]
    assert not over
    assert cg.REG_LIMIT == 64 and {r["kernel"] for r in gates["rows"]} >= {"_reduce_partials", "_combine", "_fused",
                                                                       "_clip_shift"}


def test_operand_loads_are_128_bit_when_aligned(gates):
    """Aligned variants: every operand load is 128-bit and each of the K operands is loaded;
    unaligned variants (operands one element off, odd rows) get narrower loads: the check can
    tell them apart."""
    for r in gates["rows"]:
        if r["kernel"] == "_reduce_finish":
            continue
        loads = r["operand_loads"]
        assert len(loads) == r["k"] and all(loads.values()), (r["arch"], r["variant"], loads)
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


def test_native_cuda_ops_compile_without_spills():
    """csrc/*.cu with nvcc for sm_80 and sm_90 (host and device code), 0 spills per function."""
    if shutil.which("nvcc") is None:
        if os.environ.get("GRADGUIDE_REQUIRE_NVCC", "") not in ("", "0"):
            pytest.fail("nvcc is required here (GRADGUIDE_REQUIRE_NVCC=1) but is not on PATH")
        pytest.skip("nvcc is not on PATH: the native CUDA ops cannot be compiled here")
    result = cg.nvcc_gate(ARCHS)
    assert result["nvcc"] is not None, result["reason"]
    rows = result["rows"]
    for arch in ARCHS:
        names = {r["function"] for r in rows if r["arch"] == arch}
        for kernel in ("reduce_partials_kernel", "reduce_finish_kernel", "combine_kernel", "fused_combine_kernel",
                       "clip_shift_kernel"):
            assert any(kernel in n for n in names), (arch, kernel)
    assert not [(r["arch"], r["function"], r["failures"]) for r in rows if r["failures"]]


def test_cli_check_kernels(tmp_path, gates):
    """``gradguide check-kernels`` end to end (Triton's disk cache makes the compiles cheap
    after the fixture): JSON and per-arch markdown written, exit status 0."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "gates.json"
    proc = subprocess.run([sys.executable, "-m", "gradguide.cli", "check-kernels", "--arch", "90", "--subset", "ci",
                           "--no-nvcc", "--no-progress", "--quiet", "--json", str(out), "--markdown-dir",
                           str(tmp_path)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert {r["arch"] for r in data["rows"]} == {90} and data["subset"] == "ci"
    md = (tmp_path / "kernels-sm90.md").read_text()
    assert "| `_combine` |" in md and "all pass" in md
    assert "pass" in proc.stdout and "0 fail" in proc.stdout
