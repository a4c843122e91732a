"""The models a sharded run samples (see :mod:`gradguide.tools.sharded`): the embedded analytic
ones or a user's ``module:function``, and the guidance built around them."""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

from .config import SampleConfig

# -- models -----------------------------------------------------------------------------------

@dataclasses.dataclass
class LoadedModel:
    """A model and what the run needs around it."""
    model: Callable
    schedule: Any
    shape: Tuple[int, ...]
    cond: Callable[[np.ndarray, torch.device], dict]      # sample indices -> model inputs
    classifier: Optional[Callable] = None                 # log p(y | x_t), [B]
    uncond: Optional[dict] = None                         # CFG's unconditional inputs


def load_model(config: SampleConfig) -> LoadedModel:
    """The embedded analytic models or a user's ``module:function``.

    The function is called with no arguments and returns a model, a ``(model, schedule)``
    pair (e.g. :func:`gradguide.from_diffusers`), or a dict with keys ``model``, and
    optionally ``schedule`` (default: linear, T = 1000), ``shape`` (one sample's shape),
    ``cond`` (a dict of tensors with leading dimension 1, broadcast, or ``n``, indexed by
    sample), ``uncond`` (CFG's unconditional inputs) and ``classifier``
    (``log p(y | x_t, t, **cond)``).
    """
    from gradguide.schedules import Schedule
    if config.model == "mixture":
        from gradguide.experiments.demo_mixture import TARGET_CLASS, default_mixture
        gm = default_mixture(Schedule.linear(1000))
        label = TARGET_CLASS if config.class_label is None else config.class_label
        if not 0 <= label < gm.num_classes:
            raise ValueError(f"class_label: the mixture has classes 0..{gm.num_classes - 1}, got {label}")
        conditional = config.conditional or config.cfg is not None or config.projection == "A"
        model = gm if conditional else (lambda x, t, **_: gm(x, t))
        cond = lambda idx, device: {"y": torch.full((len(idx),), label, dtype=torch.int64, device=device)}
        return LoadedModel(model, gm.schedule, (gm.dim,), cond,
                           classifier=lambda x, t, y: gm.log_prob_class(x, t, y))
    if config.model == "subspace":
        from gradguide.experiments.analytic import SubspaceGaussian
        sg = SubspaceGaussian.random(Schedule.cosine(200), D=64, d=16, seed=0)
        return LoadedModel(sg, sg.schedule, (64,), lambda idx, device: {})
    return _load_user(config)


def _load_user(config: SampleConfig) -> LoadedModel:
    from gradguide.schedules import Schedule
    module_name, _, func_name = config.model.partition(":")
    if not module_name or not func_name:
        raise ValueError(f"model: expected 'module:function', got {config.model!r}")
    if os.getcwd() not in sys.path:  # let users point at a file in the working directory
        sys.path.insert(0, os.getcwd())
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"model: cannot load {config.model!r}: {exc}") from exc
    got = func()
    spec: Dict[str, Any]
    if isinstance(got, dict):
        spec = dict(got)
    elif isinstance(got, tuple) and len(got) == 2:
        spec = {"model": got[0], "schedule": got[1]}
    else:
        spec = {"model": got}
    unknown = set(spec) - {"model", "schedule", "shape", "cond", "uncond", "classifier"}
    if unknown or "model" not in spec or not callable(spec["model"]):
        raise ValueError(f"model: {config.model!r} must return a model, (model, schedule) or a dict with a callable "
                         f"'model' and optional schedule/shape/cond/uncond/classifier; got keys {sorted(spec)}")
    model = spec["model"]
    schedule = spec.get("schedule") or Schedule.linear(1000)
    if not isinstance(schedule, Schedule):
        raise TypeError(f"model: {config.model!r} returned a schedule of type {type(schedule).__name__}, "
                        "expected a gradguide.Schedule")
    shape = config.shape or spec.get("shape") or getattr(model, "sample_shape", None)
    if shape is None:
        raise ValueError(f"shape: {config.model!r} gives no sample shape; pass --shape, e.g. --shape 3,32,32")
    shape = tuple(int(s) for s in shape)
    user_cond = spec.get("cond") or {}

    def cond(idx: np.ndarray, device) -> dict:
        out = {}
        for key, value in user_cond.items():
            value = torch.as_tensor(value)
            if value.shape[0] == 1:
                value = value.expand(len(idx), *value.shape[1:])
            elif value.shape[0] == config.n:
                value = value[torch.as_tensor(idx)]
            else:
                raise ValueError(f"cond[{key!r}]: leading dimension must be 1 or n = {config.n}, got {value.shape[0]}")
            out[key] = value.to(device)
        return out
    return LoadedModel(model, schedule, shape, cond, classifier=spec.get("classifier"), uncond=spec.get("uncond"))


def _guidance(config: SampleConfig, loaded: LoadedModel):
    from gradguide.tools.guidance_spec import build
    if config.classifier_scale is not None and loaded.classifier is None:
        raise ValueError(f"classifier_scale: model {config.model!r} has no classifier")
    spec = [("cfg", config.cfg)] if config.cfg is not None else []
    spec += [("classifier", config.classifier_scale)] if config.classifier_scale is not None else []
    return build(spec, config.projection, uncond=loaded.uncond, classifier=loaded.classifier)


def _clip(config: SampleConfig):
    """``Sampler.clip``: ``None`` for "auto" (the schedule's, e.g. a diffusers scheduler's
    ``clip_sample``), ``False`` for off, else the symmetric range."""
    if config.clip in (None, "none"):
        return False
    if config.clip == "auto":
        return None
    r = float(config.clip)  # validated by SampleConfig.check
    return (-r, r)
