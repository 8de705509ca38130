"""What every lorakit adapter module shares: named adapters, one active, on/off, merged or not."""

from __future__ import annotations

from typing import Any, ClassVar, Self

import torch
from torch import nn


class AdapterLayer(nn.Module):
    """A module that holds any number of named adapters of one method over a frozen base.

    ``settings`` maps each adapter name to its hyperparameters; :attr:`active_adapter` is the one
    forward uses (a name the module lacks passes the base through, so a model-wide adapter need
    not cover every module); :attr:`adapters_enabled` = False gives the base alone;
    :attr:`merged_adapter` names the adapter folded into the base weight, if any. Model-wide
    switching (:func:`lorakit.set_adapter`, :func:`lorakit.disable_adapters`) finds every module
    of this class, whatever its method, so a new method gets it by subclassing.

    Subclasses set :attr:`method` (for messages) and, when their update can be folded into the
    base weight, implement :meth:`check_merge` and :meth:`_update_base`.
    """

    method: ClassVar[str] = "adapter"

    def __init__(self, name: str) -> None:
        super().__init__()
        self.settings: dict[str, Any] = {}
        self.active_adapter = name
        self.adapters_enabled = True
        self.merged_adapter: str | None = None

    def set_adapter(self, name: str) -> None:
        """Makes ``name`` the adapter that forward uses; a name this module lacks passes the base
        through."""
        if self.merged_adapter is not None and name != self.merged_adapter:
            raise ValueError(
                f"adapter {self.merged_adapter!r} is merged into the base weight; "
                "unmerge it before switching adapters"
            )
        self.active_adapter = name

    @classmethod
    def wrap(cls, base: nn.Module, name: str, settings: Any) -> Self:
        """A new layer around ``base`` whose first adapter is ``name`` with ``settings``."""
        raise NotImplementedError(f"{cls.__name__} does not wrap a layer")

    def add_adapter(self, name: str, settings: Any) -> None:
        """Adds a fresh adapter beside the others; the active one stays active."""
        raise NotImplementedError

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter ``name`` (empty when this module lacks it)."""
        raise NotImplementedError

    def uses_adapter(self) -> bool:
        """Whether forward applies an adapter on top of the (unmerged) base."""
        return (
            self.adapters_enabled
            and self.merged_adapter is None
            and self.active_adapter in self.settings
        )

    @torch.no_grad()
    def merge(self) -> None:
        """Folds the active adapter into the base weight, in place; forward then runs the base.

        Raises:
            ValueError: an adapter is already merged, or the method cannot be merged.
            KeyError: this module lacks the active adapter.
        """
        if self.merged_adapter is not None:
            raise ValueError(f"adapter {self.merged_adapter!r} is already merged")
        self._require(self.active_adapter)
        self.check_merge(self.active_adapter)
        self._update_base(self.active_adapter, undo=False)
        self.merged_adapter = self.active_adapter

    @torch.no_grad()
    def unmerge(self) -> None:
        """Takes the merged adapter out of the base weight again."""
        if self.merged_adapter is None:
            raise ValueError("no adapter is merged into this layer")
        self._update_base(self.merged_adapter, undo=True)
        self.merged_adapter = None

    def check_merge(self, name: str) -> None:
        """Raises ValueError if adapter ``name`` cannot be merged into this module's base; called
        for every module before any is changed, so that a refusal leaves the model as it was."""
        raise ValueError(f"{self.method} adapters cannot be merged into the base weights")

    def _update_base(self, name: str, undo: bool) -> None:
        raise NotImplementedError

    def _require(self, name: str) -> None:
        if name not in self.settings:
            have = sorted(self.settings)
            raise KeyError(f"no {self.method} adapter named {name!r}; this layer has {have}")
