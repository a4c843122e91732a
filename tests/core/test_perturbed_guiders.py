"""diffusers' guiders with a perturbed model branch (PAG, SLG, SEG, AutoGuidance, LTX-2's) as gradguide
terms, on tiny diffusers models built in code (a cross-attention U-Net: ε, DDIM; an SD3 transformer:
flow, flow-match Euler), float64, 8 steps with start/stop windows:

- each ``gradguide.sample`` run equals diffusers' loop — the scheduler stepping, each step the guider
  called (``guider(batches)``) on the predictions its ``prepare_inputs`` names, the perturbed one from
  the model with diffusers' own hooks applied to a call of its own — to ≤ 1e-5, evaluating as many
  branches per step as the guider asks for;
- the branches share one model call per step (row-selective hooks) and give the unbatched result to
  ≤ 1e-6; only the branches a step uses are evaluated;
- the hooks are gone after sampling; what cannot be reproduced is refused by name."""
import contextlib

import pytest
import torch

import gradguide as gg

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, \
    UNet2DConditionModel  # noqa: E402
from diffusers import guiders as dg  # noqa: E402
from diffusers.hooks import HookRegistry, LayerSkipConfig  # noqa: E402
from diffusers.hooks.layer_skip import _apply_layer_skip_hook  # noqa: E402
from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceConfig, \
    _apply_smoothed_energy_guidance_hook  # noqa: E402

from gradguide.guidance.perturb import RowSpan  # noqa: E402

B, STEPS = 2, 8
DT = torch.float64
MID = "mid_block.attentions.0.transformer_blocks"      # the U-Net's block stacks (fqn="auto" finds none)
DOWN = "down_blocks.0.attentions.0.transformer_blocks"


class EpsUNet(UNet2DConditionModel):
    """A U-Net read as predicting x̂_0: its ε is ``(x − √ᾱ_t D(x))/√(1 − ᾱ_t)``, so a guided DDIM trajectory
    stays of order one (a random U-Net's output read as ε blows x̂_0 up by 1/√ᾱ_t)."""

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        d = super().forward(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        abar = self.abar[timestep.long()].view(-1, 1, 1, 1)
        return ((sample - abar.sqrt() * d) / (1 - abar).sqrt(),)


def _unet():
    torch.manual_seed(0)
    unet = EpsUNet(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4).to(DT).eval()
    unet.abar = _scheduler("unet").alphas_cumprod.to(DT)
    return unet


def _sd3():
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16).to(DT).eval()


def _inputs(kind):
    g = torch.Generator().manual_seed(3)
    if kind == "unet":
        return ({"encoder_hidden_states": torch.randn(B, 5, 12, generator=g, dtype=DT)},
                {"encoder_hidden_states": torch.randn(B, 5, 12, generator=g, dtype=DT) * 0.1})
    cond = {"encoder_hidden_states": torch.randn(B, 5, 16, generator=g, dtype=DT),
            "pooled_projections": torch.randn(B, 8, generator=g, dtype=DT)}
    return cond, {k: torch.zeros_like(v) for k, v in cond.items()}


def _scheduler(kind):
    return DDIMScheduler(clip_sample=False, timestep_spacing="trailing") if kind == "unet" \
        else FlowMatchEulerDiscreteScheduler(shift=3.0)


def _call(module, x, t, inputs, **extra):
    return module(x, timestep=t.expand(x.shape[0]), **inputs, **extra, return_dict=False)[0]


@contextlib.contextmanager
def hooked(module, apply, configs):
    """diffusers' hooks on the whole call (what its guider's ``prepare_models`` registers)."""
    names = [f"reference_{j}" for j in range(len(configs))]
    for name, config in zip(names, configs):
        apply(module, config, name)
    try:
        yield
    finally:
        for name in names:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(name, recurse=True)


def layer_skip(*configs):
    return lambda module: hooked(module, lambda m, c, n: _apply_layer_skip_hook(m, c, name=n), configs)


def smoothed(sigma, *configs):
    return lambda module: hooked(module, lambda m, c, n: _apply_smoothed_energy_guidance_hook(m, c, sigma, name=n),
                                 configs)


def guider_call(guider, preds: dict):
    """diffusers' guider called as its pipelines call it (``guider(list of BlockState)``) on the predictions
    its ``prepare_inputs`` names this step, each computed by ``preds[name]()``; also returns how many."""
    from diffusers.modular_pipelines.modular_pipeline import BlockState
    key = guider._identifier_key
    names = [getattr(batch, key) for batch in guider.prepare_inputs({})]
    data = [BlockState(noise_pred=preds[name](), **{key: name}) for name in names]
    return guider(data).pred, len(names)


def diffusers_loop(module, kind, guider, x, perturb, slot, perturbed_inputs="cond", extra=None):
    """The scheduler's loop with diffusers' guider combining the branches it names; ``perturb(module)``:
    the context of the perturbed call; ``slot``: the guider's name for the perturbed prediction.
    Returns the sample and the number of branches the guider asked for at each step."""
    cond, uncond = _inputs(kind)
    sched = _scheduler(kind)
    sched.set_timesteps(STEPS)
    if hasattr(sched, "final_alpha_cumprod"):   # DDIM's step arithmetic in float64, as gradguide's
        sched.alphas_cumprod = sched.alphas_cumprod.double()
        sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
    counts = []

    def perturbed(t):
        with perturb(module):
            return _call(module, x, t, cond if perturbed_inputs == "cond" else uncond, **(extra or {}))
    for i, t in enumerate(sched.timesteps):
        guider.set_state(step=i, num_inference_steps=STEPS, timestep=t)
        preds = {"pred_cond": lambda: _call(module, x, t, cond), "pred_uncond": lambda: _call(module, x, t, uncond)}
        preds[slot] = lambda: perturbed(t)
        pred, n = guider_call(guider, preds)
        counts.append(n)
        x = sched.step(pred, t, x, return_dict=False)[0]
    return x, counts


def gradguide_run(module, kind, term, x, batch="auto", check_sync=False):
    cond, _ = _inputs(kind)
    model, schedule = gg.from_diffusers(module, _scheduler(kind))
    return gg.sample(model, x.shape, schedule=schedule, steps=STEPS, x_T=x, cond=cond, guidance=term,
                     execution=gg.Execution(batch_branches=batch), diagnostics=gg.Diagnostics(check_sync=check_sync))


def _uncond(kind):
    return _inputs(kind)[1]


# name: (model kind, gradguide term, diffusers guider, reference perturbation, guider's slot, perturbed inputs)
CASES = {
    "pag-unet": lambda: (
        "unet", gg.PAG(4.0, 3.0, config=LayerSkipConfig([0], fqn=MID), perturbed_start=0.1, perturbed_stop=0.8,
                       uncond=_uncond("unet")),
        dg.PerturbedAttentionGuidance(guidance_scale=4.0, perturbed_guidance_scale=3.0, perturbed_guidance_start=0.1,
                                      perturbed_guidance_stop=0.8,
                                      perturbed_guidance_config=LayerSkipConfig([0], fqn=MID)),
        layer_skip(LayerSkipConfig([0], fqn=MID, skip_attention=False, skip_attention_scores=True, skip_ff=False)),
        "pred_cond_skip", "cond"),
    # CFG off for steps 0-3 while PAG is on at 1-3: the perturbed-only formula; rescale; original formulation
    "pag-unet-window-original-rescale": lambda: (
        "unet", gg.PAG(2.0, 2.5, config=[LayerSkipConfig([0], fqn=MID), LayerSkipConfig([0], fqn=DOWN)],
                       perturbed_start=0.0, perturbed_stop=1.0, start=0.5, guidance_rescale=0.4,
                       convention="diffusers-original", uncond=_uncond("unet")),
        dg.PerturbedAttentionGuidance(guidance_scale=2.0, perturbed_guidance_scale=2.5, perturbed_guidance_start=0.0,
                                      perturbed_guidance_stop=1.0, start=0.5, guidance_rescale=0.4,
                                      use_original_formulation=True,
                                      perturbed_guidance_config=[LayerSkipConfig([0], fqn=MID),
                                                                 LayerSkipConfig([0], fqn=DOWN)]),
        layer_skip(*[LayerSkipConfig([0], fqn=f, skip_attention=False, skip_attention_scores=True, skip_ff=False)
                     for f in (MID, DOWN)]),
        "pred_cond_skip", "cond"),
    "slg-unet-blocks": lambda: (
        "unet", gg.SLG(4.0, 2.0, config=LayerSkipConfig([0], fqn=DOWN), perturbed_start=0.2, perturbed_stop=0.9,
                       stop=0.75, uncond=_uncond("unet")),
        dg.SkipLayerGuidance(guidance_scale=4.0, skip_layer_guidance_scale=2.0, skip_layer_guidance_start=0.2,
                             skip_layer_guidance_stop=0.9, stop=0.75,
                             skip_layer_config=LayerSkipConfig([0], fqn=DOWN)),
        layer_skip(LayerSkipConfig([0], fqn=DOWN)), "pred_cond_skip", "cond"),
    "slg-unet-attention-only": lambda: (
        "unet", gg.SLG(3.0, 2.0, config=LayerSkipConfig([0], fqn=MID, skip_ff=False), perturbed_start=0.0,
                       perturbed_stop=1.0, uncond=_uncond("unet")),
        dg.SkipLayerGuidance(guidance_scale=3.0, skip_layer_guidance_scale=2.0, skip_layer_guidance_start=0.0,
                             skip_layer_guidance_stop=1.0,
                             skip_layer_config=LayerSkipConfig([0], fqn=MID, skip_ff=False)),
        layer_skip(LayerSkipConfig([0], fqn=MID, skip_ff=False)), "pred_cond_skip", "cond"),
    "seg-unet-mean": lambda: (   # σ ≤ 9999.9: diffusers' hook replaces the query grid by its mean
        "unet", gg.SEG(4.0, 3.0, blur_sigma=2.0, config=SmoothedEnergyGuidanceConfig([0], fqn=DOWN), seg_stop=0.75,
                       uncond=_uncond("unet")),
        dg.SmoothedEnergyGuidance(guidance_scale=4.0, seg_guidance_scale=3.0, seg_blur_sigma=2.0, seg_guidance_stop=0.75,
                                  seg_guidance_config=SmoothedEnergyGuidanceConfig([0], fqn=DOWN)),
        smoothed(2.0, SmoothedEnergyGuidanceConfig([0], fqn=DOWN)), "pred_cond_seg", "cond"),
    "seg-sd3-gaussian": lambda: (   # σ above the threshold: diffusers' Gaussian (reflect padding) over the grid
        "sd3", gg.SEG(3.0, 2.0, layers=[0, 2], guidance_rescale=0.3, uncond=_uncond("sd3")),
        dg.SmoothedEnergyGuidance(guidance_scale=3.0, seg_guidance_scale=2.0, seg_guidance_layers=[0, 2],
                                  guidance_rescale=0.3),
        smoothed(9999999.0, SmoothedEnergyGuidanceConfig([0], fqn="auto"), SmoothedEnergyGuidanceConfig([2], fqn="auto")),
        "pred_cond_seg", "cond"),
    "autoguidance-unet": lambda: (
        "unet", gg.AutoGuidance(3.0, config=LayerSkipConfig([0], fqn=MID), start=0.125, stop=0.875,
                                uncond=_uncond("unet")),
        dg.AutoGuidance(guidance_scale=3.0, auto_guidance_config=LayerSkipConfig([0], fqn=MID), start=0.125,
                        stop=0.875),
        layer_skip(LayerSkipConfig([0], fqn=MID)), "pred_uncond", "uncond"),
    # flow: the SD3 blocks' feed-forward skipped (both streams' FeedForward modules), uncond inputs perturbed
    "autoguidance-sd3-ff": lambda: (
        "sd3", gg.AutoGuidance(2.5, config=LayerSkipConfig([1], fqn="auto", skip_attention=False), stop=0.75,
                               uncond=_uncond("sd3")),
        dg.AutoGuidance(guidance_scale=2.5, auto_guidance_config=LayerSkipConfig([1], fqn="auto", skip_attention=False),
                        stop=0.75),
        layer_skip(LayerSkipConfig([1], fqn="auto", skip_attention=False)), "pred_uncond", "uncond"),
}


def _reference(module, kind, guider, x, perturb, slot, which):
    with torch.no_grad():
        return diffusers_loop(module, kind, guider, x, perturb, slot, which)


def _x_T(kind):   # both models take [B, 4, 8, 8] latents
    return torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=DT)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_diffusers(name):
    kind, term, guider, perturb, slot, which = CASES[name]()
    module = _unet() if kind == "unet" else _sd3()
    x_T = _x_T(kind)
    ref, counts = _reference(module, kind, guider, x_T.clone(), perturb, slot, which)
    bound = term.for_steps(STEPS)
    assert counts == [len(bound.step_branches(i)) for i in range(STEPS)]   # the branches diffusers asks for
    with torch.no_grad():
        got = gradguide_run(module, kind, term, x_T.clone())
        plain = gradguide_run(module, kind, gg.CFG(term.scale, uncond=_uncond(kind)), x_T.clone())
    scale = max(1.0, ref.abs().max().item())
    assert ref.abs().max() < 100
    err = (got - ref).abs().max().item()
    assert err <= 1e-5 * scale, err
    assert (got - plain).abs().max() > 1e-3 * scale   # the perturbed branch did something


def test_slg_sd3_whole_blocks():
    """SLG with whole SD3 blocks skipped (``layers=``): diffusers' block-skip hook returns the two
    streams in the wrong order for SD3's blocks and the model fails; gradguide's skip equals
    ``SD3Transformer2DModel(skip_layers=...)``, diffusers' own block skip, under diffusers' guider."""
    module = _sd3()
    x_T = _x_T("sd3")
    cond, _ = _inputs("sd3")
    with torch.no_grad(), pytest.raises(RuntimeError):   # what diffusers' hook does to an SD3 block
        with layer_skip(LayerSkipConfig([1], fqn="auto"))(module):
            _call(module, x_T, torch.tensor(500.0), cond)
    guider = dg.SkipLayerGuidance(guidance_scale=3.0, skip_layer_guidance_scale=2.0, skip_layer_guidance_start=0.0,
                                  skip_layer_guidance_stop=0.8, skip_layer_guidance_layers=[1])
    with pytest.raises(TypeError):   # diffusers' own config from layers=[1] (index 1, not [1]) cannot be applied
        _apply_layer_skip_hook(module, guider.skip_layer_config[0], name="int_index")
    HookRegistry.check_if_exists_or_initialize(module).remove_hook("int_index", recurse=True)
    with torch.no_grad():
        ref, _ = diffusers_loop(module, "sd3", guider, x_T.clone(), lambda m: contextlib.nullcontext(),
                                "pred_cond_skip", extra={"skip_layers": [1]})
        got = gradguide_run(module, "sd3", gg.SLG(3.0, 2.0, layers=[1], perturbed_start=0.0, perturbed_stop=0.8,
                                                  uncond=_uncond("sd3")), x_T.clone())
        plain = gradguide_run(module, "sd3", gg.CFG(3.0, uncond=_uncond("sd3")), x_T.clone())
    scale = max(1.0, ref.abs().max().item())
    assert (got - ref).abs().max() <= 1e-5 * scale
    assert (got - plain).abs().max() > 1e-3 * scale


def _count_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args[0] if args else kwargs["hidden_states" if "hidden_states" in kwargs
                                                                          else "sample"]).shape[0]), with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("name", ["pag-unet-window-original-rescale", "slg-unet-blocks", "seg-sd3-gaussian",
                                  "autoguidance-unet"])
def test_batched_equals_unbatched(name):
    """One model call per step with the perturbed rows in it (row-selective hooks), equal to one call per
    branch; only the branches each step uses are evaluated."""
    kind, term, _, _, _, _ = CASES[name]()
    module = _unet() if kind == "unet" else _sd3()
    x_T = _x_T(kind)
    calls, handle = _count_calls(module)
    with torch.no_grad():
        got = gradguide_run(module, kind, term, x_T.clone(), batch=True, check_sync=True)   # no host sync either
        batched_calls = list(calls)
        calls.clear()
        ref = gradguide_run(module, kind, CASES[name]()[1], x_T.clone(), batch=False)
    handle.remove()
    assert (got - ref).abs().max() <= 1e-6 * max(1.0, ref.abs().max().item())
    bound = term.for_steps(STEPS)
    per_step = [len(bound.step_branches(i)) for i in range(STEPS)]
    assert batched_calls == [n * B for n in per_step]      # one call per step, n branches of B rows
    assert calls == [B] * sum(per_step)                     # one call per branch
    assert max(per_step) == 3 or name.startswith("auto")
    assert min(per_step) < max(per_step)                   # windows leave branches out


def test_two_hooked_branches_in_one_call():
    """LTX-2's guider with two hooked perturbations (a block skip and a query blur, in the same blocks):
    four branches in one call of batch 4B, each perturbation on its own rows, equal to four calls."""
    module = _unet()
    x_T = _x_T("unet")

    def term():
        return gg.LTX2(3.0, stg_scale=1.5, modality_scale=2.0, uncond=_uncond("unet"),
                       stg=gg.LayerSkip(LayerSkipConfig([0], fqn=DOWN)),
                       modality=gg.SmoothedEnergy(SmoothedEnergyGuidanceConfig([0], fqn=DOWN), 2.0))
    calls, handle = _count_calls(module)
    with torch.no_grad():
        got = gradguide_run(module, "unet", term(), x_T.clone(), batch=True)
        assert calls == [4 * B] * STEPS
        calls.clear()
        ref = gradguide_run(module, "unet", term(), x_T.clone(), batch=False)
        assert calls == [B] * 4 * STEPS
        plain = gradguide_run(module, "unet", gg.CFG(3.0, uncond=_uncond("unet")), x_T.clone())
    handle.remove()
    assert (got - ref).abs().max() <= 1e-6 * max(1.0, ref.abs().max().item())
    assert (got - plain).abs().max() > 1e-3


def test_composes_with_gradient_guidance():
    """G_loss (a VJP through the model) next to PAG: the gradient goes through the batched call with the
    perturbed rows in it, and equals the unbatched run."""
    module = _unet()
    x_T = _x_T("unet")
    cond, _ = _inputs("unet")
    model, schedule = gg.from_diffusers(module, _scheduler("unet"))
    g = torch.randn(x_T.shape, dtype=DT, generator=torch.Generator().manual_seed(5))

    def run(batch, extra=True):
        terms = [CASES["pag-unet"]()[1]] + ([gg.LookAhead(g, 1.0, sigma=0.5)] if extra else [])
        return gg.sample(model, x_T.shape, schedule=schedule, steps=STEPS, x_T=x_T.clone(), cond=cond, guidance=terms,
                         execution=gg.Execution(batch_branches=batch))
    got, ref = run(True), run(False)
    assert (got - ref).abs().max() <= 1e-6 * max(1.0, ref.abs().max().item())
    assert (got - run(True, extra=False)).abs().max() > 1e-3


@pytest.mark.parametrize("projection", [None, "A"])
@pytest.mark.parametrize("name", ["pag-unet", "slg-unet-blocks"])
def test_classifier_and_g_loss_move_their_objective_next_to_a_perturbed_guider(name, projection):
    """Classifier guidance (log p = <d, x_t>) and G_loss (gᵀx̂_0 towards a target) next to PAG / SLG, with
    and without PixelAsParam policy A over the guider's differences: each run moves its objective
    from where the guider alone ends (every sample)."""
    module = _unet()
    x_T = _x_T("unet")
    cond, _ = _inputs("unet")
    model, schedule = gg.from_diffusers(module, _scheduler("unet"))
    d = torch.randn(x_T.shape, dtype=DT, generator=torch.Generator().manual_seed(7))

    def run(extra):
        proj = None if projection is None or not extra else gg.PixelAsParam(projection)
        with torch.no_grad():
            return gg.sample(model, x_T.shape, schedule=schedule, steps=STEPS, x_T=x_T.clone(), cond=cond,
                             guidance=[CASES[name]()[1]] + extra, projection=proj)

    def objective(x):
        return (d * x).flatten(1).sum(1)
    alone = run([])
    base = objective(alone)
    up = run([gg.Classifier(lambda x, t, **_: (d * x).flatten(1).sum(1), 2.0)])
    assert bool((objective(up) > base + 0.5).all()), (objective(up), base)
    target = base + 3.0
    looked = run([gg.LookAhead(d, target, sigma=0.5)])
    assert bool(((objective(looked) - target).abs() < 0.9 * (base - target).abs()).all()), (objective(looked), target)


def test_hooks_removed_and_row_selection_direct(monkeypatch):
    """After sampling the model is unchanged, and the model was searched for the modules to hook once
    per run (not per call); inside the context the perturbed rows (and only they) equal a perturbed
    call of their own."""
    from gradguide.guidance import perturb
    module = _unet()
    cond, uncond = _inputs("unet")
    x = _x_T("unet")
    t = torch.tensor(400)
    searches = []
    find = perturb._hooked_modules
    monkeypatch.setattr(perturb, "_hooked_modules", lambda *a: searches.append(1) or find(*a))
    with torch.no_grad():
        before = _call(module, x, t, cond)
        gradguide_run(module, "unet", CASES["pag-unet"]()[1], x.clone())
        assert len(searches) == 1
        assert torch.equal(_call(module, x, t, cond), before)
        assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in module.modules())
        skip = gg.LayerSkip(LayerSkipConfig([0], fqn=MID))
        with layer_skip(LayerSkipConfig([0], fqn=MID))(module):
            alone = _call(module, x, t, cond)
        both = {k: torch.cat([uncond[k], cond[k], cond[k]]) for k in cond}
        with skip.applied(module, RowSpan(2 * B, 3 * B, 3 * B), "test"):
            out = _call(module, torch.cat([x, x, x]), t, both)
    assert (alone - before).abs().max() > 1e-3
    assert (out[2 * B:] - alone).abs().max() <= 1e-12
    assert (out[B:2 * B] - before).abs().max() <= 1e-12
    assert (out[:B] - _call(module, x, t, uncond).detach()).abs().max() <= 1e-12


def test_graph_stepper_and_unconditional_pag():
    """The (emulated) CUDA-graph stepper captures one step per variant (which branches run) and
    replays it with the hooks; PAG with CFG off guides a model without conditioning inputs."""
    from gradguide.graphs import GraphCache
    kind, term, _, _, _, _ = CASES["pag-unet-window-original-rescale"]()
    module = _unet()
    x_T = _x_T(kind)
    cache = GraphCache(emulate=True)
    with torch.no_grad():
        eager = gradguide_run(module, kind, term, x_T.clone())
        cond, _ = _inputs(kind)
        model, schedule = gg.from_diffusers(module, _scheduler(kind))
        got = gg.sample(model, x_T.shape, schedule=schedule, steps=STEPS, x_T=x_T.clone(), cond=cond,
                        guidance=CASES["pag-unet-window-original-rescale"]()[1],
                        execution=gg.Execution(graph=cache))
    assert cache.captures == len({term.for_steps(STEPS).variant(i) for i in range(STEPS)}) >= 2
    assert (got - eager).abs().max() <= 1e-12
    # a later run with new conditioning values reuses the captures and reads the new values
    new_cond = {"encoder_hidden_states": cond["encoder_hidden_states"].flip(0) * 2}
    before = cache.captures
    with torch.no_grad():
        replayed = gg.sample(model, x_T.shape, schedule=schedule, steps=STEPS, x_T=x_T.clone(), cond=new_cond,
                             guidance=CASES["pag-unet-window-original-rescale"]()[1], execution=gg.Execution(graph=cache))
        direct = gg.sample(model, x_T.shape, schedule=schedule, steps=STEPS, x_T=x_T.clone(), cond=new_cond,
                           guidance=CASES["pag-unet-window-original-rescale"]()[1])
    assert cache.captures == before and cache.reuses == 1
    assert (replayed - direct).abs().max() <= 1e-12 and (replayed - got).abs().max() > 1e-3
    # unconditional: scale 1 (CFG's identity), no cond; the model gets one fixed text embedding
    fixed = _inputs(kind)[0]["encoder_hidden_states"][:1]
    unconditional = lambda x, t: model(x, t, encoder_hidden_states=fixed.expand(x.shape[0], -1, -1))   # noqa: E731
    pag = gg.PAG(1.0, 3.0, config=LayerSkipConfig([0], fqn=MID), perturbed_start=0.0, perturbed_stop=1.0,
                 denoiser=module)
    with torch.no_grad():
        out = gg.sample(unconditional, x_T.shape, schedule=schedule, steps=STEPS, x_T=x_T.clone(), guidance=pag)
        cond_only = gg.sample(unconditional, x_T.shape, schedule=schedule, steps=STEPS, x_T=x_T.clone())
    assert (out - cond_only).abs().max() > 1e-3
    with pytest.raises(ValueError, match="PAG needs a conditional model"):
        gg.sample(unconditional, x_T.shape, schedule=schedule, steps=STEPS, x_T=x_T.clone(),
                  guidance=gg.PAG(2.0, 3.0, config=LayerSkipConfig([0], fqn=MID), denoiser=module))


# -- LTX-2's guider: four branches, on x̂_0 ------------------------------------------------------------

class Flagged(torch.nn.Module):
    """A class-conditional ε model (bounded x̂_0) with two perturbation flags: a forward input and a
    module attribute (set by a Custom perturbation)."""

    def __init__(self, abar):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(4, 4, generator=g, dtype=DT) * 0.6)
        self.emb = torch.nn.Parameter(torch.randn(3, 4, generator=g, dtype=DT))
        self.abar, self.isolate, self.calls = abar.to(DT), False, []

    def forward(self, x, t, class_labels=None, stg=False, return_dict=True):
        self.calls.append(x.shape[0])
        h = torch.einsum("oc,bchw->bohw", self.w, x) + self.emb[class_labels].view(-1, 4, 1, 1)
        d = torch.tanh(h if not stg else 0.5 * h) + (0.2 * x if self.isolate else 0.0)
        abar = self.abar[t.long()].view(-1, 1, 1, 1)
        return ((x - abar.sqrt() * d) / (1 - abar).sqrt(),)


@contextlib.contextmanager
def _isolate(module):
    module.isolate = True
    try:
        yield
    finally:
        module.isolate = False


@pytest.mark.parametrize("rescale", [0.0, 0.5])
def test_ltx2_matches_diffusers(rescale):
    sched = _scheduler("unet")
    module = Flagged(sched.alphas_cumprod)
    y, null = torch.tensor([0, 1]), torch.tensor([2, 2])
    x = _x_T("unet")
    guider = dg.LTX2Guidance(guidance_scale=3.0, stg_scale=1.5, modality_scale=2.0, guidance_rescale=rescale,
                             start=0.125, stop=0.875)
    term = gg.LTX2(3.0, stg_scale=1.5, modality_scale=2.0, guidance_rescale=rescale, start=0.125, stop=0.875,
                   stg=gg.Inputs(stg=True), modality=gg.Custom(_isolate), uncond={"class_labels": null})
    with torch.no_grad():
        model, schedule = gg.from_diffusers(module, _scheduler("unet"))
        got = gg.sample(model, x.shape, schedule=schedule, steps=STEPS, x_T=x.clone(), cond={"class_labels": y},
                        guidance=term)
        # inside the window [1, 7): uncond and cond in one call, the two flag perturbations a call each
        assert module.calls == [B] + [2 * B, B, B] * 6 + [B]
        sched.set_timesteps(STEPS)
        sched.alphas_cumprod = sched.alphas_cumprod.double()
        sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
        ref = x.clone()
        for i, t in enumerate(sched.timesteps):
            guider.set_state(step=i, num_inference_steps=STEPS, timestep=t)
            a = sched.alphas_cumprod[t]
            tt = t.expand(B)
            def x0(eps):   # LTX-2's guider acts on x̂_0
                return (ref - (1 - a).sqrt() * eps) / a.sqrt()

            def isolated():
                with _isolate(module):
                    return x0(module(ref, tt, y)[0])
            x0_pred, _ = guider_call(guider, {
                "pred_cond": lambda: x0(module(ref, tt, y)[0]), "pred_uncond": lambda: x0(module(ref, tt, null)[0]),
                "pred_cond_stg": lambda: x0(module(ref, tt, y, stg=True)[0]), "pred_cond_modality": isolated})
            ref = sched.step((ref - a.sqrt() * x0_pred) / (1 - a).sqrt(), t, ref, return_dict=False)[0]
        plain = gg.sample(model, x.shape, schedule=schedule, steps=STEPS, x_T=x.clone(), cond={"class_labels": y},
                          guidance=gg.CFG(3.0, uncond={"class_labels": null}))
    assert (got - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
    assert (got - plain).abs().max() > 1e-3


# -- the fused step ----------------------------------------------------------------------------------------

def _ltx2_case():
    module = Flagged(_scheduler("unet").alphas_cumprod)
    term = gg.LTX2(3.0, stg_scale=1.5, modality_scale=2.0, start=0.125, stop=0.875, stg=gg.Inputs(stg=True),
                   modality=gg.Custom(_isolate), uncond={"class_labels": torch.tensor([2, 2])})
    return module, term, {"class_labels": torch.tensor([0, 1])}


@pytest.mark.parametrize("name", ["pag-unet", "pag-unet-window-original-rescale", "slg-unet-blocks", "seg-unet-mean",
                                  "autoguidance-unet", "ltx2"])
def test_fused_step_takes_the_branches_as_operands(name):
    """The perturbed guiders' combination is linear in the branch outputs: the fused plan holds one
    linear combine per variant, reading the outputs of the branches that variant's steps call (the
    model calls stay outside the plan), and equals the general step. Steps whose active branches differ
    (CFG / perturbed windows) are different variants. Guidance rescale takes inner products outside a
    fused program: that run takes the general step, and says so."""
    from gradguide import sampling
    if name == "ltx2":
        module, _, cond = _ltx2_case()
        term = lambda: _ltx2_case()[1]   # noqa: E731
    else:
        module = _unet()
        cond = _inputs("unet")[0]
        term = lambda: CASES[name]()[1]  # noqa: E731
    model, schedule = gg.from_diffusers(module, _scheduler("unet"))
    x_T = _x_T("unet")
    out, runs = {}, {}
    for fused in (True, False):
        runs[fused] = sampling.prepare_run(model, x_T.shape, schedule=schedule, steps=STEPS, cond=cond, guidance=term(),
                                           execution=gg.Execution(fused=fused))
        with torch.no_grad():
            out[fused] = gg.sample(model, x_T.shape, schedule=schedule, steps=STEPS, x_T=x_T.clone(), cond=cond,
                                   guidance=term(), execution=gg.Execution(fused=fused))
    run = runs[True]
    assert (out[True] - out[False]).abs().max() <= 1e-12 * max(1.0, out[False].abs().max().item())
    if term().guidance_rescale > 0:
        assert run.plan is None and "inner product outside a fused program" in run.fused_reason
        assert "rescale" in run.fused_reason
        return
    assert run.plan is not None, run.fused_reason
    bound = run.branch
    branches = [tuple(b.name for b in bound.step_branches(i)) for i in range(STEPS)]
    assert len(set(branches)) >= 2                      # the windows switch branches on and off
    assert len(run.plan.variants) == len({bound.variant(i) for i in range(STEPS)})
    for i in range(STEPS):
        variant = run.plan.variants[run.plan.keys[i]]
        assert [st.policy for st in variant.stages] == ["linear"]
        # the operands: x and exactly the outputs of the branches this step calls
        assert set(variant.inputs) == {"x"} | {f"model_{b}" for b in branches[i]}, (i, variant.inputs)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_fused_perturbed_step_on_the_kernels(backend):
    """PAG's fused step on the native and (interpreted) Triton kernels equals the general step on the
    reference backend: every step one fused combine of the kernel, over the branch outputs it called."""
    if gg.ops.available_backends("cpu")[backend] is not True:
        pytest.skip(f"{backend} not available")
    module = _unet()
    cond = _inputs("unet")[0]
    model, schedule = gg.from_diffusers(module, _scheduler("unet"))
    x_T = _x_T("unet")
    calls = []
    kernels = gg.ops.triton_backend if backend == "triton" else gg.ops.native_backend
    real = kernels.fused_combine

    def spy(policy, *args, **kwargs):
        calls.append(policy)
        return real(policy, *args, **kwargs)

    def run(backend, fused):
        with torch.no_grad():
            return gg.sample(model, x_T.shape, schedule=schedule, steps=STEPS, x_T=x_T.clone(), cond=cond,
                             guidance=CASES["pag-unet"]()[1], execution=gg.Execution(backend=backend, fused=fused))
    want = run("reference", False)
    kernels.fused_combine = spy
    try:
        got = run(backend, True)
    finally:
        kernels.fused_combine = real
    assert calls == ["linear"] * STEPS
    assert (got - want).abs().max() <= 1e-10 * max(1.0, want.abs().max().item())


# -- refusals ----------------------------------------------------------------------------------------

def test_refusals():
    cond, uncond = _inputs("sd3")
    module = _sd3()
    model, schedule = gg.from_diffusers(module, _scheduler("sd3"))
    with pytest.raises(ValueError, match=r"PAG: diffusers' hook cannot be applied .*not registered"):
        gg.sample(model, (B, 4, 8, 8), schedule=schedule, steps=4, cond=cond,
                  guidance=gg.PAG(3.0, 2.0, layers=[1], perturbed_start=0.0, perturbed_stop=1.0, uncond=uncond),
                  execution=gg.Execution(dtype=DT))
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in module.modules())
    with pytest.raises(ValueError, match=r"AutoGuidance: config\[0\].dropout=0.5: .*random"):
        gg.AutoGuidance(2.0, layers=[1], dropout=0.5)
    with pytest.raises(ValueError, match="AutoGuidance: dropout: diffusers requires it"):
        gg.AutoGuidance(2.0, layers=[1])
    with pytest.raises(ValueError, match="SLG: pass exactly one of layers="):
        gg.SLG(2.0, layers=[1], config=LayerSkipConfig([1]))
    with pytest.raises(ValueError, match="SLG: pass exactly one of layers="):
        gg.SLG(2.0)
    with pytest.raises(TypeError, match="PAG: layers: expected a block index"):
        gg.PAG(2.0, layers="7")
    # diffusers' guiders build LayerSkipConfig(i) with an int index, which its hooks cannot iterate
    assert gg.LayerSkip(LayerSkipConfig(3)).configs[0].indices == [3]
    with pytest.raises(TypeError, match=r"SLG: config\[0\].indices: expected a block index"):
        gg.SLG(2.0, config=LayerSkipConfig([-1]))
    with pytest.raises(ValueError, match="SEG: blur_sigma: expected a value > 0"):
        gg.SEG(2.0, layers=[0], blur_sigma=0.0)
    with pytest.raises(ValueError, match="SLG: expected 0 <= perturbed_start < 1"):
        gg.SLG(2.0, layers=[1], perturbed_start=0.5, perturbed_stop=0.2)
    with pytest.raises(ValueError, match="PAG: convention"):
        gg.PAG(2.0, layers=[1], convention="paper")
    with pytest.raises(ValueError, match=r"LTX2: stg: the stg term is on"):
        gg.LTX2(2.0, stg_scale=1.0)
    with pytest.raises(TypeError, match=r"LTX2: stg: expected a gradguide perturbation"):
        gg.LTX2(2.0, stg_scale=1.0, stg=lambda m: None)
    with pytest.raises(TypeError, match=r"PAG: the model is a function"):
        gg.sample(lambda x, t, **k: x, (B, 4, 8, 8), schedule=gg.Schedule.linear(1000), steps=2, cond=cond,
                  guidance=gg.PAG(3.0, 2.0, layers=[1], perturbed_start=0.0, uncond=uncond))
    # the same keys, but a value that is not a tensor differs between the branches: cannot stack
    cond_j, uncond_j = dict(cond, joint_attention_kwargs=None), dict(uncond, joint_attention_kwargs={})
    with pytest.raises(ValueError, match=r"execution.batch_branches=True: SLG's two branches .*joint_attention_kwargs"):
        gg.sample(model, (B, 4, 8, 8), schedule=schedule, steps=2, cond=cond_j,
                  guidance=gg.SLG(3.0, 2.0, layers=[1], uncond=uncond_j),
                  execution=gg.Execution(dtype=DT, batch_branches=True))
    # "auto": then one call per branch (2 at step 0, 3 inside the perturbed window 0 < i < 4)
    calls, handle = _count_calls(module)
    gg.sample(model, (B, 4, 8, 8), schedule=schedule, steps=4, cond=cond_j,
              guidance=gg.SLG(3.0, 2.0, layers=[1], perturbed_start=0.0, perturbed_stop=1.0, uncond=uncond_j),
              execution=gg.Execution(dtype=DT))
    handle.remove()
    assert calls == [B] * 11


# -- Flux: whole-block skips in the block's own stream order; what diffusers cannot do is refused ---------

def _flux():
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                  axes_dims_rope=(2, 2, 4)).to(DT).eval()


def _flux_call(flux, x, ehs, pooled):
    s, t = x.shape[1], ehs.shape[1]
    img_ids = torch.stack([torch.zeros(s), torch.arange(s) // 4, torch.arange(s) % 4], 1)
    return flux(x, encoder_hidden_states=ehs, pooled_projections=pooled, timestep=torch.full((x.shape[0],), 0.5),
                img_ids=img_ids, txt_ids=torch.zeros(t, 3), return_dict=False)[0]


@pytest.mark.parametrize("stack", ["transformer_blocks", "single_transformer_blocks"])
def test_flux_block_skip_rows(stack):
    """A skipped Flux block (either stack) passes both streams on in the block's own order — equal to the
    model with that block's forward replaced by one returning its inputs — on the perturbed rows of a
    batched call only. diffusers' own hook swaps the streams there."""
    flux = _flux()
    g = torch.Generator().manual_seed(4)
    x, ehs, pooled = (torch.randn(B, 16, 8, generator=g, dtype=DT), torch.randn(B, 5, 16, generator=g, dtype=DT),
                      torch.randn(B, 8, generator=g, dtype=DT))
    block = getattr(flux, stack)[0]
    with torch.no_grad():
        base = _flux_call(flux, x, ehs, pooled)
        with layer_skip(LayerSkipConfig([0], fqn=stack))(flux):
            try:   # diffusers' hook: the streams swapped, a shape error or an output of the text's length
                wrong = _flux_call(flux, x, ehs, pooled).shape
            except RuntimeError:
                wrong = None
        assert wrong != base.shape
        forward = block.forward
        block.forward = lambda hidden_states, encoder_hidden_states, *a, **k: (encoder_hidden_states, hidden_states)
        try:
            skipped = _flux_call(flux, x, ehs, pooled)
        finally:
            block.forward = forward
        with gg.LayerSkip(LayerSkipConfig([0], fqn=stack)).applied(flux, RowSpan(B, 2 * B, 2 * B), "SLG"):
            both = _flux_call(flux, torch.cat([x, x]), torch.cat([ehs, ehs]), torch.cat([pooled, pooled]))
    assert (skipped - base).abs().max() > 1e-3
    assert (both[B:] - skipped).abs().max() <= 1e-12 and (both[:B] - base).abs().max() <= 1e-12
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in flux.modules())


def test_flux_refusals():
    flux = _flux()
    rows = RowSpan(0, B, B)
    with pytest.raises(ValueError, match=r"SLG: fqn='auto' is ambiguous on FluxTransformer2DModel"):
        with gg.LayerSkip(LayerSkipConfig([0], fqn="auto")).applied(flux, rows, "SLG"):
            pass
    pag = gg.PAG(3.0, 2.0, config=LayerSkipConfig([0], fqn="transformer_blocks")).perturbation
    with pytest.raises(ValueError, match=r"PAG: diffusers' hook cannot be applied to FluxTransformer2DModel .*"
                                         r"is_cross_attention"):
        with pag.applied(flux, rows, "PAG"):
            pass
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in flux.modules())
