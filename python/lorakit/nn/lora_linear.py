"""LoRA: trainable low-rank updates beside a frozen linear layer, several by name."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lorakit import ops
from lorakit.nn.adapter_layer import AdapterLayer
from lorakit.nn.nf4_linear import NF4Linear, nf4_lora_linear


@dataclass(frozen=True)
class LoraSettings:
    """The hyperparameters of one adapter of a :class:`LoRALinear`."""

    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def check(self, in_features: int, out_features: int) -> None:
        """Raises ValueError unless the rank fits an ``in -> out`` layer, dropout is in range and
        the scaling is finite."""
        largest = min(in_features, out_features)
        r = self.r
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= largest:
            raise ValueError(
                f"LoRA rank r must be an integer from 1 to min(in, out) = {largest} for a "
                f"{in_features} -> {out_features} layer, got {r!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not math.isfinite(self.scaling):
            raise ValueError(f"LoRA alpha must be finite, got {self.alpha}")


class LoRALinear(AdapterLayer):
    """``y = base(x) + s · B A dropout(x)`` with ``base`` frozen (Hu et al. 2021, QLoRA 2023).

    The layer holds any number of named adapters (``lora_A[name]``, ``lora_B[name]``) over one
    frozen base; one of them is active at a time, and :attr:`adapters_enabled` = False gives the
    base alone. Switching copies nothing.

    ``A`` (r, in) starts Kaiming-uniform, as PEFT initialises it, and ``B`` (out, r) at zero, so a
    new adapter leaves the output unchanged. ``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA
    (Kalajdzievski 2023). Dropout applies to the low-rank path's input only, as in PEFT. Forward
    and backward run as one native op (the low-rank term accumulates into the base product's
    output); the base weight gets no gradient.

    Args:
        base: an ``nn.Linear`` or :class:`NF4Linear`; its parameters are frozen.
        r: rank of the first adapter, 1 to ``min(in_features, out_features)``.
        alpha: scaling numerator.
        dropout: probability of zeroing an input of the low-rank path while training.
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        name: the first adapter's name; it becomes the active one.

    Raises:
        TypeError: ``base`` is neither an ``nn.Linear`` nor an ``NF4Linear``.
        ValueError: ``r`` or ``dropout`` out of range.
    """

    method = "LoRA"

    def __init__(
        self,
        base: nn.Linear | NF4Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        name: str = "default",
    ) -> None:
        super().__init__(name)
        if not isinstance(base, nn.Linear | NF4Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear or NF4Linear, got {type(base).__name__}")
        base.requires_grad_(False)
        self.base = base
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.settings: dict[str, LoraSettings] = {}
        self.add_adapter(name, LoraSettings(r, alpha, dropout, use_rslora))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add_adapter(self, name: str, settings: LoraSettings) -> None:
        """Adds a fresh adapter (``B = 0``); the active one stays active.

        Raises:
            ValueError: the name is taken, or the rank or dropout is out of range.
        """
        settings.check(self.in_features, self.out_features)
        if name in self.settings:
            raise ValueError(f"this layer already has a LoRA adapter named {name!r}")
        weight, r = self.base.weight, settings.r
        options = {"dtype": weight.dtype, "device": weight.device}
        self.lora_A[name] = nn.Parameter(torch.empty(r, self.in_features, **options))
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, **options))
        # nn.Linear's default init (Kaiming-uniform with a = sqrt(5)), which PEFT uses for A.
        nn.init.kaiming_uniform_(self.lora_A[name], a=math.sqrt(5))
        self.settings[name] = settings

    @classmethod
    def wrap(cls, base: nn.Module, name: str, settings: LoraSettings) -> LoRALinear:
        return cls(base, name=name, **asdict(settings))

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.lora_A[name], self.lora_B[name]] if name in self.settings else []

    def check_merge(self, name: str) -> None:
        pass  # dense and NF4 bases both take a low-rank update

    def _update_base(self, name: str, undo: bool) -> None:
        # W += s B A (merge) or W -= s B A (unmerge). A dense weight changes by one rounding of its
        # dtype; an NF4 weight is quantized again, which unmerge cannot undo exactly (see the NF4
        # merge test for its size).
        a, b = self.lora_A[name].detach(), self.lora_B[name].detach()
        scale = (-1.0 if undo else 1.0) * self.settings[name].scaling
        if isinstance(self.base, NF4Linear):
            self.base.weight = self.base.weight.with_low_rank_update(a, b, scale)
        else:
            ops.lora_merge_(self.base.weight.data, a, b, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Submodules and parameters are read from nn.Module's own dicts: its __getattr__ costs about
        # a microsecond a lookup, and the eight lookups this takes were 3% of a 1-row decode step
        # of a 2048 x 2048 layer. A parametrized weight or bias (torch.nn.utils.parametrize) is
        # computed by the module instead, and read through it.
        base = self._modules["base"]
        if not self.uses_adapter():
            return base(x)
        name = self.active_adapter
        settings = self.settings[name]
        p = settings.dropout
        x_lora = F.dropout(x, p, training=True) if p > 0 and self.training else None
        lora_a = self._modules["lora_A"]._parameters[name]
        lora_b = self._modules["lora_B"]._parameters[name]
        adapter = (lora_a, lora_b, settings.scaling, x_lora)
        params = base._parameters
        bias = params["bias"] if "bias" in params else base.bias
        if isinstance(base, NF4Linear):
            return nf4_lora_linear(x, base.weight, bias, *adapter)
        weight = params["weight"] if "weight" in params else base.weight
        return ops.lora_linear(x, weight, bias, *adapter)

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{n}: r={s.r}, alpha={s.alpha}, scaling={s.scaling:g}"
            for n, s in self.settings.items()
        )
        return f"active={self.active_adapter!r}, {adapters}"
