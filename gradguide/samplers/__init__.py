"""Samplers as per-step scalar tables.

Every sampler step (docs/mathematics.md#samplers) is linear in its terms. Written against the denoiser's
prediction ``D = x̂_0`` (with ``ε`` re-derived from it), each one is

    x_next = c_x · x + c_0 · D + Σ_k c_k · S_k + σ · z

over carried state tensors ``S_k`` (*slots*: previous predictions of multistep solvers, Heun's
and UniPC's carried sample, PLMS's previous ε's, LMS's previous derivatives). After the step
each slot is either a plain copy (``moves``: ``D_{−2} ← D_{−1}``, ``D_{−1} ← D``) or
``u_x x + u_0 D + Σ_j u_j S_j`` with its own per-step coefficients (tables ``u_<slot>_x``,
``u_<slot>_0``, ``u_<slot>_<slot j>``); the output's are ``c_<slot>``. Absent coefficients are
zero. One *step* here is one model evaluation (Heun has 2n − 1 of them for n steps).

A sampler is therefore a set of scalar tables over the evaluations (:class:`SamplerTables`),
built on the host in float64 from a :class:`~gradguide.schedules.Timesteps`; the step itself
reads them from a device tensor. ``x`` is always the variance-preserving latent
``√ᾱ x_0 + √(1−ᾱ) ε`` the model is called on; σ-space (k-diffusion) samplers are the same
steps with ``σ = √((1−ᾱ)/ᾱ)`` (``x_σ = x / √ᾱ``), see :mod:`gradguide.samplers.ksigma`; flow-matching
samplers likewise with ``x_σ = x/(√ᾱ + √(1−ᾱ))``, see :mod:`gradguide.samplers.flow`.
The ``(x̂_0, ε)`` form of a step, ``a_0 x̂_0 + a_e ε``, has ``a_e = c_x √(1−ᾱ_t)``;
CFG++ uses it to re-noise with a different ε.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

from ..predictions import EDM, edm_coefficients
from ..schedules import Timesteps

SAMPLERS = ("ddpm", "ddim", "dpm_2", "dpm_2_ancestral", "dpmpp-2m", "dpmpp-2m-sde", "dpmpp-3m-sde",
            # diffusers' noise-prediction multistep and singlestep DPM-Solvers (gradguide.samplers.dpmsolver)
            "dpm-2m", "dpm-2m-sde", "dpm-single", "dpmpp-single", "dpmpp-single-sde",
            "dpmpp_2s_ancestral", "dpmpp_sde", "dpm_fast", "euler", "euler_a", "heun", "lms", "plms", "pndm", "unipc",
            "flow-euler", "flow-heun", "flow-lcm", "lcm", "tcd",
            # ComfyUI's own (gradguide.samplers.comfy)
            "ipndm", "ipndm_v", "deis", "gradient_estimation", "res_multistep", "res_multistep_ancestral", "lcm_comfy",
            "er_sde", "seeds_2", "seeds_3", "heunpp2", "sa_solver", "sa_solver_pece",
            # diffusers' own variants of methods above (gradguide.samplers.pndm, gradguide.samplers.sasolver)
            "ipndm_diffusers", "sa_solver_diffusers")
# ComfyUI samplers that are not a table step here, with the reason (refused by name)
REFUSED = {
    "res_multistep_cfg_pp": "its CFG++ form carries the unconditional prediction as its multistep history; gradguide's "
                            "CFG++ (gradguide.CFGPlusPlus) changes the current step's re-noising only",
    "res_multistep_ancestral_cfg_pp": "as res_multistep_cfg_pp: the unconditional prediction is its history",
    "gradient_estimation_cfg_pp": "its CFG++ form carries the unconditional derivative as history; gradguide's CFG++ "
                                  "changes the current step's re-noising only",
}
CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")   # Karras et al.'s churn on euler and heun
SOURCES = ("x", "0")   # a slot update reads x (the evaluated sample), D (the guided x̂_0) and the old slots


@dataclass
class SamplerTables:
    """Scalar tables (float64, one entry per model evaluation) describing a sampler.

    ``timesteps``: the evaluations (the model's timestep and ᾱ at each; for Heun the
    expanded list). ``slots``: the carried state tensors, zeros before the first step;
    ``moves``: ``{slot: source}`` for slots that are a plain copy of ``"x"``, ``"0"`` (the
    guided x̂_0) or another slot at every step; every other slot is updated from its ``u_``
    tables.
    """
    name: str
    timesteps: Timesteps
    tables: Dict[str, torch.Tensor]
    slots: Tuple[str, ...] = ()
    moves: Dict[str, str] = field(default_factory=dict)
    learned_variance: bool = False
    # which steps draw noise; known on the host, so no step ever branches on a tensor
    draws_noise: list = field(default_factory=list)
    # where each evaluation's noise lives, as k-diffusion names it to a noise_sampler: (σ, σ_next)
    # in σ-space (default: from the evaluation's ᾱ to the ᾱ it moves to)
    noise_sigmas: list = field(default_factory=list)
    # a user's noise_sampler(σ, σ_next) -> standard normal draws shaped like x (None: the run's generator)
    noise_sampler: Optional[Callable] = None
    # noise added to the initial latent before the first evaluation (k-diffusion's churn at the first
    # σ): x ← init_scale · x_T + initial_noise · z, z drawn for initial_noise_sigmas
    initial_noise: float = 0.0
    initial_noise_sigmas: tuple = ()

    def __post_init__(self):
        n = len(self.timesteps)
        if not self.noise_sigmas:
            ts = self.timesteps
            sig = lambda abar: ((1 - abar) / abar.clamp_min(1e-300)).sqrt().tolist()  # noqa: E731
            self.noise_sigmas = list(zip(sig(ts.abar), sig(ts.abar_prev)))
        for slot in self.slots:   # absent coefficients are zero
            keys = ["c_" + slot]
            if slot not in self.moves:
                keys += [f"u_{slot}_{src}" for src in SOURCES + tuple(self.slots)]
            for key in keys:
                self.tables.setdefault(key, torch.zeros(n, dtype=torch.float64))
        for slot, src in self.moves.items():
            if slot not in self.slots or src not in SOURCES + tuple(self.slots):
                raise ValueError(f"sampler {self.name!r}: bad move {slot} <- {src}")
        values = list(self.tables.values())   # one check of all tables; the names only on failure
        if values and not bool(torch.isfinite(torch.cat([v.reshape(-1) for v in values])).all()):
            bad = [k for k, v in self.tables.items() if not torch.isfinite(v).all()]
            raise ValueError(f"sampler {self.name!r}: non-finite step coefficients ({', '.join(sorted(bad))}) on these "
                             "timesteps (e.g. σ = ∞ at ᾱ = 0, a second-order step landing on σ = 0, or a higher-order "
                             "step between two equal σ's; diffusers' own loop returns NaN or inf in the last two cases)")

    @property
    def multistep(self) -> bool:
        """Whether a step reads carried state."""
        return bool(self.slots)

    def needs_x0(self) -> bool:
        """Whether a slot update reads the guided x̂_0 (it is then materialised each step)."""
        return any(src == "0" for src in self.moves.values()) or any(
            bool((self.tables[f"u_{slot}_0"] != 0).any()) for slot in self.slots if slot not in self.moves)

    def stacked(self, device, dtype):
        """All tables as one ``[n_tables, n_steps]`` tensor and the row of each name."""
        names = sorted(self.tables)
        rows = torch.stack([self.tables[k] for k in names]).to(device=device, dtype=dtype)
        return rows, {k: j for j, k in enumerate(names)}


def common_tables(ts: Timesteps) -> Dict[str, torch.Tensor]:
    # ᾱ = 0 (zero terminal SNR) enters the x̂_0 ↔ ε conversions as 1e-16: x̂_0 = √ᾱ x − √(1−ᾱ) v
    # is then exact to 1e-8 |x| and no coefficient divides by zero (ε models are refused there)
    abar = ts.abar.clamp_min(1e-16)
    # flow_in: a flow-matching model is called on x_σ = x/(√ᾱ + √(1−ᾱ)) (gradguide.predictions); from the
    # unclamped ᾱ, so it is exactly 1 at σ = 1
    return {"sqrt_abar": abar.sqrt(), "sqrt_1m_abar": (1 - abar).sqrt(),
            "flow_in": 1 / (ts.abar.sqrt() + (1 - ts.abar).sqrt())}


def build(name: str, ts: Timesteps, *, eta=None, variance: str = "fixed-small", prediction: str = "eps",
          **options) -> SamplerTables:
    """The tables of sampler ``name`` on ``ts``. ``options`` are the sampler's own settings
    (e.g. DPM-Solver's ``solver_type``, DDPM's ``final_noise``, the ancestral and SDE samplers'
    ``eta`` and ``s_noise``); unknown ones raise. ``eta=None``: the sampler's own default (0 for
    DDIM, 1 for the ancestral and SDE samplers). ``noise_sampler``: a callable
    ``noise_sampler(σ, σ_next)`` (k-diffusion's interface, σ-space values as float64 0-d tensors)
    returning the standard normal draws of each noisy step shaped like the sample, instead of
    the run's generator (e.g. :class:`gradguide.samplers.noise.BrownianTreeNoiseSampler`).
    ``prediction``: the model's parametrisation; an EDM model (``"edm"``, ``"edm-v"``) adds its
    per-evaluation preconditioning (``edm_skip``, ``edm_out``, ``edm_in``) for the data scale
    option ``sigma_data`` (default 0.5, Karras et al.'s and diffusers')."""
    noise_sampler = options.pop("noise_sampler", None)
    sigma_data = options.pop("sigma_data", None)
    if sigma_data is not None and prediction not in EDM:
        raise ValueError(f"sampler.sigma_data: the data scale of EDM models (prediction 'edm' or 'edm-v'), got "
                         f"prediction={prediction!r}")
    sigma_data = 0.5 if sigma_data is None else sigma_data
    if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)) or not 0 < sigma_data < float("inf"):
        raise ValueError(f"sampler.sigma_data: expected a finite number > 0, got {sigma_data!r}")
    if noise_sampler is not None and not callable(noise_sampler):
        raise TypeError(f"noise_sampler: expected a callable noise_sampler(sigma, sigma_next) returning standard "
                        f"normal draws shaped like the sample, got {type(noise_sampler).__name__}")
    if name == "dpmpp_sde":   # without a Brownian noise_sampler the two stages' noise is correlated in the tables
        options = {**options, "nested_noise": noise_sampler is None}
    tables = _build(name, ts, eta, variance, options)
    if prediction in EDM:   # on the evaluations' ᾱ (Heun's expanded list included)
        c_x, c_f, c_in = edm_coefficients(tables.timesteps.abar, float(sigma_data), prediction)
        tables.tables.update(edm_skip=c_x, edm_out=c_f, edm_in=c_in)
    if noise_sampler is not None:
        if not any(tables.draws_noise) and not tables.initial_noise:
            raise ValueError(f"noise_sampler: sampler {name!r} draws no noise with these options")
        tables.noise_sampler = noise_sampler
    return tables


# the samplers with an η (how much fresh noise a step adds); the others refuse one by name
ETA_SAMPLERS = ("ddim", "tcd", "euler_a", "dpmpp-2m-sde", "dpmpp-3m-sde", "dpm_2_ancestral", "dpmpp_2s_ancestral",
                "dpmpp_sde", "dpm_fast", "res_multistep_ancestral", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece")


def _build(name: str, ts: Timesteps, eta, variance: str, options) -> SamplerTables:
    from . import comfy, consistency, ddim, ddpm, dpmpp, dpmsolver, flow, kdiff, ksigma, plms, pndm, sasolver, unipc
    if name in REFUSED:
        raise ValueError(f"sampler {name!r} is not available: {REFUSED[name]}")
    if eta is not None and name not in ETA_SAMPLERS and name in SAMPLERS:
        raise ValueError(f"sampler.eta: sampler {name!r} takes no eta (these do: {', '.join(ETA_SAMPLERS)})")
    if name in ("flow-euler", "flow-heun", "flow-lcm"):
        if eta is not None:
            raise ValueError(f"sampler {name!r}: no eta (flow-euler takes stochastic)")
        return flow.tables(name, ts, **options)
    if name == "lcm":
        return consistency.tables(ts, **options)
    if name == "tcd":
        return consistency.tcd_tables(ts, eta, **options)
    if name in comfy.SAMPLERS:
        if eta is not None:
            options["eta"] = eta
        return comfy.tables(name, ts, **options)
    if name == "dpm_fast":
        if eta is not None:
            options["eta"] = eta
        return kdiff.dpm_fast_tables(ts, **options)
    if name in kdiff.SAMPLERS or (name in ("euler", "heun") and any(k in options for k in CHURN)):
        if eta is not None:
            options["eta"] = eta
        return kdiff.tables(name, ts, **options)
    if eta is not None:
        options["eta"] = eta
    if name == "ddpm":
        return ddpm.tables(ts, variance, **options)
    if name == "ddim":
        return ddim.tables(ts, **options)
    if name == "dpmpp-2m":
        return dpmpp.tables(ts, **options)
    if name == "dpmpp-2m-sde":
        return dpmpp.tables(ts, sde=True, **options)
    if name in ("dpm-2m", "dpm-2m-sde"):
        return dpmsolver.multistep_eps_tables(ts, sde=name == "dpm-2m-sde", **options)
    if name in dpmsolver.SINGLESTEP:
        return dpmsolver.singlestep_tables(name, ts, **options)
    if name == "dpmpp-3m-sde":   # k-diffusion's sample_dpmpp_3m_sde
        options = {"solver_order": 3, "solver_type": "heun", "lower_order_final": False, **options}
        return dpmpp.tables(ts, sde=True, name=name, **options)
    if name in ("euler", "euler_a", "heun", "lms"):
        return ksigma.tables(name, ts, **options)
    if name == "unipc":
        return unipc.tables(ts, **options)
    if name == "plms":
        return plms.tables(ts, **options)
    if name == "pndm":
        return pndm.tables(ts, **options)
    if name == "ipndm_diffusers":
        if options:
            raise ValueError(f"sampler 'ipndm_diffusers': takes no options, got {sorted(options)}")
        return pndm.ipndm_tables(ts)
    if name == "sa_solver_diffusers":
        return sasolver.tables(ts, **options)
    raise ValueError(f"sampler: expected one of {SAMPLERS}, got {name!r}")
