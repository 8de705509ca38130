"""The step engine (accumulation, schedules, evaluation, early stopping, checkpoints, metrics),
handed an objective and batches; the objectives recipes use."""

from lorakit.train.batches import RowBatches
from lorakit.train.config import TrainConfig
from lorakit.train.objective import Objective, ObjectiveOutput
from lorakit.train.trainer import Diverged, Interrupted, Trainer, TrainResult

__all__ = [
    "Diverged",
    "Interrupted",
    "Objective",
    "ObjectiveOutput",
    "RowBatches",
    "TrainConfig",
    "TrainResult",
    "Trainer",
]
