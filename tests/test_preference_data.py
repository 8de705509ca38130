"""Preference pairs: layouts, chat templates, masks, truncation, batches, filters and bad rows.

References: TRL 1.16's own ``extract_prompt`` and ``apply_chat_template`` for how a conversation
splits into prompt and completions, SFT's ``encode`` for the tokens and masks, a truncation rule
restated independently, and separate forward passes for the collated batch.
"""

import datasets
import pytest
import torch
from trl.data_utils import apply_chat_template, extract_prompt

from data_files import SUFFIXES, write_as, write_jsonl
from lorakit.data import (
    IGNORE,
    DataConfig,
    Example,
    Pair,
    collate_pairs,
    encode,
    encode_pair,
    pair_segments,
    prepare,
    prepare_preferences,
    to_segments,
    truncate_pair,
)
from lorakit.data.preference import split_prompt
from sft_helpers import llama, tokenizer

NUMBERED = " ".join(f"p{i} c{i} d{i}" for i in range(24))
TOK = tokenizer(f"user assistant system blue green red sky color {NUMBERED}")
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
USER = {"role": "user", "content": "what color is the sky ?"}
BLUE = {"role": "assistant", "content": "blue"}
GREEN = {"role": "assistant", "content": "green"}


def templated():
    tok = tokenizer(f"user assistant system blue green red sky color {NUMBERED}")
    tok.chat_template = TEMPLATE
    return tok


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def words(prefix: str, n: int, start: int = 0) -> str:
    return " ".join(f"{prefix}{i}" for i in range(start, start + n))


def string_rows(n: int) -> list[dict]:
    return [
        {"prompt": f"what is p{i} ?", "chosen": f"c{i}", "rejected": f"d{i}", "margin": i / 2}
        for i in range(n)
    ]


# Layouts and templates.


def test_string_rows_mask_the_prompt_and_end_completions_with_eos() -> None:
    row = {"prompt": "what color is the sky ?", "chosen": "blue", "rejected": "green sky"}
    pair = encode_pair(pair_segments(row, TOK), TOK)
    bos, eos = TOK.bos_token_id, TOK.eos_token_id
    prompt = [bos, *ids("what color is the sky ?")]
    assert pair.prompt == prompt and pair.prompt_length == 7
    assert pair.chosen == Example([*prompt, *ids("blue"), eos], [IGNORE] * 7 + [*ids("blue"), eos])
    assert pair.rejected == Example(
        [*prompt, *ids("green sky"), eos], [IGNORE] * 7 + [*ids("green sky"), eos]
    )
    assert pair.margin == 0.0
    # Each side is what SFT makes of the same prompt and completion.
    for side in ("chosen", "rejected"):
        sft_row = {"prompt": row["prompt"], "completion": row[side]}
        assert getattr(pair, side) == encode(to_segments(sft_row, "prompt_completion", TOK), TOK)


@pytest.mark.parametrize(
    ("chosen", "rejected"),
    [
        ([USER, BLUE], [USER, GREEN]),  # one turn
        ([USER, BLUE, USER, BLUE], [USER, BLUE, USER, GREEN]),  # differ in the last turn
        ([USER, BLUE, USER, GREEN], [USER, GREEN]),  # differ in the first answer
        ([USER, BLUE], [USER, BLUE, USER, GREEN]),  # one is a prefix of the other
        ([USER, BLUE], [USER, BLUE]),  # identical
    ],
)
def test_implicit_prompt_splits_as_trl_extract_prompt(chosen, rejected) -> None:
    expected = extract_prompt({"chosen": chosen, "rejected": rejected})
    prompt, chosen_part, rejected_part = split_prompt(chosen, rejected)
    assert (prompt, chosen_part, rejected_part) == (
        expected["prompt"],
        expected["chosen"],
        expected["rejected"],
    )


@pytest.mark.parametrize("tok", [TOK, templated()], ids=["builtin", "template"])
def test_explicit_and_implicit_conversations_render_alike(tok) -> None:
    system = {"role": "system", "content": "color"}
    explicit = {"prompt": [system, USER], "chosen": [BLUE], "rejected": [GREEN]}
    implicit = {"chosen": [system, USER, BLUE], "rejected": [system, USER, GREEN]}
    # A string prompt beside message lists repeats the conversation's (UltraFeedback does this).
    repeated = {**implicit, "prompt": USER["content"]}
    rendered = pair_segments(explicit, tok)
    assert pair_segments(implicit, tok) == rendered
    assert pair_segments(repeated, tok) == rendered
    assert all(not trained for _, trained in rendered.prompt)


def test_chat_template_splits_as_trl_apply_chat_template() -> None:
    tok = templated()
    # The prompt holds an earlier assistant turn: context, not trained on.
    row = {"prompt": [USER, BLUE, USER], "chosen": [BLUE], "rejected": [GREEN]}
    rendered = pair_segments(row, tok)
    expected = apply_chat_template(row, tok)
    assert "".join(t for t, _ in rendered.prompt) == expected["prompt"]
    assert "".join(t for t, _ in rendered.chosen) == expected["chosen"]
    assert "".join(t for t, _ in rendered.rejected) == expected["rejected"]
    assert rendered.chosen == [("blue </s> ", True)]
    pair = encode_pair(rendered, tok)
    trained = [t for t in pair.chosen.labels if t != IGNORE]
    assert trained == [*tok("blue", add_special_tokens=False)["input_ids"], tok.eos_token_id]


def test_builtin_template_trains_what_sft_trains_on_the_last_turn() -> None:
    row = {"chosen": [USER, BLUE, USER, BLUE], "rejected": [USER, BLUE, USER, GREEN]}
    pair = encode_pair(pair_segments(row, TOK), TOK)
    sft = encode(to_segments({"messages": row["chosen"]}, "chat", TOK), TOK)
    assert pair.chosen.input_ids == sft.input_ids
    # SFT trains both assistant turns; the pair only the completion's (the last one).
    masked = [IGNORE if i < pair.prompt_length else t for i, t in enumerate(sft.labels)]
    assert pair.chosen.labels == masked
    assert any(t != IGNORE for t in sft.labels[: pair.prompt_length])  # the first answer
    assert [t for t in pair.rejected.labels if t != IGNORE] == [*ids("green"), TOK.eos_token_id]


# Truncation.


def reference_budget(prompt: int, completion: int, seq_len: int) -> tuple[int, int]:
    """The documented rule, restated: the prompt is guaranteed ceil(L/2) tokens and the
    completion floor(L/2); what one side does not need, the other may use."""
    if prompt + completion <= seq_len:
        return prompt, completion
    prompt_share, completion_share = seq_len - seq_len // 2, seq_len // 2
    if prompt <= prompt_share:
        return prompt, seq_len - prompt
    if completion <= completion_share:
        return seq_len - completion, completion
    return prompt_share, completion_share


def synthetic_pair(prompt: int, chosen: int, rejected: int, bos: int = 1000) -> Pair:
    head = [bos, *range(1, prompt)]
    return Pair(
        Example(head + list(range(100, 100 + chosen)), [IGNORE] * prompt + [7] * chosen),
        Example(head + list(range(200, 200 + rejected)), [IGNORE] * prompt + [7] * rejected),
        prompt,
        0.0,
    )


def test_truncation_budget_follows_the_documented_rule_everywhere() -> None:
    for seq_len in range(2, 15):
        for p in range(1, 13):
            for c in range(1, 13):
                pair = synthetic_pair(p, c, max(1, c - 2))
                cut = truncate_pair(pair, seq_len, bos_id=1000)
                keep_p, keep_c = reference_budget(p, c, seq_len)
                head = [1000, *range(1, p)]
                # The prompt's end, after BOS when two or more prompt tokens are kept.
                expected = (
                    head[-keep_p:] if keep_p == p or keep_p < 2 else [1000, *head[1 - keep_p :]]
                )
                assert cut.prompt == expected, (seq_len, p, c)
                for full, short in ((pair.chosen, cut.chosen), (pair.rejected, cut.rejected)):
                    assert len(short) <= seq_len
                    completion = full.input_ids[p:]
                    assert short.input_ids[keep_p:] == completion[:keep_c]  # its start
                    assert set(short.labels[:keep_p]) == {IGNORE}
                    assert short.labels[keep_p:] == full.labels[p:][:keep_c]
                    # The first completion token is trained on, so a cut never empties one.
                    assert short.labels[keep_p] != IGNORE


def test_truncated_text_keeps_the_prompt_end_and_the_completion_start() -> None:
    row = {"prompt": words("p", 12), "chosen": words("c", 12), "rejected": words("d", 4)}
    pair = encode_pair(pair_segments(row, TOK), TOK)  # prompt 13 tokens, completions 13 and 5
    cut = truncate_pair(pair, 12, TOK.bos_token_id)
    assert TOK.decode(cut.chosen.input_ids) == "<s> p7 p8 p9 p10 p11 c0 c1 c2 c3 c4 c5"
    assert TOK.decode(cut.rejected.input_ids) == "<s> p7 p8 p9 p10 p11 d0 d1 d2 d3 </s>"
    assert cut.prompt_length == 6
    # A short prompt is kept whole and the completion takes the rest.
    short = encode_pair(pair_segments({**row, "prompt": "p0"}, TOK), TOK)
    assert TOK.decode(truncate_pair(short, 8, TOK.bos_token_id).chosen.input_ids) == (
        "<s> p0 c0 c1 c2 c3 c4 c5"
    )


# Batches.


def test_collate_puts_chosen_rows_first_and_pads_each_side() -> None:
    pairs = [
        encode_pair(pair_segments(r, TOK), TOK)
        for r in [
            {"prompt": "p0", "chosen": "c0 c1 c2", "rejected": "d0", "margin": 0.5},
            {"prompt": "p1 p2 p3", "chosen": "c3", "rejected": "d1 d2", "margin": -1.0},
            {"prompt": "p4", "chosen": "c4", "rejected": "d3", "margin": 2.0},
        ]
    ]
    batch = collate_pairs(pairs, TOK.pad_token_id)
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    n = max(len(r) for r in rows)
    assert set(batch) == {"input_ids", "attention_mask", "position_ids", "labels", "margin"}
    for key in ("input_ids", "attention_mask", "position_ids", "labels"):
        assert batch[key].shape == (6, n) and batch[key].dtype == torch.long
    assert batch["margin"].tolist() == [0.5, -1.0, 2.0] and batch["margin"].shape == (3,)
    for i, row in enumerate(rows):  # pair i: rows i (chosen) and 3 + i (rejected)
        k = len(row)
        assert batch["input_ids"][i, :k].tolist() == row.input_ids
        assert set(batch["input_ids"][i, k:].tolist()) <= {TOK.pad_token_id}
        assert batch["labels"][i].tolist() == row.labels + [IGNORE] * (n - k)
        assert batch["attention_mask"][i].tolist() == [1] * k + [0] * (n - k)
        assert batch["position_ids"][i].tolist() == list(range(n))


def test_one_forward_pass_scores_both_sides_as_separate_passes_do() -> None:
    model = llama(TOK).double().eval()
    rows = string_rows(3)
    rows[1]["chosen"] = "c1 c2 c3 c4"  # unequal lengths, so that some rows are padded
    pairs = [encode_pair(pair_segments(r, TOK), TOK) for r in rows]
    batch = collate_pairs(pairs, TOK.pad_token_id)
    with torch.no_grad():
        together = model(**{k: v for k, v in batch.items() if k not in ("labels", "margin")})
        for i, row in enumerate([p.chosen for p in pairs] + [p.rejected for p in pairs]):
            alone = model(torch.tensor([row.input_ids])).logits[0]
            # float64 and the same arithmetic up to padding: equal to rounding.
            torch.testing.assert_close(
                together.logits[i, : len(row)], alone, rtol=1e-12, atol=1e-12
            )


# Files, filters and the report.


def test_prepare_reports_every_filter_per_file(tmp_path) -> None:
    long_prompt = words("p", 10)
    rows = [
        {"prompt": "what is p0 ?", "chosen": "c0", "rejected": "d0"},
        {"prompt": "What  is p0 ?", "chosen": "c0", "rejected": "d0"},  # exact duplicate
        {"prompt": "what is p1 ?", "chosen": "c1", "rejected": "c1"},  # identical sides
        {"prompt": "p2", "chosen": "c2", "rejected": "d2"},  # 1 + 1 + 2 = 4 tokens: too short
        # Cut to 12: the completions keep their first 6 tokens, where they agree.
        {"prompt": long_prompt, "chosen": words("c", 7), "rejected": words("c", 6) + " d0"},
        {"prompt": long_prompt, "chosen": words("c", 8), "rejected": words("d", 8)},  # cut
    ]
    other = [{"prompt": "what is p3 ?", "chosen": "c3", "rejected": "d3"}] * 2
    config = DataConfig(
        data=[write_jsonl(tmp_path / "a.jsonl", rows), write_jsonl(tmp_path / "b.jsonl", other)],
        seq_len=12,
        min_tokens=5,
        val_fraction=0.0,
    )
    data = prepare_preferences(config, TOK)
    assert dict(data.report.counts[config.data[0]]) == {
        "read": 6,
        "chosen identical to rejected, dropped": 1,
        "exact duplicates dropped": 1,
        "near duplicates dropped": 0,
        "shorter than 5 tokens dropped": 1,
        "truncated": 2,
        "tokens cut": 15,  # 11 + 8 -> 12 and 11 + 9 -> 12, on the longer side
        "identical after truncation, dropped": 1,
        "kept": 2,
    }
    assert dict(data.report.counts[config.data[1]]) == {
        "read": 2,
        "chosen identical to rejected, dropped": 0,
        "exact duplicates dropped": 1,
        "near duplicates dropped": 0,
        "kept": 1,
    }
    assert sorted(len(p) for p in data.train) == [7, 7, 12]


def test_near_duplicate_pairs_are_dropped(tmp_path) -> None:
    # One more word after 200: 5 of about 200 word 5-grams differ, Jaccard 195 / 206 = 0.95.
    prompt = " ".join(f"w{i}" for i in range(200))
    rows = [
        {"prompt": prompt, "chosen": "c0 c1", "rejected": "d0 d1"},
        {"prompt": prompt + " w999", "chosen": "c0 c1", "rejected": "d0 d1"},
    ]
    config = DataConfig(data=[write_jsonl(tmp_path / "n.jsonl", rows)], val_fraction=0.0)
    assert (
        prepare_preferences(config, TOK).report.counts[config.data[0]]["near duplicates dropped"]
        == 1
    )


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_every_supported_file_type_gives_the_same_pairs(tmp_path, suffix) -> None:
    rows = string_rows(6)
    path = write_as(tmp_path / f"data.{suffix}", rows, suffix)
    data = prepare_preferences(DataConfig(data=[str(path)], val_fraction=0.0), TOK, seed=0)
    expected = [encode_pair(pair_segments(r, TOK), TOK) for r in rows]
    assert sorted(data.train, key=lambda p: p.margin) == expected


@pytest.mark.parametrize("suffix", ["jsonl", "parquet", "saved"])
def test_conversation_files_load_with_their_message_lists(tmp_path, suffix) -> None:
    rows = [
        {"chosen": [USER, BLUE], "rejected": [USER, GREEN]},
        {"chosen": [USER, GREEN], "rejected": [USER, BLUE]},
    ]
    path = tmp_path / f"chat.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, rows)
    elif suffix == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    config = DataConfig(data=[str(path)], val_fraction=0.0, dedup="none")
    data = prepare_preferences(config, TOK)
    expected = [encode_pair(pair_segments(r, TOK), TOK) for r in rows]
    assert sorted(data.train, key=lambda p: p.chosen.input_ids) == sorted(
        expected, key=lambda p: p.chosen.input_ids
    )


def test_validation_share_and_file(tmp_path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", string_rows(8))
    data = prepare_preferences(DataConfig(data=[path], val_fraction=0.25), TOK)
    assert (len(data.train), len(data.val)) == (6, 2)
    assert not {p.margin for p in data.train} & {p.margin for p in data.val}
    val = write_jsonl(tmp_path / "v.jsonl", string_rows(3))
    data = prepare_preferences(DataConfig(data=[path], val_data=val), TOK)
    assert (len(data.train), len(data.val)) == (8, 3)


def test_mix_draws_whole_pairs_by_share(tmp_path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", string_rows(12)[:8])
    b = write_jsonl(tmp_path / "b.jsonl", string_rows(12)[8:])  # 4 rows: the scarcer file
    config = DataConfig(data=[a, b], mix=[0.5, 0.5], val_fraction=0.0)
    margins = sorted(p.margin for p in prepare_preferences(config, TOK).train)
    assert len(margins) == 8 and margins[4:] == [4.0, 4.5, 5.0, 5.5]  # all of b, half of a


# Mistakes.


def bad(tmp_path, row: dict, reason: str, tok=TOK) -> None:
    # Arrow columns hold one type: the good row has the bad row's layout.
    if isinstance(row.get("chosen", row.get("rejected")), list):
        good = {"prompt": [USER], "chosen": [BLUE], "rejected": [GREEN]}
    else:
        good = {"prompt": "what is p0 ?", "chosen": "c0", "rejected": "d0"}
    config = DataConfig(data=[write_jsonl(tmp_path / "bad.jsonl", [good, row])])
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 2: " + reason):
        prepare_preferences(config, tok)


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"prompt": "p0", "rejected": "d0"}, "missing 'chosen'"),
        ({"prompt": "p0", "chosen": "c0"}, "missing 'rejected'"),
        ({"chosen": "c0", "rejected": "d0"}, "missing 'prompt'"),
        ({"prompt": "p0", "chosen": " ", "rejected": "d0"}, "'chosen' is empty"),
        (
            {"prompt": [USER], "chosen": [{"role": "bot"}], "rejected": [GREEN]},
            "'chosen' message 0",
        ),
        ({"prompt": [USER], "chosen": [USER], "rejected": [GREEN]}, "'chosen' must continue"),
        ({"chosen": [BLUE], "rejected": [GREEN]}, "'chosen' and 'rejected' share no"),
        ({"prompt": [], "chosen": [BLUE], "rejected": [GREEN]}, "'prompt' must be a non-empty"),
    ],
)
def test_a_bad_row_is_named_with_its_reason(tmp_path, row, reason) -> None:
    bad(tmp_path, row, reason)


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"prompt": "p0", "chosen": "c0", "rejected": [GREEN]}, "must be all strings or all"),
        ({"prompt": 3, "chosen": [BLUE], "rejected": [GREEN]}, "must be all strings or all"),
        ({"prompt": [USER], "chosen": "c0", "rejected": "d0"}, "'prompt' must be a string"),
        # The prompt was dropped and the message said only that the two sides share none.
        ({"prompt": "p0", "chosen": [BLUE], "rejected": [GREEN]}, "a string 'prompt' beside"),
    ],
)
def test_mixed_layouts_are_refused(row, reason) -> None:
    # Files cannot mix types in one column (Arrow); rows built in Python can.
    with pytest.raises(ValueError, match=reason):
        pair_segments(row, TOK)


def test_margins_must_be_numbers_in_every_row(tmp_path) -> None:
    # datasets fills the column with None for rows that lack it: a mistake, not a zero margin.
    rows = [{"prompt": "p0", "chosen": "c0", "rejected": "d0", "margin": 1.0}]
    rows.append({"prompt": "p1", "chosen": "c1", "rejected": "d1"})
    config = DataConfig(data=[write_jsonl(tmp_path / "m.jsonl", rows)])
    with pytest.raises(ValueError, match=r"m\.jsonl: row 2: 'margin' must be a number, got None"):
        prepare_preferences(config, TOK)
    rows = [{"prompt": "p0", "chosen": "c0", "rejected": "d0", "margin": "big"}]
    config = DataConfig(data=[write_jsonl(tmp_path / "s.jsonl", rows)])
    with pytest.raises(ValueError, match=r"s\.jsonl: row 1: 'margin' must be a number, got str"):
        prepare_preferences(config, TOK)
    with pytest.raises(ValueError, match="'margin' must be finite"):
        pair_segments({**rows[0], "margin": float("inf")}, TOK)


def test_completions_with_nothing_to_train_on_are_refused(tmp_path) -> None:
    tok = templated()
    # Assistant turns render as their bare content, without markup.
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}user : {{ m['content'] }} "
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    silent = {"role": "assistant", "content": ""}
    bad(
        tmp_path,
        {"chosen": [USER, silent], "rejected": [USER, GREEN]},
        "the tokenizer's chat template renders no text for message 1 \\(assistant\\)",
        tok,
    )
    blank = {"role": "assistant", "content": "  "}  # text, but no token
    bad(
        tmp_path,
        {"chosen": [USER, GREEN], "rejected": [USER, blank]},
        "'rejected' has no token",
        tok,
    )


def test_config_mistakes_and_sft_on_pairs(tmp_path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", string_rows(3))
    with pytest.raises(ValueError, match="format 'chat' does not apply to preference data"):
        prepare_preferences(DataConfig(data=[path], format="chat"), TOK)
    with pytest.raises(ValueError, match="no training data given"):
        prepare_preferences(DataConfig(), TOK)
    with pytest.raises(ValueError, match=r"d\.jsonl: row 1: .*prepare_preferences"):
        prepare(DataConfig(data=[path]), TOK)
