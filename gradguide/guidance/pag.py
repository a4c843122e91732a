"""Guiders with a perturbed model branch: diffusers' PAG, SLG (STG), SEG, AutoGuidance and LTX-2's guider.

Each compares the conditional prediction with a *worse* one from the same model evaluated under a
perturbation (:mod:`gradguide.guidance.perturb`: diffusers' own hooks, made row-selective so the
perturbed branch shares the batched model call), on the model's raw output ``p``:

- **PAG / SLG / SEG** (``p_s`` = the conditional inputs under the perturbation): with CFG on at
  step ``i`` (``int(start·N) <= i < int(stop·N)``, ``scale`` not CFG's identity) and the perturbed
  term on (``int(ps·N) < i < int(pe·N)`` — both ends *excluded*, as diffusers has it — and
  ``perturbed_scale ≠ 0``): ``p_u + w (p_c − p_u) + s (p_c − p_s)``; CFG only: ``p_u + w (p_c − p_u)``;
  perturbed only: ``p_s + s (p_c − p_s)``; neither: ``p_c``. ``"diffusers-original"`` anchors at
  ``p_c`` instead of ``p_u`` / ``p_s``. Then ``guidance_rescale`` against ``p_c``.
- **AutoGuidance**: CFG whose unconditional branch (the ``uncond`` inputs, as diffusers feeds it)
  is the perturbed model: ``p_ũ + w (p_c − p_ũ)`` inside the window. Karras et al.'s conditional weak
  model: ``uncond=lambda cond: cond``.
- **LTX2**: ``p_c + (w − 1)(p_c − p_u) + s_stg (p_c − p_stg) + (m − 1)(p_c − p_mod)`` on x̂_0 (LTX-2's
  denoiser converts velocity to x̂_0 before its guider), each term on where its scale is not its
  identity, all inside one ``[int(start·N), int(stop·N))`` window.

Only the branches a step uses are evaluated (diffusers skips them too): no unconditional rows while
CFG is off, no perturbed rows outside the perturbed window.

**Where gradguide differs from diffusers 0.42's modular pipelines** (the guider's ``forward`` is
reproduced; its hook bookkeeping is not): SEG's ``prepare_models`` never counts the batches it
prepares, so its hooks are never applied there and ``p_s = p_c``; in a step with CFG off and the
perturbed term on, PAG/SLG/SEG feed their perturbed slot with the *unconditional* inputs, unperturbed
(the batch count that applies the hooks is never reached). gradguide evaluates the branch the
guider's formula names: the conditional inputs under the perturbation.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

from ..linear import LinComb
from .base import StepContext, _signature_of, check_number
from .perturb import Branch, LayerSkip, Perturbation, SmoothedEnergy, layer_indices
from .window import DiffusersGuider, check_fraction, rescale_against, window_open


def _check_perturbation(value, owner: str, name: str) -> Perturbation:
    if not isinstance(value, Perturbation):
        raise TypeError(f"{owner}: {name}: expected a gradguide perturbation (LayerSkip, SmoothedEnergy, Custom, "
                        f"Inputs), got {type(value).__name__}")
    return value


def strict_window(start: float, stop: float, steps, index: int) -> bool:
    """diffusers' perturbed-term window ``int(start·N) < i < int(stop·N)`` (on when ``N`` is unknown)."""
    if steps is None:
        return True
    return int(start * steps) < index < int(stop * steps)


class _BranchGuider(DiffusersGuider):
    """A guider that names its model branches (:class:`~gradguide.guidance.perturb.Branch`) per step;
    ``sample`` evaluates them (:class:`~gradguide.guidance.perturb.BranchCaller`) and hands the
    outputs to :meth:`combine` as raw predictions ``{name: p}``."""
    denoiser = None

    def all_branches(self):
        raise NotImplementedError(f"{type(self).__name__}.all_branches: each branch guider lists its branches")

    def step_branches(self, index: int):
        raise NotImplementedError(f"{type(self).__name__}.step_branches: each branch guider says which a step uses")

    def differences(self, index: int) -> List[Tuple[str, str, float]]:
        """Step ``index``'s combination as ``[(direction, branch, weight)]``: the guided prediction is
        ``p_c + Σ weight·(p_c − p_branch)`` (empty: guidance off). Each term is an update direction of
        its own for a projection (:meth:`gradguide.PixelAsParam.branch_directions`)."""
        raise NotImplementedError(f"{type(self).__name__}.differences: each branch guider defines its combination")

    def anchored(self, terms: List[Tuple[str, str, float]]) -> List[Tuple[str, str, float]]:
        """diffusers' default anchor is the first active term's branch (``p_b + w (p_c − p_b)``),
        i.e. ``p_c + (w − 1)(p_c − p_b)``; ``"diffusers-original"`` anchors at ``p_c``."""
        if terms and not self.original:
            name, branch, w = terms[0]
            terms = [(name, branch, w - 1.0)] + list(terms[1:])
        return terms

    def combine(self, ctx: StepContext, p: dict) -> Optional[LinComb]:
        terms = self.differences(ctx.index)
        if not terms:                # guidance off this step (a host-side choice)
            return None
        c = p["cond"]
        pred = c
        for _, branch, weight in terms:
            pred = pred + (c - p[branch]) * weight
        return pred

    def directions(self, ctx: StepContext, eps_c: LinComb, eps_u: Optional[LinComb]):
        """``(x̂_0c, [(direction, Δ)])`` with ``x̂_0 = x̂_0c + Σ Δ`` the guided prediction in x̂_0 space
        (``Δ = w (x̂_0c − x̂_0b)``: x̂_0 is affine in the raw output and the weights of
        ``p_c + Σ w (p_c − p_b)`` sum to 1, so the combination carries over term by term)."""
        eps = dict(ctx.branch_eps)
        eps["cond"] = eps_c
        if eps_u is not None:
            eps["uncond"] = eps_u
        x0_c = ctx.x0_of_eps(eps_c)
        return x0_c, [(name, (x0_c - ctx.x0_of_eps(eps[branch])) * weight)
                      for name, branch, weight in self.differences(ctx.index)]

    def graph_signature(self) -> tuple:
        # a perturbation by what it does (its repr: configs, σ, the callable's identity), so a new
        # term with the same settings replays captured steps
        return tuple(sorted((k, repr(v) if isinstance(v, Perturbation) else _signature_of(v))
                            for k, v in vars(self).items()))

    def output_space(self, ctx: StepContext, eps: LinComb) -> LinComb:
        return ctx.output_of_eps(eps)

    def eps_space(self, ctx: StepContext, out: LinComb) -> LinComb:
        return ctx.eps_of_output(out)

    def branches(self, ctx: StepContext, eps_c: LinComb, eps_u: Optional[LinComb]):
        eps = dict(ctx.branch_eps)
        eps["cond"] = eps_c
        if eps_u is not None:
            eps["uncond"] = eps_u
        p = {name: self.output_space(ctx, e) for name, e in eps.items()}
        pred = self.combine(ctx, p)
        if pred is None:             # guidance off this step (a host-side choice)
            return eps_c, None
        if self.guidance_rescale > 0.0:
            pred = rescale_against(ctx.ops, pred, p["cond"], self.guidance_rescale)
        return self.eps_space(ctx, pred), None


class _Perturbed(_BranchGuider):
    """CFG plus a perturbed-conditional term (PAG, SLG, SEG)."""

    def __init__(self, scale, perturbed_scale, perturbation, perturbed_start, perturbed_stop, *, guidance_rescale,
                 start, stop, uncond, convention, denoiser, names=("perturbed_scale", "perturbed_start",
                                                                   "perturbed_stop")):
        super().__init__(scale, start=start, stop=stop, guidance_rescale=guidance_rescale, uncond=uncond,
                         convention=convention)
        owner = type(self).__name__
        self.perturbed_scale = check_number(names[0], perturbed_scale, owner=owner)
        self.perturbed_start = check_fraction(names[1], perturbed_start, owner)
        self.perturbed_stop = check_fraction(names[2], perturbed_stop, owner)
        if self.perturbed_start >= 1.0 or self.perturbed_stop < self.perturbed_start:   # diffusers' checks
            raise ValueError(f"{owner}: expected 0 <= {names[1]} < 1 and {names[1]} <= {names[2]} <= 1, got "
                             f"{perturbed_start}, {perturbed_stop}")
        if self.start >= 1.0 or self.stop < self.start:
            raise ValueError(f"{owner}: expected 0 <= start < 1 and start <= stop <= 1, got {start}, {stop}")
        self.perturbation = perturbation
        self.denoiser = denoiser

    @property
    def needs_cond(self) -> bool:   # with CFG off (scale its identity) the perturbed term guides an unconditional model
        return not self.identity_scale(self.scale)

    def cfg_on(self, index: int) -> bool:
        return window_open(self.start, self.stop, self.steps, index) and not self.identity_scale(self.scale)

    def perturbed_on(self, index: int) -> bool:
        return (strict_window(self.perturbed_start, self.perturbed_stop, self.steps, index)
                and not math.isclose(self.perturbed_scale, 0.0))

    def on(self, index: int) -> bool:
        return self.cfg_on(index) or self.perturbed_on(index)

    def variant(self, index: int):
        return self.cfg_on(index), self.perturbed_on(index)

    def all_branches(self):
        return (Branch("uncond", "uncond"), Branch("cond", "cond"), Branch("perturbed", "cond", self.perturbation))

    def step_branches(self, index: int):
        cfg, pert = self.variant(index)
        return tuple(b for b in self.all_branches() if b.name == "cond" or (b.name == "uncond" and cfg)
                     or (b.name == "perturbed" and pert))

    def differences(self, index: int):
        # diffusers: p_u + w (p_c − p_u) + s (p_c − p_s), CFG only p_u + w (p_c − p_u), perturbed only
        # p_s + s (p_c − p_s); "diffusers-original" anchors each at p_c
        cfg, pert = self.variant(index)
        return self.anchored(([("cfg", "uncond", self.scale)] if cfg else [])
                             + ([(self.name, "perturbed", self.perturbed_scale)] if pert else []))

    def __repr__(self) -> str:
        return (super().__repr__()[:-1] + f", perturbed_scale={self.perturbed_scale}, "
                f"perturbed_start={self.perturbed_start}, perturbed_stop={self.perturbed_stop}, "
                f"perturbation={self.perturbation!r})")


def _skip_configs(layers, config, owner, one_config: bool = False, **fields):
    """diffusers' rule: exactly one of ``layers`` (block indices, ``fqn="auto"``: one config for all
    of them, as PAG builds it, or one per block, as SLG and AutoGuidance do) and ``config``."""
    from diffusers.hooks import LayerSkipConfig
    if (layers is None) == (config is None):
        raise ValueError(f"{owner}: pass exactly one of layers= (block indices) and config= (diffusers "
                         "LayerSkipConfig(s), e.g. with the fqn of a U-Net's transformer blocks)")
    if config is not None:
        return config
    indices = layer_indices(layers, owner, "layers")
    if one_config:
        return [LayerSkipConfig(indices, fqn="auto", **fields)]
    return [LayerSkipConfig([i], fqn="auto", **fields) for i in indices]   # diffusers passes i, not [i], and fails


class PAG(_Perturbed):
    """Perturbed-attention guidance: diffusers' ``PerturbedAttentionGuidance(guidance_scale=scale,
    perturbed_guidance_scale=perturbed_scale, perturbed_guidance_start=, perturbed_guidance_stop=,
    perturbed_guidance_layers=layers | perturbed_guidance_config=config, ...)``. The perturbed branch
    replaces the self-attention scores by the identity (attention output = the values) in the chosen
    blocks, with diffusers' layer-skip hook (``skip_attention_scores=True``; diffusers forces the other
    flags, and so does gradguide). ``layers`` finds the block stack automatically (DiT models);
    U-Nets need ``config=LayerSkipConfig(indices, fqn="mid_block.attentions.0.transformer_blocks")``.
    Attention processors diffusers' hook does not know (SD3's joint attention, in 0.42) are refused
    by the hook, with its message."""
    name = "pag"

    def __init__(self, scale: float = 7.5, perturbed_scale: float = 2.8, *, layers=None, config=None,
                 perturbed_start: float = 0.01, perturbed_stop: float = 0.2, guidance_rescale: float = 0.0,
                 start: float = 0.0, stop: float = 1.0, uncond=None, convention: str = "diffusers", denoiser=None):
        configs = LayerSkip(_skip_configs(layers, config, "PAG", True, skip_attention=False,
                                          skip_attention_scores=True, skip_ff=False), "PAG", "config")
        for c in configs.configs:   # what diffusers' guider sets, whatever the config said
            c.skip_attention, c.skip_attention_scores, c.skip_ff = False, True, False
        super().__init__(scale, perturbed_scale, configs, perturbed_start, perturbed_stop,
                         guidance_rescale=guidance_rescale, start=start, stop=stop, uncond=uncond,
                         convention=convention, denoiser=denoiser)


class SLG(_Perturbed):
    """Skip-layer guidance (and spatio-temporal guidance, STG, the same with video blocks): diffusers'
    ``SkipLayerGuidance(guidance_scale=scale, skip_layer_guidance_scale=perturbed_scale,
    skip_layer_guidance_start=, skip_layer_guidance_stop=, skip_layer_guidance_layers=layers |
    skip_layer_config=config, ...)``. ``layers``: whole blocks skipped (``LayerSkipConfig(i,
    fqn="auto")``); ``config``: any ``LayerSkipConfig`` (attention only, feed-forward only, a U-Net's
    block stack). Defaults are diffusers' (SD 3.5 Medium's: layers 7, 8, 9 in its examples)."""
    name = "slg"

    def __init__(self, scale: float = 7.5, perturbed_scale: float = 2.8, *, layers=None, config=None,
                 perturbed_start: float = 0.01, perturbed_stop: float = 0.2, guidance_rescale: float = 0.0,
                 start: float = 0.0, stop: float = 1.0, uncond=None, convention: str = "diffusers", denoiser=None):
        skip = LayerSkip(_skip_configs(layers, config, "SLG"), "SLG", "config")
        super().__init__(scale, perturbed_scale, skip, perturbed_start, perturbed_stop,
                         guidance_rescale=guidance_rescale, start=start, stop=stop, uncond=uncond,
                         convention=convention, denoiser=denoiser)


class SEG(_Perturbed):
    """Smoothed-energy guidance: diffusers' ``SmoothedEnergyGuidance(guidance_scale=scale,
    seg_guidance_scale=seg_scale, seg_blur_sigma=blur_sigma, seg_guidance_start=seg_start,
    seg_guidance_stop=seg_stop, seg_guidance_layers=layers | seg_guidance_config=config, ...)``: the
    self-attention queries of the chosen blocks blurred over the (square) token grid by diffusers'
    hook (:class:`~gradguide.guidance.perturb.SmoothedEnergy` says what its σ does).
    ``seg_blur_threshold_inf`` is not taken: diffusers' hook never reads it (it uses 9999.9)."""
    name = "seg"

    def __init__(self, scale: float = 7.5, seg_scale: float = 2.8, *, blur_sigma: float = 9999999.0, layers=None,
                 config=None, seg_start: float = 0.0, seg_stop: float = 1.0, guidance_rescale: float = 0.0,
                 start: float = 0.0, stop: float = 1.0, uncond=None, convention: str = "diffusers", denoiser=None):
        from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceConfig
        if (layers is None) == (config is None):
            raise ValueError("SEG: pass exactly one of layers= (block indices) and config= "
                             "(diffusers SmoothedEnergyGuidanceConfig(s))")
        if layers is not None:
            config = [SmoothedEnergyGuidanceConfig([i], fqn="auto") for i in layer_indices(layers, "SEG", "layers")]
        blur = SmoothedEnergy(config, blur_sigma, "SEG", "config")
        super().__init__(scale, seg_scale, blur, seg_start, seg_stop,
                         guidance_rescale=guidance_rescale, start=start, stop=stop, uncond=uncond,
                         convention=convention, denoiser=denoiser, names=("seg_scale", "seg_start", "seg_stop"))
        self.blur_sigma = blur.blur_sigma


class AutoGuidance(_BranchGuider):
    """diffusers' ``AutoGuidance(guidance_scale=scale, auto_guidance_layers=layers |
    auto_guidance_config=config, dropout=1.0, ...)``: CFG against the model with the chosen layers
    skipped, evaluated on the ``uncond`` inputs (diffusers' choice; ``uncond=lambda cond: cond`` for
    the paper's conditional weak model, or a plain ``Perturbation`` such as ``Custom`` for a
    separately trained weak model). ``dropout`` must be 1 (a skip): diffusers' random dropout of a
    layer cannot be reproduced."""
    name = "autoguidance"
    needs_cond = False

    def __init__(self, scale: float = 7.5, *, layers=None, config=None, dropout: Optional[float] = None,
                 perturbation: Optional[Perturbation] = None, guidance_rescale: float = 0.0, start: float = 0.0,
                 stop: float = 1.0, uncond=None, convention: str = "diffusers", denoiser=None):
        super().__init__(scale, start=start, stop=stop, guidance_rescale=guidance_rescale, uncond=uncond,
                         convention=convention)
        if perturbation is not None:
            if layers is not None or config is not None:
                raise ValueError("AutoGuidance: pass perturbation= or layers=/config=, not both")
            self.perturbation = _check_perturbation(perturbation, "AutoGuidance", "perturbation")
        else:
            if layers is not None and dropout is None:
                raise ValueError("AutoGuidance: dropout: diffusers requires it with layers= (1.0: skip the layers)")
            fields = {} if dropout is None else {"dropout": check_number("dropout", dropout, 0.0, 1.0,
                                                                          owner="AutoGuidance")}
            self.perturbation = LayerSkip(_skip_configs(layers, config, "AutoGuidance", **fields),
                                          "AutoGuidance", "config")
        self.denoiser = denoiser

    def all_branches(self):
        return (Branch("uncond", "uncond", self.perturbation), Branch("cond", "cond"))

    def step_branches(self, index: int):
        return self.all_branches() if self.on(index) else (Branch("cond", "cond"),)

    def differences(self, index: int):
        return self.anchored([("autoguidance", "uncond", self.scale)] if self.on(index) else [])

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", perturbation={self.perturbation!r})"


class LTX2(_BranchGuider):
    """LTX-2's guider: diffusers' ``LTX2Guidance(guidance_scale=scale, stg_scale=, modality_scale=,
    guidance_rescale=, start=, stop=)``, combined on x̂_0 as LTX-2's denoiser feeds it. ``stg`` and
    ``modality``: the perturbations of its two extra branches (the conditional inputs): for
    ``LTX2VideoTransformer3DModel`` its own flags, ``Inputs(spatio_temporal_guidance_blocks=[...])``
    and ``Inputs(isolate_modalities=True)`` (a call each); any other perturbation (``LayerSkip``
    shares the batched call). One guider drives one modality's output."""
    name = "ltx2"

    def __init__(self, scale: float = 1.0, *, stg_scale: float = 0.0, modality_scale: float = 1.0,
                 stg: Optional[Perturbation] = None, modality: Optional[Perturbation] = None,
                 guidance_rescale: float = 0.0, start: float = 0.0, stop: float = 1.0, uncond=None, denoiser=None):
        super().__init__(scale, start=start, stop=stop, guidance_rescale=guidance_rescale, uncond=uncond)
        self.stg_scale = check_number("stg_scale", stg_scale, owner="LTX2")
        self.modality_scale = check_number("modality_scale", modality_scale, owner="LTX2")
        self.stg = None if stg is None else _check_perturbation(stg, "LTX2", "stg")
        self.modality = None if modality is None else _check_perturbation(modality, "LTX2", "modality")
        for name, on, given in (("stg", not math.isclose(self.stg_scale, 0.0), self.stg),
                                ("modality", not math.isclose(self.modality_scale, 1.0), self.modality)):
            if on and given is None:
                raise ValueError(f"LTX2: {name}: the {name} term is on ({name}_scale), so pass the perturbation of its "
                                 "branch")
        self.denoiser = denoiser

    def active(self, index: int):
        inside = window_open(self.start, self.stop, self.steps, index)
        return (inside and not math.isclose(self.scale, 1.0), inside and not math.isclose(self.stg_scale, 0.0),
                inside and not math.isclose(self.modality_scale, 1.0))

    def variant(self, index: int):
        return self.active(index)

    def all_branches(self):
        return (Branch("uncond", "uncond"), Branch("cond", "cond"), Branch("stg", "cond", self.stg),
                Branch("modality", "cond", self.modality))

    def step_branches(self, index: int):
        cfg, stg, mod = self.active(index)
        wanted = {"cond", "uncond"} if cfg else {"cond"}
        wanted |= {"stg"} if stg else set()
        wanted |= {"modality"} if mod else set()
        return tuple(b for b in self.all_branches() if b.name in wanted)

    def output_space(self, ctx, eps):
        return ctx.x0_of_eps(eps)

    def eps_space(self, ctx, out):
        return ctx.eps_of_x0(out)

    def differences(self, index: int):
        cfg, stg, mod = self.active(index)
        return ([("cfg", "uncond", self.scale - 1.0)] if cfg else []) \
            + ([("stg", "stg", self.stg_scale)] if stg else []) \
            + ([("modality", "modality", self.modality_scale - 1.0)] if mod else [])

    def __repr__(self) -> str:
        return (f"LTX2(scale={self.scale}, stg_scale={self.stg_scale}, modality_scale={self.modality_scale}, "
                f"stg={self.stg!r}, modality={self.modality!r}, guidance_rescale={self.guidance_rescale}, "
                f"start={self.start}, stop={self.stop})")
