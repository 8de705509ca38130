"""`lorakit ppo` under torchrun: 2 gloo processes each sample and score their half of every
step's prompts; rank 0's batch metrics are over both halves; the policy, value adapter and
value head stay equal on both ranks (the loop checks it at each checkpoint and stops otherwise);
and PPO's targets computed on each half of one rollout equal the whole rollout's."""

import json
from pathlib import Path

import torch
import torch.multiprocessing as mp

from lorakit.generation import Rollout, sample
from lorakit.recipes import ppo
from lorakit.train.distributed import init_group, release_group
from lorakit.train.ppo import PPOTrainer
from lorakit.train.rollout_loop import StepSums
from rl_helpers import PROMPTS, cli_run_files, contains_target, policy, records
from test_grpo_ddp import REWARD
from test_ppo import config as ppo_config
from test_trainer_ddp import torchrun


def test_two_processes_share_the_prompts_and_stay_in_step(tmp_path, monkeypatch) -> None:
    model_dir, data, reward = cli_run_files(tmp_path, REWARD)
    calls = tmp_path / "calls"
    calls.mkdir()
    monkeypatch.setenv("REWARD_LOG", str(calls))
    out = tmp_path / "out"
    torchrun(
        [
            "ppo", "--model", str(model_dir), "--data", str(data), "--method", "lora",
            "--out", str(out), "--reward-function", f"{reward}:contains_five",
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


# ---- PPO's batch statistics with the rollout split over 2 gloo processes

ROWS = 4


def _trainer_and_rollout(out: Path) -> tuple[PPOTrainer, Rollout]:
    """The same PPO trainer (LoRA B, value head nonzero, so that values and KL are not 0) and
    the same sampled rollout of 4 rows, in every process that calls it."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tok = policy()
    cfg = ppo_config(out, 1, batch=ROWS, whiten_rewards=True)
    head, reward = ppo.prepare(model, tok, cfg, contains_target)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        head.weight.normal_(0, 0.5)
    trainer = PPOTrainer(model, tok, cfg.train, cfg.ppo, cfg.sampling, PROMPTS, reward, head)
    prompts = [tok(p.text, add_special_tokens=False)["input_ids"] for p in PROMPTS[:ROWS]]
    rollout = sample(model, prompts, 1, cfg.sampling, tok.pad_token_id, tok.eos_token_id)
    return trainer, rollout


def _targets(trainer: PPOTrainer, rollout: Rollout, rows: slice) -> dict[str, torch.Tensor]:
    part = Rollout(
        rollout.input_ids[rows],
        rollout.attention_mask[rows],
        rollout.completion_mask[rows],
        rollout.prompt_len,
        rollout.ended[rows],
    )
    scores = torch.arange(ROWS, dtype=torch.float32)[rows] * 0.7 - 1.0
    targets, metrics = trainer._targets(part, scores, StepSums())
    return {**vars(targets), **{k: torch.tensor(v) for k, v in metrics.items()}}


def _targets_worker(rank: int, init_file: str, out: str) -> None:
    init_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        trainer, rollout = _trainer_and_rollout(Path(out) / f"run{rank}")
        half = slice(rank * ROWS // 2, (rank + 1) * ROWS // 2)
        torch.save(_targets(trainer, rollout, half), Path(out) / f"rank{rank}.pt")
    finally:
        release_group()


def test_targets_split_over_two_processes_equal_the_whole_batchs(tmp_path) -> None:
    """Each process computes PPO's targets on its half of one rollout: with the rewards' and
    the advantages' whitening, the score, the KL and the value metrics taken over both halves,
    they equal the targets of the whole rollout in one process."""
    mp.spawn(_targets_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    halves = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    trainer, rollout = _trainer_and_rollout(tmp_path / "whole")
    whole = _targets(trainer, rollout, slice(0, ROWS))
    assert whole["advantages"].abs().max() > 0.1  # the check can fail
    for name in ("logprobs", "values", "advantages", "returns"):
        split = torch.cat([h[name] for h in halves])
        # Half batches in other forward shapes, sums in another order: float32 rounding.
        torch.testing.assert_close(split, whole[name], rtol=0, atol=1e-5, msg=name)
    for name in ("kl_sequence", "score", "rlhf_reward", "value_mean", "explained_variance"):
        for half in halves:
            torch.testing.assert_close(half[name], whole[name], rtol=1e-5, atol=1e-6, msg=name)
