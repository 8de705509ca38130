"""Constitutional self-critique: principles, the critique loop, its generator and its files."""

from lorakit.constitutional.generator import Completion, Generator, ModelGenerator
from lorakit.constitutional.loop import Record, Step, critique_batch, judge_batch, pick_principles
from lorakit.constitutional.outputs import Outputs
from lorakit.constitutional.principles import DEFAULT, Principle, load_principles

__all__ = [
    "DEFAULT",
    "Completion",
    "Generator",
    "ModelGenerator",
    "Outputs",
    "Principle",
    "Record",
    "Step",
    "critique_batch",
    "judge_batch",
    "load_principles",
    "pick_principles",
]
