"""`lorakit grpo` under torchrun: 2 gloo processes each sample and score their half of every
step's prompts, rank 0's metrics are over both halves, the adapters stay equal on both ranks
(the loop checks it at each checkpoint and stops otherwise), and each rank's RNG is saved."""

import json
import os
import subprocess
import sys

from rl_helpers import cli_run_files, records
from test_trainer_ddp import PYTHON_DIR, torchrun

# The reward: 1 for "five"; every call appends its rewards to a file named by the process.
REWARD = """import json, os

def contains_five(prompts, completions):
    rewards = [float('five' in c.split()) for c in completions]
    with open(os.path.join(os.environ['REWARD_LOG'], f'{os.getpid()}.jsonl'), 'a') as f:
        f.write(json.dumps(rewards) + '\\n')
    return rewards
"""


def test_two_processes_share_the_prompts_and_stay_in_step(tmp_path, monkeypatch) -> None:
    model_dir, data, reward = cli_run_files(tmp_path, REWARD)
    calls = tmp_path / "calls"
    calls.mkdir()
    monkeypatch.setenv("REWARD_LOG", str(calls))
    out = tmp_path / "out"
    torchrun(
        [
            "grpo", "--model", str(model_dir), "--data", str(data), "--method", "lora",
            "--out", str(out), "--reward-function", f"{reward}:contains_five",
            "--max-steps", "3", "--batch-size", "4", "--group-size", "3",
            "--max-new-tokens", "4", "--updates", "2", "--lr", "1e-2", "--save-every", "1",
            "--no-progress",
        ]
    )  # fmt: skip
    per_process = [
        [json.loads(line) for line in f.read_text().splitlines()] for f in calls.iterdir()
    ]
    assert len(per_process) == 2
    # Each process scored its 2 prompts x 3 completions, once per step.
    assert all(len(steps) == 3 and all(len(r) == 6 for r in steps) for steps in per_process)
    rows = records(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for step, record in enumerate(rows):
        both = [x for steps in per_process for x in steps[step]]
        # Rank 0's metric is the mean over both processes' 12 completions.
        assert abs(record["reward_mean"] - sum(both) / len(both)) < 1e-6, step
    latest = out / (out / "latest").read_text().strip()
    assert (latest / "rng.safetensors").is_file() and (latest / "rng-rank1.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_a_reward_function_failing_in_one_process_stops_both(tmp_path) -> None:
    """Rank 1's reward function raises; both processes stop at once with one line each (rank 0
    pointing to the other's error) instead of rank 0 waiting in its next collective."""
    model_dir, data, reward = cli_run_files(
        tmp_path,
        "import os\n\ndef flaky(prompts, completions):\n"
        "    if os.environ['RANK'] == '1':\n        raise KeyError('only here')\n"
        "    return [0.0] * len(completions)\n",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(PYTHON_DIR), env.get("PYTHONPATH", "")])
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    args = [
        "grpo", "--model", str(model_dir), "--data", str(data), "--method", "lora",
        "--out", str(tmp_path / "out"), "--reward-function", f"{reward}:flaky",
        "--max-steps", "2", "--batch-size", "4", "--group-size", "2", "--max-new-tokens", "3",
        "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(
        [*launcher, "-m", "lorakit.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "step 1: the reward function raised KeyError: 'only here'" in done.stderr
    assert "the reward function failed in another process" in done.stderr
