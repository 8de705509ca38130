"""``lorakit pretrain``: continued pre-training on plain text, every token trained on."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.data import DataConfig
from lorakit.recipes.common import RunConfig


@dataclass
class PretrainConfig(RunConfig):
    """Continued pre-training: as SFT, with the data read as plain text by default."""

    data: DataConfig = field(default_factory=lambda: DataConfig(format="text"))
