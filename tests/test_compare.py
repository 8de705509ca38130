"""`lorakit compare`: one row per method with sane values, the table, JSON and chart written."""

import json
import re

import pytest

from lorakit.cli import main
from lorakit.peft.methods import METHODS
from lorakit.recipes.compare import CompareConfig

HIDDEN, LAYERS = 32, 2
TINY = ["--hidden", str(HIDDEN), "--layers", str(LAYERS), "--pretrain-steps", "2"]
TINY += ["--steps", "4", "--warmup-steps", "1", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    # In one process: a fresh process per method costs ~10 s of imports here.
    assert main(["compare", "--out", str(out), "--no-isolate", *TINY]) == 0
    return out


def rows(out) -> dict[str, dict]:
    return {r["method"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}


def test_a_row_per_registered_method_with_sane_values(compared) -> None:
    table = rows(compared)
    assert list(table) == list(METHODS)
    assert table["full"]["trainable"] == table["full"]["total"]
    assert table["full"]["trainable_pct"] == 100.0
    assert 0 < table["lora"]["trainable"] < table["full"]["trainable"]
    assert table["qlora"]["trainable"] == table["lora"]["trainable"]
    size = HIDDEN // 16  # BottleneckConfig's default reduction factor
    assert table["bottleneck"]["trainable"] == 2 * LAYERS * (2 * HIDDEN * size + size + HIDDEN)
    assert 0 < table["ia3"]["trainable"] < table["lora"]["trainable"]
    assert 0 < table["prefix"]["trainable"] < table["full"]["trainable"]
    for row in table.values():
        assert row["step_ms"] > 0 and row["steps"] == 4
        assert 0 < row["val_loss"] < 20 and 0 < row["val_loss_before"] < 20
        assert row["peak_mib"] is None  # not measurable on the CPU without isolation
    assert table["full"]["val_loss"] < table["full"]["val_loss_before"]


def test_table_json_and_chart_are_written(compared, capsys) -> None:
    assert (compared / "compare.png").stat().st_size > 1000
    text = (compared / "compare.md").read_text()
    assert text.count("\n") == 2 + len(METHODS)
    assert re.search(r"\| bottleneck \| [\d,]+ \| [\d.]+ \| n/a \|", text)


def test_isolated_runs_measure_memory(tmp_path, capsys) -> None:
    argv = ["compare", "--out", str(tmp_path), "--methods", "bottleneck", *TINY]
    assert main(argv) == 0
    (row,) = rows(tmp_path).values()
    assert row["peak_mib"] is not None and row["peak_mib"] >= 0
    assert "| bottleneck |" in capsys.readouterr().out


def test_unknown_methods_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown methods"):
        CompareConfig(methods=["dora"])


def test_warmup_that_leaves_no_step_to_time_is_refused() -> None:
    # It timed every step instead, warm-up included, without a word.
    with pytest.raises(ValueError, match=r"--warmup-steps 4 leaves none of the --steps 4 to time"):
        CompareConfig(steps=4, warmup_steps=4)
    CompareConfig(steps=4, warmup_steps=3)
