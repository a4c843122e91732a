"""One guidance factory for the harness: a spec (term names, optional scales, a projection name)
plus the model-side inputs a term needs (a classifier, a reward gradient, a decoder, ...) become
the ``guidance`` and ``projection`` arguments of :func:`gradguide.sample`.

The dry run, the fuzzer, the benchmark workloads and sharded sampling all build their terms here,
so a name means the same configuration everywhere (``"apg-momentum"`` is APG with momentum −0.5
in every report) and a new term is added to the harness in one table."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from .. import guidance as g
from ..projection import PixelAsParam

# name -> (default scale, constructor(scale, inputs, options)); a scale of None: the term has none
_TERMS: Dict[str, Tuple[Any, Callable]] = {
    "cfg": (4.0, lambda s, i, o: g.CFG(s, uncond=i.get("uncond"), **o)),
    "classifier": (1.0, lambda s, i, o: g.Classifier(_need(i, "classifier", "classifier"), s, **o)),
    "G": (None, lambda s, i, o: g.NaiveGradient(_need(i, "G", "gradient"), _need(i, "G", "target"), **o)),
    "G_loss": (None, lambda s, i, o: g.LookAhead(_need(i, "G_loss", "gradient"), _need(i, "G_loss", "target"), **o)),
    "dps": (None, lambda s, i, o: g.DPS(_need(i, "dps", "operator"), _need(i, "dps", "measurement"), **o)),
    "apg": (4.0, lambda s, i, o: g.APG(s, uncond=i.get("uncond"), **o)),
    # a running average of Δ carried between steps (state: the general step, not the fused one)
    "apg-momentum": (4.0, lambda s, i, o: g.APG(s, uncond=i.get("uncond"), **{"momentum": -0.5, **o})),
    "rescale": (4.0, lambda s, i, o: g.Rescale(s, uncond=i.get("uncond"), **o)),
    "cfg-zero*": (4.0, lambda s, i, o: g.CFGZeroStar(s, uncond=i.get("uncond"), **{"zero_init_steps": 1, **o})),
    "cfg++": (0.5, lambda s, i, o: g.CFGPlusPlus(s, uncond=i.get("uncond"), **o)),
    "tcfg": (4.0, lambda s, i, o: g.TCFG(s, **o)),
    "mambo-g": (4.0, lambda s, i, o: g.MamboG(s, **{"alpha": 2.0, **o})),
    # the APG phase (with momentum) from the second step on
    "apg-mix": (3.5, lambda s, i, o: g.APGMix(s, **{"apg_scale": 6.0, "apg_start_step": 0, **o})),
    "fdg": ((6.0, 3.0), lambda s, i, o: g.FDG(list(s), **o)),
    # G_loss through a decoder: x̂_0 is decoded before the linearised reward is applied
    "G_loss-decoded": (None, lambda s, i, o: g.DecodedLookAhead(
        _need(i, "G_loss-decoded", "decode"), _need(i, "G_loss-decoded", "gradient"), i.get("offset", 0.0), **o)),
}
GUIDANCE = ("none",) + tuple(_TERMS)
PROJECTIONS = ("none", "A", "B", "C", "pcgrad")
INPUTS = ("uncond", "classifier", "gradient", "target", "offset", "decode", "operator", "measurement")

TermSpec = Union[str, Tuple[str, Any]]


def _need(inputs: dict, name: str, key: str):
    if inputs.get(key) is None:
        raise ValueError(f"guidance: {name!r} needs the input {key!r}")
    return inputs[key]


def guidance_terms(guidance: Union[TermSpec, Sequence[TermSpec], None], *,
                   options: Optional[Dict[str, dict]] = None, **inputs) -> List[g.GuidanceTerm]:
    """The terms of ``guidance``: a name of :data:`GUIDANCE`, a ``(name, scale)`` pair, or a
    sequence of them (``None``, ``"none"`` and ``()``: no term). A name's scale defaults to the
    harness's (4 for the CFG family); ``options[name]``: further constructor keywords;
    ``inputs``: what the terms read from the model side (:data:`INPUTS`)."""
    unknown = set(inputs) - set(INPUTS)
    if unknown:
        raise TypeError(f"guidance_terms: unknown inputs {sorted(unknown)}; expected some of {INPUTS}")
    if guidance is None:
        guidance = []
    elif isinstance(guidance, str) or _is_pair(guidance):
        guidance = [guidance]
    options = dict(options or {})
    if set(options) - set(_TERMS):
        raise ValueError(f"options: unknown terms {sorted(set(options) - set(_TERMS))}")
    terms = []
    for spec in guidance:
        name, scale = (spec, None) if isinstance(spec, str) else spec
        if name == "none":
            continue
        if name not in _TERMS:
            raise ValueError(f"guidance: expected one of {GUIDANCE}, got {name!r}")
        default, make = _TERMS[name]
        if scale is not None and default is None:
            raise ValueError(f"guidance: {name!r} takes no scale, got {scale!r}")
        terms.append(make(default if scale is None else scale, inputs, dict(options.get(name, {}))))
    return terms


def _is_pair(spec) -> bool:
    return isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and not isinstance(spec[1], str)


def projection(name: Optional[str], granularity: Optional[str] = None) -> Optional[PixelAsParam]:
    """PixelAsParam policy ``name`` (``"pcgrad"``: policy A with PCGrad's rule), or ``None`` for
    ``None`` / ``"none"``. ``granularity``: PixelAsParam's (its default when ``None``)."""
    if name in (None, "none"):
        return None
    if name not in PROJECTIONS:
        raise ValueError(f"projection: expected one of {PROJECTIONS}, got {name!r}")
    kw = {} if granularity is None else {"granularity": granularity}
    if name == "pcgrad":
        return PixelAsParam("A", pcgrad=True, **kw)
    return PixelAsParam(name, **kw)


def build(guidance: Union[TermSpec, Sequence[TermSpec], None] = None, projection_name: Optional[str] = None, *,
          granularity: Optional[str] = None, options: Optional[Dict[str, dict]] = None,
          **inputs) -> Tuple[List[g.GuidanceTerm], Optional[PixelAsParam]]:
    """``(guidance terms, projection)`` of a spec: see :func:`guidance_terms` and :func:`projection`."""
    return guidance_terms(guidance, options=options, **inputs), projection(projection_name, granularity)
