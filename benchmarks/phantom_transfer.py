"""Label efficiency on phantoms: with 1 %, 5 %, 25 % and 100 % of the labels, how do random
initialisation, ID-only (MoCo-v2) and CAiD pre-training compare downstream?

On the embedded synthetic chest phantoms (which carry nodules and their masks), for each seed:

1. pre-train two ResNet-18 U-Nets with the same budget through ``caid_hf.training.pretrain``
   (configs/demo.yaml's settings, pinned in ``PRETRAINING``; ``--pretrain-steps``): **ID**
   (``context_prediction=False``) and **CAiD** (MoCo-v2 + context prediction); the backbone
   after the last step is used; a randomly initialised network (same seed) is the floor;
2. from each start, at each label fraction of a pool of ``--label-pool`` labelled phantoms
   (the same images for every start; seeded per fraction and seed):
   - **classification** ("nodule present"): fine-tune the encoder and a linear head,
     ``--finetune-steps`` steps of up to 16 images, AdamW 1e-3, validation every
     ``--eval-steps`` steps, the best validation AUC's weights scored on the test set (mean
     ROC-AUC; no early stopping: runs sit at chance for tens of steps first);
   - **segmentation** (nodule masks): fine-tune the whole U-Net the same way (up to 8 images
     per step), test Dice of the best validation Dice (pooled over the test pixels);
   - **linear probe**: logistic regression on the frozen encoder's every-stage average
     (``evaluate-features --embedding stages``) of the labelled images, with BatchNorm
     statistics re-estimated on the pool's images (an untrained network has none), scored by
     ROC-AUC on the test phantoms.

Downstream phantoms are drawn at 64 px, the pre-training view size (nodules 1.5-2 px in
radius). Downstream sets are the same for every seed; seeds change the pre-training, the
initialisation, the labelled subset and the fine-tuning order.

    python benchmarks/phantom_transfer.py              # default size: 3 seeds, about 40 min on 2 cores
    python benchmarks/phantom_transfer.py --quick      # smoke run, a few minutes
    python benchmarks/phantom_transfer.py --pretrain-steps 2000 --device cuda   # on a GPU

Prints a markdown table per task (mean ± std over seeds, one column per label fraction) and
writes OUT/results.json and OUT/label_efficiency.png (metric against label fraction, one line
per start, the seeds' spread shaded), both updated after every seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from caid_hf import CAiDConfig, CAiDModel  # noqa: E402
from caid_hf.console import quiet_loading  # noqa: E402
from caid_hf.finetuning.arguments import (  # noqa: E402
    FinetuneDataArguments,
    FinetuneModelArguments,
    FinetuningArguments,
)
from caid_hf.finetuning.data import PhantomLabelledSource  # noqa: E402
from caid_hf.finetuning.features import (  # noqa: E402
    extract_embeddings,
    probe_scores,
    recalibrate_batch_norm,
)
from caid_hf.finetuning.finetune import finetune  # noqa: E402
from caid_hf.training.arguments import parse_pretraining_args  # noqa: E402
from caid_hf.training.pretrain import pretrain  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
INITS = ("random", "ID", "CAiD")
NAMES = {"random": "random init", "ID": "ID only (MoCo-v2)", "CAiD": "CAiD"}
TASKS = ("classification", "segmentation", "linear_probe")
TASK_METRICS = {"classification": "test mean AUC, fine-tuned",
                "segmentation": "test Dice, fine-tuned U-Net",
                "linear_probe": "test AUC, frozen linear probe (all stages)"}
FRACTIONS = (0.01, 0.05, 0.25, 1.0)
DOWNSTREAM_SIZE = 64
LABEL_SEED = 2000  # downstream phantom seeds (pool, validation +1, test +2): far from pre-training's


# The pre-training settings, pinned here so that results do not move with configs/demo.yaml:
# the demo's ResNet-18 U-Net on 64 px views of 128 px phantoms, MoCo-v2 with a queue of 256.
PRETRAINING = ["--encoder_name", "resnet18", "--image_size", "64", "--queue_size", "256",
               "--projection_dim", "128", "--momentum", "0.99", "--shuffle_bn_splits", "2",
               "--train_source", "phantoms", "--num_train_phantoms", "1024",
               "--num_validation_phantoms", "128", "--phantom_size", "128",
               "--per_device_train_batch_size", "32", "--learning_rate", "0.03",
               "--warmup_steps", "10"]
# View augmentation: "demo" is configs/demo.yaml's (no brightness/contrast jitter or blur,
# crops of at least half the image: with the original's, MoCo-v2 collapses on phantoms);
# "original" is the original implementation's.
AUGMENTATION = {"demo": ["--crop_scale_min", "0.5", "--color_jitter_p", "0.0", "--blur_p", "0.0"],
                "original": ["--crop_scale_min", "0.2", "--color_jitter_p", "0.8",
                             "--blur_p", "0.5"]}


def pretrain_backbone(method: str, seed: int, steps: int, out: Path, workers: int,
                      augmentation: str = "demo", device: str | None = None) -> Path:
    """Pre-train ID or CAiD for ``steps`` steps (:data:`PRETRAINING` settings) through
    ``caid_hf.training.pretrain``; returns the final backbone folder."""
    model_args, data_args, args = parse_pretraining_args([
        *PRETRAINING, *AUGMENTATION[augmentation],
        "--context_prediction", str(method == "CAiD").lower(),
        "--max_steps", str(steps), "--seed", str(seed), "--output_dir", str(out),
        "--overwrite_output_dir", "true", "--report_to", "none",
        "--dataloader_num_workers", str(workers), "--logging_steps", str(max(steps, 1)),
        "--use_cpu", str(device == "cpu").lower(),
    ])
    pretrain(model_args, data_args, args)
    return out / "final"


def finetuned(task: str, init_from: str, fraction: float, seed: int, a: argparse.Namespace,
              out: Path) -> float:
    """Test metric (mean AUC or Dice) of the best-validation model fine-tuned from
    ``init_from`` on ``fraction`` of the labelled pool."""
    segmentation = task == "segmentation"
    result = finetune(
        FinetuneModelArguments(task=task, init_from=init_from, encoder_name="resnet18",
                               image_size=DOWNSTREAM_SIZE),
        FinetuneDataArguments(train_source="phantoms", num_train_phantoms=a.label_pool,
                              label_fraction=fraction,
                              num_validation_phantoms=a.validation_phantoms,
                              num_test_phantoms=a.test_phantoms, phantom_size=DOWNSTREAM_SIZE,
                              phantom_seed=LABEL_SEED),
        FinetuningArguments(output_dir=str(out), overwrite_output_dir=True,
                            max_steps=a.finetune_steps,
                            per_device_train_batch_size=8 if segmentation else 16,
                            learning_rate=1e-3, eval_steps=a.eval_steps, mixed_precision="no",
                            early_stopping_patience=0, bootstrap_resamples=0, seed=seed,
                            report_to="none", dataloader_num_workers=0,
                            logging_steps=a.finetune_steps,
                            use_cpu=a.device == "cpu"))
    shutil.rmtree(out, ignore_errors=True)  # only the numbers are kept
    return result.test_report["metrics"]["dice" if segmentation else "mean_auc"]


def labelled_subset(n: int, fraction: float, seed: int) -> np.ndarray:
    """The pool indices fine-tuning trains on at ``fraction`` (its own seeded draw, the same
    rule: ceil(n * fraction) images)."""
    keep = max(1, int(np.ceil(n * fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    return np.sort(np.asarray(order[:keep]))


def probe_aucs(backbone: CAiDModel, pool: PhantomLabelledSource, test: PhantomLabelledSource,
               seed: int, device: str) -> dict[float, float]:
    """Frozen linear-probe test AUC at every label fraction (every-stage embedding, BatchNorm
    statistics re-estimated on the pool's images; the probe fits the labelled subset)."""
    recalibrate_batch_norm(backbone, pool, DOWNSTREAM_SIZE, device=device)
    x, y = extract_embeddings(backbone, pool, DOWNSTREAM_SIZE, device=device,
                              embedding="stages")
    test_x, test_y = extract_embeddings(backbone, test, DOWNSTREAM_SIZE, device=device,
                                        embedding="stages")
    aucs = {}
    for fraction in FRACTIONS:
        rows = labelled_subset(len(x), fraction, seed)
        if len(np.unique(y[rows, 0])) < 2:  # too few labels for both classes: chance
            aucs[fraction] = 0.5
            continue
        aucs[fraction] = probe_scores(x[rows], y[rows], ["nodule"], test_x, test_y,
                                      folds=2, seed=seed)["linear_probe"]["mean_auc"]
    return aucs


def load_backbone(folder: str) -> CAiDModel:
    with quiet_loading():
        return CAiDModel.from_pretrained(folder)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def tables(per_seed: dict, a: argparse.Namespace) -> str:
    """One markdown table per task: rows are starts, columns label fractions."""
    parts = []
    for task in TASKS:
        counts = [max(1, int(np.ceil(a.label_pool * f))) for f in FRACTIONS]
        header = " | ".join(f"{f:.0%} ({n} labelled)" for f, n in zip(FRACTIONS, counts))
        lines = [f"**{TASK_METRICS[task]}**", "", f"| start | {header} |",
                 "|---|" + "---:|" * len(FRACTIONS)]
        for init in INITS:
            cells = [mean_std(per_seed[init][task][str(f)]) for f in FRACTIONS]
            lines.append(f"| {NAMES[init]} | {' | '.join(cells)} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def line_plot(per_seed: dict, path: Path, title: str) -> None:
    """Metric against label fraction (log axis), one line per start: the seeds' mean, their
    spread (± std) shaded, every seed a dot; one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(15, 4.6), dpi=120)
    colours = {"random": "#7f7f7f", "ID": "#1f77b4", "CAiD": "#d62728"}
    for ax, task in zip(axes, TASKS):
        for init in INITS:
            values = [per_seed[init][task][str(f)] for f in FRACTIONS]
            means = np.array([statistics.mean(v) for v in values])
            stds = np.array([statistics.stdev(v) if len(v) > 1 else 0.0 for v in values])
            ax.plot(FRACTIONS, means, marker="o", color=colours[init], label=NAMES[init])
            ax.fill_between(FRACTIONS, means - stds, means + stds, color=colours[init],
                            alpha=0.15)
            for f, v in zip(FRACTIONS, values):
                ax.scatter([f] * len(v), v, color=colours[init], s=8, alpha=0.6)
        ax.set_xscale("log")
        ax.set_xticks(FRACTIONS, [f"{f:.0%}" for f in FRACTIONS])
        ax.set_xlabel("share of the labelled pool used")
        ax.set_ylabel(TASK_METRICS[task])
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=9)  # Dice lines can sit near 0 at few labels
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="Number of seeds.")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="Seeds are first-seed .. first-seed + seeds - 1.")
    parser.add_argument("--augmentation", choices=sorted(AUGMENTATION), default="demo",
                        help="Pre-training view augmentation (see AUGMENTATION).")
    parser.add_argument("--pretrain-steps", type=int, default=96,
                        help="Pre-training steps of 32 images, the same for ID and CAiD.")
    parser.add_argument("--label-pool", type=int, default=1000,
                        help="Labelled phantoms; each label fraction takes a seeded share.")
    parser.add_argument("--validation-phantoms", type=int, default=100)
    parser.add_argument("--test-phantoms", type=int, default=200)
    parser.add_argument("--finetune-steps", type=int, default=300,
                        help="Fine-tuning steps at every fraction (no early stopping).")
    parser.add_argument("--eval-steps", type=int, default=50)
    parser.add_argument("--device", default=None,
                        help="'cpu' or 'cuda' (default: cuda where there is one).")
    parser.add_argument("--workers", type=int, default=1, help="Pre-training loader workers.")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "phantom_transfer"))
    parser.add_argument("--quick", action="store_true",
                        help="Smoke run: 1 seed, 8 pre-training steps, small sets.")
    a = parser.parse_args(argv)
    if a.quick:
        a.seeds, a.pretrain_steps, a.label_pool = 1, 8, 200
        a.validation_phantoms, a.test_phantoms, a.finetune_steps, a.eval_steps = 16, 32, 10, 5
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    pool = PhantomLabelledSource(a.label_pool, DOWNSTREAM_SIZE, LABEL_SEED)
    test = PhantomLabelledSource(a.test_phantoms, DOWNSTREAM_SIZE, LABEL_SEED + 2)
    per_seed = {init: {task: {str(f): [] for f in FRACTIONS} for task in TASKS}
                for init in INITS}
    for seed in range(a.first_seed, a.first_seed + a.seeds):
        inits = {"random": "random"}
        for method in ("ID", "CAiD"):
            t = time.perf_counter()
            inits[method] = str(pretrain_backbone(method, seed, a.pretrain_steps,
                                                  out / f"seed{seed}" / method, a.workers,
                                                  a.augmentation, device))
            print(f"[seed {seed}] pre-trained {method} in {time.perf_counter() - t:.0f} s")
        for init, init_from in inits.items():
            torch.manual_seed(seed)
            backbone = (CAiDModel(CAiDConfig(encoder_name="resnet18",
                                             image_size=DOWNSTREAM_SIZE), add_decoder=False)
                        if init == "random" else load_backbone(init_from))
            for fraction, auc in probe_aucs(backbone, pool, test, seed, device).items():
                per_seed[init]["linear_probe"][str(fraction)].append(auc)
            for task in ("classification", "segmentation"):
                for fraction in FRACTIONS:
                    value = finetuned(task, init_from, fraction, seed, a,
                                      out / f"seed{seed}" / f"{task}_{init}_{fraction}")
                    per_seed[init][task][str(fraction)].append(value)
            row = ", ".join(f"{task} " + "/".join(f"{per_seed[init][task][str(f)][-1]:.3f}"
                                                  for f in FRACTIONS) for task in TASKS)
            print(f"[seed {seed}] {init}: {row} "
                  f"({time.perf_counter() - started:.0f} s so far)")
        results = summarise(per_seed, a, time.perf_counter() - started, out)
    print()
    print(results["table"])
    print(f"\n{a.seeds} seed(s), {a.pretrain_steps} pre-training steps, "
          f"{a.finetune_steps} fine-tuning steps per run; wall time "
          f"{results['wall_time_s'] / 60:.1f} min; wrote {out / 'results.json'} and "
          f"{out / 'label_efficiency.png'}")
    return results


def summarise(per_seed: dict, a: argparse.Namespace, wall: float, out: Path) -> dict:
    """Write OUT/results.json and OUT/label_efficiency.png for the seeds done so far."""
    seeds = len(per_seed["random"]["classification"][str(FRACTIONS[0])])
    results = {"per_seed": per_seed, "seeds_done": seeds, "wall_time_s": round(wall, 1),
               "settings": {**vars(a), "fractions": FRACTIONS,
                            "downstream_size": DOWNSTREAM_SIZE},
               "table": tables(per_seed, a)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    line_plot(per_seed, out / "label_efficiency.png",
              f"Label efficiency on phantoms: mean ± std over {seeds} seed(s), "
              f"{a.pretrain_steps} pre-training steps of 32 images, {a.finetune_steps} "
              f"fine-tuning steps per run")
    return results


if __name__ == "__main__":
    main()
