"""Loading local files, dedup, length filters, truncation counts, split and mixing."""

import json
import random
import re

import pytest

from data_files import SUFFIXES, as_written_on_windows, write_as, write_jsonl
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
    with pytest.raises(ValueError, match=r"d\.jsonl: row 4: 'completion' is missing or null"):
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


# ---- text encodings: what editors write is read as the plain file, the rest refused ----------

TEXT_ROWS = [{"text": f"the capital of {w} is {w} ."} for w in ["one", "two", "three"]]


def write_plain(path, suffix: str):
    """``qa_rows`` in a text file of ``suffix`` (plain text: one row per line)."""
    if suffix == "txt":
        path.write_text("".join(r["text"] + "\n" for r in TEXT_ROWS))
        return path
    return write_as(path, qa_rows(5), suffix)


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "txt"])
def test_a_bom_crlf_and_blank_lines_read_as_the_plain_file(tmp_path, suffix) -> None:
    plain = write_plain(tmp_path / f"plain.{suffix}", suffix)
    messy = tmp_path / f"messy.{suffix}"
    messy.write_bytes(as_written_on_windows(plain.read_bytes(), suffix))
    assert messy.read_bytes() != plain.read_bytes()
    assert load_rows(messy).to_list() == load_rows(plain).to_list()


ROWS_JSON = json.dumps(qa_rows(2))


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("wide.jsonl", ROWS_JSON.encode("utf-16"), "is UTF-16 text (it starts with a UTF-16 "),
        ("wide.csv", "a,b\n1,2\n".encode("utf-16"), "is UTF-16 text"),
        ("wide.txt", "one\n".encode("utf-32"), "is UTF-32 text"),
        ("nomark.json", ROWS_JSON.encode("utf-16-le"), "line 1 holds a NUL byte"),
        ("latin1.txt", b"one\ncaf\xe9\n", "line 2 is not UTF-8 text"),
        ("latin1.json", b'[{"text": "one"},\n {"text": "caf\xe9"}]', "line 2 is not UTF-8 text"),
        ("array.jsonl", json.dumps(qa_rows(2), indent=2).encode(), "name it .json"),
        ("comma.json", b'[{"text": "a"},\n]', "line 2 column 1: not valid JSON (Expecting"),
        ("mixed.json", b'[{"text": "a"}, 5]', "item 2 of the array is a number, not an object"),
        ("scalar.json", b"5", "line 1 is a number, not an object"),
        ("none.json", b"[]", "has no rows"),
        ("twice.jsonl", b'{"text": "a"}\n{"text": "a", "text": "b"}', "line 2: the key 'text' is"),
        ("twice.json", b'[{"text": "a", "text": "b"}]', "the key 'text' is repeated"),
        ("blank.txt", b"\n \r\n", "has no rows (only blank lines)"),
        ("deep.jsonl", b'{"a": ' + b"[" * 10**5 + b"]" * 10**5 + b"}", "line 1: a value is nested"),
        ("deep.json", b"[" * 10**5 + b"]" * 10**5, "deep.json: a value is nested too deeply"),
        ("pretty.json", b'{\n "text": ["a"],\n "text": ["b"]\n}', "the key 'text' is repeated"),
        ("late.json", b'{\n "text": ["a"],\n "id": [1,]\n}', "line 3 column 11: not valid JSON"),
        ("header.csv", b"prompt,completion\r\n\r\n", "has no rows (only a header)"),
        ("blank.csv", b"\n\n", "has no rows"),
    ],
)
def test_text_that_is_not_utf8_or_not_json_names_the_file_and_line(
    tmp_path, name, content, expected
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(expected)) as error:
        load_rows(path)
    assert str(error.value).startswith(str(path))
