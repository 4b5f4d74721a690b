"""Label efficiency on phantoms: with 1 %, 5 %, 25 % and 100 % of the labels, how do random
initialisation, ID-only (MoCo-v2) and CAiD pre-training compare downstream?

On the embedded synthetic chest phantoms (which carry nodules and their masks), for each seed:

1. pre-train two ResNet-18 U-Nets with the same budget through ``caid_hf.training.pretrain``
   (configs/demo.yaml's settings, pinned in ``PRETRAINING``; ``--pretrain-steps``): **ID**
   (``context_prediction=False``) and **CAiD** (MoCo-v2 + context prediction); the backbone
   after the last step is used; a randomly initialised network (same seed) is the floor;
2. evaluate the three starts as ``caid-hf evaluate-transfer`` does
   (:mod:`caid_hf.finetuning.transfer`) at each label fraction of a pool of ``--label-pool``
   labelled phantoms (the same images for every start; seeded per fraction and seed):
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
writes OUT/results.json, OUT/results.md and OUT/label_efficiency.png (metric against label
fraction, one line per start, the seeds' spread shaded), updated after every run.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from caid_hf.finetuning.arguments import (  # noqa: E402
    FinetuneDataArguments,
    FinetuningArguments,
)
from caid_hf.finetuning.transfer import TransferArguments, TransferEvaluation  # noqa: E402
from caid_hf.training.arguments import parse_pretraining_args  # noqa: E402
from caid_hf.training.pretrain import pretrain  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAMES = {"random": "random init", "ID": "ID only (MoCo-v2)", "CAiD": "CAiD"}
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

    evaluation = TransferEvaluation(
        TransferArguments(backbones=list(NAMES.values()), label_fractions=list(FRACTIONS),
                          seeds=a.seeds, modes=["probe", "finetune", "segment"],
                          segmentation_batch_size=8),
        FinetuneDataArguments(train_source="phantoms", num_train_phantoms=a.label_pool,
                              num_validation_phantoms=a.validation_phantoms,
                              num_test_phantoms=a.test_phantoms, phantom_size=DOWNSTREAM_SIZE,
                              phantom_seed=LABEL_SEED),
        FinetuningArguments(output_dir=str(out), overwrite_output_dir=True,
                            max_steps=a.finetune_steps, per_device_train_batch_size=16,
                            learning_rate=1e-3, eval_steps=a.eval_steps, mixed_precision="no",
                            early_stopping_patience=0, bootstrap_resamples=0,
                            seed=a.first_seed, report_to="none", dataloader_num_workers=0,
                            logging_steps=a.finetune_steps, use_cpu=device == "cpu"),
        encoder_name="resnet18", image_size=DOWNSTREAM_SIZE)
    evaluation.plot_title = (f"Label efficiency on phantoms: {a.pretrain_steps} pre-training "
                             f"steps of 32 images, {a.finetune_steps} fine-tuning steps per run")
    for seed in range(a.first_seed, a.first_seed + a.seeds):
        starts = {NAMES["random"]: "random"}
        for method in ("ID", "CAiD"):
            t = time.perf_counter()
            starts[NAMES[method]] = str(pretrain_backbone(method, seed, a.pretrain_steps,
                                                          out / f"seed{seed}" / method,
                                                          a.workers, a.augmentation, device))
            print(f"[seed {seed}] pre-trained {method} in {time.perf_counter() - t:.0f} s")
        evaluation.run_seed(seed, starts)
    results = evaluation.write()
    print()
    print(evaluation.markdown(results))
    print(f"\n{a.seeds} seed(s), {a.pretrain_steps} pre-training steps, "
          f"{a.finetune_steps} fine-tuning steps per run; wall time "
          f"{results['wall_time_s'] / 60:.1f} min; wrote {out / 'results.json'}, "
          f"{out / 'results.md'} and {out / 'label_efficiency.png'}")
    return results


if __name__ == "__main__":
    main()
