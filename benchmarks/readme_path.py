"""The README's path, measured: the demo's backbone, then the fine-tuning command, against the
same fine-tuning command from random initialisation.

For each demo seed, ``caid-hf pretrain --config configs/demo.yaml --seed S``; then for each
fine-tuning seed K, ``caid-hf finetune --config configs/finetune_phantoms_classification.yaml
--seed K`` twice: ``--init_from OUT/demo_S/best`` and ``--init_from random`` (the random
runs do not depend on the demo seed, so they are run once per K). A pair is (demo seed,
fine-tuning seed); the pre-trained start is ahead in a pair when its test mean AUC is
higher than the random start's at the same K.

    python benchmarks/readme_path.py                       # 2 demo seeds x 5 fine-tuning seeds
    python benchmarks/readme_path.py --quick               # smoke run: 1 x 2, few steps

Prints each run's test mean AUC, the pairs ahead, and the mean ± std of each start; writes
OUT/readme_path.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
FINETUNE = ROOT / "configs" / "finetune_phantoms_classification.yaml"


def caid_hf(*args: str) -> None:
    """Run ``caid-hf ARGS`` in a child process (as the README does), failing loudly."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "caid_hf.cli", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def test_mean_auc(folder: Path) -> float:
    return float(json.loads((folder / "test_results.json").read_text())["metrics"]["mean_auc"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-seeds", type=int, nargs="+", default=[42, 43])
    parser.add_argument("--finetune-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default=str(ROOT / "outputs" / "readme_path"))
    parser.add_argument("--quick", action="store_true",
                        help="Smoke run: one demo seed of 4 steps, two fine-tuning seeds of "
                             "4 steps.")
    a = parser.parse_args(argv)
    out = Path(a.out)
    demo_extra, finetune_extra = [], []
    if a.quick:
        a.demo_seeds, a.finetune_seeds = a.demo_seeds[:1], a.finetune_seeds[:2]
        demo_extra = ["--max_steps", "4", "--probe_steps", "0", "--num_train_phantoms", "256"]
        finetune_extra = ["--max_steps", "4", "--eval_steps", "2", "--num_train_phantoms",
                          "64", "--num_validation_phantoms", "32", "--num_test_phantoms", "64"]
    started = time.perf_counter()
    results: dict = {"random": {}, "pretrained": {}}
    for k in a.finetune_seeds:
        run = out / f"random_seed{k}"
        caid_hf("finetune", "--config", str(FINETUNE), "--init_from", "random", "--seed",
                str(k), "--output_dir", str(run), "--overwrite_output_dir", "true",
                *finetune_extra)
        results["random"][str(k)] = test_mean_auc(run)
        print(f"random init, fine-tuning seed {k}: test mean AUC "
              f"{results['random'][str(k)]:.4f}", flush=True)
    demo_wall_s = {}
    for s in a.demo_seeds:
        demo = out / f"demo_seed{s}"
        t = time.perf_counter()
        caid_hf("pretrain", "--config", str(DEMO), "--seed", str(s), "--output_dir", str(demo),
                "--overwrite_output_dir", "true", *demo_extra)
        demo_wall_s[str(s)] = round(time.perf_counter() - t, 1)
        print(f"demo seed {s}: {demo_wall_s[str(s)] / 60:.1f} min from the command to its end",
              flush=True)
        for k in a.finetune_seeds:
            run = out / f"demo{s}_seed{k}"
            caid_hf("finetune", "--config", str(FINETUNE), "--init_from", str(demo / "best"),
                    "--seed", str(k), "--output_dir", str(run), "--overwrite_output_dir",
                    "true", *finetune_extra)
            results["pretrained"][f"{s}/{k}"] = test_mean_auc(run)
            print(f"demo seed {s}, fine-tuning seed {k}: test mean AUC "
                  f"{results['pretrained'][f'{s}/{k}']:.4f} (random: "
                  f"{results['random'][str(k)]:.4f})", flush=True)
    pairs = [(v, results["random"][key.split("/")[1]]) for key, v in results["pretrained"].items()]
    ahead = sum(p > r for p, r in pairs)
    summary = {"pairs": len(pairs), "ahead": ahead,
               "pretrained_mean": statistics.mean(p for p, _ in pairs),
               "pretrained_std": statistics.stdev(p for p, _ in pairs) if len(pairs) > 1 else 0.0,
               "random_mean": statistics.mean(results["random"].values()),
               "random_std": (statistics.stdev(results["random"].values())
                              if len(results["random"]) > 1 else 0.0),
               "demo_wall_s": demo_wall_s,
               "wall_time_s": round(time.perf_counter() - started, 1)}
    record = {"runs": results, "summary": summary, "demo_config": DEMO.read_text(),
              "finetune_config": FINETUNE.read_text()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "readme_path.json").write_text(json.dumps(record, indent=2))
    print(f"pre-trained ahead in {ahead} of {len(pairs)} pairs; test mean AUC pre-trained "
          f"{summary['pretrained_mean']:.4f} ± {summary['pretrained_std']:.4f}, random "
          f"{summary['random_mean']:.4f} ± {summary['random_std']:.4f}; "
          f"{summary['wall_time_s'] / 60:.1f} min; {out / 'readme_path.json'}")
    return record


if __name__ == "__main__":
    main()
