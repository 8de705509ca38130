r"""The KL coefficient of PPO's reward penalty: fixed, or adapted towards a target KL.

Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", sec. 2.2: the reward
is :math:`R = r - \beta\,\mathrm{KL}`, and :math:`\beta` follows a proportional controller

.. math::

    e_t = \mathrm{clip}\Big(\frac{\mathrm{KL}_t - \mathrm{KL}_{target}}{\mathrm{KL}_{target}},
    -0.2, 0.2\Big), \qquad \beta_{t+1} = \beta_t\,(1 + K_\beta\, e_t), \quad
    K_\beta = \frac{n}{\text{horizon}},

``n`` being the samples (episodes) of the step, as TRL's ``AdaptiveKLController`` computed it
(TRL <= 0.11; the same controller as OpenAI's ``lm-human-preferences``).
"""

from __future__ import annotations

# Ziegler et al. 2019's clip of the proportional error.
ERROR_CLIP = 0.2


class FixedKLController:
    """A constant KL coefficient ``value`` (TRL's ``FixedKLController``)."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"FixedKLController: kl_coef must be >= 0, got {kl_coef}")
        self.value = kl_coef

    def update(self, current: float, n_steps: int) -> float:
        """No change; returns the coefficient."""
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """The proportional controller of the module docstring (TRL's ``AdaptiveKLController``).

    Args:
        init_kl_coef: the starting coefficient (TRL's PPO ``kl_coef`` default 0.05).
        target: the KL to steer towards (nats per sequence, as the caller measures it).
        horizon: samples over which the coefficient may change by about ``e^{0.2}``
            (Ziegler et al. used 10,000).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int = 10000) -> None:
        super().__init__(init_kl_coef)
        if target <= 0 or horizon < 1:
            raise ValueError(
                f"AdaptiveKLController: target must be > 0 and horizon >= 1, got {target}, "
                f"{horizon}"
            )
        self.target, self.horizon = target, horizon

    def update(self, current: float, n_steps: int) -> float:
        """Moves the coefficient after a step that measured KL ``current`` over ``n_steps``
        samples; returns the new value."""
        error = min(max(current / self.target - 1, -ERROR_CLIP), ERROR_CLIP)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value
