"""DPM-Solver++(2M) (Lu et al. 2022, Alg. 2; diffusers' "midpoint" form), as scalar tables.

With ``α = √ᾱ``, ``σ = √(1−ᾱ)``, ``λ = log(α/σ)``, step ``s → t``, ``h = λ_t − λ_s`` and
``r = h_{prev}/h``: ``x_t = (σ_t/σ_s) x_s + α_t (1 − e^{−h}) [(1 + 1/(2r)) D_s − D_{prev}/(2r)]``
where ``D`` is the data prediction ``x̂_0``. First order (``r → ∞``) at the first step and at
the last, which lands on clean data (``σ_t = 0``, so ``x_0 = D_s``), as diffusers does with
``final_sigmas_type="zero"``. Deterministic: ``σ = 0``.
"""
from __future__ import annotations

import torch

from . import SamplerTables, common_tables


def tables(ts) -> SamplerTables:
    a_s, s_s = ts.abar.sqrt(), (1 - ts.abar).sqrt()
    a_t, s_t = ts.abar_prev.sqrt(), (1 - ts.abar_prev).sqrt()
    exp_neg_h = (s_t / a_t) / (s_s / a_s)  # e^{−h}, exactly 0 when landing on clean data
    lam_s = torch.log(a_s / s_s)
    n = len(ts)
    c_0 = a_t * (1 - exp_neg_h)
    c_h = torch.zeros_like(c_0)
    for i in range(1, n - 1):  # second order in the middle
        h = torch.log(a_t[i] / s_t[i]) - lam_s[i]
        r = (lam_s[i] - lam_s[i - 1]) / h
        c_h[i] = -c_0[i] / (2 * r)
        c_0[i] = c_0[i] * (1 + 1 / (2 * r))
    t = common_tables(ts)
    t.update(c_x=s_t / s_s, c_0=c_0, c_h=c_h, sigma=torch.zeros_like(c_0), var_mean=torch.zeros_like(c_0))
    return SamplerTables("dpmpp-2m", ts, t, multistep=True, draws_noise=[False] * n)
