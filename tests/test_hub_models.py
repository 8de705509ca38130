"""`--model` takes a Hugging Face hub id: a model in the Hugging Face cache loads offline, and one
that is neither cached nor reachable gets one line (exit status 2), not a traceback."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lorakit
from sft_helpers import qa_rows, saved_model

PYTHON_DIR = Path(lorakit.__file__).resolve().parents[1]


def hub_cache(root: Path, repo: str, model: Path) -> Path:
    """``model``'s files laid out as the Hugging Face cache holds a downloaded ``repo``."""
    cache = root / "hub"
    folder = cache / f"models--{repo.replace('/', '--')}"
    revision = "0" * 40
    shutil.copytree(model, folder / "snapshots" / revision)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    return cache


def lorakit_offline(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(PYTHON_DIR), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "lorakit.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_a_cached_hub_id_trains_offline_and_a_missing_one_gets_one_line(tmp_path) -> None:
    cache = hub_cache(tmp_path, "lorakit-tests/tiny-llama", saved_model(tmp_path / "model"))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows(8)))
    common = ["--data", str(data), "--method", "lora", "--max-steps", "2", "--no-progress"]
    done = lorakit_offline(
        cache, "sft", "--model", "lorakit-tests/tiny-llama", "--out", str(tmp_path / "o"), *common
    )
    assert done.returncode == 0, done.stderr[-2000:]
    adapter = json.loads((tmp_path / "o" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "lorakit-tests/tiny-llama"

    missing = lorakit_offline(
        cache, "sft", "--model", "lorakit-tests/missing", "--out", str(tmp_path / "m"), *common
    )
    assert missing.returncode == 2
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "lorakit-tests/missing" in lines[0] and "cache" in lines[0]
