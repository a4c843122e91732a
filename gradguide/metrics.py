"""Sample statistics: the off-support ratio of the gradient-guidance paper."""
from __future__ import annotations

import torch

_REAL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def off_support_ratio(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``r_off(x) = ‖(I − AAᵀ)x‖ / ‖AAᵀx‖`` per sample, for a basis ``A`` with orthonormal columns.

    ``x``: ``[B, D]`` (or ``[B, ...]`` flattened to D; a single sample ``[D]`` gives ``[1]``);
    ``basis``: ``[D, d]``, d ≥ 1. Both real floating tensors on one device. Computed in float64
    (a ``[B, D] × [D, d]`` product: cheap, and the ratio is ill-conditioned where the on-support
    part is small) and returned in float32 (float64 when either input is float64), shape ``[B]``.
    Where the on-support part ``AAᵀx`` is exactly zero the ratio is ``inf`` — including the
    all-zero sample (nothing of it lies in the support); NaN/inf inputs give NaN/inf.
    """
    for name, value in (("x", x), ("basis", basis)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"off_support_ratio: {name}: expected a tensor, got {type(value).__name__}")
        if value.dtype not in _REAL:
            raise TypeError(f"off_support_ratio: {name}: expected a real floating dtype in {_REAL}, got {value.dtype}")
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"off_support_ratio: x: expected a non-empty [B, D] tensor, got shape {tuple(x.shape)}")
    if x.device.type == "meta" or basis.device.type == "meta":
        raise ValueError("off_support_ratio: x: meta tensors hold no values")
    flat = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.unsqueeze(0)
    if basis.dim() != 2 or basis.shape[0] != flat.shape[1] or basis.shape[1] < 1:
        raise ValueError(f"off_support_ratio: basis: expected shape [D={flat.shape[1]}, d] with d >= 1, "
                         f"got {tuple(basis.shape)}")
    if basis.device != flat.device:
        raise ValueError(f"off_support_ratio: basis: on {basis.device}, but x is on {flat.device}")
    out_dtype = torch.float64 if torch.float64 in (x.dtype, basis.dtype) else torch.float32
    flat, basis = flat.to(torch.float64), basis.to(torch.float64)
    on = (flat @ basis) @ basis.T
    off_norm, on_norm = (flat - on).norm(dim=1), on.norm(dim=1)
    ratio = off_norm / torch.where(on_norm == 0, torch.ones_like(on_norm), on_norm)
    return torch.where(on_norm == 0, torch.full_like(ratio, float("inf")), ratio).to(out_dtype)
