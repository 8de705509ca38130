"""`lorakit constitutional`: principles files, the critique loop's mechanics with a scripted
generator (formats, principle draws, resume, judge labels), its files feeding `lorakit sft` and
`lorakit dpo`, a tiny model end to end, and (slow) the real SmolLM2-135M-Instruct."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_files import write_jsonl
from lorakit.cli import main
from lorakit.constitutional import (
    DEFAULT,
    Completion,
    ModelGenerator,
    load_principles,
    pick_principles,
)
from lorakit.constitutional.conversation import as_messages, judge_messages, revision_messages
from lorakit.constitutional.lengths import LoopShape, check_lengths
from lorakit.constitutional.principles import parse_principles
from lorakit.data.prompts import render_messages
from lorakit.generation import SamplingOptions
from lorakit.recipes.constitutional import ConstitutionalConfig, CritiqueOptions, generate_data
from sft_helpers import llama, saved_model, tokenizer

PRINCIPLES = [
    {"name": "short", "critique": "Is it too long?", "revision": "Make it shorter."},
    {"name": "kind", "critique": "Is it unkind?", "revision": "Make it kind."},
    {"name": "true", "critique": "Is it false?", "revision": "Make it true."},
]
PROMPTS = [
    {"prompt": "what is one ?"},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
    {"prompt": "what is two ?"},
    {"prompt": "what is three ?"},
    {"prompt": "what is four ?"},
]


class Scripted:
    """A generator whose answers tell what it was asked: a first answer names the prompt, a
    critique names the principle's request, a revision extends the response it revises. The
    judge says "A" with probability ``p_a`` whatever it is shown (pure position bias)."""

    def __init__(self, p_a: float = 0.8, fail_after: int | None = None) -> None:
        self.p_a, self.fail_after, self.calls = p_a, fail_after, 0

    def complete(self, conversations):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("interrupted by the test")
        out = []
        for c in conversations:
            last = c[-1]["content"]
            if last.startswith("Make it"):  # a revision request: revise the critiqued answer
                out.append(Completion(f"{c[-4]['content']} + {last[8:-1]}", 3))
            elif last.startswith("Is it"):
                out.append(Completion(f"critique of {c[-2]['content']!r}: {last}", 2))
            else:
                out.append(Completion(f"answer to {last}", 1))
        return out

    def choice_probabilities(self, conversations, choices):
        assert choices == ("A", "B")
        return [[self.p_a, 1 - self.p_a] for _ in conversations]


def config(out, revisions=2, order="random", seed=0, judge=False, batch_size=2):
    options = CritiqueOptions(
        data=["unused"],
        out=str(out),
        revisions=revisions,
        order=order,
        seed=seed,
        judge=judge,
        batch_size=batch_size,
        progress=False,
    )
    return ConstitutionalConfig(critique=options)


def prompts():
    return [(i, as_messages(p.get("prompt") or p["messages"])) for i, p in enumerate(PROMPTS)]


def run_scripted(out, generator=None, **options):
    principles = parse_principles(PRINCIPLES, "test")
    cfg = config(out, **options)
    return generate_data(generator or Scripted(), prompts(), principles, cfg, {"o": options})


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- principles


def test_default_principles_load_and_yaml_equals_json(tmp_path) -> None:
    default = load_principles(DEFAULT)
    assert len(default) >= 3 and len({p.name for p in default}) == len(default)
    assert all(p.critique and p.revision for p in default)
    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps({"principles": PRINCIPLES}))
    as_yaml = tmp_path / "p.yaml"
    import yaml

    as_yaml.write_text(yaml.safe_dump(PRINCIPLES))
    assert load_principles(as_json) == load_principles(as_yaml) == parse_principles(PRINCIPLES, "x")


@pytest.mark.parametrize(
    ("loaded", "message"),
    [
        ([], "non-empty list of principles"),
        ({"rules": PRINCIPLES}, "non-empty list of principles"),
        ([PRINCIPLES[0], "a string"], "principle 1 must be a mapping"),
        ([PRINCIPLES[0], {"name": "x", "critique": "c"}], "principle 1: 'revision' must be a non"),
        ([{**PRINCIPLES[0], "critique": 3}], "principle 0: 'critique' must be a non-empty string"),
        ([{**PRINCIPLES[0], "name": " "}], "principle 0: 'name' must be a non-empty string"),
        ([{**PRINCIPLES[0], "examples": [{"prompt": "p"}]}], "principle 0: example 0: 'response'"),
        ([{**PRINCIPLES[0], "examples": {}}], "principle 0: 'examples' must be a list"),
        ([{**PRINCIPLES[0], "weight": 2}], "principle 0: unknown fields ['weight']"),
        ([PRINCIPLES[0], PRINCIPLES[0]], "unique; repeated: ['short']"),
    ],
)
def test_bad_principles_are_named_by_index_and_field(loaded, message) -> None:
    with pytest.raises(ValueError) as raised:
        parse_principles(loaded, "p.yaml")
    assert str(raised.value).startswith("p.yaml") and message in str(raised.value)


def test_principle_draws_depend_on_seed_and_prompt_only() -> None:
    draws = [pick_principles(i, 4, 3, "random", seed=7) for i in range(300)]
    assert draws == [pick_principles(i, 4, 3, "random", seed=7) for i in range(300)]
    assert draws != [pick_principles(i, 4, 3, "random", seed=8) for i in range(300)]
    # Uniform over 3 principles: each drawn 400 of 1200 times; 5 standard deviations
    # (sqrt(1200 * 1/3 * 2/3) = 16) bound a correct sampler's deviation.
    counts = Counter(p for d in draws for p in d)
    assert sorted(counts) == [0, 1, 2] and all(abs(n - 400) < 80 for n in counts.values())
    assert [pick_principles(i, 4, 3, "round-robin", 0) for i in (0, 2)] == [
        [0, 1, 2, 0],
        [2, 0, 1, 2],
    ]


# ---- the loop and its files


def test_outputs_hold_prompt_revisions_and_pairs(tmp_path) -> None:
    summary = run_scripted(tmp_path, revisions=2, order="round-robin")
    sft, pairs, trace = (
        rows(tmp_path / f) for f in ("sft.jsonl", "preferences.jsonl", "trace.jsonl")
    )
    assert [r["id"] for r in sft] == [r["id"] for r in trace] == list(range(len(PROMPTS)))
    second = trace[1]
    assert second["prompt"] == PROMPTS[1]["messages"]
    assert second["response"] == "answer to hi"
    # Round-robin from principle 1 for prompt 1: kind, then true; each revision revises the last.
    assert [s["principle"] for s in second["steps"]] == ["kind", "true"]
    assert second["steps"][0]["critique"] == "critique of 'answer to hi': Is it unkind?"
    assert second["final"] == "answer to hi + kind + true" == second["steps"][1]["revision"]
    assert second["tokens"] == 1 + 2 * (2 + 3)
    assert sft[1]["messages"] == [
        *PROMPTS[1]["messages"],
        {"role": "assistant", "content": second["final"]},
    ]
    assert pairs[1] == {
        "id": 1,
        "prompt": PROMPTS[1]["messages"],
        "chosen": [{"role": "assistant", "content": second["final"]}],
        "rejected": [{"role": "assistant", "content": "answer to hi"}],
    }
    assert summary["prompts"] == 5 and summary["prompts_changed"] == 5
    assert summary["preference_pairs"] == 5 and summary["tokens_generated"] == 5 * 11
    assert summary["principles"] == {
        name: {"rounds": n, "revisions_changed": n}
        for name, n in Counter(s["principle"] for t in trace for s in t["steps"]).items()
    }
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_an_interrupted_run_resumes_to_the_uninterrupted_files(tmp_path) -> None:
    whole = tmp_path / "whole"
    run_scripted(whole)
    part = tmp_path / "part"
    # Batches of 2 prompts take 1 + 2 * 2 generation calls; stop inside the second batch.
    with pytest.raises(KeyboardInterrupt):
        run_scripted(part, Scripted(fail_after=7))
    assert [r["id"] for r in rows(part / "trace.jsonl")] == [0, 1]
    # A crash while prompt 2's rows were being written: its sft row whole, its trace line torn.
    with (part / "sft.jsonl").open("a") as f:
        f.write(json.dumps({"id": 2, "messages": []}) + "\n")
    with (part / "trace.jsonl").open("a") as f:
        f.write('{"id": 2, "prompt": [{"ro')
    generator = Scripted()
    run_scripted(part, generator)
    assert generator.calls == 2 * 5  # prompts 2-3 and 4: two batches only
    for name in ("sft.jsonl", "preferences.jsonl", "trace.jsonl"):
        got, expected = rows(part / name), rows(whole / name)
        if name == "trace.jsonl":
            for r in got + expected:
                del r["seconds"]
        assert got == expected, name
    with pytest.raises(ValueError, match="other settings \\(differing: o\\)"):
        run_scripted(part, revisions=3)


def test_judge_labels_are_normalised_and_cancel_position_bias(tmp_path) -> None:
    # A judge that answers A with probability 0.8 whatever it sees: asked in both orders, the
    # revision wins once at 0.8 and once at 0.2: 0.5 each way.
    run_scripted(tmp_path / "biased", Scripted(p_a=0.8), judge=True)
    for pair in rows(tmp_path / "biased" / "preferences.jsonl"):
        assert pair["p_chosen"] == pytest.approx(0.5) and pair["p_rejected"] == pytest.approx(0.5)
        assert pair["judge_principle"] in {p["name"] for p in PRINCIPLES}


def test_model_choice_probabilities_equal_one_conversation_at_a_time() -> None:
    """Batched (left-padded) next-token probabilities of "A" / "B", renormalised, against an
    unpadded forward of each conversation alone, softmax in float64 over the two logits."""
    tok = tokenizer("A B")
    model = llama(tok).eval()
    generator = ModelGenerator(model, tok, SamplingOptions(), batch_size=3)
    conversations = [[{"role": "user", "content": "what is one ?" * n}] for n in (1, 3, 2)]
    got = torch.tensor(
        generator.choice_probabilities(conversations, ("A", "B")), dtype=torch.float64
    )
    ids_a, ids_b = tok.convert_tokens_to_ids(["A", "B"])
    for row, conversation in zip(got, conversations, strict=True):
        ids = tok(render_messages(conversation, tok), add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            logits = model(**ids).logits[0, -1].double()
        expected = logits[[ids_a, ids_b]].softmax(-1)
        # float32 logits of padded vs unpadded batches differ in the last bits (different
        # matmul shapes): 1e-5 is far below any change a wrong mask or position would cause.
        torch.testing.assert_close(row, expected, rtol=0, atol=1e-5)
        assert row.sum().item() == pytest.approx(1.0, abs=1e-12)


# ---- the command


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return saved_model(tmp_path_factory.mktemp("model") / "tiny", extra="A B")


def one_line(capsys, argv, expected) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_tiny_model_end_to_end_feeds_sft_and_dpo(tmp_path, tiny_model, capsys) -> None:
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    principles = tmp_path / "principles.json"
    principles.write_text(json.dumps(PRINCIPLES))
    out = tmp_path / "out"
    argv = ["constitutional", "--model", str(tiny_model), "--data", data, "--out", str(out)]
    options = ["--principles", str(principles), "--max-new-tokens", "6", "--judge", "--no-progress"]
    assert main([*argv, *options, "--batch-size", "3", "--revisions", "2", "--device", "cpu"]) == 0
    assert "5 prompts" in capsys.readouterr().out
    trace = rows(out / "trace.jsonl")
    assert len(trace) == 5 and all(len(t["steps"]) == 2 and t["tokens"] >= 5 for t in trace)
    for pair in rows(out / "preferences.jsonl"):
        assert pair["p_chosen"] + pair["p_rejected"] == pytest.approx(1.0, abs=1e-9)
    # The same command again: everything is done, nothing is generated.
    assert main([*argv, *options, "--batch-size", "3", "--revisions", "2", "--device", "cpu"]) == 0
    assert len(rows(out / "trace.jsonl")) == 5

    # The files feed the trainers as they are (scripted rows: the model's may all be equal).
    scripted = tmp_path / "scripted"
    run_scripted(scripted, judge=True)  # the judge's columns ride along
    train = ["--method", "lora", "--max-steps", "1", "--batch-size", "2", "--no-progress"]
    common = ["--model", str(tiny_model), *train, "--val-fraction", "0"]
    sft_data = str(scripted / "sft.jsonl")
    assert main(["sft", *common, "--data", sft_data, "--out", str(tmp_path / "s")]) == 0
    pairs = str(scripted / "preferences.jsonl")
    assert main(["dpo", *common, "--data", pairs, "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "adapter" / "adapter_config.json").exists()


def test_mistakes_get_one_line(tmp_path, tiny_model, capsys) -> None:
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- name: x\n  critique: c\n")
    base = ["constitutional", "--model", str(tiny_model), "--out", str(tmp_path / "o")]
    one_line(capsys, [*base, "--data", str(empty)], "empty.jsonl is empty")
    one_line(capsys, [*base, "--data", data, "--principles", str(bad)], "principle 0: 'revision'")
    one_line(capsys, [*base, "--data", data, "--revisions", "0"], "revisions must be at least 1")
    one_line(capsys, [*base[:1], "--data", data], "missing --model, --out")
    no_tokenizer = tmp_path / "no_tokenizer"
    llama(tokenizer()).save_pretrained(no_tokenizer)
    one_line(
        capsys,
        ["constitutional", "--model", str(no_tokenizer), "--data", data, "--out", str(tmp_path)],
        "cannot load a tokenizer",
    )


def test_prompts_that_can_outgrow_the_model_are_refused_before_generating(
    tmp_path, tiny_model, capsys
) -> None:
    """The longest request a prompt can lead to (its revision request with a response and a
    critique of --max-new-tokens each, then --max-new-tokens more) is checked against the
    model's 128 positions before anything is generated: one token over is refused, naming the
    prompt; exactly 128 runs to the end."""
    one = parse_principles(PRINCIPLES[:1], "test")  # every round draws it
    principles = tmp_path / "principles.json"
    principles.write_text(json.dumps(PRINCIPLES[:1]))
    long_prompt = "what is one ? " * 8
    data = write_jsonl(tmp_path / "prompts.jsonl", [PROMPTS[0], {"prompt": long_prompt}])
    tok = tokenizer("A B")
    counter = ModelGenerator(llama(tok), tok, SamplingOptions(), batch_size=1)
    request = revision_messages(as_messages(long_prompt.strip()), "", one[0], "")
    revising = counter.count_tokens([request])[0]
    fits = (128 - revising) // 3
    assert fits >= 2, revising  # the test needs room to generate
    out = tmp_path / "out"
    argv = ["constitutional", "--model", str(tiny_model), "--data", data, "--out", str(out)]
    argv += ["--principles", str(principles), "--revisions", "2", "--no-progress"]
    one_line(
        capsys,
        [*argv, "--max-new-tokens", str(fits + 1)],
        f"prompt 1 of --data can need {revising + 3 * (fits + 1)} positions in a revision request",
    )
    assert not (out / "trace.jsonl").exists() or not (out / "trace.jsonl").read_text()
    shutil.rmtree(out)
    assert main([*argv, "--max-new-tokens", str(fits), "--device", "cpu"]) == 0
    assert len(rows(out / "trace.jsonl")) == 2


def test_the_judges_question_is_checked_too() -> None:
    tok = tokenizer("A B")
    counter = ModelGenerator(llama(tok), tok, SamplingOptions(), batch_size=1)
    principles = parse_principles(PRINCIPLES, "test")
    prompt = [(0, as_messages("what is one ?"))]
    shape = LoopShape(principles, 1, "round-robin", 0, max_new_tokens=4, judge=True)
    question = judge_messages(prompt[0][1], "", "", principles[0])
    judged = counter.count_tokens([question])[0] + 2 * 4
    revising = counter.count_tokens([revision_messages(prompt[0][1], "", principles[0], "")])[0]
    assert judged > revising + 3 * 4  # the judge's question is the longest here
    check_lengths(counter.count_tokens, prompt, shape, judged)
    with pytest.raises(ValueError, match=f"can need {judged} positions in the judge's question"):
        check_lengths(counter.count_tokens, prompt, shape, judged - 1)
    no_judge = LoopShape(principles, 1, "round-robin", 0, max_new_tokens=4, judge=False)
    check_lengths(counter.count_tokens, prompt, no_judge, judged - 1)


@pytest.mark.slow
def test_smollm2_critiques_and_revises(tmp_path) -> None:
    """The real SmolLM2-135M-Instruct, one prompt, one round (short, to stay well under a
    minute on 2 CPU cores): every step is text, and the trace names a default principle."""
    from gguf_files import smollm2_dir

    pytest.importorskip("gguf")
    model = smollm2_dir()
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Name a fruit."}])
    out = tmp_path / "out"
    argv = ["constitutional", "--model", str(model), "--data", data, "--out", str(out)]
    assert main([*argv, "--max-new-tokens", "12", "--no-progress", "--device", "cpu"]) == 0
    [trace] = rows(out / "trace.jsonl")
    assert trace["response"] and trace["steps"][0]["critique"] and trace["final"]
    assert trace["steps"][0]["principle"] in {p.name for p in load_principles()}
