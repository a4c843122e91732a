"""A roofline projection of a guided step's GPU time from the dry run's counts (a PROJECTION).

No GPU has run these workloads: every time here is computed, not measured. For each op the
dry run recorded (all bytes it reads and writes, its FLOPs, its dtype):

    op time   = max(bytes / bandwidth, FLOPs / peak for the op's dtype and kind)
    step time = Σ op time + launches × per-launch cost

Assumptions (stated in every table): spec peak bandwidth and spec dense peak FLOPs (no
efficiency factor: a real GPU reaches ~80-90 % of spec bandwidth and less of spec FLOPs, so
the projection is a *lower bound* on kernel time); every op a separate kernel that goes to
DRAM (no cache reuse between ops); FLOPs only for matmuls, convolutions and attention (torch's
flop registry) and for the Triton reduce on fp64 data (its tile Grams run on fp64 tensor
cores, DMMA: 512 FLOPs per element of an operand, gradguide/kernels/reduce.py; fp32 data takes a
per-thread kernel that its SASS roofline projects memory-bound); fp16/bf16 matmuls and convolutions on tensor cores; fp32 convolutions on TF32
tensor cores (cuDNN's default, ``torch.backends.cudnn.allow_tf32``), fp32 matmuls on CUDA
cores (``torch.backends.cuda.matmul.allow_tf32`` defaults to False). Launch cost: eager
≈ :data:`EAGER_LAUNCH_US` per op (PyTorch's host-side dispatch + launch, which bounds small
ops), CUDA-graph replay ≈ :data:`GRAPH_LAUNCH_US` per kernel node plus one graph launch.
"""
from __future__ import annotations

from typing import Dict, List

# spec sheets: NVIDIA H100 SXM5 80GB and A100 SXM4 80GB datasheets (dense, no sparsity)
GPUS: Dict[str, dict] = {
    "H100-SXM": {"bandwidth": 3.35e12, "fp16_tc": 989e12, "tf32_tc": 494.5e12, "fp32": 66.9e12, "fp64_tc": 66.9e12},
    "A100-SXM": {"bandwidth": 2.039e12, "fp16_tc": 312e12, "tf32_tc": 156e12, "fp32": 19.5e12, "fp64_tc": 19.5e12},
}
EAGER_LAUNCH_US = 5.0    # per eager op: host dispatch + launch (typical PyTorch eager overhead on a fast CPU)
GRAPH_LAUNCH_US = 1.0    # per kernel node inside a replayed CUDA graph
GRAPH_REPLAY_US = 10.0   # per graph launch (cudaGraphLaunch)

_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "matmul"}
_CONV = {"convolution", "convolution_backward", "_convolution", "cudnn_convolution"}


def _peak(gpu: dict, dtype: str, name: str) -> float:
    if name == "reduce" and dtype == "float64":   # the Triton reduce's DMMA (the only reduce with FLOPs)
        return gpu["fp64_tc"]
    if dtype in ("float16", "bfloat16"):
        return gpu["fp16_tc"]
    if name in _CONV:
        return gpu["tf32_tc"]
    return gpu["fp32"]


def kernel_time(ops: List[tuple], gpu: dict) -> float:
    """Σ max(bytes / bandwidth, FLOPs / peak) over ``ops`` = [(bytes, flops, dtype, name)], in seconds."""
    total = 0.0
    for nbytes, flops, dtype, name in ops:
        t = nbytes / gpu["bandwidth"]
        if flops:
            t = max(t, flops / _peak(gpu, dtype, name))
        total += t
    return total


def project_step(step: dict, graph_launches_extra: int = 0) -> Dict[str, dict]:
    """Projected seconds per step for each GPU: model and guidance kernel time, and the launch
    overhead eager vs CUDA-graph replay. ``step`` is one entry of a dry run's ``steps_measured``."""
    out = {}
    phases_model = ("forward", "backward")
    launches_model = sum(step[p]["launches"] for p in phases_model)
    launches_guid = step["guidance"]["launches"]
    launches = launches_model + launches_guid
    for name, gpu in GPUS.items():
        model_s = sum(kernel_time(step["roofline_ops"][p], gpu) for p in phases_model)
        guid_s = kernel_time(step["roofline_ops"]["guidance"], gpu)
        guid_min_s = step["min_guidance_bytes"] / gpu["bandwidth"]
        eager = model_s + guid_s + launches * EAGER_LAUNCH_US * 1e-6
        graph = model_s + guid_s + (launches * GRAPH_LAUNCH_US + GRAPH_REPLAY_US) * 1e-6 \
            + graph_launches_extra * EAGER_LAUNCH_US * 1e-6
        out[name] = {"model_kernel_s": model_s, "guidance_kernel_s": guid_s, "guidance_minimum_s": guid_min_s,
                     "launch_eager_s": launches * EAGER_LAUNCH_US * 1e-6,
                     "guidance_eager_s": guid_s + launches_guid * EAGER_LAUNCH_US * 1e-6,
                     "eager_step_s": eager, "graph_step_s": graph}
    return out


def project_workload(result: dict) -> dict:
    """Per-step and per-pass projections for a workload's dry run (the measured step stands for
    every step of the pass)."""
    step = next(iter(result["steps_measured"].values()))
    g = result.get("graph") or {}
    extra = g.get("copy_in_launches", 0) + g.get("noise_launches", 0)
    per_step = project_step(step, extra)
    n = result["steps"]
    return {gpu: dict(p, eager_pass_s=p["eager_step_s"] * n, graph_pass_s=p["graph_step_s"] * n)
            for gpu, p in per_step.items()}


ASSUMPTIONS = (
    "PROJECTION, not a measurement: no GPU ran this. Per op max(bytes / spec bandwidth, FLOPs / spec dense peak), "
    "summed; every op a separate DRAM round trip; FLOPs counted for matmul/conv/attention and for the Triton "
    "reduce on fp64 data (512 per operand element, fp64 tensor cores); fp16/bf16 on tensor "
    "cores, fp32 convolutions on TF32 tensor cores, fp32 matmuls on CUDA cores. Launch cost: eager "
    f"{EAGER_LAUNCH_US:g} µs per op, graph replay {GRAPH_LAUNCH_US:g} µs per kernel + {GRAPH_REPLAY_US:g} µs per "
    "replay + the copy-in launches at eager cost. Spec: H100 SXM 3.35 TB/s, 989 TFLOP/s fp16, 495 TF32, 67 fp32; "
    "A100 SXM 80GB 2.04 TB/s, 312 fp16, 156 TF32, 19.5 fp32; fp64 tensor cores 67 / 19.5. Real kernels reach ~80-90 % of spec bandwidth: "
    "read these as lower bounds on kernel time."
)
