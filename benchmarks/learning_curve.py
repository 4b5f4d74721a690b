"""Learning curve: does pre-training teach the encoder the findings, and after how many steps?

ID (MoCo-v2 alone) and CAiD (MoCo-v2 + context prediction) pre-train a ResNet-18 U-Net on an
unlabelled pool of ChestX-ray14-like phantoms (``phantoms:cxr14``, docs/phantoms.md); every
``--probe-every`` steps the online probe scores the frozen encoder: a logistic regression on
the every-stage average features of 512 labelled phantoms, scored by ROC-AUC on 512 others,
for each of the eight findings. The curve is the mean AUC (and the mean of each scale group:
global, regional, local) against pre-training steps; step 0 is the randomly initialised
encoder. The label-efficiency benchmark's pre-training budget is read off this curve: where
it flattens, or the time cap. On a 2-core CPU the default (600 steps, 19,200 views per
method, about 36 minutes each with its probes on an AVX2 CPU) already reaches past that
cap: a 90-minute benchmark of three seeds leaves each pre-training about 5 minutes.

The settings below are fixed before any comparison of the two methods is made on this data:
the paper's augmentation (crops of 20-100 % of the film, brightness/contrast jitter with
p = 0.8, blur with p = 0.5, flips), a queue of 4,096 keys, SGD with lr 0.03 and a cosine
schedule over the run, 64 px views of 128 px phantoms, batch 32. The probe's phantoms
(seed 1000 and 1002) are neither in the pre-training pool (seed of the run) nor in the
benchmark's labelled sets. Every probe, step 0's included, embeds with BatchNorm statistics
re-estimated on the probe's 512 fitting images (``--probe_batch_norm_statistics data``), as
``caid-hf evaluate-transfer``'s probe does: a random encoder has no statistics of its own,
and embedded without any its features score 0.80 mean AUC here against 0.69 with them, a
floor no trained encoder is measured against.

    python benchmarks/learning_curve.py                  # default: 600 steps per method
    python benchmarks/learning_curve.py --quick          # smoke run, a few minutes
    python benchmarks/learning_curve.py --device cuda --steps 20000 --probe-every 1000

Writes OUT/curve.json (every probe of every run) and OUT/learning_curve.png, and prints a
markdown table of mean AUC against steps, with the CPU the run used.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from caid_hf import CAiDConfig, CAiDModel  # noqa: E402
from caid_hf.data.chest_phantoms import FINDINGS, SCALE_GROUPS  # noqa: E402
from caid_hf.performance import describe_cpu  # noqa: E402
from caid_hf.training.arguments import parse_pretraining_args  # noqa: E402
from caid_hf.training.online_probe import OnlineProbe  # noqa: E402
from caid_hf.training.pretrain import pretrain  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("ID", "CAiD")
SOURCE = "phantoms:cxr14"
VIEW_SIZE = 64
PROBE_IMAGES = 512

# Pinned here so the curve does not move with configs/demo.yaml.
PRETRAINING = ["--encoder_name", "resnet18", "--image_size", str(VIEW_SIZE),
               "--queue_size", "4096", "--projection_dim", "128", "--momentum", "0.99",
               "--shuffle_bn_splits", "2", "--train_source", SOURCE,
               "--num_validation_phantoms", "256", "--phantom_size", "128",
               "--per_device_train_batch_size", "32", "--learning_rate", "0.03",
               "--warmup_steps", "20", "--crop_scale_min", "0.2", "--color_jitter_p", "0.8",
               "--blur_p", "0.5", "--probe_source", SOURCE,
               "--probe_num_images", str(PROBE_IMAGES), "--probe_embedding", "stages",
               "--probe_batch_norm_statistics", "data"]


def group_means(aucs: dict[str, float]) -> dict[str, float]:
    """Mean AUC of each scale group (NaN findings left out) and of all findings."""
    def mean(names):
        values = [aucs[n] for n in names if not np.isnan(aucs[n])]
        return float(np.mean(values)) if values else float("nan")

    return {"all": mean(FINDINGS), **{g: mean(names) for g, names in SCALE_GROUPS.items()}}


def probe_points(history: list[dict]) -> list[dict]:
    """The run's probes: step, per-finding AUCs and group means."""
    points = []
    for record in history:
        if "probe/linear_probe_auc" not in record:
            continue
        aucs = {n: float(record.get(f"probe/linear_probe_auc/{n}", float("nan")))
                for n in FINDINGS}
        points.append({"step": record["step"], "aucs": aucs, **group_means(aucs)})
    return points


def random_init_point(seed: int) -> dict:
    """Step 0: the probe on a randomly initialised encoder (the runs' shared floor)."""
    torch.manual_seed(seed)
    backbone = CAiDModel(CAiDConfig(encoder_name="resnet18", image_size=VIEW_SIZE))
    result = OnlineProbe(SOURCE, VIEW_SIZE, PROBE_IMAGES, VIEW_SIZE, seed=seed,
                         batch_norm_statistics="data")(backbone)
    return {"step": 0, "aucs": result.label_aucs, **group_means(result.label_aucs)}


def run(method: str, a: argparse.Namespace, out: Path) -> list[dict]:
    model_args, data_args, args = parse_pretraining_args([
        *PRETRAINING, "--context_prediction", str(method == "CAiD").lower(),
        "--num_train_phantoms", str(a.pool), "--max_steps", str(a.steps),
        "--probe_steps", str(a.probe_every), "--seed", str(a.seed),
        "--output_dir", str(out / method), "--overwrite_output_dir", "true",
        "--report_to", "none", "--dataloader_num_workers", str(a.workers),
        "--logging_steps", str(a.probe_every), "--use_cpu", str(a.device == "cpu").lower(),
    ])
    return probe_points(pretrain(model_args, data_args, args).history)


def table(curves: dict[str, list[dict]]) -> str:
    steps = sorted({p["step"] for points in curves.values() for p in points})
    lines = ["| steps | " + " | ".join(f"{m} all / global / regional / local" for m in curves)
             + " |", "|---:|" + "---:|" * len(curves)]
    for step in steps:
        cells = []
        for points in curves.values():
            p = next((p for p in points if p["step"] == step), None)
            cells.append("" if p is None else " / ".join(
                f"{p[g]:.3f}" for g in ("all", "global", "regional", "local")))
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ("all", "global", "regional", "local")
    fig, axes = plt.subplots(1, len(groups), figsize=(16, 4.2), dpi=110, sharex=True)
    for ax, group in zip(axes, groups):
        for method, points in curves.items():
            ax.plot([p["step"] for p in points], [p[group] for p in points], marker="o",
                    markersize=3, label=method)
        ax.set_title("mean AUC, all eight findings" if group == "all"
                     else f"{group} findings ({', '.join(SCALE_GROUPS[group])})", fontsize=9)
        ax.set_xlabel("pre-training steps (batch 32)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("linear-probe AUC (frozen encoder)")
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="Pre-training steps per method.")
    parser.add_argument("--probe-every", type=int, default=100)
    parser.add_argument("--pool", type=int, default=20000, help="Unlabelled phantoms.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if any).")
    parser.add_argument("--workers", type=int, default=1, help="Pre-training loader workers.")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "learning_curve"))
    parser.add_argument("--quick", action="store_true", help="40 steps, probe every 20.")
    a = parser.parse_args(argv)
    if a.quick:
        a.steps, a.probe_every, a.pool = 40, 20, 2000
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = describe_cpu()
    print(f"CPU: {cpu}", flush=True)
    start = time.time()
    floor = random_init_point(a.seed)
    curves, seconds = {}, {}
    for method in a.methods:
        began = time.time()
        curves[method] = [floor, *run(method, a, out)]
        seconds[method] = round(time.time() - began, 1)
        summary = {"settings": {**vars(a), "pretraining": PRETRAINING}, "cpu": cpu,
                   "seconds": seconds, "curves": curves}
        (out / "curve.json").write_text(json.dumps(summary, indent=1))
        plot(curves, out / "learning_curve.png",
             f"Online linear probe on ChestX-ray14-like phantoms while pre-training "
             f"(ResNet-18 U-Net, {VIEW_SIZE} px views, pool {a.pool}, seed {a.seed})")
        print(table(curves), flush=True)
    print(f"wall time {(time.time() - start) / 60:.1f} min; {out / 'curve.json'}")
    return summary


if __name__ == "__main__":
    main()
