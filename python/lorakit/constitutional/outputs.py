"""The files ``lorakit constitutional`` writes in ``--out``, appended prompt by prompt so that an
interrupted run resumes where it stopped:

- ``sft.jsonl``: ``{"id", "messages"}``: the prompt and the final revision (``lorakit sft``).
- ``preferences.jsonl``: ``{"id", "prompt", "chosen", "rejected"}`` as conversations: the final
  revision over the first response, for prompts whose revision changed the text (``lorakit
  dpo`` / ``reward``); with ``--judge`` also ``judge_principle``, ``p_chosen``, ``p_rejected``.
- ``trace.jsonl``: every response, critique and revision with its principle, per prompt.
- ``settings.json``: what the run was started with (a resumed run must match it);
  ``summary.json``: counts, tokens and time, recomputed from the trace.

Each line is written whole, flushed and synced before the next; a prompt's trace line comes
last, so a prompt counts as done once its trace line is complete. On start, a torn last line
(a crash in mid-write) is cut off, and sft / preference rows of prompts without a trace line
are dropped: they are generated again.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO

from lorakit.constitutional.loop import Record
from lorakit.file_writes import append_text, open_for_append, write_text_atomic

FILES = ("sft.jsonl", "preferences.jsonl", "trace.jsonl")


def _cut_torn_line(path: Path) -> None:
    """Truncates ``path`` after its last newline (a line without one was torn by a crash)."""
    if not path.exists():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with path.open("r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


class Outputs:
    """The output directory of one run (see the module docstring)."""

    def __init__(self, out: Path, settings: dict[str, Any]) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        settings = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
        saved = out / "settings.json"
        if saved.exists():
            before = json.loads(saved.read_text())
            differ = sorted(
                k for k in settings.keys() | before.keys() if before.get(k) != settings.get(k)
            )
            if differ:
                raise ValueError(
                    f"{out} holds a run with other settings (differing: {', '.join(differ)}); "
                    "resume it with the same options or choose another --out"
                )
        else:
            write_text_atomic(saved, json.dumps(settings, indent=2) + "\n")
        for name in FILES:
            _cut_torn_line(out / name)
        self.done = {row["id"] for row in _read_rows(out / "trace.jsonl")}
        for name in FILES[:2]:
            rows = _read_rows(out / name)
            kept = [r for r in rows if r["id"] in self.done]
            if len(kept) != len(rows):
                write_text_atomic(out / name, "".join(json.dumps(r) + "\n" for r in kept))
        self._files: dict[str, BinaryIO] = {name: open_for_append(out / name) for name in FILES}

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def _append(self, name: str, row: dict[str, Any]) -> None:
        # A line torn by a full disk is cut off when the run resumes.
        line = json.dumps(row, ensure_ascii=False) + "\n"
        append_text(self._files[name], self.out / name, line, sync=True)

    def append(self, record: Record, seconds: float) -> None:
        """Writes one prompt's rows: sft, preference (if its text changed), then trace."""
        final = [{"role": "assistant", "content": record.final}]
        self._append("sft.jsonl", {"id": record.id, "messages": [*record.prompt, *final]})
        if record.changed:
            pair: dict[str, Any] = {
                "id": record.id,
                "prompt": record.prompt,
                "chosen": final,
                "rejected": [{"role": "assistant", "content": record.response}],
            }
            if record.judge is not None:
                pair["judge_principle"] = record.judge["principle"]
                pair["p_chosen"] = record.judge["chosen"]
                pair["p_rejected"] = record.judge["rejected"]
            self._append("preferences.jsonl", pair)
        trace = {
            "id": record.id,
            "prompt": record.prompt,
            "response": record.response,
            "steps": [asdict(s) for s in record.steps],
            "final": record.final,
            "tokens": record.tokens,
            "seconds": round(seconds, 3),
        }
        self._append("trace.jsonl", trace)
        self.done.add(record.id)

    def write_summary(self) -> dict[str, Any]:
        """``summary.json`` from the trace (so a resumed run's summary covers every prompt)."""
        traces = _read_rows(self.out / "trace.jsonl")
        rounds: Counter[str] = Counter()
        changed: Counter[str] = Counter()
        for t in traces:
            current = t["response"]
            for step in t["steps"]:
                rounds[step["principle"]] += 1
                changed[step["principle"]] += step["revision"] != current
                current = step["revision"]
        summary = {
            "prompts": len(traces),
            "prompts_changed": sum(t["final"] != t["response"] for t in traces),
            "preference_pairs": len(_read_rows(self.out / "preferences.jsonl")),
            "principles": {
                name: {"rounds": rounds[name], "revisions_changed": changed[name]}
                for name in sorted(rounds)
            },
            "tokens_generated": sum(t["tokens"] for t in traces),
            "seconds": round(sum(t["seconds"] for t in traces), 1),
        }
        write_text_atomic(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary
