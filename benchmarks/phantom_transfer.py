"""Phantom transfer: does CAiD pre-training help downstream, compared with ID-only and random?

On the embedded synthetic chest phantoms (which carry nodules and their masks), for each seed:

1. pre-train two ResNet-18 U-Nets with the same budget through ``caid_hf.training.pretrain``
   (configs/demo.yaml's settings, pinned in ``PRETRAINING``: 64 px views of 128 px phantoms,
   batch 32, MoCo-v2 with a queue of 256; ``--augmentation original`` for the original's view
   augmentation instead of the demo's): **ID** (instance discrimination only,
   ``context_prediction=False``) and **CAiD** (MoCo-v2 + context prediction); the backbone
   after the last step is used;
2. **linear probe** for "nodule present": logistic regression on frozen embeddings of 3,000
   held-out phantoms, scored by ROC-AUC on 1,000 others, on two embeddings: every encoder
   stage's spatial average side by side (``evaluate-features --embedding stages``; the
   headline) and the last stage's alone (``pooler_output``). A nodule is a few pixels wide;
   the last stage, trained to be invariant to the views, averages it away in every backbone
   measured with re-estimated BatchNorm statistics (AUC 0.55-0.65), while the lower stages
   keep it. Every backbone embeds with BatchNorm statistics re-estimated on the probe's
   training images (no labels; ``recalibrate_batch_norm``): a randomly initialised network
   has never seen an image, and in eval mode with its initial statistics it computes an
   unnormalised function, not the network a trained backbone is compared with. The AUCs
   with the saved statistics are reported too;
3. **few-label segmentation**: fine-tune the whole U-Net (``caid_hf.finetuning``) on 5 % of a
   pool of 1,024 labelled phantoms (52 images) to segment the nodules; Dice (pooled over the
   pixels of 200 held-out test phantoms) of the model with the best validation Dice over
   300 steps of 8 images (no early stopping: Dice stays at 0 for the first 25-100 steps or
   more, until the nodules are found, so stopping on a plateau would cut runs short at
   random, and 100 steps left random init at Dice 0.02);

with a randomly initialised network as the floor (same seeds). Downstream images are
phantoms drawn at 64 px, the pre-training view size (nodules are drawn at least 1.5 px in
radius, so they stay visible; a 128 px phantom shrunk to 64 px would blur them below a pixel).
Downstream phantom sets are the same for every seed; seeds change the pre-training, the
initialisation and the fine-tuning order.

    python benchmarks/phantom_transfer.py              # default size: under 30 min on 2 cores
    python benchmarks/phantom_transfer.py --quick      # smoke run, a few minutes

Prints a markdown table (mean ± std over seeds) and writes OUT/results.json and
OUT/phantom_transfer.png (bar chart with the seeds' spread), both updated after every seed so
that an interrupted run keeps the seeds it finished.
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
DOWNSTREAM_SIZE = 64
PROBE_SEED, SEGMENTATION_SEED = 2000, 3000  # phantom seeds far from pre-training's
# per seed and initialisation: linear-probe AUCs (all encoder stages / last stage only; with
# the probe images' BatchNorm statistics / the saved ones) and the few-label Dice
RESULT_KEYS = ("probe_auc", "probe_auc_last_stage", "probe_auc_saved_statistics",
               "probe_auc_last_stage_saved_statistics", "dice")


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
                      augmentation: str = "demo") -> Path:
    """Pre-train ID or CAiD for ``steps`` steps (:data:`PRETRAINING` settings) through
    ``caid_hf.training.pretrain``; returns the final backbone folder."""
    model_args, data_args, args = parse_pretraining_args([
        *PRETRAINING, *AUGMENTATION[augmentation],
        "--context_prediction", str(method == "CAiD").lower(),
        "--max_steps", str(steps), "--seed", str(seed), "--output_dir", str(out),
        "--overwrite_output_dir", "true", "--report_to", "none",
        "--dataloader_num_workers", str(workers), "--logging_steps", str(max(steps, 1)),
    ])
    pretrain(model_args, data_args, args)
    return out / "final"


def random_backbone(seed: int) -> CAiDModel:
    torch.manual_seed(seed)
    return CAiDModel(CAiDConfig(encoder_name="resnet18", image_size=DOWNSTREAM_SIZE),
                     add_decoder=False)


def probe_aucs(backbone: CAiDModel, probe_train: PhantomLabelledSource,
               probe_test: PhantomLabelledSource, seed: int, statistics: str
               ) -> dict[str, float]:
    """Linear-probe ROC-AUC for 'nodule present' on frozen embeddings, with the backbone's
    own BatchNorm statistics (``statistics="model"``) or with statistics re-estimated on the
    probe's training images (``"data"``; changes ``backbone``): ``{"stages": AUC on every
    encoder stage's average side by side, "last_stage": AUC on pooler_output}`` (one pass:
    pooler_output is the stage embedding's last columns)."""
    if statistics == "data":
        recalibrate_batch_norm(backbone, probe_train, DOWNSTREAM_SIZE)
    train_x, train_y = extract_embeddings(backbone, probe_train, DOWNSTREAM_SIZE,
                                          embedding="stages")
    test_x, test_y = extract_embeddings(backbone, probe_test, DOWNSTREAM_SIZE,
                                        embedding="stages")
    last = backbone.encoder.out_channels[-1]
    return {name: probe_scores(train_x[:, columns], train_y, ["nodule"], test_x[:, columns],
                               test_y, seed=seed)["linear_probe"]["mean_auc"]
            for name, columns in (("stages", slice(None)), ("last_stage", slice(-last, None)))}


def segmentation_dice(init_from: str, seed: int, a: argparse.Namespace, out: Path) -> float:
    """Few-label nodule segmentation: test Dice of the model with the best validation Dice."""
    result = finetune(
        FinetuneModelArguments(task="segmentation", init_from=init_from,
                               encoder_name="resnet18", image_size=DOWNSTREAM_SIZE),
        FinetuneDataArguments(train_source="phantoms", num_train_phantoms=a.label_pool,
                              label_fraction=a.label_fraction,
                              num_validation_phantoms=a.validation_phantoms,
                              num_test_phantoms=a.test_phantoms, phantom_size=DOWNSTREAM_SIZE,
                              phantom_seed=SEGMENTATION_SEED),
        FinetuningArguments(output_dir=str(out), overwrite_output_dir=True,
                            max_steps=a.finetune_steps, per_device_train_batch_size=8,
                            learning_rate=1e-3, eval_steps=a.eval_steps, mixed_precision="no",
                            early_stopping_patience=0, bootstrap_resamples=0, seed=seed,
                            report_to="none", dataloader_num_workers=0,
                            logging_steps=a.finetune_steps))
    return result.test_report["metrics"]["dice"]


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def bar_chart(results: dict, path: Path, title: str) -> None:
    """Three panels (the two linear probes, few-label Dice): mean bars, std error bars, seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.8), dpi=120)
    colours = {"random": "#9e9e9e", "ID": "#1f77b4", "CAiD": "#d62728"}
    panels = (("probe_auc", "linear-probe ROC-AUC, 'nodule present'\n(frozen, all encoder "
                            "stages)", 0.5),
              ("probe_auc_last_stage", "linear-probe ROC-AUC, 'nodule present'\n(frozen, "
                                       "last stage only: pooler_output)", 0.5),
              ("dice", f"few-label segmentation Dice\n(nodule masks, "
                       f"{results['settings']['labelled_images']} labelled images)", None))
    for ax, (key, label, chance) in zip(axes, panels):
        for k, init in enumerate(INITS):
            values = results["per_seed"][init][key]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            mean = statistics.mean(values)
            ax.bar(k, mean, yerr=std, capsize=6, color=colours[init], alpha=0.85)
            ax.scatter([k] * len(values), values, color="black", s=14, zorder=3,
                       label="one seed" if k == 0 else None)
            ax.annotate(f"{mean:.3f}", (k, mean + std), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=10)
        if chance is not None:
            ax.axhline(chance, color="black", linestyle="--", linewidth=1, label="chance")
        # above the bars and their labels (up to about 0.9), so it never hides a mean
        ax.legend(loc="upper center", ncol=2, fontsize=9)
        ax.set_xticks(range(len(INITS)), ["random init", "ID (MoCo-v2)", "CAiD"])
        ax.set_ylabel(label, fontsize=10)
        ax.set_ylim(0, 1.15)
        ax.set_yticks(np.linspace(0, 1, 6))
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
    parser.add_argument("--probe-phantoms", type=int, default=3000,
                        help="Phantoms the probe learns from (400 was too few for a 512-d "
                             "embedding and a few-pixel nodule: every probe sat at chance).")
    parser.add_argument("--probe-test-phantoms", type=int, default=1000,
                        help="Phantoms the probe is scored on.")
    parser.add_argument("--label-pool", type=int, default=1024,
                        help="Labelled pool for segmentation; --label-fraction of it is used.")
    parser.add_argument("--label-fraction", type=float, default=0.05)
    parser.add_argument("--validation-phantoms", type=int, default=64)
    parser.add_argument("--test-phantoms", type=int, default=200)
    parser.add_argument("--finetune-steps", type=int, default=300,
                        help="Fine-tuning steps of 8 images (no early stopping).")
    parser.add_argument("--eval-steps", type=int, default=25)
    parser.add_argument("--workers", type=int, default=1, help="Pre-training loader workers.")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "phantom_transfer"))
    parser.add_argument("--quick", action="store_true",
                        help="Smoke run: 1 seed, 8 pre-training steps, small sets.")
    a = parser.parse_args(argv)
    if a.quick:
        a.seeds, a.pretrain_steps, a.probe_phantoms, a.probe_test_phantoms = 1, 8, 64, 64
        a.validation_phantoms, a.test_phantoms, a.finetune_steps, a.eval_steps = 16, 32, 10, 5
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    probe_train = PhantomLabelledSource(a.probe_phantoms, DOWNSTREAM_SIZE, PROBE_SEED)
    probe_test = PhantomLabelledSource(a.probe_test_phantoms, DOWNSTREAM_SIZE, PROBE_SEED + 1)
    per_seed = {init: {key: [] for key in RESULT_KEYS} for init in INITS}
    for seed in range(a.first_seed, a.first_seed + a.seeds):
        inits = {"random": "random"}
        for method in ("ID", "CAiD"):
            t = time.perf_counter()
            inits[method] = str(pretrain_backbone(method, seed, a.pretrain_steps,
                                                  out / f"seed{seed}" / method, a.workers,
                                                  a.augmentation))
            print(f"[seed {seed}] pre-trained {method} in {time.perf_counter() - t:.0f} s")
        for init, init_from in inits.items():
            backbone = random_backbone(seed) if init == "random" \
                else CAiDModel.from_pretrained(init_from)
            saved = probe_aucs(backbone, probe_train, probe_test, seed, "model")
            auc = probe_aucs(backbone, probe_train, probe_test, seed, "data")
            seg_dir = out / f"seed{seed}" / f"segmentation_{init}"
            dice = segmentation_dice(init_from, seed, a, seg_dir)
            shutil.rmtree(seg_dir, ignore_errors=True)  # weights not needed, only numbers
            row = {"probe_auc": auc["stages"], "probe_auc_last_stage": auc["last_stage"],
                   "probe_auc_saved_statistics": saved["stages"],
                   "probe_auc_last_stage_saved_statistics": saved["last_stage"], "dice": dice}
            for key, value in row.items():
                per_seed[init][key].append(value)
            print(f"[seed {seed}] {init}: probe AUC all stages {auc['stages']:.3f}, last "
                  f"stage {auc['last_stage']:.3f} (saved BN statistics: {saved['stages']:.3f}, "
                  f"{saved['last_stage']:.3f}), Dice {dice:.3f} "
                  f"({time.perf_counter() - started:.0f} s so far)")

        # the table so far, so that an interrupted run still leaves its numbers
        results = summarise(per_seed, a, time.perf_counter() - started, out)
    print()
    print(results["table"])
    print(f"\n{a.seeds} seed(s), {a.pretrain_steps} pre-training steps; wall time "
          f"{results['wall_time_s'] / 60:.1f} min; wrote {out / 'results.json'} and "
          f"{out / 'phantom_transfer.png'}")
    return results


def summarise(per_seed: dict, a: argparse.Namespace, wall: float, out: Path) -> dict:
    """Write OUT/results.json and OUT/phantom_transfer.png for the seeds done so far; returns
    the results with their markdown table."""
    seeds = len(per_seed["random"]["dice"])
    labelled = max(1, int(np.ceil(a.label_pool * a.label_fraction)))
    results = {"per_seed": per_seed, "seeds_done": seeds, "wall_time_s": round(wall, 1),
               "settings": {**vars(a), "labelled_images": labelled,
                            "downstream_size": DOWNSTREAM_SIZE}}
    table = [f"| initialisation | linear-probe AUC, nodule present, all encoder stages "
             f"({a.probe_phantoms} + {a.probe_test_phantoms} phantoms; BatchNorm statistics "
             f"of the probe images) | the same, last stage only (pooler_output) | all stages "
             f"with the saved BatchNorm statistics (random: its initial ones) | few-label Dice "
             f"({labelled} labelled, {a.test_phantoms} test phantoms) |",
             "|---|---:|---:|---:|---:|"]
    names = {"random": "random init (floor)", "ID": "ID only (MoCo-v2)",
             "CAiD": "CAiD (MoCo-v2 + context prediction)"}
    for init in INITS:
        cells = [mean_std(per_seed[init][key]) for key in
                 ("probe_auc", "probe_auc_last_stage", "probe_auc_saved_statistics", "dice")]
        table.append(f"| {names[init]} | {' | '.join(cells)} |")
    results["table"] = "\n".join(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    bar_chart(results, out / "phantom_transfer.png",
              f"Phantom transfer: mean ± std over {seeds} seed(s), "
              f"{a.pretrain_steps} pre-training steps of 32 images; probes embed with the "
              f"BatchNorm statistics of the probe images")
    return results

if __name__ == "__main__":
    main()
