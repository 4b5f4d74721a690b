"""How long a user waits before anything happens: ``import caid_hf`` against ``import torch``,
and a mistyped flag (``caid-hf pretrain --learnig_rate 1``) until its message.

Each command runs ``--repeats`` times in a fresh interpreter, the commands taking turns; the
medians and the difference to ``import torch`` are printed with the CPU they ran on.

    python benchmarks/startup_time.py              # 5 rounds
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [str(Path(sys.executable).parent / "caid-hf")]  # the console script a user runs
COMMANDS = {
    "python -c 'import torch'": ([sys.executable, "-c", "import torch"], 0),
    "python -c 'import caid_hf'": ([sys.executable, "-c", "import caid_hf"], 0),
    "python -c 'import caid_hf; from transformers import AutoModel'": (
        [sys.executable, "-c", "import caid_hf; from transformers import AutoModel"], 0),
    "caid-hf pretrain --learnig_rate 1": ([*CLI, "pretrain", "--learnig_rate", "1"], 2),
    "caid-hf pretrain --image_size 100 --queue_size 0 --learnig_rate 1": (
        [*CLI, "pretrain", "--image_size", "100", "--queue_size", "0", "--learnig_rate", "1"], 2),
}


def timed(command: list[str], expected: int) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != expected:
        raise SystemExit(f"{command} exited {done.returncode}, expected {expected}:\n"
                         f"{done.stderr[-2000:]}")
    return seconds


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    a = parser.parse_args(argv)
    from caid_hf.performance import describe_cpu

    print(f"CPU: {describe_cpu()}", flush=True)
    for command, expected in COMMANDS.values():  # warm the file cache once
        timed(command, expected)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(a.repeats):
        for name, (command, expected) in COMMANDS.items():
            times[name].append(timed(command, expected))
    medians = {name: statistics.median(values) for name, values in times.items()}
    torch_s = medians["python -c 'import torch'"]
    print(f"\nmedians of {a.repeats} (each command in a fresh interpreter):")
    for name, seconds in medians.items():
        spread = f"{min(times[name]):.2f}-{max(times[name]):.2f}"
        print(f"  {seconds:6.2f} s  ({spread}; {seconds - torch_s:+.2f} s against torch)  {name}")
    return medians


if __name__ == "__main__":
    main()
