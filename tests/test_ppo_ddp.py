"""`lorakit ppo` under torchrun: 2 gloo processes each sample and score their half of every
step's prompts; rank 0's batch metrics are over both halves; the policy, value adapter and
value head stay equal on both ranks (the loop checks it at each checkpoint and stops otherwise).
That whitening and the other batch statistics span both halves is tested in test_rl_losses.py."""

import json

from rl_helpers import PROMPTS, records
from sft_helpers import saved_model
from test_grpo_ddp import REWARD
from test_trainer_ddp import torchrun


def test_two_processes_share_the_prompts_and_stay_in_step(tmp_path, monkeypatch) -> None:
    model_dir = saved_model(tmp_path / "model")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.text}) + "\n" for p in PROMPTS))
    (tmp_path / "reward.py").write_text(REWARD)
    calls = tmp_path / "calls"
    calls.mkdir()
    monkeypatch.setenv("REWARD_LOG", str(calls))
    out = tmp_path / "out"
    torchrun(
        [
            "ppo", "--model", str(model_dir), "--data", str(data), "--method", "lora",
            "--out", str(out), "--reward-function", f"{tmp_path / 'reward.py'}:contains_five",
            "--max-steps", "3", "--batch-size", "4", "--max-new-tokens", "4",
            "--updates", "2", "--minibatches", "2", "--missing-eos-penalty", "0",
            "--kl-target", "0.1", "--lr", "1e-2", "--save-every", "1", "--no-progress",
        ]
    )  # fmt: skip
    per_process = [
        [json.loads(line) for line in f.read_text().splitlines()] for f in calls.iterdir()
    ]
    assert len(per_process) == 2
    # Each process scored its 2 prompts once per step.
    assert all(len(steps) == 3 and all(len(r) == 2 for r in steps) for steps in per_process)
    rows = records(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for step, record in enumerate(rows):
        both = [x for steps in per_process for x in steps[step]]
        # The score (no EOS penalty here) is the mean over both processes' 4 completions.
        assert abs(record["score"] - sum(both) / len(both)) < 1e-6, step
    # The adaptive controller ran, fed the KL over both halves.
    assert len({r["kl_coef"] for r in rows}) > 1
    latest = out / (out / "latest").read_text().strip()
    assert (latest / "rng.safetensors").is_file() and (latest / "rng-rank1.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
