"""Loading local files, dedup, length filters, truncation counts, split and mixing."""

import random

import pytest

from data_files import SUFFIXES, write_as, write_jsonl
from lorakit.data import DataConfig, Example, load_rows, prepare
from lorakit.data.dedup import exact_duplicates, near_duplicates
from lorakit.data.pipeline import mix
from sft_helpers import qa_rows, tokenizer

TOK = tokenizer()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_every_supported_file_type_loads_the_same_rows(tmp_path, suffix) -> None:
    rows = qa_rows(5)
    path = write_as(tmp_path / f"data.{suffix}", rows, suffix)
    assert load_rows(path).to_list() == rows


def test_loading_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_rows(tmp_path / "missing.jsonl")
    (tmp_path / "data.xml").write_text("<x/>")
    with pytest.raises(ValueError, match=r"unknown file type '\.xml'"):
        load_rows(tmp_path / "data.xml")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_rows(bad)


def test_a_malformed_row_is_named(tmp_path) -> None:
    rows = [*qa_rows(3), {"prompt": "what is one ?", "completion": None}]
    config = DataConfig(data=[write_jsonl(tmp_path / "d.jsonl", rows)])
    with pytest.raises(ValueError, match=r"d\.jsonl: row 3: 'completion' is null"):
        prepare(config, TOK)


def test_exact_duplicates_ignore_case_and_spacing() -> None:
    assert exact_duplicates(["Hello  world", "hello world", "other", "HELLO WORLD\n"]) == [1, 3]


def test_near_duplicates_drop_close_rows_and_keep_different_ones() -> None:
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(500)]
    base = [rng.choice(vocab) for _ in range(200)]
    close = list(base)
    close[100] = "changed"  # one word in 200: shingle Jaccard 192/200 = 0.96
    other = [rng.choice(vocab) for _ in range(200)]
    texts = [" ".join(t) for t in (base, other, close)]
    assert near_duplicates(texts, threshold=0.8) == [2]
    assert near_duplicates(texts[:2], threshold=0.8) == []


def test_prepare_reports_every_filter(tmp_path) -> None:
    rows = [
        {"prompt": "what is one ?", "completion": " two"},
        {"prompt": "what is one ?", "completion": " two"},  # exact duplicate
        {"prompt": "what", "completion": " one"},  # 1 + 1 + 2 = 4 tokens: too short
        {"prompt": "one two three four five six one two", "completion": " three"},  # cut
        {"prompt": "one two three four five six one two three", "completion": " four"},  # only
    ]  # the prompt survives the cut, so nothing is left to train on
    config = DataConfig(
        data=[write_jsonl(tmp_path / "d.jsonl", rows)],
        seq_len=10,
        min_tokens=5,
        val_fraction=0.0,
        pack=False,
    )
    data = prepare(config, TOK)
    counts = dict(data.report.counts[config.data[0]])
    assert counts == {
        "read": 5,
        "exact duplicates dropped": 1,
        "near duplicates dropped": 0,
        "shorter than 5 tokens dropped": 1,
        "truncated": 2,
        # Row 3 is 1 + 8 + 2 = 11 tokens, row 4 is 12: cut to 10.
        "tokens cut": 3,
        "nothing to train on after truncation, dropped": 1,
        "kept": 2,
    }
    assert sorted(len(r) for r in data.train) == [7, 10]


def test_max_tokens_drops_instead_of_cutting_and_text_is_split(tmp_path) -> None:
    long_text = " ".join(["one"] * 25)  # 1 + 25 + 1 = 27 tokens
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": long_text}, {"text": "two"}])
    data = prepare(DataConfig(data=[path], seq_len=10, val_fraction=0.0, pack=False), TOK)
    assert sorted(len(r) for r in data.train) == [3, 7, 10, 10]  # 27 = 10 + 10 + 7
    dropped = DataConfig(data=[path], seq_len=10, max_tokens=20, val_fraction=0.0, pack=False)
    data = prepare(dropped, TOK)
    assert [len(r) for r in data.train] == [3]
    assert data.report.counts[path]["longer than 20 tokens dropped"] == 1


def test_split_is_disjoint_and_sized(tmp_path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"one {'two ' * i}"} for i in range(40)])
    config = DataConfig(data=[path], val_fraction=0.25, pack=False, dedup="exact")
    data = prepare(config, TOK)
    assert (len(data.train), len(data.val)) == (30, 10)
    lengths = {len(r) for r in data.train} | {len(r) for r in data.val}
    assert len(lengths) == 40  # every row once, in one of the two


def test_mix_draws_by_share_without_repeating() -> None:
    domain = [Example([1, i], [-100, i]) for i in range(100)]
    general = [Example([2, i], [-100, i]) for i in range(1000)]
    mixed = mix([domain, general], [0.8, 0.2], random.Random(0))
    # The scarcer group limits the mixture: all 100 domain rows and 25 general ones.
    assert sum(e.input_ids[0] == 1 for e in mixed) == 100
    assert sum(e.input_ids[0] == 2 for e in mixed) == 25
    assert len({tuple(e.input_ids) for e in mixed}) == len(mixed)


def test_mix_needs_one_share_per_file() -> None:
    with pytest.raises(ValueError, match="mix has 1 shares for 2 files"):
        DataConfig(data=["a", "b"], mix=[1.0])
