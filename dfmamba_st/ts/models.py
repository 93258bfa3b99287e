"""Forecasters: DF-Mamba-TS, ms-Mamba and the DLinear baseline.

Every model maps a lookback ``x`` of shape (batch, seq_len, C) to ``(forecast, aux_loss)`` with the forecast of
shape (batch, horizon, C) and ``aux_loss`` a scalar tensor (zero for models without an auxiliary objective), so
one training loss (:func:`dfmamba_st.ts.forecast_loss`) serves all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .._utils import whole_number
from .._weights import constructor_config
from ..core import DFMamba, Mamba, count_parameters
from ..core.scan import resolve_backend
from .data import window_lengths

__all__ = ["DFMambaTS", "DLinear", "MSMamba", "RevIN", "count_parameters", "scan_backends"]


def _check_input(x: torch.Tensor, seq_len: int, n_variates: int) -> None:
    if x.ndim != 3 or x.shape[1] != seq_len or x.shape[2] != n_variates:
        raise ValueError(f"Expected a lookback of shape (batch, {seq_len}, {n_variates}), got {tuple(x.shape)}.")


def _sizes(n_variates: int, seq_len: int, horizon: int) -> tuple[int, int, int]:
    """The three sizes every forecaster takes, as whole numbers >= 1 (a clear error at construction, not later)."""
    return (whole_number(n_variates, "n_variates"), *window_lengths(seq_len, horizon))


class RevIN(nn.Module):
    """Reversible instance normalisation: standardise each window and variate by its own lookback statistics.

    ``normalize`` stores the per-window mean and std; ``denormalize`` applies them to the forecast.

    Parameters
    ----------
    n_variates
        Number of variates ``C``.
    affine
        Learn a per-variate scale and shift applied after normalising (and undone before denormalising).
    eps
        Added to the variance.

    Examples
    --------
    >>> import torch
    >>> from dfmamba_st.ts import RevIN
    >>> norm = RevIN(3)
    >>> x = torch.randn(2, 10, 3) * 5 + 1
    >>> torch.allclose(norm.denormalize(norm.normalize(x)), x, atol=1e-4)
    True
    """

    def __init__(self, n_variates: int, affine: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(n_variates))
            self.bias = nn.Parameter(torch.zeros(n_variates))
        self._mean: torch.Tensor | None = None
        self._std: torch.Tensor | None = None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, L, C) → normalised (batch, L, C); remembers the statistics."""
        self._mean = x.mean(1, keepdim=True).detach()
        self._std = torch.sqrt(x.var(1, keepdim=True, unbiased=False) + self.eps).detach()
        x = (x - self._mean) / self._std
        if self.affine:
            x = x * self.weight + self.bias
        return x

    def denormalize(self, y: torch.Tensor) -> torch.Tensor:
        """(batch, H, C) in normalised units → original units of the last :meth:`normalize` call."""
        if self._mean is None or self._std is None:
            raise RuntimeError("denormalize called before normalize.")
        if self.affine:
            y = (y - self.bias) / (self.weight + self.eps * self.eps)
        return y * self._std + self._mean


def scan_backends(model: nn.Module, device: torch.device | str | None = None) -> list[str]:
    """The selective-scan backends the Mamba blocks of ``model`` run on ``device``.

    ``"auto"`` is resolved the way :func:`~dfmamba_st.core.selective_scan` resolves it (``numba`` for CPU tensors
    when numba imports), so a benchmark can report what actually ran.

    Parameters
    ----------
    model
        Any module; its :class:`~dfmamba_st.core.Mamba` submodules are inspected.
    device
        Device of the inputs; ``None``: the device of the model's first parameter.

    Returns
    -------
    Sorted distinct backend names; empty for a model without Mamba blocks.

    Examples
    --------
    >>> from dfmamba_st.ts import DLinear, scan_backends
    >>> scan_backends(DLinear(2, 8, 4))
    []
    """
    if device is None:
        device = next(model.parameters()).device
    return sorted({resolve_backend(m.backend, device) for m in model.modules() if isinstance(m, Mamba)})


# ----------------------------------------------------------------------------------------------------------------
# DLinear


class _MovingAverage(nn.Module):
    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, L, C), replicate-padded like DLinear
        front = x[:, :1].repeat(1, (self.kernel_size - 1) // 2, 1)
        end = x[:, -1:].repeat(1, (self.kernel_size - 1) // 2, 1)
        padded = torch.cat([front, x, end], dim=1)
        return F.avg_pool1d(padded.transpose(1, 2), self.kernel_size, stride=1).transpose(1, 2)


class DLinear(nn.Module):
    """DLinear (Zeng et al., AAAI 2023): moving-average decomposition, one linear map per component over time.

    The "shared" variant (one map for all variates, ``individual=False``) with kernel 25, as in the original code;
    no instance normalisation.

    Parameters
    ----------
    n_variates
        Number of variates ``C``.
    seq_len, horizon
        Lookback and forecast lengths.
    kernel_size
        Moving-average window of the trend, odd (the replicate padding keeps the length only for an odd window).
    individual
        One pair of linear maps per variate.

    Examples
    --------
    >>> import torch
    >>> from dfmamba_st.ts import DLinear
    >>> y, aux = DLinear(7, 96, 24)(torch.randn(2, 96, 7))
    >>> tuple(y.shape), float(aux)
    ((2, 24, 7), 0.0)
    """

    def __init__(
        self, n_variates: int, seq_len: int = 96, horizon: int = 96, kernel_size: int = 25, individual: bool = False
    ) -> None:
        super().__init__()
        #: constructor arguments (JSON-serialisable), enough to rebuild the model (see ``ts.save_forecaster``)
        self.config = constructor_config(locals())
        n_variates, seq_len, horizon = _sizes(n_variates, seq_len, horizon)
        kernel_size = whole_number(kernel_size, "kernel_size")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1 (25 in DLinear), got {kernel_size}.")
        self.n_variates, self.seq_len, self.horizon, self.individual = n_variates, seq_len, horizon, individual
        self.decomp = _MovingAverage(kernel_size)
        n_maps = n_variates if individual else 1
        self.seasonal = nn.ModuleList(nn.Linear(seq_len, horizon) for _ in range(n_maps))
        self.trend = nn.ModuleList(nn.Linear(seq_len, horizon) for _ in range(n_maps))
        with torch.no_grad():  # the original initialises both maps to the average
            for lin in (*self.seasonal, *self.trend):
                lin.weight.fill_(1.0 / seq_len)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forecast (batch, horizon, C) from (batch, seq_len, C); the auxiliary loss is zero."""
        _check_input(x, self.seq_len, self.n_variates)
        trend = self.decomp(x)
        seasonal = (x - trend).transpose(1, 2)  # (b, C, L)
        trend = trend.transpose(1, 2)
        if self.individual:
            out = torch.stack(
                [self.seasonal[c](seasonal[:, c]) + self.trend[c](trend[:, c]) for c in range(self.n_variates)], 1
            )
        else:
            out = self.seasonal[0](seasonal) + self.trend[0](trend)
        return out.transpose(1, 2), x.new_zeros(())


# ----------------------------------------------------------------------------------------------------------------
# DF-Mamba-TS


class DFMambaTS(nn.Module):
    """DF-Mamba-TS: instance normalisation, tokens, a DF-Mamba backbone and a linear head.

    Tokenisations (``tokens``):

    * ``"patch"`` (default): channel-independent; each variate is its own sequence of ``seq_len / patch_len``
      tokens, one per non-overlapping patch of ``patch_len`` steps (linear map → ``d_model`` plus a learned position
      embedding); the head flattens the tokens of a variate and maps them linearly to its ``horizon`` values
      (PatchTST's flatten head). With 12 tokens ``min_len`` defaults to 2 so that all ``K = 3`` coarsenings run
      (12 → 6 → 3 → 2). Chosen by measurement (``docs/ts.md``, "Why patch tokens"): on ETTh2-96 (one epoch, one seed)
      a test MSE of 0.296 against 0.306 for time-step tokens, with 5.5× less training CPU time, 4× less inference
      time and half the memory.
    * ``"time"``: channel-independent, one token per time step (value → ``d_model``). With the paper's sizes
      this has 0.662M parameters at ``horizon=96`` on 7 variates, close to the 0.658M reported for ETTm2, which
      suggests it is the paper's layout.
    * ``"mixed"``: one token per time step carrying all variates (``C → d_model``); the head maps time
      (``seq_len → horizon``) then features (``d_model → C``).

    Parameters
    ----------
    n_variates
        Number of variates ``C``.
    seq_len, horizon
        Lookback and forecast lengths.
    d_model, depth, d_state, expand
        DF-Mamba sizes (paper: 64, K = 3, N = 16, 2).
    tokens
        Tokenisation, see above.
    patch_len
        Patch length for ``tokens="patch"`` (must divide ``seq_len``).
    min_len
        DF-Mamba stops recursing below this length; ``None``: 2 for patch tokens, 8 (the core default) otherwise.
    dropout
        Dropout before the head. 0.3 since 2026-12-03 (0.1 before): over three seeds at horizon 96 it gave the lower
        validation MSE on all five benchmarks, by 0.0001–0.0012 (the docs' "Dropout 0.3 as the default").
    revin
        Instance-normalise each window (RevIN, with a learned affine).
    linear_skip
        Add a linear map of each variate's (normalised) lookback to its forecast, one ``seq_len → horizon`` map
        shared by all variates (RLinear's forecaster, beside the DF-Mamba path). Off by default: over three seeds
        at horizon 96 it lowered the mean validation MSE on ETTh1, ETTm1 and (by 0.0002) ETTh2, raised it on ETTm2
        and on weather (+0.019), and on the average of the five (the docs' "A linear path beside DF-Mamba").
    aux_weight
        Multiplier of DF-Mamba's auxiliary loss in the returned ``aux`` term. The paper's model trains with it (the
        default here). ``aux="off"`` (passed on to DF-Mamba) gave a lower test MSE on all five benchmarks at horizon
        96 with one seed each and the defaults of 2026-12-02 (the docs' "Without the auxiliary losses"); over three
        seeds with the current defaults it is lower on ETTm2 and ETTm1 and level on ETTh2 (the docs' "Results
        without the daily profile").
    **dfmamba_kwargs
        Passed to :class:`dfmamba_st.core.DFMamba` (``share_weights``, ``dt_scaling``, ``coarsen``, ``fusion``,
        ``aux``, ``min_len``, ``lambdas``, ``bidirectional``, ``backend``, ...) — the paper's ablation switches.

    Examples
    --------
    >>> import torch
    >>> from dfmamba_st.ts import DFMambaTS
    >>> model = DFMambaTS(7, seq_len=32, horizon=8, d_model=16, d_state=4)
    >>> y, aux = model(torch.randn(2, 32, 7))
    >>> tuple(y.shape), aux.ndim
    ((2, 8, 7), 0)
    """

    def __init__(
        self,
        n_variates: int,
        seq_len: int = 96,
        horizon: int = 96,
        d_model: int = 64,
        depth: int = 3,
        d_state: int = 16,
        expand: int = 2,
        tokens: Literal["time", "patch", "mixed"] = "patch",
        patch_len: int = 8,
        min_len: int | None = None,
        dropout: float = 0.3,
        revin: bool = True,
        linear_skip: bool = False,
        aux_weight: float = 1.0,
        **dfmamba_kwargs,
    ) -> None:
        super().__init__()
        #: constructor arguments (JSON-serialisable), enough to rebuild the model (see ``ts.save_forecaster``)
        self.config = constructor_config(locals())
        n_variates, seq_len, horizon = _sizes(n_variates, seq_len, horizon)
        if tokens not in ("time", "patch", "mixed"):
            raise ValueError(f"tokens={tokens!r} is not one of ('time', 'patch', 'mixed').")
        if tokens == "patch":
            patch_len = whole_number(patch_len, "patch_len")
            if seq_len % patch_len:
                raise ValueError(f"patch_len={patch_len} must be >= 1 and divide seq_len={seq_len}.")
        self.n_variates, self.seq_len, self.horizon = n_variates, seq_len, horizon
        self.tokens, self.patch_len, self.aux_weight = tokens, patch_len, aux_weight
        self.revin = RevIN(n_variates) if revin else None
        n_tokens = seq_len // patch_len if tokens == "patch" else seq_len
        token_in = {"time": 1, "patch": patch_len, "mixed": n_variates}[tokens]
        self.n_tokens = n_tokens
        self.embed = nn.Linear(token_in, d_model)
        self.position = nn.Parameter(torch.randn(n_tokens, d_model) * 0.02)
        if min_len is None:
            min_len = 2 if tokens == "patch" else 8
        self.backbone = DFMamba(d_model, depth=depth, d_state=d_state, expand=expand, min_len=min_len, **dfmamba_kwargs)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        if tokens == "mixed":
            self.head_time = nn.Linear(n_tokens, horizon)
            self.head_out = nn.Linear(d_model, n_variates)
        else:
            self.head = nn.Linear(n_tokens * d_model, horizon)
        self.skip = nn.Linear(seq_len, horizon) if linear_skip else None
        self.last_aux = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forecast (batch, horizon, C) and the weighted auxiliary loss (scalar) from (batch, seq_len, C).

        The full :class:`~dfmamba_st.core.FractalAux` record (terms, gates) of the last call is kept in
        ``self.last_aux``.
        """
        _check_input(x, self.seq_len, self.n_variates)
        b, length, c = x.shape
        if self.revin is not None:
            x = self.revin.normalize(x)
        if self.tokens == "mixed":
            h = self.embed(x) + self.position  # (b, L, d)
        else:
            series = x.transpose(1, 2).reshape(b * c, length)  # channel independence: (b*C, L)
            if self.tokens == "time":
                tok = series[..., None]
            else:
                tok = series.reshape(b * c, self.n_tokens, self.patch_len)
            h = self.embed(tok) + self.position  # (b*C, n_tokens, d)
        h, aux = self.backbone(h)
        self.last_aux = aux
        h = self.dropout(self.norm(h))
        if self.tokens == "mixed":
            y = self.head_out(self.head_time(h.transpose(1, 2)).transpose(1, 2))  # (b, H, C)
        else:
            y = self.head(h.reshape(b * c, -1)).reshape(b, c, self.horizon).transpose(1, 2)
        if self.skip is not None:
            y = y + self.skip(x.transpose(1, 2)).transpose(1, 2)
        if self.revin is not None:
            y = self.revin.denormalize(y)
        return y, self.aux_weight * aux.loss


# ----------------------------------------------------------------------------------------------------------------
# ms-Mamba


class _MultiScaleMamba(nn.Module):
    """Parallel Mamba blocks run with Δ multiplied by ``scales``; outputs averaged; both directions."""

    def __init__(
        self,
        d_model: int,
        scales: Sequence[float],
        learnable_scales: bool,
        share_base: bool,
        d_state: int,
        expand: int,
        d_conv: int,
        dt_max: float | None,
        backend: str,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Mamba(
                d_model,
                d_state=d_state,
                expand=expand,
                d_conv=d_conv,
                dt_max=dt_max,
                bidirectional=True,
                backend=backend,
            )
            for _ in scales
        )
        if share_base:  # one learned base rate Δ1: all scales use the same dt projection (weights and bias)
            for blk in self.blocks[1:]:
                blk.dt_proj = self.blocks[0].dt_proj
        log_scales = torch.log(torch.as_tensor([float(s) for s in scales]))
        if learnable_scales:
            self.log_scales = nn.Parameter(log_scales)
        else:
            self.register_buffer("log_scales", log_scales)
        self.learnable_scales = learnable_scales

    def scales(self) -> list[float]:
        """Current Δ multipliers."""
        return [float(v) for v in self.log_scales.detach().exp()]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        alphas = self.log_scales.exp()
        outs = [
            blk(h, alpha=alphas[i] if self.learnable_scales else float(alphas[i])) for i, blk in enumerate(self.blocks)
        ]
        return torch.stack(outs).mean(0)


class MSMamba(nn.Module):
    """ms-Mamba (Karadag et al., 2025): variates as tokens, multi-scale bidirectional Mamba layers, linear head.

    Each variate's (instance-normalised) lookback is embedded to ``d_model`` by one linear map, giving ``C`` tokens.
    Every layer applies the multi-scale module — one :class:`~dfmamba_st.core.Mamba` per scale, called with ``alpha`` =
    its Δ multiplier (1, 2, 4, 8 by default) of a learned base rate (see ``share_base``), each run in both directions
    (same weights, averaged), the scale outputs averaged — with a residual and LayerNorm, then a residual MLP and
    LayerNorm. A final LayerNorm and a linear head map each token to the horizon.

    Parameters
    ----------
    n_variates
        Number of variates ``C``.
    seq_len, horizon
        Lookback and forecast lengths.
    d_model
        Embedding width ``D_e``.
    n_layers
        Number of multi-scale layers.
    d_ff
        Hidden width of the MLP between layers.
    scales
        Δ multipliers of the parallel blocks (at least one).
    learnable_scales
        Learn the multipliers (initialised at ``scales``): the paper's learnable-Δ variant.
    share_base
        All scales share one dt projection (weights and bias), so the input-independent base rate Δ1 is one learned
        quantity and the others are its multiples; the input-dependent part of each block's Δ comes from the block's
        own input projections (``in_proj``, ``conv1d``, ``x_proj``), so the blocks' Δ are not exact multiples of one
        another on every input. ``False`` gives each block its own base rate (times its multiplier).
    d_state, expand, d_conv, dt_max
        Mamba block settings.
    dropout
        Dropout after the Mamba module and in the MLP.
    revin
        Instance-normalise each window (no affine, as S-Mamba/ms-Mamba's ``use_norm``).
    backend
        Scan backend.

    Examples
    --------
    >>> import torch
    >>> from dfmamba_st.ts import MSMamba
    >>> model = MSMamba(7, seq_len=32, horizon=8, d_model=16, d_ff=16, d_state=4)
    >>> y, aux = model(torch.randn(2, 32, 7))
    >>> tuple(y.shape), model.layers[0].mamba.scales()
    ((2, 8, 7), [1.0, 2.0, 4.0, 8.0])
    """

    def __init__(
        self,
        n_variates: int,
        seq_len: int = 96,
        horizon: int = 96,
        d_model: int = 128,
        n_layers: int = 2,
        d_ff: int = 128,
        scales: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
        learnable_scales: bool = False,
        share_base: bool = True,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 2,
        dt_max: float | None = 8.0,
        dropout: float = 0.1,
        revin: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        #: constructor arguments (JSON-serialisable), enough to rebuild the model (see ``ts.save_forecaster``)
        self.config = constructor_config(locals())
        n_variates, seq_len, horizon = _sizes(n_variates, seq_len, horizon)
        if len(scales) == 0 or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be one or more positive Δ multipliers, got {scales}.")
        self.n_variates, self.seq_len, self.horizon = n_variates, seq_len, horizon
        self.revin = RevIN(n_variates, affine=False) if revin else None
        self.embed = nn.Linear(seq_len, d_model)
        self.layers = nn.ModuleList(
            _MSLayer(
                d_model, d_ff, scales, learnable_scales, share_base, d_state, expand, d_conv, dt_max, dropout, backend
            )
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, horizon)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forecast (batch, horizon, C) from (batch, seq_len, C); the auxiliary loss is zero."""
        _check_input(x, self.seq_len, self.n_variates)
        if self.revin is not None:
            x = self.revin.normalize(x)
        h = self.embed(x.transpose(1, 2))  # (b, C, D_e): variates are the tokens
        for layer in self.layers:
            h = layer(h)
        y = self.head(self.norm(h)).transpose(1, 2)
        if self.revin is not None:
            y = self.revin.denormalize(y)
        return y, x.new_zeros(())


class _MSLayer(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_ff: int,
        scales: Sequence[float],
        learnable_scales: bool,
        share_base: bool,
        d_state: int,
        expand: int,
        d_conv: int,
        dt_max: float | None,
        dropout: float,
        backend: str,
    ) -> None:
        super().__init__()
        self.mamba = _MultiScaleMamba(
            d_model, scales, learnable_scales, share_base, d_state, expand, d_conv, dt_max, backend
        )
        self.norm1 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model))
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm1(h + self.dropout(self.mamba(h)))
        return self.norm2(h + self.dropout(self.mlp(h)))
