"""Score networks for the linear-subspace simulation of the gradient-guidance paper (docs/mathematics.md#generative-optimisation).

- :class:`UNet1D` — the paper's score network: a 1-D U-Net over the D = 64 vector read as a
  one-channel sequence of length 64, with a sinusoidal time embedding, GroupNorm ResNet blocks
  with weight-standardised convolutions and FiLM (scale, shift) time conditioning, linear
  attention at every resolution, full attention in the middle, channel multipliers
  (1, 2, 4, 8) of a base width 64: about 14.9 M parameters. Written here from the architecture
  facts of the authors' ``simulations/unet_1d.py`` (github ``yukang123/GGDMOptim``), itself a
  1-D port of the ``denoising-diffusion-pytorch`` U-Net. Used for benchmarks and full runs on
  a GPU.
- :class:`SmallScoreNet` — a small MLP ε-network (~60 k parameters) that trains on 2 CPU cores
  in about a minute; its trained weights ship in ``gradguide/weights/`` for the demo and tests.

Both are called ``net(x_t, t)`` with ``x_t`` ``[B, D]`` and integer training timesteps ``t``
``[B]``, and return the ε-prediction ``[B, D]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sin/cos embedding of (integer) timesteps, ``[B, dim]``."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    angle = t.to(torch.float32)[:, None] * freq[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


# -- the paper's 1-D U-Net -----------------------------------------------------------------

class _StdConv1d(nn.Conv1d):
    """Conv1d with weight standardisation (Qiao et al. 2019), paired with GroupNorm."""

    def forward(self, x):
        w = self.weight
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        mean = w.mean(dim=(1, 2), keepdim=True)
        var = w.var(dim=(1, 2), unbiased=False, keepdim=True)
        return F.conv1d(x, (w - mean) * (var + eps).rsqrt(), self.bias, self.stride, self.padding)


class _ChannelNorm(nn.Module):
    """Layer norm over channels of a ``[B, C, N]`` tensor, with a learned gain only."""

    def __init__(self, channels: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x):
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        return (x - mean) * (var + eps).rsqrt() * self.gain


class _ConvNormAct(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int = 8):
        super().__init__()
        self.conv = _StdConv1d(c_in, c_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, c_out)

    def forward(self, x, scale_shift=None):
        x = self.norm(self.conv(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return F.silu(x)


class _ResBlock(nn.Module):
    """Two conv blocks; the time embedding sets a per-channel scale and shift of the first."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int = 8):
        super().__init__()
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.block1 = _ConvNormAct(c_in, c_out, groups)
        self.block2 = _ConvNormAct(c_out, c_out, groups)
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        scale, shift = self.film(F.silu(emb))[:, :, None].chunk(2, dim=1)
        h = self.block2(self.block1(x, (scale, shift)))
        return h + self.skip(x)


class _Attention(nn.Module):
    """Multi-head self-attention over sequence positions; ``linear=True`` is the O(N)
    softmax-kernel variant (softmax of q over features, of k over positions)."""

    def __init__(self, channels: int, heads: int = 4, head_dim: int = 32, linear: bool = True):
        super().__init__()
        self.heads, self.head_dim, self.linear = heads, head_dim, linear
        inner = heads * head_dim
        self.norm = _ChannelNorm(channels)
        self.qkv = nn.Conv1d(channels, 3 * inner, 1, bias=False)
        self.out = nn.Conv1d(inner, channels, 1)
        self.out_norm = _ChannelNorm(channels) if linear else nn.Identity()

    def forward(self, x):
        b, _, n = x.shape
        q, k, v = (z.reshape(b, self.heads, self.head_dim, n) for z in self.qkv(self.norm(x)).chunk(3, dim=1))
        scale = self.head_dim ** -0.5
        if self.linear:
            q = q.softmax(dim=-2) * scale
            k = k.softmax(dim=-1)
            context = torch.einsum("bhdn,bhen->bhde", k, v)
            h = torch.einsum("bhde,bhdn->bhen", context, q)
        else:
            attn = torch.einsum("bhdi,bhdj->bhij", q * scale, k).softmax(dim=-1)
            h = torch.einsum("bhij,bhdj->bhdi", attn, v)
        return x + self.out_norm(self.out(h.reshape(b, -1, n)))


class UNet1D(nn.Module):
    """The paper's 1-D U-Net ε-network (about 14.9 M parameters at ``width=64``)."""

    def __init__(self, dim: int = 64, width: int = 64, mults=(1, 2, 4, 8), groups: int = 8):
        super().__init__()
        if dim % (2 ** (len(mults) - 1)) != 0:
            raise ValueError(f"UNet1D: dim: expected a multiple of {2 ** (len(mults) - 1)}, got {dim}")
        self.dim, self.width = dim, width
        emb_dim = 4 * width
        self.time_mlp = nn.Sequential(nn.Linear(width, emb_dim), nn.GELU(), nn.Linear(emb_dim, emb_dim))
        self.init_conv = nn.Conv1d(1, width, 7, padding=3)
        chans = [width] + [width * m for m in mults]
        pairs = list(zip(chans[:-1], chans[1:]))
        self.downs = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(pairs):
            last = i == len(pairs) - 1
            self.downs.append(nn.ModuleList([
                _ResBlock(c_in, c_in, emb_dim, groups), _ResBlock(c_in, c_in, emb_dim, groups), _Attention(c_in),
                nn.Conv1d(c_in, c_out, 3, padding=1) if last else nn.Conv1d(c_in, c_out, 4, 2, 1)]))
        mid = chans[-1]
        self.mid1 = _ResBlock(mid, mid, emb_dim, groups)
        self.mid_attn = _Attention(mid, linear=False)
        self.mid2 = _ResBlock(mid, mid, emb_dim, groups)
        self.ups = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(reversed(pairs)):
            last = i == len(pairs) - 1
            up = nn.Conv1d(c_out, c_in, 3, padding=1) if last else \
                nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv1d(c_out, c_in, 3, padding=1))
            self.ups.append(nn.ModuleList([
                _ResBlock(c_out + c_in, c_out, emb_dim, groups), _ResBlock(c_out + c_in, c_out, emb_dim, groups),
                _Attention(c_out), up]))
        self.final_block = _ResBlock(2 * width, width, emb_dim, groups)
        self.final_conv = nn.Conv1d(width, 1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"UNet1D: x: expected [B, {self.dim}], got {tuple(x.shape)}")
        emb = self.time_mlp(sinusoidal_embedding(t.reshape(-1).expand(x.shape[0]), self.width))
        h = self.init_conv(x[:, None, :])
        first = h
        skips = []
        for block1, block2, attn, down in self.downs:
            h = block1(h, emb)
            skips.append(h)
            h = attn(block2(h, emb))
            skips.append(h)
            h = down(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for block1, block2, attn, up in self.ups:
            h = block1(torch.cat([h, skips.pop()], dim=1), emb)
            h = attn(block2(torch.cat([h, skips.pop()], dim=1), emb))
            h = up(h)
        h = self.final_block(torch.cat([h, first], dim=1), emb)
        return self.final_conv(h)[:, 0, :]


# -- the small network for the demo and tests -------------------------------------------------

class SmallScoreNet(nn.Module):
    """A residual MLP ε-network for ``D``-dimensional data with a sinusoidal time embedding.

    ``depth`` hidden layers of ``hidden`` units, SiLU, residual connections; small enough
    (~55 k parameters) to train on 2 CPU cores in well under a minute and to ship in the package.

    Given the schedule's ``alphas_cumprod``, the MLP ``F`` is preconditioned as in Karras et al.
    (NeurIPS 2022, "EDM", Table 1) written for VP noise ``x_t = a x_0 + s ε``: with
    ``n² = a²σ_d² + s²``, ``x̂_0 = (aσ_d²/n²) x_t + (sσ_d/n) F(x_t/n, t)`` and
    ``ε̂ = (x_t − a x̂_0)/s``. Input and target of ``F`` then have unit scale at every t, and
    ``ε̂`` has no ``1/s`` blow-up near t = 0, where an unconditioned MLP's small errors otherwise
    throw samples far off the data (we measured mean sample norm ≈ 146 against the data's ≈ 3.9).
    """

    def __init__(self, dim: int = 64, hidden: int = 128, depth: int = 3, emb: int = 32,
                 alphas_cumprod=None, sigma_data: float = 0.5):
        super().__init__()
        self.dim, self.hidden, self.depth, self.emb, self.sigma_data = dim, hidden, depth, emb, float(sigma_data)
        self.inp = nn.Linear(dim + emb, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, dim)
        abar = torch.ones(1) if alphas_cumprod is None else torch.as_tensor(alphas_cumprod, dtype=torch.float32)
        self.register_buffer("alphas_cumprod", abar.clone())
        self.preconditioned = alphas_cumprod is not None

    def config(self) -> dict:
        return {"dim": self.dim, "hidden": self.hidden, "depth": self.depth, "emb": self.emb,
                "sigma_data": self.sigma_data, "preconditioned": self.preconditioned}

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"SmallScoreNet: x: expected [B, {self.dim}], got {tuple(x.shape)}")
        t = t.reshape(-1).expand(x.shape[0])
        e = sinusoidal_embedding(t, self.emb).to(x.dtype)
        if self.preconditioned:
            abar = self.alphas_cumprod.to(x.dtype).index_select(0, t)[:, None]
            a, s, sd2 = abar.sqrt(), (1 - abar).sqrt(), self.sigma_data ** 2
            n = (abar * sd2 + (1 - abar)).sqrt()
            f = self._mlp(x / n, e)
            x0 = (a * sd2 / n ** 2) * x + (s * self.sigma_data / n) * f
            return (x - a * x0) / s
        return self._mlp(x, e)

    def _mlp(self, x, e):
        h = F.silu(self.inp(torch.cat([x, e], dim=1)))
        for layer in self.layers:
            h = h + F.silu(layer(h))
        return self.out(h)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
