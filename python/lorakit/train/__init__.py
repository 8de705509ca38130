"""The training loop (accumulation, schedules, evaluation, early stopping, checkpoints, metrics)
and the recipes built on it."""

from lorakit.train.config import TrainConfig
from lorakit.train.trainer import Trainer, TrainResult

__all__ = ["TrainConfig", "TrainResult", "Trainer"]
