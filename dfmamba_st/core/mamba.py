"""The Mamba block (selective state-space layer) with a time-step scale and clip.

Parameter names follow mamba-ssm's ``Mamba`` module (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``,
``A_log``, ``D``, ``out_proj``) so that weights can be exchanged with it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .scan import Backend, selective_scan

__all__ = ["Mamba"]


class Mamba(nn.Module):
    """Mamba block: in_proj → causal depthwise conv → SiLU → selective scan gated by SiLU(z) → out_proj.

    The time step of the scan is ``Δ = min(softplus(dt_proj(x) + dt_bias) · alpha, dt_max)``, where ``alpha``
    is given per call (DF-Mamba passes ``2**k`` at recursion depth ``k``) and ``dt_max`` is a safety clip.

    Parameters
    ----------
    d_model
        Width of the input and output.
    d_state
        State size ``N`` of the SSM.
    d_conv
        Width of the causal depthwise convolution.
    expand
        ``d_inner = expand * d_model``.
    dt_rank
        Rank of the time-step projection; ``"auto"`` is ``ceil(d_model / 16)``.
    dt_min, dt_max_init
        Range of the log-uniform initial time steps.
    dt_init_floor
        Smallest initial time step (the log-uniform draws are clamped to it before the bias is set).
    dt_max
        Clip of the scaled time step (``None`` for no clip).
    conv_bias
        Bias in the depthwise causal convolution.
    bias
        Bias in the input and output projections.
    bidirectional
        Also run the same block (same weights) over the reversed sequence and average both directions.
    backend
        Scan backend, see :func:`~dfmamba_st.core.selective_scan`.

    Examples
    --------
    >>> import torch
    >>> from dfmamba_st.core import Mamba
    >>> block = Mamba(8, d_state=4)
    >>> block(torch.randn(2, 10, 8)).shape
    torch.Size([2, 10, 8])
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | Literal["auto"] = "auto",
        dt_min: float = 1e-3,
        dt_max_init: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_max: float | None = 8.0,
        conv_bias: bool = True,
        bias: bool = False,
        bidirectional: bool = False,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.dt_max = dt_max
        self.bidirectional = bidirectional
        self.backend = backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

        # Time-step initialisation as in mamba-ssm: weights ~ U(±dt_rank^-0.5), bias = softplus^-1(dt),
        # dt log-uniform in [dt_min, dt_max_init].
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max_init) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

        # S4D-real initialisation: A = -(1, 2, ..., N) for every channel.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))

    def time_step(self, dt: torch.Tensor, alpha: float) -> torch.Tensor:
        """Scaled, clipped time step ``min(softplus(dt + bias) · alpha, dt_max)`` for (batch, d_inner, L) input.

        Computed in float32 at least (as mamba-ssm's kernel computes its softplus), in float64 for float64 input.
        """
        dtype = torch.promote_types(dt.dtype, torch.float32)
        delta = F.softplus(dt.to(dtype) + self.dt_proj.bias[:, None].to(dtype)) * alpha
        if self.dt_max is not None:
            delta = delta.clamp(max=self.dt_max)
        return delta

    def _forward_one_direction(self, hidden: torch.Tensor, alpha: float) -> torch.Tensor:
        length = hidden.shape[1]
        xz = self.in_proj(hidden).transpose(1, 2)  # (b, 2 d_inner, L)
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv1d(x)[..., :length])
        x_dbl = self.x_proj(x.transpose(1, 2))  # (b, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.T).transpose(1, 2)  # (b, d_inner, L)
        delta = self.time_step(dt, alpha)
        # A (and the time step) in float32 at least, as mamba-ssm's kernel takes them; float64 for float64 inputs
        A = -torch.exp(self.A_log.to(torch.promote_types(x.dtype, torch.float32)))
        y = selective_scan(
            x,
            delta,
            A,
            B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(),
            self.D.to(x.dtype),
            z=z,
            backend=self.backend,
        )
        return self.out_proj(y.transpose(1, 2))

    def forward(self, hidden: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """Apply the block to ``hidden`` of shape (batch, L, d_model) with time-step scale ``alpha``."""
        out = self._forward_one_direction(hidden, alpha)
        if self.bidirectional:
            back = self._forward_one_direction(hidden.flip(1), alpha).flip(1)
            out = 0.5 * (out + back)
        return out
