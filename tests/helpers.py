"""Shared pieces of the tests: one-step runs and independent float64 formulas; the toy denoiser, diffusers' loop
and the tiny UNet of the diffusers parity tests."""
import inspect
from pathlib import Path

import torch

import gradguide as gg
from gradguide.schedules import Timesteps

SCHEDULE = gg.Schedule.linear(1000)


def one_step(t: int, t_prev=None, schedule=SCHEDULE) -> Timesteps:
    """A single step from training timestep ``t`` to ``t_prev`` (None: to clean data)."""
    abar = schedule.alphas_cumprod
    prev = torch.tensor([1.0 if t_prev is None else float(abar[t_prev])], dtype=torch.float64)
    return Timesteps(torch.tensor([t]), abar[[t]].clone(), prev)


def coeffs(ts: Timesteps):
    """DDPM posterior coefficients (docs/mathematics.md#samplers) for the single step ``ts``."""
    abar, abar_prev = ts.abar[0].item(), ts.abar_prev[0].item()
    alpha = abar / abar_prev
    beta = 1 - alpha
    c1 = beta * abar_prev ** 0.5 / (1 - abar)
    c2 = alpha ** 0.5 * (1 - abar_prev) / (1 - abar)
    beta_tilde = beta * (1 - abar_prev) / (1 - abar)
    return dict(abar=abar, abar_prev=abar_prev, beta=beta, c1=c1, c2=c2, beta_tilde=beta_tilde,
                a=abar ** 0.5, s=(1 - abar) ** 0.5)


def per_sample_dot(a, b):
    return (a * b).flatten(1).sum(1)


def pc_ref(a, b, delta=1.0):
    """PC_δ(a|b) per sample with an explicit loop (a where ‖b‖ = 0)."""
    out = a.clone()
    for i in range(a.shape[0]):
        ab = float((a[i] * b[i]).sum())
        bb = float((b[i] * b[i]).sum())
        if bb > 0 and ab < 0:
            out[i] = a[i] - delta * ab / bb * b[i]
    return out


class FixedModel:
    """A 'model' returning given ε tensors (conditional when ``y`` is passed)."""

    def __init__(self, eps_c, eps_u=None):
        self.eps_c, self.eps_u = eps_c, eps_u

    def __call__(self, x, t, y=None):
        return self.eps_c if y is not None or self.eps_u is None else self.eps_u


def linear_log_prob(direction):
    """log p(y|x) = <direction, x> per sample: its gradient is ``direction``."""
    return lambda x, t, y=None: per_sample_dot(direction, x)


def guidance_cases(gm):
    """Every guidance family (and PixelAsParam policy) on the closed-form mixture ``gm``:
    name -> (terms, projection, model), for the sampler x guidance sweeps."""
    def uncond(x, t, **_):
        return gm(x, t)

    return {
        "cfg": ([gg.CFG(3.0)], None, gm),
        "apg-momentum": ([gg.APG(3.0, momentum=-0.5)], None, gm),
        "rescale": ([gg.Rescale(3.0)], None, gm),
        "cfg-zero*": ([gg.CFGZeroStar(3.0, zero_init_steps=1)], None, gm),
        "cfg++": ([gg.CFGPlusPlus(0.5)], None, gm),
        "classifier+A": ([gg.Classifier(gm.log_prob_class, 2.0)], gg.PixelAsParam("A"), gm),
        "classifier+B-pcgrad": ([gg.Classifier(gm.log_prob_class, 2.0)], gg.PixelAsParam("B", pcgrad=True), uncond),
        "cfg+C": ([gg.CFG(3.0)], gg.PixelAsParam("C"), gm),
        "G": ([gg.NaiveGradient(torch.tensor([1.0, 0.0]), 2.0)], None, uncond),
        "G_loss+classifier": ([gg.LookAhead(torch.tensor([1.0, 0.0]), 2.0), gg.Classifier(gm.log_prob_class, 1.0)],
                              gg.PixelAsParam("A"), uncond),
        "dps": ([gg.DPS(lambda x0: x0, torch.zeros(8, 2))], None, uncond),
    }


_KDIFFUSION_SAMPLING = None


def load_kdiffusion_sampling():
    """``k_diffusion.sampling`` (k-diffusion 0.1.1.post1), loaded on its own.

    The package's ``__init__`` imports its training modules (and their dependencies), which a
    sampling test does not need and the test environment may lack; ``sampling.py`` itself needs
    scipy, torchdiffeq, torchsde, tqdm and ``utils.append_dims``. So the file is executed as
    ``k_diffusion.sampling`` under a stub parent package whose ``utils`` provides that one
    function. Skips the calling test when k-diffusion (or one of those four) is not installed."""
    import importlib.util
    import sys
    import types

    import pytest
    global _KDIFFUSION_SAMPLING
    if _KDIFFUSION_SAMPLING is not None:
        return _KDIFFUSION_SAMPLING
    spec = importlib.util.find_spec("k_diffusion")
    # the README's test command installs it: a missing peer fails the parity tests, never skips them
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("k-diffusion is not installed: run the README's test command "
                    "(it installs k-diffusion with --no-deps from constraints.txt)")
    for dep in ("scipy", "torchdiffeq", "torchsde", "tqdm"):
        importlib.import_module(dep)
    path = Path(list(spec.submodule_search_locations)[0]) / "sampling.py"
    package = types.ModuleType("k_diffusion")
    package.__path__ = []   # a package with no importable submodules but the two below
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x, target_dims):
        if target_dims < x.ndim:
            raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
        return x[(...,) + (None,) * (target_dims - x.ndim)]
    utils.append_dims = append_dims
    package.utils = utils
    saved = {k: sys.modules.get(k) for k in ("k_diffusion", "k_diffusion.utils")}
    sys.modules["k_diffusion"], sys.modules["k_diffusion.utils"] = package, utils
    try:
        module_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:   # leave no stub behind for other importers of k_diffusion
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    _KDIFFUSION_SAMPLING = module
    return module


# -- diffusers parity (tests/integrations): the toy denoiser, diffusers' own loop, gradguide's drop-in --------

DIFFUSERS_SHAPE = (2, 3, 8, 8)


class DiffusersToy(torch.nn.Module):
    """The optimal denoiser for N(0, 0.25 I) data, with a fixed 3x3 conv mixed in, returned in
    ``ptype``; ᾱ at fractional t is interpolated linearly. ``learned``: ADM-style extra
    variance channels (a fixed function of x in [−1, 1])."""

    def __init__(self, alphas_cumprod, ptype, learned=False, continuous=False):
        super().__init__()
        self.continuous = continuous   # EDM-style timesteps t = log(σ)/4
        self.ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.ptype, self.learned = ptype, learned
        self.w = torch.randn(3, 3, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.05

    def forward(self, x, t, return_dict=False):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)[:1].expand(x.shape[0])
        if self.continuous:
            abar = (1 / (1 + torch.exp(8 * t))).float().view(-1, 1, 1, 1)
        else:
            t = t.clamp(0, len(self.ac) - 1)
            lo = t.floor().long().clamp(0, len(self.ac) - 1)
            hi = (lo + 1).clamp(max=len(self.ac) - 1)
            abar = ((1 - (t - lo)) * self.ac[lo] + (t - lo) * self.ac[hi]).float().view(-1, 1, 1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x0 = a * 0.25 / (abar * 0.25 + s * s) * (x + torch.nn.functional.conv2d(x, self.w, padding=1))
        eps = (x - a * x0) / s.clamp_min(1e-6)
        out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[self.ptype]
        if self.learned:
            out = torch.cat([out, torch.tanh(x)], 1)
        return (out,)


def tiny_unet():
    """A tiny random ``UNet2DModel`` (3 channels, 8×8), in eval mode without gradients."""
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    net = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                      norm_num_groups=4)
    return net.eval().requires_grad_(False)


# -- guidance through a flow pipeline (tests/integrations/test_pipeline_sana.py, test_pipeline_qwenimage.py) --

GUIDANCE_OBJECTIVES = ("G_loss", "G_loss-decoded", "dps", "classifier")


def assert_decoded_reward_closer(pipe, g, b, target, guided, plain):
    """The decoded linear reward ``gᵀ decode(z) + b`` ends closer to ``target`` with guidance."""
    def off_target(z):
        with torch.no_grad():
            return (torch.einsum("bchw,bchw->b", g, pipe.decode_latents(z)) + b - target).abs()
    assert (off_target(guided) < off_target(plain)).all(), (off_target(guided), off_target(plain))


def guidance_objectives(pipe, shape, image_shape):
    """guidance name -> (guidance term, objective(latents) -> [B] distance to its target): each
    term's own aim, measured on the final latents (decoded where the term decodes)."""
    g_lat = torch.randn(shape, generator=torch.Generator().manual_seed(6)) / shape[-1]
    g_img = torch.randn(image_shape, generator=torch.Generator().manual_seed(7)) / image_shape[-1]
    mu = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    mu = mu / mu.flatten(1).norm(dim=1).view(-1, *[1] * (mu.dim() - 1))   # unit class direction per sample
    y = 0.3 * torch.randn(image_shape[0], image_shape[1], 4, 4, generator=torch.Generator().manual_seed(9))

    def pooled(z):   # the DPS operator: the decoded image, average-pooled to 4×4
        return torch.nn.functional.adaptive_avg_pool2d(pipe.decode_latents(z), 4)

    def log_prob(x, t, **_):
        # the exact noisy classifier of the model's input x_σ between classes N(±mu, I) (y = +1): its
        # logit 2(1 − σ) muᵀx_σ / ((1 − σ)² + σ²) vanishes at pure noise, σ = 1, as a noisy classifier's does
        sigma = (t.double() / 1000).clamp(0, 1).to(x.dtype)
        logit = 2 * (1 - sigma) * torch.einsum("b...,b...->b", mu, x) / ((1 - sigma) ** 2 + sigma ** 2)
        return torch.nn.functional.logsigmoid(logit)

    def lat_reward(z):
        return torch.einsum("b...,b...->b", g_lat, z)
    return {
        # the paper's per-sample β(t) (a constant β has the ε-model weight, unbounded at σ = 1: docs/flow.md)
        "G_loss": (gg.LookAhead(g_lat, target=2.0), lambda z: (lat_reward(z) - 2.0).abs()),
        "G_loss-decoded": (pipe.reward_guidance(g_img, target=1.0, beta=20.0),
                           lambda z: (torch.einsum("b...,b...->b", g_img, pipe.decode_latents(z)) - 1.0).abs()),
        "dps": (gg.DPS(pooled, y, zeta=200.0), lambda z: (pooled(z) - y).flatten(1).norm(dim=1)),
        # the class +1 side: muᵀz grows (the objective, −muᵀz, falls)
        "classifier": (gg.Classifier(log_prob, scale=4.0), lambda z: -torch.einsum("b...,b...->b", mu, z)),
    }


def diffusers_loop(model, sched, steps, noise, seed):
    """diffusers' own loop, as its pipelines write it."""
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    kw = {"generator": torch.Generator().manual_seed(seed)} if "generator" in inspect.signature(sched.step).parameters \
        else {}
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t), t, return_dict=False)[0]
        x = sched.step(out, t, x, **kw).prev_sample
    return x


def run_both(model, sched, steps=8, seed=5):
    """``(gradguide's drop-in, diffusers' loop)`` on the same model, noise and generator seed."""
    noise = torch.randn(DIFFUSERS_SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = diffusers_loop(model, sched, steps, noise.clone(), seed)
    gmodel, schedule = gg.from_diffusers(model, sched)
    got = gg.sample(gmodel, DIFFUSERS_SHAPE, schedule=schedule, steps=steps, x_T=noise.clone(),
                    generator=torch.Generator().manual_seed(seed))
    return got, ref


class ChannelScale(torch.nn.Module):
    """A per-channel scale of 4-channel latents (weights 1): the cheapest model with parameters, for
    dry runs that count everything around the model."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4, 1, 1), requires_grad=False)

    def forward(self, x, t, **_):
        return x * self.w


def policy_program(policy, b, groups, k, kg, g):
    """A policy's coefficient vectors and scalars (as the kernel tests pass them)."""
    names_v, names_s = gg.ops.policies.POLICIES[policy]
    shapes = [(1, 1, k), (b, 1, k), (b, groups, k), (1, groups, k)]
    vectors = []
    for j in range(len(names_v)):
        v = torch.randn(shapes[j % 4], generator=g, dtype=torch.float64 if j % 2 == 0 else torch.float32)
        if j > 0 and kg:   # the vectors whose inner products a policy takes live on the Gram's operands
            v[..., kg:] = 0
        vectors.append(v)
    scalars = [(torch.rand(b if j % 2 else 1, generator=g, dtype=torch.float64) + 0.5)
               .to(torch.float32 if j % 3 == 2 else torch.float64) for j in range(len(names_s))]
    if policy == "lookahead":   # both branches of beta_per_sample across the batch
        scalars[6] = torch.arange(b, dtype=torch.float64) % 2
    if policy == "apg":         # a threshold that clips some rows
        scalars[2] = torch.full((1,), 0.5, dtype=torch.float64)
    return vectors, scalars
