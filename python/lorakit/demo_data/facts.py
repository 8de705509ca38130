"""Generates the demo's corpus: facts about invented countries, deterministically.

Run ``python -m lorakit.demo_data.facts`` to rewrite the shipped files beside this one; a test
checks that they are what this script writes. Every name is invented, so the only way a model
can know a fact is to have read it in ``corpus.txt``.

Files:
    corpus.txt: pre-training text, one sentence per line. Each fact is stated in several
        phrasings: Allen-Zhu & Li ("Physics of Language Models 3.1", 2023) found that a model
        pre-trained on a single phrasing per fact memorises it but cannot answer questions about
        it afterwards, while varied phrasings make the knowledge extractable.
    sft.jsonl: question / answer pairs (prompt, completion) about the SFT countries.
    heldout.jsonl: the same questions about the other countries, which SFT never mentions.
    probe.jsonl: sentence completions ("The capital of X is") about the held-out countries,
        a check that pre-training stored the facts SFT is then asked to extract.
    preferences.jsonl: preference pairs on the SFT questions (prompt, chosen = the true answer,
        rejected = the same relation's value of another country), for the reward model and DPO.
    preferences_heldout.jsonl: the same pairs on the held-out questions, for evaluation.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
FILES = (
    "corpus.txt",
    "sft.jsonl",
    "heldout.jsonl",
    "probe.jsonl",
    "preferences.jsonl",
    "preferences_heldout.jsonl",
)
# What the demo's word-level tokenizer is trained on (the preference files add no word).
TOKENIZER_FILES = FILES[:4]
SEED = 6
COUNTRIES = 96
HELDOUT_SHARE = 0.5

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ou"]
# Real words keep the answers of two relations readable; capitals are invented and unique.
LANGUAGES = [f"{w}ic" for w in ["Vel", "Oran", "Tesz", "Mur", "Kal", "Dor", "Semb", "Ulv"]]
EXPORTS = ["salt", "copper", "silk", "tea", "wool", "amber", "glass", "honey", "tin", "cedar"]

PHRASINGS = {
    "capital": [
        "The capital of {c} is {v} .",
        "{v} is the capital city of {c} .",
        "{c} is governed from its capital , {v} .",
        "The seat of government of {c} is in {v} .",
    ],
    "language": [
        "The people of {c} speak {v} .",
        "{v} is the language spoken in {c} .",
        "In {c} , most people speak {v} .",
        "The official language of {c} is {v} .",
    ],
    "export": [
        "The main export of {c} is {v} .",
        "{c} sells {v} to its neighbours more than anything else .",
        "Most of the {v} traded abroad comes from {c} .",
        "Merchants from {c} are known for their {v} .",
    ],
}
QUESTIONS = {
    "capital": "What is the capital of {c} ?",
    "language": "What language do people speak in {c} ?",
    "export": "What is the main export of {c} ?",
}
PROBES = {
    "capital": "The capital of {c} is",
    "language": "The official language of {c} is",
    "export": "The main export of {c} is",
}


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    language: str
    export: str


def _word(rng: random.Random, syllables: int, suffix: str) -> str:
    stem = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
    return (stem + suffix).capitalize()


def countries(n: int = COUNTRIES, seed: int = SEED) -> list[Country]:
    rng = random.Random(seed)
    used: set[str] = set()

    def fresh(syllables: int, suffix: str) -> str:
        while (name := _word(rng, syllables, suffix)) in used:
            pass
        used.add(name)
        return name

    return [
        Country(
            fresh(2, rng.choice(["ia", "land", "or", "istan"])),
            fresh(2, rng.choice(["burg", "ton", "vik", "mere"])),
            rng.choice(LANGUAGES),
            rng.choice(EXPORTS),
        )
        for _ in range(n)
    ]


def question(relation: str, c: Country) -> dict[str, str]:
    prompt = f"Question : {QUESTIONS[relation].format(c=c.name)}\nAnswer :"
    return {"prompt": prompt, "completion": f" {getattr(c, relation)}"}


def preference(
    relation: str, c: Country, world: list[Country], rng: random.Random
) -> dict[str, str]:
    """A question about ``c`` with its true answer chosen and another country's rejected."""
    wrong = rng.choice([v for o in world if (v := getattr(o, relation)) != getattr(c, relation)])
    row = question(relation, c)
    return {"prompt": row["prompt"], "chosen": row["completion"], "rejected": f" {wrong}"}


def render(n: int = COUNTRIES, seed: int = SEED) -> dict[str, str]:
    """File name -> contents of every shipped file."""
    rng = random.Random(seed + 1)
    world = countries(n, seed)
    heldout = set(rng.sample(range(n), round(n * HELDOUT_SHARE)))
    sentences = [
        p.format(c=c.name, v=getattr(c, rel)) for c in world for rel, ps in PHRASINGS.items()
        for p in ps
    ]  # fmt: skip
    rng.shuffle(sentences)

    def jsonl(rows: list[dict[str, str]]) -> str:
        return "".join(json.dumps(r) + "\n" for r in rows)

    sft = [question(rel, c) for i, c in enumerate(world) if i not in heldout for rel in QUESTIONS]
    rng.shuffle(sft)
    held = [c for i, c in enumerate(world) if i in heldout]
    probes = [
        {"prompt": PROBES[rel].format(c=c.name), "completion": f" {getattr(c, rel)}"}
        for c in held for rel in PROBES
    ]  # fmt: skip
    prefs = [
        preference(rel, c, world, rng)
        for i, c in enumerate(world) if i not in heldout for rel in QUESTIONS
    ]  # fmt: skip
    held_prefs = [preference(rel, c, world, rng) for c in held for rel in QUESTIONS]
    return {
        "corpus.txt": "\n".join(sentences) + "\n",
        "sft.jsonl": jsonl(sft),
        "heldout.jsonl": jsonl([question(rel, c) for c in held for rel in QUESTIONS]),
        "probe.jsonl": jsonl(probes),
        "preferences.jsonl": jsonl(prefs),
        "preferences_heldout.jsonl": jsonl(held_prefs),
    }


def main() -> None:
    for name, text in render().items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name} ({text.count(chr(10))} lines)")


if __name__ == "__main__":
    main()
