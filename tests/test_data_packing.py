"""Packing: row boundaries, position ids, and attention that stays within each example."""

import pytest
import torch

from lorakit.data import IGNORE, Example, Row, collate, pack
from sft_helpers import llama, tokenizer


def ex(*ids: int) -> Example:
    return Example(list(ids), [IGNORE, *ids[1:]])


def test_pack_fills_rows_in_order_and_restarts_positions() -> None:
    rows = pack([ex(1, 2, 3), ex(4, 5), ex(6, 7, 8, 9), ex(10)], length=5)
    assert [r.input_ids for r in rows] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert [r.position_ids for r in rows] == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    # The first token of each example is never a target: not of the previous example either.
    assert rows[0].labels == [IGNORE, 2, 3, IGNORE, 5]


def test_pack_refuses_an_example_longer_than_a_row() -> None:
    with pytest.raises(ValueError, match="longer than the row"):
        pack([ex(1, 2, 3)], length=2)


def test_collate_pads_right_with_ignored_labels_and_continuing_positions() -> None:
    batch = collate([Row([1, 2, 3], [IGNORE, 2, 3], [0, 1, 0]), Row.of(ex(4))], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [IGNORE, IGNORE, IGNORE]]
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 1, 2]]


def test_a_packed_row_computes_what_its_examples_compute_separately() -> None:
    tok = tokenizer()
    model = llama(tok).eval()
    a, b, c = ex(2, 7, 8, 9, 10), ex(2, 11, 12), ex(2, 13, 14, 15)
    (row,) = pack([a, b, c], length=12)
    batch = collate([row], pad_id=0)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits[0]
        alone = [model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in (a, b, c)]
    # Same arithmetic up to the order of float32 sums in attention over different lengths.
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5)
    # Without the restarts, the second example would attend to the first.
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    assert not torch.allclose(leaky[len(a) :], torch.cat(alone[1:]), atol=1e-3)
