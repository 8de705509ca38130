"""FSDP2 over 2 CPU processes (gloo): the NF4 base is sharded (each rank stores about half of its
bytes) and computes what the unsharded model does; lorakit's 8-bit AdamW keeps the state of each
rank's shard only, in blocks that start at the shard's first element."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lorakit.nn import NF4Linear
from lorakit.optim import AdamW
from lorakit.optim.state import local_shard
from lorakit.peft import LoraConfig
from lorakit.peft.inject import apply_lora
from lorakit.train import fsdp
from lorakit.train.distributed import init_group, release_group
from sft_helpers import llama, tokenizer

WORLD = 2


def _qlora_model() -> nn.Module:
    # Hidden 64: each NF4 layer has 32 to 64 blocks of 64 weights, so its rows split evenly.
    model = llama(tokenizer(), hidden=64, layers=2)
    torch.manual_seed(0)
    apply_lora(model, LoraConfig(r=4, quantize="nf4"))
    return model


def _base_storage(model: nn.Module) -> tuple[int, int]:
    """(bytes of this rank's NF4 storage, bytes of one row of every storage tensor)."""
    stored = rows = 0
    for module in model.modules():
        if isinstance(module, NF4Linear):
            for p in (module.weight_codes, module.weight_scales):
                stored += local_shard(p).untyped_storage().nbytes()
                rows += p.shape[1] * p.element_size()
    return stored, rows


def _loss_and_grads(model: nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    ids = torch.randint(4, 20, (2, 12), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {
        n: p.grad.full_tensor() if isinstance(p.grad, torch.distributed.tensor.DTensor) else p.grad
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    return loss.item(), grads


def _adamw_steps(linear: nn.Linear, steps: int = 3) -> AdamW:
    opt = AdamW(linear.parameters(), lr=1e-2, weight_decay=0.1, state_bits=8)
    x = torch.randn(8, linear.in_features, generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        linear(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def _linear(n_in: int, n_out: int) -> nn.Linear:
    torch.manual_seed(3)
    return nn.Linear(n_in, n_out, bias=False)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    init_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = _qlora_model()
        whole_bytes, row_bytes = _base_storage(model)
        fsdp.shard(model, torch.device("cpu"))
        shard_bytes, _ = _base_storage(model)
        loss, grads = _loss_and_grads(model)
        torch.save(grads, os.path.join(out_dir, f"grads{rank}.pt"))

        mesh = init_device_mesh("cpu", (WORLD,))
        states = {}
        for n_in, n_out in ((256, 64), (100, 90)):
            linear = fully_shard(_linear(n_in, n_out), mesh=mesh)
            opt = _adamw_steps(linear)
            weight = linear.weight
            state = opt.state[weight]
            torch.save(
                {"local": local_shard(weight).detach().clone(), "state": state},
                os.path.join(out_dir, f"linear{n_out}-rank{rank}.pt"),
            )
            states[n_out] = {k: list(v.shape) for k, v in state.items() if torch.is_tensor(v)}
        result = {
            "loss": loss,
            "whole_bytes": whole_bytes,
            "shard_bytes": shard_bytes,
            "row_bytes": row_bytes,
            "states": states,
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        release_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp_nf4")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return out


def _result(out: Path, rank: int) -> dict:
    return json.loads((out / f"rank{rank}.json").read_text())


def test_each_rank_stores_half_of_the_nf4_base(ranks) -> None:
    for rank in range(WORLD):
        got = _result(ranks, rank)
        whole, shard = got["whole_bytes"], got["shard_bytes"]
        # FSDP2 gives each rank ceil(rows / 2) rows of every storage tensor, so a rank stores
        # half of the bytes, plus at most half a row per tensor where a tensor's rows are odd.
        assert whole / 2 <= shard <= whole / 2 + got["row_bytes"] / 2, (rank, whole, shard)


def test_sharded_qlora_computes_what_the_whole_model_does(ranks) -> None:
    model = _qlora_model()
    torch.set_num_threads(1)
    loss, grads = _loss_and_grads(model)
    for rank in range(WORLD):
        # The gathered NF4 bytes are the same bytes, so the forward is the same computation;
        # the gradients are averaged over two equal ranks ((g + g) / 2 is exact in float32).
        # Only the order of FSDP's reductions could move the last bit: 1e-6 relative.
        assert _result(ranks, rank)["loss"] == pytest.approx(loss, rel=1e-6)
        theirs = torch.load(ranks / f"grads{rank}.pt")
        assert theirs.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(theirs[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_8bit_state_is_per_shard_in_blocks_that_start_at_the_shard(ranks) -> None:
    for rank in range(WORLD):
        states = _result(ranks, rank)["states"]
        # (64, 256) splits into 32 rows of 256 per rank: 8192 codes, 32 blocks of 256.
        assert states["64"]["exp_avg"] == [32, 256] and states["64"]["exp_avg_absmax"] == [32]
        # (90, 100) splits into 45 rows of 100: 4500 codes, ceil(4500 / 256) = 18 blocks (the
        # unsharded tensor has 36, and element 4500 is in the middle of its 18th).
        assert states["90"]["exp_avg"] == [45, 100] and states["90"]["exp_avg_absmax"] == [18]


def test_8bit_steps_on_block_aligned_shards_equal_the_unsharded_steps(ranks) -> None:
    # Each shard of the (64, 256) weight is whole 256-element blocks, the same blocks the
    # unsharded state has, and the gradient is the same on both ranks: the sharded 8-bit AdamW
    # computes exactly what one process does (same native kernel on the same values).
    torch.set_num_threads(1)
    linear = _linear(256, 64)
    _adamw_steps(linear)
    halves = linear.weight.detach().chunk(WORLD)
    for rank in range(WORLD):
        saved = torch.load(ranks / f"linear64-rank{rank}.pt")
        torch.testing.assert_close(saved["local"], halves[rank], rtol=0, atol=0)


def test_8bit_steps_on_unaligned_shards_quantize_each_shard_alone(ranks) -> None:
    # The second rank's shard of the (90, 100) weight starts at element 4500, inside an
    # unsharded block: its state is blockwise over the shard alone. Its steps equal the same
    # 8-bit AdamW run on that shard as a tensor of its own (4500 elements: 8-bit state too; the
    # gradient of a row depends only on that row, so the shard's gradient is those rows').
    torch.set_num_threads(1)
    linear = _linear(100, 90)
    x = torch.randn(8, 100, generator=torch.Generator().manual_seed(2))
    for rank in range(WORLD):
        rows = linear.weight.detach().chunk(WORLD)[rank]
        part = nn.Linear(100, rows.shape[0], bias=False)
        part.weight.data.copy_(rows)
        opt = AdamW(part.parameters(), lr=1e-2, weight_decay=0.1, state_bits=8)
        for _ in range(3):
            # d/dW of the mean over all 90 outputs: the part's sum over the same count.
            (part(x).square().sum() / (8 * 90)).backward()
            opt.step()
            opt.zero_grad()
        saved = torch.load(ranks / f"linear90-rank{rank}.pt")
        assert math.prod(saved["state"]["exp_avg"].shape) == rows.numel()
        torch.testing.assert_close(saved["local"], part.weight.detach(), rtol=1e-6, atol=1e-7)


def test_fsdp_needs_a_model_that_names_its_decoder_layers() -> None:
    assert [type(m).__name__ for m in fsdp.decoder_layers(_qlora_model())] == [
        "LlamaDecoderLayer"
    ] * 2
    with pytest.raises(ValueError, match="names no decoder-layer class"):
        fsdp.decoder_layers(nn.Sequential(nn.Linear(2, 2)))
