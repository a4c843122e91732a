"""UniPC (Zhao et al., NeurIPS 2023; diffusers' ``UniPCMultistepScheduler`` with
``predict_x0=True``), as scalar tables.

Each step ``i`` evaluates the model at the predicted sample ``x_i``; then the corrector
UniC (from step 1 on) replaces it by ``x_i^c``, a combination of the previous corrected sample,
the previous data predictions and the new one ``D_i``; the predictor UniP steps from
``x_i^c`` with ``D_i`` and the previous predictions. Both are linear in
``(x_{i−1}^c, D_i, D_{i−1}, ..., D_{i−order})``: this module runs diffusers' recursion on the host in
float64 over those basis vectors, so each step's output and the carried ``x_i^c`` are rows
of scalar tables. ``solver_type`` ``"bh2"`` (diffusers' default) or ``"bh1"``;
``solver_order`` 1, 2 or 3; ``lower_order_final`` and ``disable_corrector`` as in diffusers.
"""
from __future__ import annotations

import math

import torch

from . import SamplerTables, common_tables

PREV = ("x0_prev", "x0_prev2", "x0_prev3")   # D_{−1}, D_{−2}, D_{−3}
# basis: x (the evaluated sample), D_i, the previous predictions, the carried corrected sample
BASIS = ("x", "0") + PREV + ("x_carry",)


def _e(k: str) -> torch.Tensor:
    v = torch.zeros(len(BASIS), dtype=torch.float64)
    v[BASIS.index(k)] = 1.0
    return v


def _d(j: int) -> str:
    """Basis name of D_{i−j} (j = 0 is the current prediction)."""
    return "0" if j == 0 else PREV[j - 1]


def _rhos(rks, h, solver_type, order, predictor):
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    b_h = hh if solver_type == "bh1" else math.expm1(hh)
    R, b = [], []
    for k in range(1, order + 1):
        R.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if predictor:
        if order == 1:
            rhos = torch.zeros(0, dtype=torch.float64)
        elif order == 2:
            rhos = torch.tensor([0.5], dtype=torch.float64)
        else:
            rhos = torch.linalg.solve(R[:-1, :-1], b[:-1])
    else:
        rhos = torch.tensor([0.5], dtype=torch.float64) if order == 1 else torch.linalg.solve(R, b)
    return rhos, h_phi_1, b_h


def tables(ts, solver_order: int = 2, solver_type: str = "bh2", lower_order_final: bool = True,
           disable_corrector=()) -> SamplerTables:
    if solver_order not in (1, 2, 3):
        raise ValueError(f"unipc: solver_order: expected 1, 2 or 3, got {solver_order!r}")
    if solver_type not in ("bh1", "bh2"):
        raise ValueError(f"unipc: solver_type: expected 'bh1' or 'bh2', got {solver_type!r}")
    if (ts.abar == 0).any():
        raise ValueError("unipc: needs ᾱ > 0 at every visited step (λ = −∞ at zero terminal SNR); clamp ᾱ_T as "
                         "diffusers does (2**-24) or use sampler='ddim'")
    if solver_type == "bh1" and ts.abar_prev[-1] == 1.0:
        raise ValueError("unipc: solver_type='bh1' with a final σ = 0 is undefined (B(h) = −h = −∞ on the last step; "
                         "diffusers returns NaN): use 'bh2' or end at final σ = σ_min")
    n = len(ts)
    abar = torch.cat([ts.abar, ts.abar_prev[-1:]]).tolist()   # ᾱ at σ_0 .. σ_n
    alpha = [math.sqrt(v) for v in abar]
    sig = [math.sqrt(1 - v) for v in abar]
    lam = [math.log(a) - math.log(s) if s > 0 else math.inf for a, s in zip(alpha, sig)]
    disabled = {int(k) for k in disable_corrector}
    zero = torch.zeros(len(BASIS), dtype=torch.float64)
    out_rows, carry_rows = [], []
    prev_order = None
    for i in range(n):
        # corrector UniC: x_i^c from x_{i−1}^c (carried), D_{i−1}, ..., D_{i−order} and D_i
        if i > 0 and (i - 1) not in disabled:
            order = prev_order
            h = lam[i] - lam[i - 1]
            rks, d1s = [], []
            for k in range(1, order):
                rk = (lam[i - 1 - k] - lam[i - 1]) / h
                rks.append(rk)
                d1s.append((_e(_d(k + 1)) - _e(_d(1))) / rk)
            rhos, h_phi_1, b_h = _rhos(rks + [1.0], h, solver_type, order, predictor=False)
            res = sum((r * d for r, d in zip(rhos[:-1].tolist(), d1s)), zero)
            sample = (sig[i] / sig[i - 1]) * _e("x_carry") - alpha[i] * h_phi_1 * _e(_d(1)) \
                - alpha[i] * b_h * (res + rhos[-1].item() * (_e("0") - _e(_d(1))))
        else:
            sample = _e("x")
        order = min(solver_order, n - i) if lower_order_final else solver_order
        order = min(order, min(i, solver_order) + 1)   # warm-up
        prev_order = order
        # predictor UniP from x_i^c with D_i, ..., D_{i−order+1}
        h = lam[i + 1] - lam[i]
        if order >= 2 and not math.isfinite(h):
            raise ValueError("unipc: a second-order step onto σ = 0 (h = ∞) is undefined (diffusers returns inf): keep "
                             "lower_order_final=True or end at final σ = σ_min")
        rks, d1s = [], []
        for k in range(1, order):
            rk = (lam[i - k] - lam[i]) / h
            rks.append(rk)
            d1s.append((_e(_d(k)) - _e("0")) / rk)
        rhos, h_phi_1, b_h = _rhos(rks + [1.0], h, solver_type, order, predictor=True)
        res = sum((r * d for r, d in zip(rhos.tolist(), d1s)), zero)
        out = (sig[i + 1] / sig[i]) * sample - alpha[i + 1] * h_phi_1 * _e("0") - alpha[i + 1] * b_h * res
        out_rows.append(out)
        carry_rows.append(sample)
    out_rows, carry_rows = torch.stack(out_rows), torch.stack(carry_rows)
    prev = PREV[:solver_order]
    slots = prev + ("x_carry",)
    t = common_tables(ts)
    for j, k in enumerate(BASIS):   # the output's c_*, the carried sample's u_x_carry_*
        if k in ("x", "0") or k in slots:
            t["c_" + k] = out_rows[:, j]
            t["u_x_carry_" + k] = carry_rows[:, j]
        elif (out_rows[:, j] != 0).any() or (carry_rows[:, j] != 0).any():
            raise AssertionError("unipc: a step reads a prediction older than solver_order")  # cannot happen
    t["sigma"] = torch.zeros(n, dtype=torch.float64)
    t["var_mean"] = torch.zeros(n, dtype=torch.float64)
    moves = {"x0_prev": "0", "x0_prev2": "x0_prev", "x0_prev3": "x0_prev2"}
    return SamplerTables("unipc", ts, t, slots=slots, moves={k: v for k, v in moves.items() if k in prev},
                         draws_noise=[False] * n)
