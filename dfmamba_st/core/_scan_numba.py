"""Fused CPU selective scan with numba: one forward and one backward kernel.

Layout and parallelism
    Channels are processed in blocks of ``LANES`` (32) neighbouring channels; inside a block every
    operation is a fixed-length loop over 32 lanes contiguous in memory, for LLVM to vectorise (the
    ``exp`` loops are; the recurrence loops only partly, as numba cannot tell LLVM the arrays do not alias). The
    time-major inputs (batch, L, d_inner) make a block's values at one time step contiguous. Work items
    (batch, block) run in parallel (``prange``), time runs sequentially, and a block's state
    (N x 32 numbers) lives in a small local array. ``d_inner`` is zero-padded to a multiple of 32.
Precision
    States, outputs and gradients are accumulated in float64 whatever the input dtype (fp32 inputs are
    promoted and the results cast back). The decays ``exp(delta * A)`` are computed in the input dtype
    with a branch-free polynomial ``exp`` (1-2 ulp; libm's ``exp`` does not vectorise), so fp32 results
    are at least as accurate as an fp32 sequential loop and fp64 results agree with it to round-off.
Memory
    The forward stores the state every ``chunk`` steps (float64 checkpoints, N * 8 / chunk bytes per
    (time step, channel): 4 bytes for N = 16, chunk = 32, i.e. as much as one fp32 input tensor). The
    backward walks time in reverse one chunk at a time: it recomputes that chunk's decays and states from
    its checkpoint into a per-thread buffer (bit-identical to the forward) and runs the adjoint
    recurrence ``g[t] = C[t] dy[t] + a[t+1] g[t+1]`` through it. The (L, N, d_inner) state history is
    never stored.
Reductions
    Gradients of ``B`` and ``C`` sum over channels; to stay race-free the backward splits the channel
    blocks into a few groups (about two per thread), each with its own (L, N) accumulator, summed at the
    end. Chunks are the outer loop and channels the inner one, so a chunk's accumulators stay in cache.

numba is imported when this module is imported; :mod:`dfmamba_st.core.scan` imports this module lazily.
Kernels are compiled with ``cache=True`` (one compilation per input dtype, reused across processes).
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange, types
from numba.extending import overload
from torch.autograd.function import once_differentiable

__all__ = ["DEFAULT_CHUNK", "LANES", "ScanCoreNumba", "scan_core_numba"]

#: channels processed together (SIMD lanes); a compile-time constant of the kernels
LANES = 32
#: checkpoint interval (time steps) of the forward states
DEFAULT_CHUNK = 32
#: time steps whose decays the forward exponentiates in one vectorised call
_EXP_BLOCK = 16

# exp(r) = sum r^k / k! for |r| <= ln(2)/2 (degree 13: truncation error < 1e-17, below one ulp)
_C2, _C3, _C4, _C5, _C6, _C7, _C8, _C9, _C10, _C11, _C12, _C13 = (1.0 / math.factorial(k) for k in range(2, 14))
# float32: Cephes' expf (Cody-Waite split of ln 2, degree-7 minimax polynomial, about 1 ulp)
_F = np.float32
_F_LO, _F_HI, _F_LOG2E, _F_MAGIC = _F(-87.0), _F(88.0), _F(1.44269504088896341), _F(12582912.0)  # 1.5 * 2^23
_F_LN2_HI, _F_LN2_LO, _F_ONE = _F(0.693359375), _F(-2.12194440e-4), _F(1.0)
_P0, _P1, _P2, _P3, _P4, _P5 = (
    _F(c)
    for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
)
_FM_EXP = {"contract"}  # no reassociation here: the round-to-integer trick below relies on exact fp order
_FM_KERNEL = {"contract", "reassoc"}  # lets LLVM vectorise the sums over lanes


def _exp64(z, kbuf):  # pragma: no cover - compiled
    m = z.shape[0]
    kbits = kbuf.view(np.int64)
    for i in range(m):
        x = min(max(z[i], -708.0), 709.0)
        kd = x * 1.4426950408889634 + 6755399441055744.0  # + 1.5 * 2^52 rounds to an integer in the low bits
        k = kd - 6755399441055744.0
        r = x - k * 0.693147180369123816490 - k * 1.90821492927058770002e-10
        r2 = r * r
        r4 = r2 * r2
        q0 = (1.0 + r) + r2 * (_C2 + _C3 * r)
        q1 = (_C4 + _C5 * r) + r2 * (_C6 + _C7 * r)
        q2 = (_C8 + _C9 * r) + r2 * (_C10 + _C11 * r)
        q3 = _C12 + _C13 * r
        z[i] = (q0 + r4 * q1) + (r4 * r4) * (q2 + r4 * q3)
        kbuf[i] = kd
    for i in range(m):
        kbits[i] = (kbits[i] - 0x4338000000000000 + 1023) << 52  # the bits of 2.0 ** k
    for i in range(m):
        z[i] *= kbuf[i]


def _exp32(z, kbuf):  # pragma: no cover - compiled
    m = z.shape[0]
    kbits = kbuf.view(np.int32)
    for i in range(m):
        x = min(max(z[i], _F_LO), _F_HI)
        kd = x * _F_LOG2E + _F_MAGIC
        k = kd - _F_MAGIC
        r = x - k * _F_LN2_HI - k * _F_LN2_LO
        p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
        z[i] = p * (r * r) + r + _F_ONE
        kbuf[i] = kd
    for i in range(m):
        kbits[i] = (kbits[i] - 0x4B400000 + 127) << 23  # the bits of 2.0f ** k
    for i in range(m):
        z[i] *= kbuf[i]


def _exp_inplace(z, kbuf):
    """``z[:] = exp(z)`` for a float32 or float64 vector ``z`` (``kbuf``: scratch, same length and dtype).

    Branch-free and vectorisable (libm's ``exp`` is not): ``exp(z) = 2^k * p(r)``, ``k = round(z / ln 2)``,
    ``r = z - k ln 2`` (Cody-Waite), ``p`` a polynomial (float64: degree-13 Taylor, Estrin scheme;
    float32: Cephes' minimax), ``2^k`` assembled in the exponent bits; 1-2 ulp. ``z`` is clamped to
    [-708, 709] (float32: [-87, 88]), so ``exp`` of anything below gives ~1e-308 (1e-38) instead of 0,
    far below the round-off of any state it multiplies.
    """
    out = np.exp(z)
    z[:] = out


@overload(_exp_inplace, jit_options={"fastmath": _FM_EXP, "nogil": True})
def _exp_inplace_impl(z, kbuf):
    if isinstance(z, types.Array) and z.dtype == types.float32:
        return _exp32
    return _exp64


@njit(inline="always", fastmath=_FM_KERNEL)
def _decays(delta, b, d0, t0, t1, a_b, dec, kbuf):  # pragma: no cover - compiled
    """``dec[((t - t0) * N + n) * LANES + l] = exp(delta[b, t, d0 + l] * A[d0 + l, n])`` for t0 <= t < t1.

    ``kbuf`` holds ``_EXP_BLOCK * N * LANES`` numbers; the exp runs in blocks of that size (cache-friendly).
    """
    N = a_b.shape[0]
    step = _EXP_BLOCK * N * LANES
    m = 0
    for t in range(t0, t1):
        for n in range(N):
            for lane in range(LANES):
                dec[m + lane] = delta[b, t, d0 + lane] * a_b[n, lane]
            m += LANES
    for s in range(0, m, step):
        e = min(m, s + step)
        _exp_inplace(dec[s:e], kbuf[: e - s])


@njit(parallel=True, cache=True, nogil=True, fastmath=_FM_KERNEL)
def _forward_kernel(u, delta, AT, Bt, Ct, h0, y, h_last, ckpt, chunk):  # pragma: no cover - compiled
    """Forward scan.

    u, delta, y: (b, L, d); AT: (N, d); Bt, Ct: (b, L, N); h0, h_last: (b, N, d) float64;
    ckpt: (b, ceil(L / chunk), N, d) float64; d and chunk multiples of LANES and _EXP_BLOCK.
    """
    batch, length, d_inner = u.shape
    N = AT.shape[0]
    n_blocks = d_inner // LANES
    for idx in prange(batch * n_blocks):
        b = idx // n_blocks
        d0 = (idx - b * n_blocks) * LANES
        x = np.empty((N, LANES), np.float64)
        a_b = np.empty((N, LANES), AT.dtype)  # decays are computed in the input dtype
        dec = np.empty(_EXP_BLOCK * N * LANES, AT.dtype)
        kbuf = np.empty(_EXP_BLOCK * N * LANES, AT.dtype)
        du = np.empty(LANES, np.float64)
        acc = np.empty(LANES, np.float64)
        for n in range(N):
            for lane in range(LANES):
                x[n, lane] = h0[b, n, d0 + lane]
                a_b[n, lane] = AT[n, d0 + lane]
        for t_blk in range(0, length, _EXP_BLOCK):
            if t_blk % chunk == 0:
                c = t_blk // chunk
                for n in range(N):
                    for lane in range(LANES):
                        ckpt[b, c, n, d0 + lane] = x[n, lane]
            t_end = min(length, t_blk + _EXP_BLOCK)
            _decays(delta, b, d0, t_blk, t_end, a_b, dec, kbuf)
            m = 0
            for t in range(t_blk, t_end):
                for lane in range(LANES):
                    du[lane] = np.float64(delta[b, t, d0 + lane]) * u[b, t, d0 + lane]
                    acc[lane] = 0.0
                for n in range(N):
                    bn = np.float64(Bt[b, t, n])
                    cn = np.float64(Ct[b, t, n])
                    for lane in range(LANES):
                        xn = dec[m + lane] * x[n, lane] + du[lane] * bn
                        x[n, lane] = xn
                        acc[lane] += xn * cn
                    m += LANES
                for lane in range(LANES):
                    y[b, t, d0 + lane] = acc[lane]
        for n in range(N):
            for lane in range(LANES):
                h_last[b, n, d0 + lane] = x[n, lane]


@njit(inline="always", fastmath=_FM_KERNEL)
def _lane_sum(v):  # pragma: no cover - compiled
    """Sum of the ``LANES`` values of ``v`` (overwritten) in a fixed pairwise order.

    A running sum over the lanes under ``reassoc`` is vectorised or not depending on run-time checks of the arrays'
    addresses, so its rounding (and the gradient's last bits) changed between two identical calls; each level of
    this tree adds independent pairs, in the same order on either path.
    """
    width = LANES // 2
    while width >= 1:
        for k in range(width):
            v[k] += v[k + width]
        width //= 2
    return v[0]


@njit(parallel=True, cache=True, nogil=True, fastmath=_FM_KERNEL)
def _backward_kernel(
    u, delta, AT, Bt, Ct, ckpt, chunk, dy, dh, n_groups, du_g, ddelta_g, dA_part, dB_part, dC_part
):  # pragma: no cover - compiled
    """Backward scan, layouts as :func:`_forward_kernel`.

    ``dh`` (b, N, d) float64 holds dL/d(last state) on entry and dL/d(initial state) on exit;
    dA_part: (b, N, d) float64; dB_part, dC_part: (n_groups, b, L, N) float64.
    """
    batch, length, d_inner = u.shape
    N = AT.shape[0]
    n_chunks = ckpt.shape[1]
    n_blocks = d_inner // LANES
    per = -(-n_blocks // n_groups)
    for idx in prange(batch * n_groups):
        b = idx // n_groups
        g = idx - b * n_groups
        blk_lo = min(n_blocks, g * per)
        blk_hi = min(n_blocks, blk_lo + per)
        xs = np.empty((chunk + 1) * N * LANES, np.float64)  # states before each step of the chunk, and after
        dec = np.empty(chunk * N * LANES, AT.dtype)
        kbuf = np.empty(_EXP_BLOCK * N * LANES, AT.dtype)
        dB_c = np.zeros(chunk * N, np.float64)  # this chunk's dB, dC summed over the group's channels
        dC_c = np.zeros(chunk * N, np.float64)
        a_b = np.empty((N, LANES), AT.dtype)
        gx = np.empty((N, LANES), np.float64)
        dA_acc = np.empty((N, LANES), np.float64)
        dt = np.empty(LANES, np.float64)
        ut = np.empty(LANES, np.float64)
        du = np.empty(LANES, np.float64)
        gy = np.empty(LANES, np.float64)
        s_b = np.empty(LANES, np.float64)
        s_a = np.empty(LANES, np.float64)
        p_c = np.empty(LANES, np.float64)  # per-lane terms of this step's dC and dB, summed by _lane_sum
        p_b = np.empty(LANES, np.float64)
        for blk in range(blk_lo, blk_hi):
            for n in range(N):
                for lane in range(LANES):
                    dA_part[b, n, blk * LANES + lane] = 0.0
        # chunks outermost so the (chunk, N) accumulators stay in cache while the channels are summed
        for c in range(n_chunks - 1, -1, -1):
            t0 = c * chunk
            t1 = min(length, t0 + chunk)
            if t1 <= t0:
                continue
            for i in range((t1 - t0) * N):
                dB_c[i] = 0.0
                dC_c[i] = 0.0
            for blk in range(blk_lo, blk_hi):
                d0 = blk * LANES
                for n in range(N):
                    for lane in range(LANES):
                        xs[n * LANES + lane] = ckpt[b, c, n, d0 + lane]
                        a_b[n, lane] = AT[n, d0 + lane]
                        gx[n, lane] = dh[b, n, d0 + lane]
                        dA_acc[n, lane] = 0.0
                _decays(delta, b, d0, t0, t1, a_b, dec, kbuf)
                m = 0
                for t in range(t0, t1):  # recompute the chunk's states as the forward did
                    for lane in range(LANES):
                        du[lane] = np.float64(delta[b, t, d0 + lane]) * u[b, t, d0 + lane]
                    for n in range(N):
                        bn = np.float64(Bt[b, t, n])
                        for lane in range(LANES):
                            xs[m + N * LANES + lane] = dec[m + lane] * xs[m + lane] + du[lane] * bn
                        m += LANES
                for t in range(t1 - 1, t0 - 1, -1):  # adjoint, backwards in time
                    i = t - t0
                    m = i * N * LANES
                    for lane in range(LANES):
                        dt[lane] = delta[b, t, d0 + lane]
                        ut[lane] = u[b, t, d0 + lane]
                        du[lane] = dt[lane] * ut[lane]
                        gy[lane] = dy[b, t, d0 + lane]
                        s_b[lane] = 0.0
                        s_a[lane] = 0.0
                    for n in range(N):
                        bn = np.float64(Bt[b, t, n])
                        cn = np.float64(Ct[b, t, n])
                        for lane in range(LANES):
                            gn = gx[n, lane] + gy[lane] * cn  # dL/dx[t]
                            p_c[lane] = gy[lane] * xs[m + N * LANES + lane]
                            p_b[lane] = gn * du[lane]
                            s_b[lane] += gn * bn
                            gda = gn * dec[m + lane] * xs[m + lane]  # dL/d(delta * A) at t
                            s_a[lane] += gda * a_b[n, lane]
                            dA_acc[n, lane] += gda * dt[lane]
                            gx[n, lane] = gn * dec[m + lane]  # dL/dx[t-1] through x[t]
                        dC_c[i * N + n] += _lane_sum(p_c)
                        dB_c[i * N + n] += _lane_sum(p_b)
                        m += LANES
                    for lane in range(LANES):
                        du_g[b, t, d0 + lane] = s_b[lane] * dt[lane]
                        ddelta_g[b, t, d0 + lane] = s_b[lane] * ut[lane] + s_a[lane]
                for n in range(N):
                    for lane in range(LANES):
                        dh[b, n, d0 + lane] = gx[n, lane]
                        dA_part[b, n, d0 + lane] += dA_acc[n, lane]
            for t in range(t0, t1):
                for n in range(N):
                    dB_part[g, b, t, n] = dB_c[(t - t0) * N + n]
                    dC_part[g, b, t, n] = dC_c[(t - t0) * N + n]


def _time_major(x: torch.Tensor, d_pad: int) -> np.ndarray:
    """(b, d, L) tensor -> contiguous (b, L, d + d_pad) array, zero-padded channels."""
    x = x.detach().transpose(1, 2)
    if d_pad:
        x = F.pad(x, (0, d_pad))
    return x.contiguous().numpy()


def _state_major(x: torch.Tensor, d_pad: int) -> np.ndarray:
    """(b, d, N) tensor -> contiguous float64 (b, N, d + d_pad) array."""
    return _time_major(x.to(torch.float64), d_pad)


@functools.cache
def _start_thread_pool() -> None:
    """Start numba's thread pool once, keeping torch's thread count.

    numba's OpenMP threading layer, when its pool starts (at the first parallel kernel), sets the OpenMP thread
    count of the calling thread, which torch's CPU operations share, to ``NUMBA_NUM_THREADS``: a caller's
    ``torch.set_num_threads(1)`` became one thread per core for the rest of the session.
    """
    threads = torch.get_num_threads()
    numba.get_num_threads()  # starts the pool if no one has
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _n_groups(batch: int, n_blocks: int) -> int:
    threads = numba.get_num_threads()
    return max(1, min(n_blocks, math.ceil(2 * threads / batch)))


class ScanCoreNumba(torch.autograd.Function):
    """``(u, delta, A, B, C, h0) -> (y, h_last)`` with ``y`` before D and gating, on CPU tensors."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, chunk):
        _start_thread_pool()
        batch, d_inner, length = u.shape
        N = A.shape[1]
        d_pad = -d_inner % LANES
        u_t, delta_t = _time_major(u, d_pad), _time_major(delta, d_pad)
        AT = _time_major(A[None], d_pad)[0]  # (N, d)
        Bt = B.detach().transpose(1, 2).contiguous().numpy()
        Ct = C.detach().transpose(1, 2).contiguous().numpy()
        y = np.empty_like(u_t)
        h_last = np.empty((batch, N, d_inner + d_pad), np.float64)
        ckpt = np.empty((batch, max(1, math.ceil(length / chunk)), N, d_inner + d_pad), np.float64)
        _forward_kernel(u_t, delta_t, AT, Bt, Ct, _state_major(h0, d_pad), y, h_last, ckpt, chunk)
        ctx.save_for_backward(u, delta, A, B, C, torch.from_numpy(ckpt))
        ctx.chunk = chunk
        y_out = torch.from_numpy(y)[:, :, :d_inner].transpose(1, 2).contiguous()
        h_out = torch.from_numpy(h_last)[:, :, :d_inner].transpose(1, 2).to(u.dtype).contiguous()
        return y_out, h_out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh):
        u, delta, A, B, C, ckpt = ctx.saved_tensors
        batch, d_inner, length = u.shape
        N = A.shape[1]
        d_pad = -d_inner % LANES
        groups = _n_groups(batch, (d_inner + d_pad) // LANES)
        u_t = _time_major(u, d_pad)
        du_g = np.empty_like(u_t)
        ddelta_g = np.empty_like(u_t)
        dA_part = np.empty((batch, N, d_inner + d_pad), np.float64)
        dB_part = np.empty((groups, batch, length, N), np.float64)
        dC_part = np.empty((groups, batch, length, N), np.float64)
        dh_ = _state_major(dh, d_pad)
        _backward_kernel(
            u_t,
            _time_major(delta, d_pad),
            _time_major(A[None], d_pad)[0],
            B.detach().transpose(1, 2).contiguous().numpy(),
            C.detach().transpose(1, 2).contiguous().numpy(),
            ckpt.numpy(),
            ctx.chunk,
            _time_major(dy.to(u.dtype), d_pad),
            dh_,
            groups,
            du_g,
            ddelta_g,
            dA_part,
            dB_part,
            dC_part,
        )
        dt = u.dtype

        def back(x: np.ndarray) -> torch.Tensor:  # (b, L|N, d + pad) -> (b, d, L|N)
            return torch.from_numpy(x)[:, :, :d_inner].transpose(1, 2).to(dt).contiguous()

        dA = torch.from_numpy(dA_part.sum(0))[:, :d_inner].T.to(dt).contiguous()
        dB = torch.from_numpy(dB_part.sum(0)).transpose(1, 2).to(dt).contiguous()
        dC = torch.from_numpy(dC_part.sum(0)).transpose(1, 2).to(dt).contiguous()
        return back(du_g), back(ddelta_g), dA, dB, dC, back(dh_), None


def scan_core_numba(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h0: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run :class:`ScanCoreNumba` (CPU tensors of one dtype, float32 or float64).

    Parameters
    ----------
    u, delta
        (batch, d_inner, L); ``delta`` already biased / softplus-ed.
    A
        (d_inner, N).
    B, C
        (batch, N, L).
    h0
        Initial state, (batch, d_inner, N).
    chunk
        Checkpoint interval of the forward states (the backward recomputes one chunk at a time);
        rounded up to a multiple of 16.

    Returns
    -------
    y, h_last
        Output before D / gating, (batch, d_inner, L), and the last state, (batch, d_inner, N).
    """
    chunk = max(_EXP_BLOCK, -(-int(chunk) // _EXP_BLOCK) * _EXP_BLOCK)  # a multiple of _EXP_BLOCK
    return ScanCoreNumba.apply(u, delta, A, B, C, h0, chunk)
