"""Noise samplers: callables ``noise_sampler(σ, σ_next)`` returning the standard normal draws of a
noisy step (k-diffusion's interface), passed as the ``noise_sampler`` sampler option.

:class:`BrownianTreeNoiseSampler` draws the increments of one fixed Brownian path (torchsde's
``BrownianTree``; ``pip install torchsde``, an optional dependency): the draw for ``(σ, σ_next)``
is ``(W(σ_next) − W(σ))/√|σ_next − σ|``. Noise over nested intervals is then correlated as the
SDE's is (DPM-Solver++(SDE)'s half step and full step), and the sample depends on the path, not
on the step count, which is why k-diffusion's SDE samplers default to it. With the same seed,
σ range and shape it gives the same draws as k-diffusion's ``BrownianTreeNoiseSampler``, so a
k-diffusion SDE sample can be reproduced exactly.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch


class BrownianTreeNoiseSampler:
    """``BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=None, transform=None)``.

    ``x``: a tensor with the samples' shape, dtype and device (only those are read).
    ``sigma_min``, ``sigma_max``: the range of σ's that will be queried (the smallest positive
    and the largest σ of the run). ``seed``: an integer, or a list of B integers for one
    independent path per sample (the batch dimension is ``x``'s first); ``None`` draws one
    from torch's global generator. ``transform``: maps σ to the tree's time (identity by default).
    """

    def __init__(self, x: torch.Tensor, sigma_min, sigma_max, seed: Optional[Union[int, Sequence[int]]] = None,
                 transform: Optional[Callable] = None):
        try:
            import torchsde
        except ImportError as exc:   # pragma: no cover - exercised only without torchsde
            raise ImportError("BrownianTreeNoiseSampler needs torchsde: pip install torchsde") from exc
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a tensor shaped like the samples, got {type(x).__name__}")
        self.transform = transform if transform is not None else (lambda sigma: sigma)
        t0 = self.transform(torch.as_tensor(sigma_min))
        t1 = self.transform(torch.as_tensor(sigma_max))
        if not bool(t0 != t1):
            raise ValueError(f"sigma_min, sigma_max: expected two different σ's, got {sigma_min!r} and {sigma_max!r}")
        self.sign = 1 if bool(t0 < t1) else -1
        t0, t1 = (t0, t1) if self.sign == 1 else (t1, t0)
        if seed is None:
            seed = int(torch.randint(0, 2 ** 63 - 1, []).item())
        self.batched = isinstance(seed, (list, tuple))
        if self.batched:
            if len(seed) != x.shape[0]:
                raise ValueError(f"seed: a list needs one seed per sample ({x.shape[0]}), got {len(seed)}")
            w0 = torch.zeros_like(x[0])
        else:
            seed, w0 = [seed], torch.zeros_like(x)
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in seed]

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        ta = self.transform(torch.as_tensor(sigma))
        tb = self.transform(torch.as_tensor(sigma_next))
        sign = 1 if bool(ta < tb) else -1
        lo, hi = (ta, tb) if sign == 1 else (tb, ta)
        w = torch.stack([tree(lo, hi) for tree in self.trees]) * (self.sign * sign)
        w = w if self.batched else w[0]
        return w / (tb - ta).abs().sqrt()
