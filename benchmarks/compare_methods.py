"""Every fine-tuning method on one small model and task: `lorakit compare` with a report header.

Prints the machine, versions and commit, then the table; the options are `lorakit compare`'s.
"""

import argparse
import os
import subprocess

import torch

import lorakit
from lorakit.config_args import add_arguments, build
from lorakit.recipes import compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, compare.CompareConfig, set())
    config = build(compare.CompareConfig, parser.parse_args(), set(), {})
    load = os.getloadavg()[0]
    result = compare.run(config)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    device = result.rows[0]["device"]
    where = (
        torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"CPU, {config.threads} thread(s)"
    )
    version = lorakit.build_info().version
    print(
        f"## lorakit compare, {where}: torch {torch.__version__}, lorakit {version}, "
        f"commit {commit.stdout.strip() or 'unknown'}, load average at start {load:.2f}\n"
    )
    print(compare.format_table(result.rows))


if __name__ == "__main__":
    main()
