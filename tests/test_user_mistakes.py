"""A user's mistake on the command line or in a file: exit status 2 and one line naming the
file, option or row; never a traceback, never a silently wrong result."""

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, LlamaConfig

from lorakit.cli import build_parser, main
from lorakit.config_args import build
from lorakit.data import DataConfig
from lorakit.data.prompts import load_prompts
from lorakit.models.positions import check_positions
from lorakit.models.tiny import check_width
from lorakit.peft import IA3Config, LoraConfig
from lorakit.recipes.sft import SFTConfig
from lorakit.train import TrainConfig
from preference_helpers import pair_rows
from sft_helpers import qa_rows, saved_model, tokenizer

FAST = ["--max-steps", "2", "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in qa_rows(12)))
    return str(path)


def one_line_error(capsys, argv: list[str], expected: str, status: int = 2) -> str:
    assert main(argv) == status
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def sft(model_dir, data, out, *extra: str) -> list[str]:
    return ["sft", "--model", str(model_dir), "--data", data, "--out", str(out), *extra]


def sft_config(*argv: str) -> SFTConfig:
    """The SFTConfig that ``lorakit sft`` builds from ``argv`` (no training)."""
    args = build_parser().parse_args(["sft", *argv])
    return build(SFTConfig, args, set(), {})


# ---- data files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.jsonl", "", "is empty (0 bytes)"),
        ("empty.csv", "", "is empty (0 bytes)"),
        ("empty.txt", "", "is empty (0 bytes)"),
        ("blank.jsonl", "\n\n", "blank.jsonl has no rows"),
    ],
)
def test_an_empty_data_file_is_one_line(tmp_path, model_dir, capsys, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    argv = sft(model_dir, str(path), tmp_path / "out", *FAST)
    one_line_error(capsys, argv, f"{tmp_path / name}")
    one_line_error(capsys, argv, expected)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("latin1.jsonl", b'{"prompt": "caf\xe9", "completion": "x"}\n', "line 1 is not UTF-8 text"),
        ("latin1.csv", b"prompt,completion\ncaf\xe9,x\n", "line 2 is not UTF-8 text"),
        ("broken.parquet", b"not parquet at all", "cannot be read as parquet"),
    ],
)
def test_an_unreadable_data_file_is_one_line(tmp_path, model_dir, capsys, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    err = one_line_error(capsys, sft(model_dir, str(path), tmp_path / "out", *FAST), expected)
    assert str(path) in err


def test_an_out_that_is_a_file_is_one_line(tmp_path, model_dir, data, capsys) -> None:
    one_line_error(capsys, sft(model_dir, data, data, *FAST), "is a file, not a directory")
    assert (tmp_path / "data.jsonl").read_text().count("\n") == 12  # untouched


# ---- YAML values are typed as the command line types them -------------------------------------


def write_yaml(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_strings_convert_by_the_options_type(tmp_path) -> None:
    # PyYAML reads 1e-3 (no dot) as a string; argparse would convert "1e-3" with float().
    config = sft_config(
        "--config",
        write_yaml(tmp_path, 'lr: 1e-3\nbatch_size: "4"\nlora: {alpha: "32"}\nmix: [1]\n'),
        "--data",
        "a.jsonl",
    )
    assert config.train.lr == 0.001 and isinstance(config.train.lr, float)
    assert config.train.batch_size == 4 and isinstance(config.train.batch_size, int)
    assert config.lora.alpha == 32.0
    assert config.data.mix == [1.0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('pack: "no"', "pack must be true or false, got 'no'"),
        ("pack: 0", "pack must be true or false, got 0"),
        ("lr: fast", "lr must be a number, got 'fast'"),
        ("train: {lr: [1]}", "lr must be a number, got [1]"),
        ("batch_size: 4.5", "batch_size must be an integer, got 4.5"),
        ('batch_size: "4.5"', "batch_size must be an integer, got '4.5'"),
        ("batch_size: true", "batch_size must be an integer, got True"),
        ("batch_size: null", "batch_size needs a value, got null"),
        ("data: 5", "data must be a string, got 5"),
        ("schedule: linear", "schedule must be one of ['cosine', 'wsd', 'constant']"),
        ("optim_bits: 16", "optim_bits must be one of [32, 8], got 16"),
        ("lora: {alpha: .nan}", "lora: alpha must be > 0, got nan"),
        ("max_steps: -1", "max_steps must be >= 0, got -1"),
    ],
)
def test_yaml_values_of_the_wrong_type_name_the_option_and_file(
    tmp_path, model_dir, capsys, text, expected
) -> None:
    config = write_yaml(tmp_path, text + "\n")
    argv = ["sft", "--model", str(model_dir), "--data", "x.jsonl", "--config", config]
    err = one_line_error(capsys, argv, expected)
    if "lora:" not in expected and "max_steps" not in expected:  # type errors: the file too
        assert "run.yaml" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # PyYAML kept the last value, so the file's order decided silently.
        ("lr: 0.1\nlr: 0.2", "run.yaml: the key 'lr' is repeated (line 2)"),
        ("lora: {r: 4, r: 8}", "run.yaml: the key 'r' is repeated (line 1)"),
        ("train: {lr: 0.1}\nlr: 0.2", "run.yaml gives the option lr twice"),
        ("lora-r: 4\nlora_r: 8", "run.yaml gives the option lora_r twice"),
        ("lora: {r: 4}\nlora-r: 8", "run.yaml gives the option lora_r twice"),
        # A value PyYAML cannot build was a bare "month must be in 1..12".
        ("seed: 2020-13-01", "run.yaml: month must be in 1..12"),
    ],
)
def test_an_option_given_twice_in_yaml_is_one_line(tmp_path, capsys, text, expected) -> None:
    config = write_yaml(tmp_path, text + "\n")
    one_line_error(
        capsys, ["sft", "--model", "m", "--data", "x.jsonl", "--config", config], expected
    )


def test_dashed_options_nested_in_a_group_are_read_as_flat_ones(tmp_path) -> None:
    config = write_yaml(tmp_path, "lora: {target-modules: [q_proj]}\n")
    assert sft_config("--config", config, "--data", "a").lora.target_modules == ["q_proj"]


# ---- numeric options: refused where the value means nothing ------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--max-steps", "-1", "max_steps must be >= 0, got -1"),
        ("--save-every", "-1", "save_every must be >= 0, got -1"),
        ("--eval-every", "-2", "eval_every must be >= 0"),
        ("--patience", "-1", "patience must be >= 0"),
        ("--log-every", "0", "log_every must be a positive integer, got 0"),
        ("--keep-checkpoints", "0", "keep_checkpoints must be a positive integer"),
        ("--batch-size", "0", "batch_size must be a positive integer"),
        ("--grad-accum", "-3", "grad_accum must be a positive integer"),
        ("--seed", "-1", "seed must be >= 0"),
        ("--epochs", "-1", "epochs must be >= 0"),
        ("--lr", "0", "lr must be > 0, got 0.0"),
        ("--lr", "nan", "lr must be > 0, got nan"),
        ("--lr", "inf", "lr must be > 0, got inf"),
        ("--weight-decay", "-0.1", "weight_decay must be >= 0"),
        ("--max-grad-norm", "nan", "max_grad_norm must be >= 0, got nan"),
        ("--warmup", "1", "warmup must be in [0, 1)"),
        ("--optim-page-budget-mb", "-1", "optim_page_budget_mb must be >= 0"),
        ("--seq-len", "1", "seq_len must be >= 2"),
        ("--val-fraction", "nan", "val_fraction must be in [0, 1)"),
        ("--near-dup-threshold", "0", "near_dup_threshold must be in (0, 1]"),
        ("--min-tokens", "-1", "min_tokens must be >= 0"),
        ("--max-tokens", "-1", "max_tokens must be >= 0"),
        ("--lora-r", "0", "lora: r must be a positive integer"),
        ("--lora-alpha", "nan", "lora: alpha must be > 0, got nan"),
        ("--lora-alpha", "-16", "lora: alpha must be > 0"),
        ("--lora-dropout", "nan", "lora: dropout must be in [0, 1)"),
        ("--bottleneck-reduction-factor", "0", "reduction_factor must be a positive integer"),
    ],
)
def test_meaningless_numbers_are_refused(tmp_path, model_dir, capsys, option, value, expected):
    argv = ["sft", "--model", str(model_dir), "--data", "x.jsonl", option, value]
    one_line_error(capsys, argv, expected)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu", "CPU"])
def test_unknown_devices_are_refused_before_loading(model_dir, capsys, device) -> None:
    argv = ["sft", "--model", str(model_dir), "--data", "x.jsonl", "--device", device]
    one_line_error(capsys, argv, f"device must be auto, cpu, cuda or cuda:N, got '{device}'")


def test_a_cuda_device_the_machine_lacks_is_one_line(tmp_path, model_dir, data, capsys) -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = f"cuda:{count}"  # one past the last device, or any on a machine without CUDA
    expected = "this machine has" if count else "no CUDA GPU is usable here"
    one_line_error(capsys, sft(model_dir, data, tmp_path / "out", "--device", device), expected)


@pytest.mark.parametrize("command", ["demo", "compare"])
def test_a_width_that_the_heads_cannot_split_is_one_line(command, capsys) -> None:
    # It was a traceback from transformers' config check after the run had started.
    one_line_error(capsys, [command, "--hidden", "70"], "hidden 70 does not split into 2")


def test_check_width_refuses_what_transformers_refuses() -> None:
    from huggingface_hub.errors import StrictDataclassError

    # transformers lets odd head sizes up to 4 pass, whose RoPE then fails in the forward pass.
    with pytest.raises(ValueError, match="hidden 3 does not split"):
        check_width(3)
    for hidden in range(5, 200):
        heads = max(1, hidden // 32)
        try:
            LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads)
            built = True
        except StrictDataclassError:
            built = False
        if built:
            check_width(hidden)
        else:
            with pytest.raises(ValueError, match=f"hidden {hidden} does not split"):
                check_width(hidden)


def test_configs_refuse_nan_in_python_too() -> None:
    with pytest.raises(ValueError, match="alpha must be > 0, got nan"):
        LoraConfig(alpha=math.nan)
    with pytest.raises(ValueError, match="alpha must be > 0, got inf"):
        LoraConfig(alpha=math.inf)
    with pytest.raises(ValueError, match="r must be an integer, got True"):
        LoraConfig(r=True)
    with pytest.raises(ValueError, match="mix shares must be > 0, got nan"):
        DataConfig(data=["a"], mix=[math.nan])
    with pytest.raises(ValueError, match=r"max_steps must be an integer, got 2\.5"):
        TrainConfig(max_steps=2.5)
    with pytest.raises(ValueError, match="every row would be dropped"):
        DataConfig(min_tokens=10, max_tokens=5)


def test_dpo_and_reward_options_refuse_nan(model_dir, capsys) -> None:
    base = ["--model", str(model_dir), "--data", "x.jsonl"]
    one_line_error(capsys, ["dpo", *base, "--beta", "nan"], "beta must be positive and finite")
    one_line_error(capsys, ["reward", *base, "--center-coefficient", "-1"], "must be >= 0")


# ---- all-linear on the command line --------------------------------------------------------------


def test_all_linear_on_the_command_line_is_the_python_string() -> None:
    config = sft_config("--lora-target-modules", "all-linear", "--data", "a.jsonl")
    assert config.lora == LoraConfig(target_modules="all-linear")
    assert LoraConfig(target_modules=["all-linear"]).target_modules == "all-linear"
    assert IA3Config(target_modules=["all-linear"]).target_modules == "all-linear"
    with pytest.raises(ValueError, match="takes no other names"):
        LoraConfig(target_modules=["all-linear", "q_proj"])


@pytest.mark.parametrize("config", [LoraConfig, IA3Config])
def test_target_modules_of_another_type_are_one_line(config) -> None:
    assert config(target_modules=("v_proj", "q_proj")).target_modules == ["v_proj", "q_proj"]
    assert config(target_modules={"v_proj", "q_proj"}).target_modules == ["q_proj", "v_proj"]
    for bad in (5, ["q_proj", 3]):
        with pytest.raises(ValueError, match="target_modules must be a module name pattern"):
            config(target_modules=bad)


def test_one_layer_name_as_a_yaml_string_says_it_is_a_regex(
    tmp_path, model_dir, data, capsys
) -> None:
    # PEFT's rule: one string is a regular expression for the full name. The message listed
    # 'q_proj' among the layer names without saying why 'q_proj' matched none.
    config = write_yaml(tmp_path, "lora_target_modules: q_proj\n")
    argv = [*sft(model_dir, data, tmp_path / "out", "--method", "lora", *FAST), "--config", config]
    expected = (
        "one string is a regular expression for the full name, such as "
        "'model.layers.0.mlp.down_proj'; the list ['q_proj'] matches name endings"
    )
    one_line_error(capsys, argv, expected)


def test_all_linear_trains_from_the_command_line(tmp_path, model_dir, data) -> None:
    out = tmp_path / "out"
    argv = sft(model_dir, data, out, "--method", "lora", "--lora-target-modules", "all-linear")
    assert main([*argv, *FAST]) == 0
    keys = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    layers = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys}
    assert layers == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# ---- corrupt model files ----------------------------------------------------------------------


def test_a_truncated_base_model_is_one_line(tmp_path, model_dir, data, capsys) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    one_line_error(capsys, sft(broken, data, tmp_path / "o", *FAST), f"from {broken}")


def test_a_pickled_base_model_is_never_loaded(tmp_path, model_dir, data, capsys) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(model_dir, pickled)
    state = load_file(str(pickled / "model.safetensors"))
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")  # torch.load(weights_only) would accept it
    one_line_error(capsys, sft(pickled, data, tmp_path / "o", *FAST), "never loads")


def test_an_inconsistent_model_config_is_one_line(tmp_path, model_dir, data, capsys) -> None:
    # transformers checks a config as it builds it, raising an error that is no ValueError.
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_attention_heads": 3}))
    expected = f"{broken / 'config.json'} is not a valid model configuration: "
    err = one_line_error(capsys, sft(broken, data, tmp_path / "o", *FAST), expected)
    assert "not a multiple of the number of attention heads (3)" in err


def test_a_base_model_missing_weights_is_one_line(tmp_path, model_dir, data, capsys) -> None:
    # transformers would start the missing layer at random, warn, and let the run train on it.
    partial = tmp_path / "partial"
    shutil.copytree(model_dir, partial)
    weights = load_file(str(partial / "model.safetensors"))
    kept = {k: v for k, v in weights.items() if ".layers.1." not in k}
    save_file(kept, str(partial / "model.safetensors"), metadata={"format": "pt"})
    expected = f"{partial} has no weights for {len(weights) - len(kept)} of the causal LM's"
    one_line_error(capsys, sft(partial, data, tmp_path / "o", *FAST), expected)
    assert not (tmp_path / "o").exists()


def test_tokens_past_the_embeddings_are_one_line(tmp_path, model_dir, capsys) -> None:
    # Tokens added to the tokenizer, the model not resized: an IndexError in the first batch
    # that held one (a device-side assert on a GPU). Unused, they are harmless (Gemma 3's
    # tokenizer lists an image token past its text model's embeddings).
    grown = tmp_path / "grown"
    shutil.copytree(model_dir, grown)
    grown_tokenizer = tokenizer()
    grown_tokenizer.add_tokens(["seven", "eight"])  # ids past the model's embeddings
    grown_tokenizer.save_pretrained(grown)
    vocab = json.loads((grown / "config.json").read_text())["vocab_size"]
    for name, completion in (("unused", " six"), ("used", " seven")):
        path = tmp_path / f"{name}.jsonl"
        rows = [{"prompt": "what is five ?", "completion": completion}] * 4
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        argv = sft(grown, str(path), tmp_path / name, *FAST)
        if name == "unused":
            assert main(argv) == 0
        else:
            expected = f"the data holds token id {vocab}, but the model has only {vocab} input"
            one_line_error(capsys, argv, expected)
    # lorakit reward --score tokenizes rows too (a traceback, as in training).
    argv = ["reward", "--score", "--model", str(grown), "--data", str(tmp_path / "used.jsonl")]
    argv += ["--out", str(tmp_path / "scores"), "--no-progress"]
    # A reward model (a score head in its weights) with the grown tokenizer.
    AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).save_pretrained(
        grown
    )
    one_line_error(capsys, argv, f"the data holds token id {vocab}, but the model has only")


def test_a_pad_token_past_the_embeddings_is_one_line(tmp_path, model_dir, data, capsys) -> None:
    # The data never holds it, but every padded batch does.
    padded = tmp_path / "padded"
    shutil.copytree(model_dir, padded)
    padded_tokenizer = tokenizer()
    padded_tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    padded_tokenizer.save_pretrained(padded)
    vocab = json.loads((padded / "config.json").read_text())["vocab_size"]
    argv = sft(padded, data, tmp_path / "out", "--no-pack", *FAST)
    one_line_error(capsys, argv, f"the pad token's id {vocab} is past the model's {vocab} input")


# ---- adapters with NaN, Inf or integers --------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, model_dir):
    tmp = tmp_path_factory.mktemp("adapter")
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows(12)))
    assert main([*sft(model_dir, str(data), tmp / "run", "--method", "lora"), *FAST]) == 0
    return tmp / "run" / "adapter"


def broken_adapter(tmp_path, adapter_dir, tensors=None, config=None):
    broken = tmp_path / "broken"
    shutil.copytree(adapter_dir, broken)
    if tensors is not None:
        weights = load_file(str(broken / "adapter_model.safetensors"))
        save_file(tensors(weights), str(broken / "adapter_model.safetensors"))
    if config is not None:
        path = broken / "adapter_config.json"
        path.write_text(json.dumps(config(json.loads(path.read_text()))))
    return broken


def first_key_set(weights, value):
    key = sorted(weights)[0]
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] = value
    return weights


@pytest.mark.parametrize(
    ("tensors", "config", "expected"),
    [
        (lambda w: first_key_set(w, math.nan), None, "holds NaN or infinite values"),
        (lambda w: first_key_set(w, math.inf), None, "holds NaN or infinite values"),
        (lambda w: {k: v.to(torch.int32) for k, v in w.items()}, None, "not a floating-point"),
        (None, lambda c: {**c, "lora_alpha": math.nan}, "alpha must be finite"),
        (None, lambda c: {**c, "lora_alpha": math.inf}, "alpha must be finite"),
        (None, lambda c: c | {"alpha_pattern": {"q_proj": math.nan}}, "alpha must be finite"),
    ],
)
def test_non_finite_or_integer_adapters_do_not_merge(
    tmp_path, model_dir, adapter_dir, capsys, tensors, config, expected
) -> None:
    broken = broken_adapter(tmp_path, adapter_dir, tensors, config)
    out = tmp_path / "merged"
    argv = ["merge", "--model", str(model_dir), "--adapter", str(broken), "--out", str(out)]
    one_line_error(capsys, argv, expected)
    assert not out.exists()


def test_merging_a_nan_adapter_in_memory_is_refused(model_dir, adapter_dir) -> None:
    from transformers import AutoModelForCausalLM

    from lorakit.peft import load_adapter
    from lorakit.peft.export import merged_state_dict
    from lorakit.peft.merge import merge_adapter

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    load_adapter(model, adapter_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"][0, 0] = math.nan
    with pytest.raises(ValueError, match="holds NaN or infinite values"):
        merge_adapter(model)
    with pytest.raises(ValueError, match="holds NaN or infinite values"):
        merged_state_dict(model)
    after = model.state_dict()  # the refusal left every base weight as it was
    for key, value in before.items():
        if "lora_" not in key:
            torch.testing.assert_close(after[key], value, rtol=0, atol=0)


# ---- sequences longer than the model ---------------------------------------------------------


def test_rows_longer_than_the_models_positions_are_one_line(tmp_path, model_dir, capsys) -> None:
    # The tiny Llama has 128 positions; plain text is cut into pieces of --seq-len tokens.
    text = tmp_path / "long.txt"
    text.write_text(" ".join(["question : what is one ? two"] * 60) + "\n")
    argv = ["pretrain", "--model", str(model_dir), "--data", str(text), "--out", str(tmp_path)]
    expected = "an example of 256 tokens, longer than the 128 positions this model has"
    one_line_error(capsys, [*argv, "--seq-len", "256", *FAST], expected)
    assert main([*argv, "--seq-len", "128", *FAST]) == 0


def test_a_rope_scaling_factor_extends_the_models_positions() -> None:
    scaled = LlamaConfig(
        max_position_embeddings=64, rope_scaling={"rope_type": "linear", "factor": 2}
    )
    model = SimpleNamespace(config=scaled)
    check_positions(model, [128, 5])
    with pytest.raises(ValueError, match="example of 129 tokens, longer than the 128 positions"):
        check_positions(model, [129])


# ---- a reward model without a trained score head ---------------------------------------------


def test_scoring_needs_a_trained_score_head(tmp_path, model_dir, adapter_dir, data, capsys):
    # An SFT adapter or a plain causal LM leaves the head at its random initialisation.
    out = tmp_path / "scores"
    argv = ["reward", "--score", "--model", str(model_dir), "--data", data, "--no-progress"]
    argv += ["--out", str(out)]
    one_line_error(capsys, [*argv, "--adapter", str(adapter_dir)], "is no reward adapter")
    one_line_error(capsys, argv, f"{model_dir} has no trained 'score' head")
    assert not out.exists()


def test_a_stray_file_with_a_score_head_is_not_the_models(tmp_path, model_dir, data, capsys):
    # transformers loads model.safetensors (or the files its index names), never this one.
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    save_file({"score.weight": torch.zeros(1, 32)}, model / "extra.safetensors")
    argv = ["reward", "--score", "--model", str(model), "--data", data, "--no-progress"]
    one_line_error(capsys, [*argv, "--out", str(tmp_path / "scores")], "no trained 'score' head")
    (model / "model.safetensors").unlink()
    one_line_error(capsys, [*argv, "--out", str(tmp_path / "scores")], "holds no model weights")


def test_ppo_refuses_a_reward_adapter_without_a_head(tmp_path, model_dir, adapter_dir, capsys):
    argv = ["ppo", "--model", str(model_dir), "--data", "x.jsonl", "--out", str(tmp_path)]
    expected = f"{adapter_dir} is no reward adapter"
    one_line_error(capsys, [*argv, "--reward-adapter", str(adapter_dir)], expected)


@pytest.mark.parametrize(
    ("command", "peft_type", "task_type"),
    [("grpo", "IA3", "CAUSAL_LM"), ("grpo", "LORA", "SEQ_CLS"), ("ppo", "PREFIX_TUNING", None)],
)
def test_an_init_adapter_of_another_kind_is_one_line(
    tmp_path, model_dir, capsys, command, peft_type, task_type
) -> None:
    # An IA3 or prefix adapter trained in the LoRA policy's place without a word.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": peft_type, "task_type": task_type}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    argv = [command, "--model", str(model_dir), "--data", "x.jsonl", "--out", str(tmp_path / "o")]
    argv += ["--reward-function", "r.py:f", "--init-adapter", str(adapter)]
    expected = f"--init-adapter {adapter} holds peft_type {peft_type!r}, task_type {task_type!r}"
    one_line_error(capsys, argv, expected)


def test_a_reward_adapter_without_score_is_one_line(tmp_path, model_dir, adapter_dir, capsys):
    # It was ignored: a new reward model trained from the bare base instead.
    argv = ["reward", "--model", str(model_dir), "--data", "x.jsonl", "--out", str(tmp_path)]
    one_line_error(capsys, [*argv, "--adapter", str(adapter_dir)], "goes with --score")


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], "row 2: missing 'completion'"),
        ([{"prompt": "a", "completion": 5}], "row 1: 'completion' must be text or messages"),
        ([{"prompt": "a", "chosen": "b", "rejected": None}], "row 1: missing 'rejected'"),
    ],
)
def test_bad_rows_to_score_name_the_row(tmp_path, model_dir, capsys, rows, expected) -> None:
    # They failed after the model loaded with "missing 'chosen'", naming no file or row.
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["reward", "--score", "--model", str(model_dir), "--data", str(path), "--no-progress"]
    one_line_error(capsys, [*argv, "--out", str(tmp_path / "out")], f"{path}: {expected}")


def test_nothing_left_to_train_on_says_what_dropped_it(tmp_path, model_dir, capsys) -> None:
    path = tmp_path / "same.jsonl"
    same = [{**r, "chosen": r["rejected"]} for r in pair_rows(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in same))
    argv = ["dpo", "--model", str(model_dir), "--data", str(path), "--out", str(tmp_path / "o")]
    expected = f"left after filtering and the split ({path}: read 6, chosen identical to rejected"
    one_line_error(capsys, [*argv, *FAST], expected)


# ---- chat templates that fail or render nothing ------------------------------------------------

TURNS = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
NOT_JINJA = "{% for m in messages %}{{ m.content }{% endfor %}"
REFUSES_SYSTEM = (
    "{% for m in messages %}{% if m.role == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}" + TURNS
)
SKIPS_ASSISTANT = (
    "{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}{% endif %}{% endfor %}"
)
SYSTEM_CHAT = [{"role": "system", "content": "one"}, {"role": "user", "content": "hello"}]


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (NOT_JINJA, "chat template is not valid Jinja: unexpected '}'"),
        (REFUSES_SYSTEM, "chat template fails on this conversation: System role not supported"),
        ("{{ 1 / 0 }}", "chat template fails on this conversation: ZeroDivisionError"),
        ("{{ messages[0].content + 1 }}", "chat template fails on this conversation: TypeError"),
        ("{{ 'abc'.index('z') }}", "chat template fails on this conversation: ValueError"),
        # It trained on nothing: a loss of 0 and an adapter that learned nothing.
        (SKIPS_ASSISTANT, "chat template renders no text for message 2 (assistant)"),
    ],
)
def test_a_chat_template_that_fails_is_one_line(
    tmp_path, model_dir, capsys, template, expected
) -> None:
    templated = tmp_path / "templated"
    shutil.copytree(model_dir, templated)
    (templated / "chat_template.jinja").write_text(template)
    messages = [*SYSTEM_CHAT, {"role": "assistant", "content": "world"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    argv = sft(templated, str(path), tmp_path / "out", "--method", "lora", *FAST)
    one_line_error(capsys, argv, f"{path}: row 1: the tokenizer's {expected}")


def test_rollout_prompts_name_the_row_a_chat_template_refuses(tmp_path) -> None:
    tok = tokenizer()
    tok.chat_template = REFUSES_SYSTEM
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "hello"}) + "\n" + json.dumps({"messages": SYSTEM_CHAT}))
    with pytest.raises(ValueError, match=r"prompts\.jsonl: row 2: .* System role not supported"):
        load_prompts([str(path)], tok)


# ---- one file given twice --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "files", "expected"),
    [
        # Deduplication works within a file: every row trained on twice, silently.
        ("sft", ["--data", "d.jsonl", "./d.jsonl"], "data names ./d.jsonl twice"),
        # A validation loss over training rows, silently.
        ("dpo", ["--data", "d.jsonl", "--val-data", "d.jsonl"], "val_data d.jsonl is also a"),
        (
            "grpo",
            ["--data", "d.jsonl", "d.jsonl", "--reward-function", "r.py:f"],
            "names d.jsonl twice",
        ),
    ],
)
def test_a_file_given_twice_is_one_line(model_dir, capsys, command, files, expected) -> None:
    one_line_error(capsys, [command, "--model", str(model_dir), *files], expected)


def test_sft_on_preference_pairs_names_the_commands_that_take_them(
    tmp_path, model_dir, capsys
) -> None:
    # It pointed a command-line user to a Python function.
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(4)))
    expected = f"{path}: row 1: the rows are preference pairs (chosen / rejected): train on them "
    expected += "with lorakit dpo or lorakit reward"
    one_line_error(capsys, sft(model_dir, str(path), tmp_path / "out", *FAST), expected)
