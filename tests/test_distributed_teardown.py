"""Tearing down a gloo process group used by DDP joins its threads before the process exits.

Threads left running into interpreter shutdown are what made DDP workers abort at random with
"terminate called without an active exception"; the check reads the live threads' names.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import lorakit

# Where the imported lorakit lives (the installed wheel in CI, python/ in a dev tree).
PYTHON_DIR = Path(lorakit.__file__).resolve().parents[1]

SCRIPT = """
import os, sys
import torch
from lorakit.train.distributed import init_group, release_group

def thread_names():
    tasks = os.listdir("/proc/self/task")
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in tasks)

init_group("gloo", rank=0, world_size=1)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
model(torch.randn(2, 4)).sum().backward()
del model
during = thread_names()
release_group()
print(" ".join(during))
print(" ".join(thread_names()))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_release_group_leaves_no_gloo_thread_running() -> None:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PYTHON_DIR), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    during, after = done.stdout.splitlines()
    assert "gloo" in during  # the group really ran gloo threads
    assert "gloo" not in after, after
