"""Selective scan: the recurrence at the heart of Mamba, behind one function.

For every batch element ``b``, channel ``d`` and state ``n``::

    x[t] = exp(delta[t] * A[d, n]) * x[t-1] + delta[t] * B[n, t] * u[t]
    y[t] = sum_n C[n, t] * x[t, n] + D[d] * u[t]
    y[t] = y[t] * silu(z[t])            (when z is given)

Shapes follow mamba-ssm: ``u, delta, z``: (batch, d_inner, L); ``A``: (d_inner, N);
``B, C``: (batch, N, L); ``D, delta_bias``: (d_inner,).

The input term ``delta * B * u`` is mamba-ssm's discretisation (its reference scan and CUDA kernel): exact
zero-order hold for ``A`` (``exp(delta * A)``) and an Euler step for ``B``, not the zero-order hold
``A⁻¹(exp(delta * A) - 1) B`` of the DF-Mamba paper's eq. 3–4. The two agree for small ``delta * A``; at the
large time steps of deep fractal levels (``delta`` scaled by ``2**k``, clipped at 8) the Euler input gain is the
larger (by a factor ``delta * |A| / (1 - exp(-delta * |A|))``).

Backends (all differentiable in every tensor input):

``"cuda"``
    mamba-ssm's fused kernel (``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``), for CUDA
    tensors when mamba-ssm imports. Calls the kernel cannot serve run the ``"torch"`` backend instead, on the
    same device: with ``initial_state`` (the kernel takes none), with ``return_last_state=True`` (its backward
    drops the last state's gradient) and in float64 (it takes float32, float16 and bfloat16 inputs). It gets
    ``A``, ``D`` and ``delta_bias`` in float32 and ``delta``, ``B``, ``C`` and ``z`` in the dtype of ``u``, as it
    requires. Every backend returns ``u``'s dtype.
``"torch"``
    Pure PyTorch, chunked (:mod:`._scan_torch`): vectorised within chunks, a sequential carry between
    them, a custom backward that recomputes states segment by segment. CPU and GPU, any float dtype
    (half precision is computed in float32).
``"numba"``
    Fused CPU kernels (:mod:`._scan_numba`), parallel over channels, sequential in time, backward
    recomputing states chunk by chunk from checkpoints. CPU tensors only; needs numba.
``"reference"``
    The plain loop :func:`selective_scan_reference` (slow; for tests).
``"auto"``
    ``cuda`` for CUDA tensors when mamba-ssm imports, else ``torch`` on GPU; ``numba`` for CPU tensors
    when numba imports, else ``torch``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "cuda", "torch", "numba", "reference"]

__all__ = [
    "available_backends",
    "resolve_backend",
    "selective_scan",
    "selective_scan_cuda",
    "selective_scan_numba",
    "selective_scan_reference",
    "selective_scan_torch",
]


def _prepare_delta(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool) -> torch.Tensor:
    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _finish_output(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """``(y + D u) · silu(z)``, in ``u``'s dtype whatever the dtypes of ``D`` and ``z`` (as mamba-ssm's kernel)."""
    if D is not None:
        y = y + u * D[..., None]
    if z is not None:
        y = y * F.silu(z)
    return y.to(u.dtype)


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
):
    """Plain sequential loop (slow; the ground truth the other backends are tested against).

    Parameters
    ----------
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state
        As for :func:`selective_scan` (without ``backend``).

    Returns
    -------
    ``y`` of shape (batch, d_inner, L), or ``(y, last_state)`` with ``return_last_state``. With ``L = 0``, ``y`` is
    empty and the last state is the initial one.

    Notes
    -----
    Unlike the other backends, this loop checks no shapes, and it computes in the dtype of the inputs, promoted
    where they differ (the ``"torch"`` and ``"numba"`` backends compute half precision in float32); like them, it
    returns ``u``'s dtype. It runs on any device and is
    differentiable through ordinary autograd; it loops over time in Python, so it is meant for short sequences.

    Examples
    --------
    >>> import torch
    >>> from dfmamba_st.core import selective_scan, selective_scan_reference
    >>> g = torch.Generator().manual_seed(0)
    >>> u, delta = torch.randn(2, 4, 10, generator=g), torch.rand(2, 4, 10, generator=g)
    >>> A = -torch.rand(4, 3, generator=g)
    >>> B, C = torch.randn(2, 3, 10, generator=g), torch.randn(2, 3, 10, generator=g)
    >>> y, last = selective_scan_reference(u, delta, A, B, C, D=torch.ones(4), return_last_state=True)
    >>> y.shape, last.shape
    (torch.Size([2, 4, 10]), torch.Size([2, 4, 3]))
    >>> torch.allclose(y, selective_scan(u, delta, A, B, C, D=torch.ones(4), backend="torch"), atol=1e-5)
    True
    """
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    batch, d_inner, length = u.shape
    x = (
        initial_state
        if initial_state is not None
        else torch.zeros(batch, d_inner, A.shape[1], dtype=u.dtype, device=u.device)
    )
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]
        x = torch.exp(dt * A) * x + dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append((x * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(u.shape)
    y = _finish_output(y, u, D, z)
    return (y, x.to(u.dtype)) if return_last_state else y


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _check_shapes(u, delta, A, B, C, initial_state) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, d_inner, L); got {tuple(u.shape)}, {tuple(delta.shape)}.")
    batch, d_inner, length = u.shape
    if A.dim() != 2 or A.shape[0] != d_inner:
        raise ValueError(f"A must be (d_inner, N) = ({d_inner}, N); got {tuple(A.shape)}.")
    N = A.shape[1]
    for name, m in (("B", B), ("C", C)):
        if tuple(m.shape) != (batch, N, length):
            raise ValueError(f"{name} must be (batch, N, L) = {(batch, N, length)}; got {tuple(m.shape)}.")
    if initial_state is not None and tuple(initial_state.shape) != (batch, d_inner, N):
        raise ValueError(
            f"initial_state must be (batch, d_inner, N) = {(batch, d_inner, N)}; got {tuple(initial_state.shape)}."
        )


def _scan_with_core(
    core: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    return_last_state: bool,
    initial_state: torch.Tensor | None,
):
    """Shared wrapper: delta bias / softplus, D and the z gate with ordinary autograd, the scan with ``core``."""
    _check_shapes(u, delta, A, B, C, initial_state)
    dtype = _compute_dtype(u.dtype)
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    if initial_state is None:
        initial_state = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=dtype, device=u.device)
    y, last = core(*(t.to(dtype) for t in (u, delta, A, B, C, initial_state)))
    y = _finish_output(y.to(u.dtype), u, D, z)
    return (y, last.to(u.dtype)) if return_last_state else y


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
):
    """Pure-PyTorch chunked scan (CPU or GPU). Arguments and return value as :func:`selective_scan`."""
    from ._scan_torch import scan_core_torch

    return _scan_with_core(
        scan_core_torch, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state
    )


def selective_scan_numba(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
):
    """Fused numba CPU scan. Arguments and return value as :func:`selective_scan`.

    The first call per dtype compiles the kernels (tens of seconds); they are cached on disk.
    """
    if not _numba_available():
        raise RuntimeError(
            f"The 'numba' scan backend needs numba, which does not import ({_numba_error()}); "
            "install numba or use backend='torch'."
        )
    if u.device.type != "cpu":
        raise ValueError(
            f"The 'numba' scan backend runs on CPU tensors; got device {u.device}. "
            "Use backend='cuda' or 'torch' for GPU tensors."
        )
    from ._scan_numba import scan_core_numba

    return _scan_with_core(
        scan_core_numba, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state
    )


def selective_scan_cuda(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
):
    """mamba-ssm's fused CUDA kernel. Arguments and return value as :func:`selective_scan`.

    Calls the kernel cannot serve run :func:`selective_scan_torch` on the same (CUDA) tensors instead: with
    ``initial_state`` (the kernel has none), with ``return_last_state=True`` (the kernel's backward ignores the
    last state's gradient) and with float64 ``u`` (the kernel takes float32, float16 and bfloat16).
    """
    reason = _cuda_unavailable_reason(u)
    if reason is not None:
        raise RuntimeError(
            f"The 'cuda' scan backend is not available: {reason}. "
            "Use backend='torch' (CPU or GPU) or backend='numba' (CPU)."
        )
    if initial_state is not None or return_last_state or u.dtype == torch.float64:
        return selective_scan_torch(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state
        )
    _check_shapes(u, delta, A, B, C, None)
    fn = _mamba_ssm_scan()
    # the kernel takes A, D and delta_bias in float32 and delta, B, C, z in the input dtype, whatever that is
    A, delta, B, C = A.float(), delta.to(u.dtype), B.to(u.dtype), C.to(u.dtype)
    z = z.to(u.dtype) if z is not None else None
    D = D.float() if D is not None else None
    delta_bias = delta_bias.float() if delta_bias is not None else None
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, False)


@functools.cache
def _numba_import() -> str | None:
    """``None`` when numba imports, else the error message."""
    try:
        import numba  # noqa: F401
    except Exception as err:  # ImportError, or a broken install (e.g. numpy version mismatch)
        return f"{type(err).__name__}: {err}"
    return None


def _numba_available() -> bool:
    return _numba_import() is None


def _numba_error() -> str:
    return _numba_import() or ""


@functools.cache
def _mamba_ssm_import() -> tuple[Callable | None, str | None]:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:
        return None, f"mamba-ssm is not importable ({type(err).__name__}: {err})"
    return selective_scan_fn, None


def _mamba_ssm_scan() -> Callable:
    fn, _ = _mamba_ssm_import()
    assert fn is not None
    return fn


def _cuda_unavailable_reason(u: torch.Tensor | None = None) -> str | None:
    """Why the cuda backend cannot run (``None`` when it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if u is not None and u.device.type != "cuda":
        return f"the tensors are on {u.device}, not on a CUDA device"
    return _mamba_ssm_import()[1]


_BACKENDS: dict[str, Callable] = {
    "reference": selective_scan_reference,
    "torch": selective_scan_torch,
    "numba": selective_scan_numba,
    "cuda": selective_scan_cuda,
}


def available_backends() -> list[str]:
    """Names of the scan backends usable in this environment (``"cuda"`` needs a GPU and mamba-ssm).

    Returns
    -------
    The sorted names: always ``"reference"`` and ``"torch"``, ``"numba"`` when numba imports, ``"cuda"`` when torch
    sees a CUDA device and mamba-ssm imports. ``"auto"`` is not listed (see :func:`resolve_backend`).

    Examples
    --------
    >>> from dfmamba_st.core import available_backends
    >>> {"reference", "torch"} <= set(available_backends())
    True
    """
    names = ["reference", "torch"]
    if _numba_available():
        names.append("numba")
    if _cuda_unavailable_reason() is None:
        names.append("cuda")
    return sorted(names)


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """The backend ``backend="auto"`` picks for tensors on ``device`` (other names are returned unchanged).

    Parameters
    ----------
    backend
        A backend name or ``"auto"``.
    device
        Device of the tensors.

    Returns
    -------
    The concrete backend name. For ``"auto"``: ``"cuda"`` on a CUDA device when mamba-ssm imports, else ``"torch"``
    there; ``"numba"`` on the CPU when numba imports, else ``"torch"``; ``"torch"`` on any other device type. Names
    other than ``"auto"`` are not checked (:func:`selective_scan` rejects unknown ones).

    Examples
    --------
    >>> from dfmamba_st.core import resolve_backend
    >>> resolve_backend("torch", "cpu")
    'torch'
    >>> resolve_backend("auto", "cpu") in ("numba", "torch")  # "numba" where numba imports
    True
    """
    if backend != "auto":
        return backend
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda" if _cuda_unavailable_reason() is None else "torch"
    if device.type == "cpu" and _numba_available():
        return "numba"
    return "torch"


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
    *,
    backend: Backend = "auto",
):
    """Selective scan with mamba-ssm's signature.

    Parameters
    ----------
    u, delta
        Input and time step, (batch, d_inner, L).
    A
        State matrix (diagonal, real), (d_inner, N).
    B, C
        Input-dependent input and output matrices, (batch, N, L).
    D
        Skip connection, (d_inner,).
    z
        Output gate, (batch, d_inner, L); the output is multiplied by ``silu(z)``.
    delta_bias
        Added to ``delta`` before the optional softplus, (d_inner,).
    delta_softplus
        Apply softplus to ``delta``.
    return_last_state
        Also return the final state, (batch, d_inner, N). mamba-ssm's backward ignores its gradient: with
        ``backend="cuda"`` such a call runs ``"torch"``.
    initial_state
        State to start from, (batch, d_inner, N), so long sequences can be processed in tiles
        (differentiable). mamba-ssm's kernel has none: with ``backend="cuda"`` such a call runs ``"torch"``.
    backend
        ``"auto"``, ``"cuda"`` (mamba-ssm), ``"torch"``, ``"numba"`` or ``"reference"``; see the module
        docstring. ``"cuda"`` raises :class:`RuntimeError` without a CUDA device or mamba-ssm, ``"numba"``
        without numba; an unknown name raises :class:`ValueError`.

    Returns
    -------
    ``y`` of shape (batch, d_inner, L) in ``u``'s dtype whatever the dtypes of ``D`` and ``z``, or
    ``(y, last_state)``.

    Examples
    --------
    >>> import torch
    >>> from dfmamba_st.core import selective_scan
    >>> u = torch.randn(2, 4, 10); delta = torch.rand(2, 4, 10)
    >>> A = -torch.rand(4, 3); B = torch.randn(2, 3, 10); C = torch.randn(2, 3, 10)
    >>> selective_scan(u, delta, A, B, C).shape
    torch.Size([2, 4, 10])
    """
    backend = resolve_backend(backend, u.device)
    if backend not in _BACKENDS:
        raise ValueError(
            f"Unknown scan backend {backend!r}; choose one of {['auto', *sorted(_BACKENDS)]} "
            f"(available here: {available_backends()})."
        )
    return _BACKENDS[backend](u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)
