import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import the references next to them

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so that equality also holds for NaN and signed zeros."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])
