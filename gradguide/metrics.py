"""Sample statistics: the off-support ratio of the gradient-guidance paper."""
from __future__ import annotations

import torch


def off_support_ratio(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``r_off(x) = ‖(I − AAᵀ)x‖ / ‖AAᵀx‖`` per sample, for a basis ``A`` with orthonormal columns.

    ``x``: ``[B, D]`` (or ``[B, ...]`` flattened to D); ``basis``: ``[D, d]``. Returns ``[B]``
    (inf where the on-support part is zero).
    """
    if not isinstance(x, torch.Tensor) or not isinstance(basis, torch.Tensor):
        raise TypeError("off_support_ratio: x and basis must be tensors")
    flat = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.unsqueeze(0)
    if basis.dim() != 2 or basis.shape[0] != flat.shape[1]:
        raise ValueError(f"off_support_ratio: basis: expected shape [D={flat.shape[1]}, d], got {tuple(basis.shape)}")
    if basis.device != flat.device:
        raise ValueError(f"off_support_ratio: basis on {basis.device}, x on {flat.device}")
    basis = basis.to(flat.dtype)
    on = (flat @ basis) @ basis.T
    off = flat - on
    return off.norm(dim=1) / on.norm(dim=1)
