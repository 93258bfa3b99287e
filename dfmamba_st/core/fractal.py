"""DF-Mamba: the recursive, multi-scale state-space module (Algorithm 1 of the DF-Mamba paper).

``RecursiveForward(X, k)`` on ``X`` of shape (batch, L, d):

1. local dynamics: ``H_local = X + Mamba(Norm(X); Δ · α_k)`` with ``α_k = 2**k`` (one block, shared by all depths);
2. base case: stop when ``k >= K`` or ``L < L_min`` and return ``H_local``;
3. coarse-graining: ``P = PairConcat(H_local)`` (zero-pad an odd length), ``X_next = Enc(P)``;
   ``L_recon = MSE(Dec(Enc(sg(P))), sg(P))`` (the pairs are a fixed source for the auto-encoder: see Notes);
4. recursion: ``H_deep = RecursiveForward(X_next, k + 1)``, ``H_global = Upsample(H_deep, size=L)`` (linear);
   ``L_consist = MSE(H_global, sg(H_local))``;
5. fusion: ``g = σ(Gate([H_local, H_global]))``, ``H_out = (1 - g) ⊙ H_local + g ⊙ H_global``;
   ``L_flow = (mean(g) - sg(mean(g_next)))²`` when the next depth has a gate;
6. ``L_aux = Σ_depths λ1 L_recon + λ2 L_consist + λ3 L_flow``.

MSE is the mean over batch, positions and features (the paper writes squared norms): every depth weighs the same
whatever its length, and the terms' scale does not change with the batch or the width.

Notes
-----
Departures from the paper and properties it does not state:

- ``L_recon``: eq. 11 writes ``||sg(P) - Dec(Enc(P))||²``, with the stop-gradient on the target only, so its gradient
  also reaches the features ``P`` through ``Enc``; here the encoder is run a second time on ``sg(P)``, so the loss
  trains ``Enc`` and ``Dec`` alone. This follows the paper's own justification of the term (appendix: "the source
  distribution of P_k is treated as fixed" while the downsampler and decoder are updated). The literal form,
  measured on DLPFC (seeds 0–9) and ETTh2: mean ARI of the 30 slice-seed pairs 0.558 against 0.562, 151674 0.025
  lower, ETTh2-96 MSE 0.2849 against 0.2852 (``docs/spatial_log.md``, "Eq. 11 as written"; not adopted).
- Not causal: pairing (``P`` holds tokens ``2i`` and ``2i + 1``) and linear upsampling let output ``t`` depend on
  inputs after ``t``, up to ``2**(K + 1) - 2`` positions ahead (2, 6, 14, 30 for K = 1 … 4), even with a one-way
  scan. As in the paper's Algorithm 1; it matters only for a loss that predicts later tokens from earlier outputs.
- Upsampling: Algorithm 1 writes ``U(H_deep; size=L)``; here the coarse sequence is interpolated to the padded, even
  length ``2·ceil(L/2)`` and then cropped to ``L`` (:func:`upsample`), so coarse token ``i`` stays at the centre of
  the pair ``2i, 2i + 1`` it summarises. The two readings are equal for an even ``L``; for an odd ``L`` the paper's
  literal call stretches the coarse sequence over ``L`` positions and drifts by up to half a token per depth.
- Without weight sharing (the ``share_weights=False`` ablation) the deepest depth's parameter set has no encoder,
  decoder or gate: that depth is always a base case, so they would never run.
- The scan discretises ``B`` as mamba-ssm does (``Δ·B``, Euler), not by the zero-order hold of the paper's eq. 3–4
  (``A⁻¹(exp(ΔA) - I)B``); see :mod:`dfmamba_st.core.scan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .mamba import Mamba
from .scan import Backend

__all__ = ["DFMamba", "FractalAux"]

AUX_TERMS = ("recon", "consist", "flow")


@dataclass
class FractalAux:
    """What :class:`~dfmamba_st.core.DFMamba` returns next to its output.

    Attributes
    ----------
    loss
        Weighted auxiliary loss ``Σ_k λ1 L_recon + λ2 L_consist + λ3 L_flow`` (scalar; zero with ``aux="off"``).
    terms
        The unweighted terms summed over depths: ``{"recon", "consist", "flow"}``.
    gates
        Channel-mean gate of every fusing depth ``k = 0, 1, ...``, each (batch, L_k), detached; 0 = local, 1 = global.
    lengths
        Sequence length at every depth that ran the Mamba block (the last one is the base case).

    Examples
    --------
    Depth 2 on 20 tokens: the Mamba block runs on 20, 10 and 5 tokens and the two upper depths fuse through a gate:

    >>> import torch
    >>> from dfmamba_st.core import DFMamba
    >>> y, aux = DFMamba(8, depth=2, d_state=4)(torch.randn(3, 20, 8))
    >>> aux.lengths, sorted(aux.terms), [tuple(g.shape) for g in aux.gates], aux.loss.ndim
    ([20, 10, 5], ['consist', 'flow', 'recon'], [(3, 20), (3, 10)], 0)
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    gates: list[torch.Tensor] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


def pair_concat(x: torch.Tensor) -> torch.Tensor:
    """(batch, L, d) → (batch, ceil(L/2), 2d): concatenate neighbours, zero-padding an odd length."""
    if x.shape[1] % 2:
        x = F.pad(x, (0, 0, 0, 1))
    b, length, d = x.shape
    return x.reshape(b, length // 2, 2 * d)


def pool_pairs(x: torch.Tensor) -> torch.Tensor:
    """(batch, L, d) → (batch, ceil(L/2), d): the mean of each pair of neighbours; an odd length's last token alone.

    The ``coarsen="pool"`` ablation. The last pair of an odd length holds one token (``pair_concat`` pads with zeros),
    so its mean is that token, not half of it.

    Examples
    --------
    >>> import torch
    >>> pool_pairs(torch.arange(1.0, 6.0).reshape(1, 5, 1)).flatten().tolist()
    [1.5, 3.5, 5.0]
    """
    d = x.shape[-1]
    pairs = pair_concat(x)
    pooled = 0.5 * (pairs[..., :d] + pairs[..., d:])
    if x.shape[1] % 2:
        pooled = torch.cat([pooled[:, :-1], x[:, -1:]], dim=1)
    return pooled


def upsample(x: torch.Tensor, length: int) -> torch.Tensor:
    """Linear interpolation along the sequence from (batch, ceil(L/2), d) back to (batch, L, d).

    Coarse token ``i`` summarises fine positions ``2i`` and ``2i + 1``; interpolation is done on the padded,
    even length (so the geometry stays exact) and then cropped to ``length``.
    """
    padded = 2 * x.shape[1]
    up = F.interpolate(x.transpose(1, 2), size=padded, mode="linear", align_corners=False)
    return up[..., :length].transpose(1, 2)


class _Scale(nn.Module):
    """The per-scale parameters: norm + Mamba block, encoder/decoder of the coarse-graining, fusion gate."""

    def __init__(
        self, d_model: int, mamba_kwargs: dict, coarsen: str, fusion: str, hidden: int, recursive: bool
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mamba = Mamba(d_model, **mamba_kwargs)
        # a flat model (depth 0) never coarse-grains or fuses: build only what is used
        if recursive and coarsen == "learned":
            self.encoder = _mlp(2 * d_model, hidden, d_model)
            self.decoder = _mlp(d_model, hidden, 2 * d_model)
        if recursive and fusion == "gate":
            self.gate = nn.Linear(2 * d_model, d_model)


class DFMamba(nn.Module):
    """Dynamic Fractal Mamba over sequences of any length.

    Parameters
    ----------
    d_model
        Token width ``d``.
    depth
        Maximum recursion depth ``K`` (the paper uses 3; 4 for pathology). ``depth=0`` is a flat Mamba block.
    d_state, expand, d_conv
        Mamba block sizes (``N``, ``E``, conv width).
    min_len
        Stop recursing once the sequence is shorter than this (``L_min``).
    lambdas
        Weights ``(λ1, λ2, λ3)`` of ``L_recon``, ``L_consist``, ``L_flow``.
    dt_max
        Clip of the scaled time step Δ·2^k.
    hidden
        Hidden width of the encoder/decoder MLPs (default ``d_model``).
    bidirectional
        Scan each depth in both directions with the same block.
    share_weights
        One set of parameters for every depth (the paper). ``False`` gives each depth its own (ablation).
    dt_scaling
        Time-step scale at depth ``k``: ``"exp"`` = 2^k (the paper), ``"linear"`` = 1 + k, ``"const"`` = 1.
    coarsen
        ``"learned"`` pair-concat + MLP encoder (the paper) or ``"pool"`` average pooling of pairs (ablation).
    fusion
        ``"gate"`` (the paper) or ``"add"`` (``H_local + H_global``, ablation).
    aux
        ``"on"`` or ``"off"`` (auxiliary loss returned as zero; ablation).
    backend
        Scan backend, see :func:`~dfmamba_st.core.selective_scan`.

    Examples
    --------
    >>> import torch
    >>> from dfmamba_st.core import DFMamba
    >>> model = DFMamba(16, depth=3, d_state=4)
    >>> y, aux = model(torch.randn(2, 37, 16))
    >>> y.shape, aux.loss.ndim, len(aux.gates)
    (torch.Size([2, 37, 16]), 0, 3)
    """

    def __init__(
        self,
        d_model: int,
        depth: int = 3,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        min_len: int = 8,
        lambdas: tuple[float, float, float] = (1.0, 1.0, 0.1),
        dt_max: float | None = 8.0,
        hidden: int | None = None,
        bidirectional: bool = False,
        share_weights: bool = True,
        dt_scaling: Literal["exp", "linear", "const"] = "exp",
        coarsen: Literal["learned", "pool"] = "learned",
        fusion: Literal["gate", "add"] = "gate",
        aux: Literal["on", "off"] = "on",
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        for name, value, allowed in (
            ("dt_scaling", dt_scaling, ("exp", "linear", "const")),
            ("coarsen", coarsen, ("learned", "pool")),
            ("fusion", fusion, ("gate", "add")),
            ("aux", aux, ("on", "off")),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}.")
        if depth < 0 or min_len < 1:
            raise ValueError(f"depth must be >= 0 and min_len >= 1, got depth={depth}, min_len={min_len}.")
        self.d_model = d_model
        self.depth = depth
        self.min_len = min_len
        self.lambdas = tuple(float(v) for v in lambdas)
        self.share_weights = share_weights
        self.dt_scaling = dt_scaling
        self.coarsen = coarsen
        self.fusion = fusion
        self.aux = aux
        mamba_kwargs = dict(
            d_state=d_state, expand=expand, d_conv=d_conv, dt_max=dt_max, bidirectional=bidirectional, backend=backend
        )
        n_sets = 1 if share_weights else depth + 1
        # without sharing, the deepest depth's set is only ever a base case: no encoder, decoder or gate
        self.scales = nn.ModuleList(
            _Scale(d_model, mamba_kwargs, coarsen, fusion, hidden or d_model, recursive=k < depth)
            for k in range(n_sets)
        )
        if not share_weights and depth > 0:
            self._register_load_state_dict_pre_hook(self._drop_unused_deepest_weights)

    def _drop_unused_deepest_weights(self, state_dict: dict, prefix: str, *args) -> None:
        """Read weights saved before 2026-12-07, when the deepest depth's set also held an encoder, decoder and gate.

        They never ran (that depth is always a base case), so dropping them loads the model that was trained.
        """
        unused = tuple(f"{prefix}scales.{self.depth}.{part}." for part in ("encoder", "decoder", "gate"))
        for key in [k for k in state_dict if k.startswith(unused)]:
            del state_dict[key]

    def alpha(self, k: int) -> float:
        """Time-step scale at depth ``k``."""
        return {"exp": 2.0**k, "linear": 1.0 + k, "const": 1.0}[self.dt_scaling]

    def _scale(self, k: int) -> _Scale:
        return self.scales[0 if self.share_weights else k]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, FractalAux]:
        """Run DF-Mamba on ``x`` of shape (batch, L, d_model), L >= 1.

        Returns
        -------
        ``(y, aux)``: ``y`` has the shape of ``x``; ``aux`` is a :class:`FractalAux`.
        """
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Expected input of shape (batch, L, {self.d_model}), got {tuple(x.shape)}.")
        if x.shape[1] < 1:
            raise ValueError("Sequence length must be at least 1.")
        terms = {name: x.new_zeros(()) for name in AUX_TERMS}
        record = FractalAux(loss=x.new_zeros(()), terms=terms)
        y, _ = self._recursive_forward(x, 0, record)
        if self.aux == "on":
            lam = dict(zip(AUX_TERMS, self.lambdas))
            record.loss = sum(lam[name] * terms[name] for name in AUX_TERMS)
        return y, record

    def _recursive_forward(
        self, x: torch.Tensor, k: int, record: FractalAux
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        scale = self._scale(k)
        length = x.shape[1]
        # 1-2. local dynamics with the time step dilated by alpha_k
        h_local = x + scale.mamba(scale.norm(x), alpha=self.alpha(k))
        record.lengths.append(length)
        # 3. base case
        if k >= self.depth or length < self.min_len:
            return h_local, None
        # 4. information-preserving coarse-graining
        if self.coarsen == "learned":
            pairs = pair_concat(h_local)
            x_next = scale.encoder(pairs)
            fixed_pairs = pairs.detach()
            recon = scale.decoder(scale.encoder(fixed_pairs))
            record.terms["recon"] = record.terms["recon"] + F.mse_loss(recon, fixed_pairs)
        else:
            x_next = pool_pairs(h_local)
        # 5-6. recursion and resolution recovery
        h_deep, m_next = self._recursive_forward(x_next, k + 1, record)
        h_global = upsample(h_deep, length)
        # 7. cross-scale consistency: the local view is a fixed anchor
        record.terms["consist"] = record.terms["consist"] + F.mse_loss(h_global, h_local.detach())
        # 8. fusion
        if self.fusion == "add":
            return h_local + h_global, None
        g = torch.sigmoid(scale.gate(torch.cat([h_local, h_global], dim=-1)))
        out = (1 - g) * h_local + g * h_global
        # 9. gate smoothness across scales
        m_k = g.mean()
        if m_next is not None:
            record.terms["flow"] = record.terms["flow"] + (m_k - m_next.detach()) ** 2
        record.gates.insert(0, g.mean(-1).detach())
        return out, m_k
