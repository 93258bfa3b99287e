"""The Mamba block against a plain per-time-step reference written from the equations (fp64)."""

import math

import pytest
import torch
import torch.nn.functional as F

from dfmamba_st.core import Mamba, available_backends


def plain_mamba(block: Mamba, hidden: torch.Tensor, alpha: float) -> torch.Tensor:
    """Token by token: in_proj, causal depthwise conv, SiLU, x_proj, Δ = min(softplus(.)·α, dt_max), scan, gate."""
    batch, length, _ = hidden.shape
    w_conv = block.conv1d.weight[:, 0, :]  # (d_inner, d_conv)
    A = -torch.exp(block.A_log)
    outs = []
    for b in range(batch):
        xz = hidden[b] @ block.in_proj.weight.T
        x, z = xz[:, : block.d_inner], xz[:, block.d_inner :]
        state = torch.zeros(block.d_inner, block.d_state, dtype=hidden.dtype)
        rows = []
        for t in range(length):
            acc = block.conv1d.bias.clone()
            for j in range(block.d_conv):
                src = t - (block.d_conv - 1) + j
                if src >= 0:
                    acc = acc + w_conv[:, j] * x[src]
            xc = F.silu(acc)
            proj = block.x_proj.weight @ xc
            dt_in, B, C = (
                proj[: block.dt_rank],
                proj[block.dt_rank : block.dt_rank + block.d_state],
                proj[-block.d_state :],
            )
            delta = F.softplus(block.dt_proj.weight @ dt_in + block.dt_proj.bias) * alpha
            if block.dt_max is not None:
                delta = torch.minimum(delta, torch.full_like(delta, block.dt_max))
            state = torch.exp(delta[:, None] * A) * state + (delta * xc)[:, None] * B[None, :]
            y = state @ C + block.D * xc
            rows.append((y * F.silu(z[t])) @ block.out_proj.weight.T)
        outs.append(torch.stack(rows))
    return torch.stack(outs)


@pytest.mark.parametrize("alpha", [1.0, 4.0, 64.0])
@pytest.mark.parametrize("backend", available_backends())
def test_block_matches_plain_reference(alpha, backend):
    torch.manual_seed(0)
    block = Mamba(6, d_state=3, d_conv=4, expand=2, dt_max=2.0, backend=backend).double()
    hidden = torch.randn(2, 11, 6, dtype=torch.float64)
    # fp64 throughout: agreement to rounding (a float32 step anywhere would show as ~1e-8 relative)
    torch.testing.assert_close(block(hidden, alpha=alpha), plain_mamba(block, hidden, alpha), rtol=0, atol=1e-13)


def test_bidirectional_averages_both_directions_with_one_set_of_weights():
    torch.manual_seed(0)
    block = Mamba(4, d_state=2, bidirectional=True, backend="reference").double()
    hidden = torch.randn(1, 9, 4, dtype=torch.float64)
    fwd = plain_mamba(block, hidden, 1.0)
    bwd = plain_mamba(block, hidden.flip(1), 1.0).flip(1)
    torch.testing.assert_close(block(hidden), 0.5 * (fwd + bwd), rtol=0, atol=1e-13)


def test_time_step_is_scaled_then_clipped():
    block = Mamba(4, d_state=2, dt_max=0.5)
    dt = torch.zeros(1, block.d_inner, 3)
    base = F.softplus(block.dt_proj.bias)[None, :, None].expand_as(dt)
    assert torch.allclose(block.time_step(dt, 2.0), torch.clamp(2.0 * base, max=0.5))
    assert block.time_step(dt + 100.0, 1.0).max().item() == pytest.approx(0.5)
    # a step of 0.3 scaled by 2 is clipped to 0.5 (clipping first, then scaling, would give 0.6)
    target = torch.tensor(0.3)
    at = (target + torch.log(-torch.expm1(-target)) - block.dt_proj.bias)[None, :, None].expand_as(dt)
    assert torch.allclose(block.time_step(at, 1.0), torch.full_like(dt, 0.3), atol=1e-6)
    assert torch.allclose(block.time_step(at, 2.0), torch.full_like(dt, 0.5))


def test_parameter_names_and_shapes_follow_mamba_ssm():
    block = Mamba(32, d_state=16, d_conv=4, expand=2)
    shapes = {name: tuple(p.shape) for name, p in block.named_parameters()}
    dt_rank = math.ceil(32 / 16)
    assert shapes == {
        "A_log": (64, 16),
        "D": (64,),
        "in_proj.weight": (128, 32),
        "conv1d.weight": (64, 1, 4),
        "conv1d.bias": (64,),
        "x_proj.weight": (dt_rank + 32, 64),
        "dt_proj.weight": (64, dt_rank),
        "dt_proj.bias": (64,),
        "out_proj.weight": (32, 64),
    }
    # S4D-real initialisation and the initial time steps inside [dt_min, dt_max_init]
    assert torch.allclose(-torch.exp(block.A_log[0]), -torch.arange(1, 17, dtype=torch.float32))
    dt0 = F.softplus(block.dt_proj.bias.detach())
    assert float(dt0.min()) >= 1e-4 - 1e-7 and float(dt0.max()) <= 0.1 + 1e-6


def test_mamba_initial_time_steps_are_log_uniform_and_dt_weights_bounded():
    """M06/M07/M08: dt = exp(U(log dt_min, log dt_max_init)); dt_proj.weight ~ U(±dt_rank^-0.5); D = 1."""
    torch.manual_seed(0)
    block = Mamba(1024, d_state=2, expand=2)  # 2048 channels, dt_rank 64
    dt = torch.nn.functional.softplus(block.dt_proj.bias.detach()).double()
    log_dt = (dt.log() - math.log(1e-3)) / (math.log(0.1) - math.log(1e-3))  # U(0, 1) if log-uniform
    assert abs(float(log_dt.mean()) - 0.5) < 0.03 and abs(float((log_dt < 0.25).double().mean()) - 0.25) < 0.03
    bound = block.dt_rank**-0.5
    w = block.dt_proj.weight.detach().abs()
    assert float(w.max()) <= bound and float(w.max()) > 0.95 * bound
    assert torch.equal(block.D.detach(), torch.ones(block.d_inner))
    # draws below dt_init_floor are raised to it before the bias is set
    floored = Mamba(64, d_state=2, dt_min=1e-6, dt_max_init=1e-4, dt_init_floor=1e-3)
    dt = torch.nn.functional.softplus(floored.dt_proj.bias.detach().double())
    assert torch.allclose(dt, torch.full_like(dt, 1e-3), rtol=1e-4)
