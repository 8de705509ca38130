"""AdamW with 32-bit or 8-bit state, one fused native op per parameter and step."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from lorakit import ops
from lorakit.optim.paging import PagedParam, StatePager
from lorakit.optim.state import check_loaded_state, local_shard, new_state, uses_8bit
from lorakit.quant import dynamic_map

# clip_grad_norm_'s guard against dividing by a zero norm, kept so max_grad_norm clips alike.
_CLIP_EPS = 1e-6


def fused_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    hyper: dict[str, Any],
    codes: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """One fused AdamW step of ``param`` (or a page of it) with its state (or that page's).

    ``state`` holds 8-bit moments when it has absmax tensors; ``codes`` are then the signed and
    unsigned dynamic maps they are quantized with. ``hyper``: the op's keyword arguments.
    """
    if "exp_avg_absmax" in state:
        ops.adamw8bit_step_(
            param,
            grad,
            state["exp_avg"],
            state["exp_avg_absmax"],
            state["exp_avg_sq"],
            state["exp_avg_sq_absmax"],
            *codes,
            **hyper,
        )
    else:
        ops.adamw_step_(param, grad, state["exp_avg"], state["exp_avg_sq"], **hyper)


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter) computed as ``torch.optim.AdamW`` does, fused per parameter.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lr: learning rate.
        betas: decay rates of the first and second moment.
        eps: added to the denominator.
        weight_decay: decoupled weight decay (``param *= 1 - lr * weight_decay``).
        state_bits: 32 keeps both moments in float32 (8 bytes per parameter); 8 keeps them as
            blockwise 8-bit codes (2 bytes plus 8 bytes per 256). Tensors under 4096 elements
            keep 32-bit state either way.
        max_grad_norm: if set, gradients are scaled as ``clip_grad_norm_`` would (total 2-norm
            over all parameters of this optimizer), inside the step instead of in a separate pass.
            The last step's norm (before clipping) is kept in ``grad_norm`` for logging.
        paged: keep the state of CUDA parameters in pinned host memory and stream it through a
            pool of pages on the GPU, so that state never takes more than ``page_budget_mb`` of
            GPU memory (see :class:`lorakit.optim.paging.StatePager`). The results are exactly
            those of resident state. CPU parameters are not affected (their state is in host
            memory already).
        page_budget_mb: the most GPU memory, per device, that paged optimizer state may take;
            ``math.inf`` keeps all state resident. When all state fits, nothing is copied.

    NaN and Inf gradients: without ``max_grad_norm`` they propagate as in ``torch.optim.AdamW``:
    the parameter elements they touch and their moments become NaN (with 8-bit state the NaN
    spreads to the moments of its whole block of 256, through the block's absmax). Checking
    would cost a pass over every gradient; ``torch.amp.GradScaler`` already skips such steps.
    With ``max_grad_norm`` the norm is computed anyway, so a non-finite norm raises
    ``FloatingPointError`` before anything is changed.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        state_bits: int = 32,
        max_grad_norm: float | None = None,
        paged: bool = False,
        page_budget_mb: float = 1024.0,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if state_bits not in (32, 8):
            raise ValueError(f"state_bits must be 32 or 8, got {state_bits}")
        if max_grad_norm is not None and not max_grad_norm > 0.0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        if not page_budget_mb > 0.0:
            raise ValueError(f"page_budget_mb must be > 0, got {page_budget_mb}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "state_bits": state_bits,
        }
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.paged = paged and math.isfinite(page_budget_mb)
        self.page_budget_mb = page_budget_mb
        self._pagers: dict[torch.device, StatePager] = {}
        self.grad_norm: float | None = None
        self._codes: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _pager(self, device: torch.device) -> StatePager | None:
        """The pager of ``device``'s parameters, planned over all of them on first use; None
        when their state is not paged (CPU parameters: their state is in host memory already)."""
        if not self.paged or device.type != "cuda":
            return None
        if device not in self._pagers:
            pager = StatePager(device, int(self.page_budget_mb * 2**20))
            pager.plan(
                [
                    (p, uses_8bit(p, group["state_bits"]))
                    for group in self.param_groups
                    for p in group["params"]
                    if p.device == device and p.requires_grad
                ]
            )
            self._pagers[device] = pager
        return self._pagers[device]

    def _home(self, param: torch.Tensor) -> torch.device:
        """Where ``param``'s state lives: pinned host memory when paged, else beside it."""
        pager = self._pager(param.device)
        return pager.home(param) if pager is not None else param.device

    def _synchronize(self) -> None:
        for pager in self._pagers.values():
            pager.synchronize()

    def _dynamic_maps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._codes:
            self._codes[device] = (dynamic_map(True, device), dynamic_map(False, device))
        return self._codes[device]

    def _params_with_grad(self) -> list[tuple[dict[str, Any], int, torch.Tensor]]:
        found = []
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError(
                            f"lorakit.optim.AdamW: parameter {index} has a sparse gradient, "
                            "which is not supported; use dense gradients "
                            "(e.g. nn.Embedding(sparse=False))"
                        )
                    found.append((group, index, p))
                index += 1
        return found

    def _grad_scale(self, params: list[torch.Tensor]) -> float:
        if self.max_grad_norm is None or not params:
            return 1.0
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        # Over DTensor gradients the norm is a DTensor of the ranks' partial sums.
        norm = float(total.full_tensor() if isinstance(total, DTensor) else total)
        self.grad_norm = norm
        if norm != norm or norm == float("inf"):
            raise FloatingPointError(
                f"lorakit.optim.AdamW: the gradient norm is {norm}; no parameter was updated"
            )
        return min(1.0, self.max_grad_norm / (norm + _CLIP_EPS))

    def _update(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, Any],
        hyper: dict[str, Any],
    ) -> None:
        fused_step(param, grad, state, hyper, self._dynamic_maps(param.device))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Performs one step; ``closure``, if given, re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = self._params_with_grad()
        grad_scale = self._grad_scale([p for _, _, p in todo])
        paged: dict[StatePager, list[PagedParam]] = {}
        for group, index, p in todo:
            state = self.state[p]
            home = self._home(p)
            eightbit = uses_8bit(p, group["state_bits"])
            if not state:
                state.update(new_state(p, eightbit, home, pin_memory=home != p.device))
            device = state["exp_avg"].device
            if device != home:
                raise RuntimeError(
                    f"lorakit.optim.AdamW: parameter {index} is on {p.device} and its optimizer "
                    f"state should be on {home}, but it is on {device}; create the optimizer (or "
                    "load its state) after moving the model"
                )
            state["step"] += 1
            beta1, beta2 = group["betas"]
            hyper = {
                "lr": float(group["lr"]),
                "beta1": beta1,
                "beta2": beta2,
                "eps": group["eps"],
                "weight_decay": group["weight_decay"],
                "step": state["step"],
                "grad_scale": grad_scale,
            }
            update = functools.partial(self._update, hyper=hyper)
            shard, grad = local_shard(p), local_shard(p.grad)
            pager = self._pager(p.device)
            if pager is not None and home != p.device:
                paged.setdefault(pager, []).append(PagedParam(shard, state, eightbit, update, grad))
            else:
                update(shard, grad, state)
        for pager, items in paged.items():
            pager.step(items)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict saved by an AdamW of the same configuration (``state_bits``).

        Raises:
            ValueError: the state dict comes from another optimizer or configuration.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(saved_groups)} parameter groups, this optimizer "
                f"{len(self.param_groups)}"
            )
        for ours, saved in zip(self.param_groups, saved_groups, strict=True):
            if saved.get("state_bits") != ours["state_bits"]:
                raise ValueError(
                    f"the state dict holds state_bits={saved.get('state_bits')} state (None: not "
                    f"from lorakit.optim.AdamW) but this optimizer has state_bits="
                    f"{ours['state_bits']}; create the optimizer with the saved configuration"
                )
            if len(saved["params"]) != len(ours["params"]):
                raise ValueError("a parameter group of the state dict has a different size")
            for index, p in zip(saved["params"], ours["params"], strict=True):
                if index in state_dict["state"]:
                    check_loaded_state(index, p, state_dict["state"][index], ours["state_bits"])
        self._synchronize()  # no copy may still be writing the state that is replaced
        # torch.optim would cast floating state to each parameter's dtype (float32 moments of a
        # bf16 parameter to bf16, losing bits), so the state is loaded here, only moved.
        super().load_state_dict({**state_dict, "state": {}})
        for saved, ours in zip(saved_groups, self.param_groups, strict=True):
            for index, p in zip(saved["params"], ours["params"], strict=True):
                if index in state_dict["state"]:
                    self.state[p] = {
                        k: self._placed(p, v) if isinstance(v, torch.Tensor) else v
                        for k, v in state_dict["state"][index].items()
                    }

    def _placed(self, param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """A copy of loaded state ``value`` where ``param``'s state lives (pinned when paged)."""
        home = self._home(param)
        if home == param.device:
            return value.to(device=home)
        return value.to(device=home).pin_memory()

    def state_dict(self) -> dict[str, Any]:
        """The state, as ``torch.optim.Optimizer.state_dict``; paged state is read only after
        every copy of it has landed."""
        self._synchronize()
        return super().state_dict()
