"""lorakit.optim.AdamW with torch.amp on the CPU: bf16 autocast and GradScaler."""

from __future__ import annotations

import copy

import pytest
import torch

from lorakit.optim import AdamW


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 1))


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return torch.nn.functional.mse_loss(model(x).float(), y)


@pytest.mark.parametrize("bits", [32, 8])
def test_grad_scaler_steps_as_unscaling_by_hand(bits: int) -> None:
    scaled_model = _model()
    manual_model = copy.deepcopy(scaled_model)
    scaled = AdamW(scaled_model.parameters(), lr=1e-3, state_bits=bits)
    manual = AdamW(manual_model.parameters(), lr=1e-3, state_bits=bits)
    scale = 2.0**10  # growth_interval is 2000 steps, so it stays put here
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    x = torch.randn(128, 64)
    y = torch.sin(x[:, :8].sum(1, keepdim=True))
    for _ in range(20):
        scaled.zero_grad()
        scaler.scale(_loss(scaled_model, x, y)).backward()
        scaler.step(scaled)
        scaler.update()
        manual.zero_grad()
        (_loss(manual_model, x, y) * scale).backward()
        for p in manual_model.parameters():
            p.grad.mul_(1.0 / scale)
        manual.step()
    assert scaled_model[0].weight.grad.dtype == torch.float32  # autocast keeps float32 params
    # Scaling and unscaling by a power of two are exact, so the two runs agree to the bit.
    for a, b in zip(scaled_model.parameters(), manual_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_grad_scaler_skips_a_step_with_an_inf_gradient() -> None:
    model = _model()
    opt = AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(model(torch.randn(4, 64)).sum()).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    # GradScaler found the inf while unscaling and never called step(): nothing moved, no state.
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert not opt.state and scaler.get_scale() == 2.0**9
