"""`lorakit demo`, reduced to seconds: the pipeline runs and reports accuracy; its shipped data
is what the generator writes."""

import re
from pathlib import Path

from lorakit.cli import main
from lorakit.demo_data import facts


def test_shipped_demo_data_is_what_the_generator_writes() -> None:
    for name, text in facts.render().items():
        assert (facts.HERE / name).read_text() == text, name
    assert set(facts.render()) == set(facts.FILES)


def test_heldout_questions_are_about_countries_sft_never_mentions() -> None:
    def countries(name: str) -> set[str]:
        return set(re.findall(r"(?:of|in) (\w+) \?", (facts.HERE / name).read_text()))

    sft, heldout = countries("sft.jsonl"), countries("heldout.jsonl")
    assert len(sft) == len(heldout) == facts.COUNTRIES // 2
    assert not sft & heldout
    assert all(c in (facts.HERE / "corpus.txt").read_text() for c in heldout)


def test_reduced_demo_runs_end_to_end(tmp_path, monkeypatch, capsys) -> None:
    # --out relative to the current directory, as `make demo` runs it (its default is relative).
    monkeypatch.chdir(tmp_path)
    out = Path("demo")
    argv = ["demo", "--out", str(out), "--pretrain-epochs", "1", "--sft-epochs", "1"]
    argv += ["--reward-epochs", "1", "--dpo-epochs", "1", "--grpo-steps", "2"]
    assert main([*argv, "--hidden", "32", "--layers", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    before = re.search(r"before QLoRA SFT:\s+([\d.]+)%", printed)
    after = re.search(r"after QLoRA SFT:\s+([\d.]+)%", printed)
    assert before and after and 0 <= float(after.group(1)) <= 100
    assert re.search(r"trainable parameters: [\d,]+ of [\d,]+ \([\d.]+%\)", printed)
    assert "MiB NF4" in printed
    assert (out / "sft" / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "pretrain" / "loss.png").exists() and (out / "sft" / "loss.png").exists()
    assert f"adapter: {out / 'sft' / 'adapter'}\n" in printed
    for stage in ("before training", "after training", "before DPO", "after DPO"):
        assert re.search(rf"{stage}:\s+[\d.]+%", printed), stage
    assert (out / "reward" / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "dpo" / "adapter" / "adapter_model.safetensors").exists()
    assert re.search(r"GRPO from the SFT model, 2 steps: mean reward [\d.]+ \(step 1\)", printed)
    assert (out / "grpo" / "adapter" / "adapter_model.safetensors").exists()
