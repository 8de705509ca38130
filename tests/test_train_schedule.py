"""Learning-rate schedules at the points that define them."""

import pytest
import torch

from lorakit.train.schedule import constant, cosine, scheduler, wsd


def test_cosine_warms_up_linearly_then_halves_at_the_midpoint_of_the_decay() -> None:
    assert cosine(0, total=100, warmup=10) == pytest.approx(0.1)
    assert cosine(9, total=100, warmup=10) == pytest.approx(1.0)
    assert cosine(10, total=100, warmup=10) == pytest.approx(1.0)
    assert cosine(55, total=100, warmup=10) == pytest.approx(0.5)
    assert cosine(100, total=100, warmup=10) == pytest.approx(0.0)


def test_wsd_is_10_percent_warmup_80_constant_10_linear_decay() -> None:
    values = [wsd(s, total=100) for s in range(100)]
    assert values[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert values[10:90] == [1.0] * 80
    assert values[90:] == pytest.approx([(100 - s) / 10 for s in range(90, 100)])


def test_constant_after_warmup() -> None:
    assert [constant(s, total=10, warmup=2) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_scheduler_drives_the_optimizer_and_rejects_unknown_names() -> None:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = scheduler(opt, "wsd", total=20, warmup_share=0.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)  # step 0 of a 2-step warmup
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        scheduler(opt, "linear", total=20, warmup_share=0.1)
