"""Label efficiency on phantoms: with 1 %, 5 %, 25 % and 100 % of the labels, how do random
initialisation, ID-only (MoCo-v2), CAiD and a supervised start compare downstream?

Default: the ChestX-ray14-like phantoms (``--phantoms cxr14``, docs/phantoms.md: eight
findings at three scales, masks of the localised ones). For each seed:

1. pre-train two ResNet-18 U-Nets with the same budget through ``caid_hf.training.pretrain``
   on an unlabelled pool of ``--unlabelled-pool`` phantoms (the learning curve's settings,
   :data:`CXR14_PRETRAINING`; ``--pretrain-steps``, read off
   ``benchmarks/learning_curve.py``): **ID** (``context_prediction=False``) and **CAiD**
   (MoCo-v2 + context prediction); the backbone after the last step is used;
2. a **supervised** start, the upper bound, trained once for all seeds (at the first seed):
   a classifier fine-tuned from random initialisation on all eight labels of a separate
   pool of ``--label-pool`` phantoms (its own seeds, never the evaluation's images), its
   encoder taken as a backbone. Its spread over seeds is the downstream runs' alone;
3. a randomly initialised network (same seed) is the floor;
4. evaluate the four starts as ``caid-hf evaluate-transfer`` does
   (:mod:`caid_hf.finetuning.transfer`) at each label fraction of a labelled pool of
   ``--label-pool`` phantoms (the same images for every start; drawn per fraction and seed):
   - **probe**: a logistic regression per finding on the frozen encoder's every-stage
     average, BatchNorm statistics re-estimated on the pool's images, ROC-AUC on the test
     phantoms; each encoder stage is also probed alone (where the reusable low- and
     mid-level features are);
   - **finetune**: the encoder and a linear head fine-tuned (``--finetune-steps`` steps of
     up to 16 images, AdamW 1e-3, validation every ``--eval-steps`` steps, the best
     validation AUC's weights scored on the test set);
   - **segment**: the whole U-Net fine-tuned (``--segmentation-steps`` steps of 8 images)
     on the union of the localised findings' masks (effusion, consolidation, pneumothorax,
     atelectasis, nodule, mass), test Dice.
   Mean AUC over the eight findings and per scale group (global, regional, local).

Downstream phantoms are drawn at 64 px, the pre-training view size. The labelled pool,
validation and test phantoms are the same for every seed; seeds change the pre-training, the
supervised pool's fine-tuning, the initialisation, the labelled subset and the fine-tuning
order. Data, metrics and sizes were fixed before any CAiD-vs-ID comparison on this data.

    python benchmarks/phantom_transfer.py              # default: 3 seeds, under 90 min on 2 cores
    python benchmarks/phantom_transfer.py --quick      # smoke run, a few minutes
    python benchmarks/phantom_transfer.py --device cuda --pretrain-steps 20000   # on a GPU
    python benchmarks/phantom_transfer.py --phantoms v1   # the first phantoms' benchmark
    python benchmarks/phantom_transfer.py --resume     # a stopped run: its missing seeds

``--phantoms v1`` reproduces the earlier figures (nodule present, 96 pre-training steps,
1,000 labelled phantoms; no supervised start).

Prints a markdown table per mode (mean ± std over seeds, one column per label fraction) and
writes OUT/results.json, OUT/results.md and OUT/label_efficiency.png (metric against label
fraction, one line per start, the seeds' spread shaded), updated after every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from caid_hf.console import quiet_loading  # noqa: E402
from caid_hf.data.chest_phantoms import SCALE_GROUPS  # noqa: E402
from caid_hf.finetuning.arguments import (  # noqa: E402
    FinetuneDataArguments,
    FinetuneModelArguments,
    FinetuningArguments,
)
from caid_hf.finetuning.finetune import finetune  # noqa: E402
from caid_hf.finetuning.transfer import TransferArguments, TransferEvaluation  # noqa: E402
from caid_hf.modeling_caid import CAiDForImageClassification  # noqa: E402
from caid_hf.training.arguments import parse_pretraining_args  # noqa: E402
from caid_hf.training.pretrain import pretrain  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAMES = {"random": "random init", "ID": "ID only (MoCo-v2)", "CAiD": "CAiD",
         "supervised": "supervised (other pool)"}
FRACTIONS = (0.01, 0.05, 0.25, 1.0)
DOWNSTREAM_SIZE = 64
LABEL_SEED = 2000  # downstream phantom seeds (pool, validation +1, test +2): far from pre-training's
SUPERVISED_SEED = 3000  # the supervised start's own labelled pool (+1: its validation set)

# The first phantoms' pre-training, pinned so that published figures reproduce: the demo's
# ResNet-18 U-Net on 64 px views of 128 px phantoms, MoCo-v2 with a queue of 256, crops of at
# least half the image and no brightness/contrast jitter or blur (with the original's
# augmentation MoCo-v2 collapsed on those phantoms).
V1_PRETRAINING = ["--encoder_name", "resnet18", "--image_size", "64", "--queue_size", "256",
                  "--projection_dim", "128", "--momentum", "0.99", "--shuffle_bn_splits", "2",
                  "--train_source", "phantoms", "--num_validation_phantoms", "128",
                  "--phantom_size", "128", "--per_device_train_batch_size", "32",
                  "--learning_rate", "0.03", "--warmup_steps", "10", "--crop_scale_min", "0.5",
                  "--color_jitter_p", "0.0", "--blur_p", "0.0"]
# The ChestX-ray14-like phantoms' pre-training: benchmarks/learning_curve.py's settings (the
# paper's augmentation, a queue of 4,096, 64 px views of 128 px phantoms, batch 32).
CXR14_PRETRAINING = ["--encoder_name", "resnet18", "--image_size", "64", "--queue_size", "4096",
                     "--projection_dim", "128", "--momentum", "0.99", "--shuffle_bn_splits", "2",
                     "--train_source", "phantoms:cxr14", "--num_validation_phantoms", "256",
                     "--phantom_size", "128", "--per_device_train_batch_size", "32",
                     "--learning_rate", "0.03", "--warmup_steps", "20",
                     "--crop_scale_min", "0.2", "--color_jitter_p", "0.8", "--blur_p", "0.5"]


@dataclasses.dataclass
class Version:
    """One phantom version's benchmark: data, sizes and what is compared."""

    source: str
    pretraining: list[str]
    pretrain_steps: int
    unlabelled_pool: int
    label_pool: int
    validation_phantoms: int
    test_phantoms: int
    finetune_steps: int
    segmentation_steps: int
    starts: tuple[str, ...]
    label_groups: list[str] | None
    probe_stages: bool


VERSIONS = {
    # 100 pre-training steps: benchmarks/learning_curve.py's probe still rises at 600 steps
    # (ID 0.689 at step 0, 0.707 at 100, 0.725 at 600), so the budget is the time cap. Sizes
    # from the cost of one seed on the 2-core AVX2 CPU: pre-training 3.7 (ID) + 5.4 (CAiD)
    # min, the supervised start 2 min, per start a probe 50 s, a fine-tuning run of 100 steps
    # 31 s, a segmentation run of 100 steps 50 s: 36 min a seed, 108 for three. So the
    # supervised start is trained once for all seeds and segmentation runs take 50 steps
    # (the same for every start), about 29 min a seed
    "cxr14": Version("phantoms:cxr14", CXR14_PRETRAINING, pretrain_steps=100,
                     unlabelled_pool=20000, label_pool=2000, validation_phantoms=250,
                     test_phantoms=1000, finetune_steps=100, segmentation_steps=50,
                     starts=("random", "ID", "CAiD", "supervised"),
                     label_groups=[f"{g}={','.join(n)}" for g, n in SCALE_GROUPS.items()],
                     probe_stages=True),
    "v1": Version("phantoms", V1_PRETRAINING, pretrain_steps=96, unlabelled_pool=1024,
                  label_pool=1000, validation_phantoms=100, test_phantoms=200,
                  finetune_steps=300, segmentation_steps=300, starts=("random", "ID", "CAiD"),
                  label_groups=None,
                  probe_stages=False),
}


def pretrain_backbone(version: Version, method: str, seed: int, steps: int, out: Path,
                      workers: int, device: str, pool: int) -> Path:
    """Pre-train ID or CAiD for ``steps`` steps on ``pool`` unlabelled phantoms through
    ``caid_hf.training.pretrain``; returns the final backbone folder."""
    model_args, data_args, args = parse_pretraining_args([
        *version.pretraining, "--num_train_phantoms", str(pool),
        "--context_prediction", str(method == "CAiD").lower(),
        "--max_steps", str(steps), "--seed", str(seed), "--output_dir", str(out),
        "--overwrite_output_dir", "true", "--report_to", "none",
        "--dataloader_num_workers", str(workers), "--logging_steps", str(max(steps, 1)),
        "--use_cpu", str(device == "cpu").lower(),
    ])
    pretrain(model_args, data_args, args)
    return out / "final"


def supervised_backbone(version: Version, seed: int, pool: int, validation: int, steps: int,
                        eval_steps: int, out: Path, device: str) -> Path:
    """Fine-tune a classifier from random initialisation on every label of ``pool`` phantoms
    of the supervised start's own seeds; save its encoder as a backbone folder."""
    finetune(FinetuneModelArguments(task="classification", init_from="random",
                                    encoder_name="resnet18", image_size=DOWNSTREAM_SIZE),
             FinetuneDataArguments(train_source=version.source, num_train_phantoms=pool,
                                   num_validation_phantoms=validation, num_test_phantoms=16,
                                   phantom_size=DOWNSTREAM_SIZE, phantom_seed=SUPERVISED_SEED),
             FinetuningArguments(output_dir=str(out), overwrite_output_dir=True,
                                 max_steps=steps, per_device_train_batch_size=32,
                                 learning_rate=1e-3, eval_steps=eval_steps,
                                 mixed_precision="no", early_stopping_patience=0,
                                 bootstrap_resamples=0, seed=seed, report_to="none",
                                 dataloader_num_workers=0, logging_steps=steps,
                                 use_cpu=device == "cpu"))
    with quiet_loading():
        classifier = CAiDForImageClassification.from_pretrained(out)
    classifier.caid.save_pretrained(out / "backbone")
    return out / "backbone"


def resume(evaluation: TransferEvaluation, out: Path) -> list[int]:
    """Take the finished seeds' runs from ``out/results.json`` into ``evaluation``; returns
    those seeds. Refuses results of other settings (label pool, fractions, test set)."""
    path = out / "results.json"
    if not path.is_file():
        return []
    before = json.loads(path.read_text())
    now = evaluation.results()
    for what in (("data", "pool_images"), ("data", "test_images"), ("data", "label_names"),
                 ("settings", "label_fractions"), ("settings", "modes")):
        if before[what[0]][what[1]] != now[what[0]][what[1]]:
            raise SystemExit(f"--resume: {path} has {what[1]} {before[what[0]][what[1]]}, "
                             f"this run {now[what[0]][what[1]]}; give another --out")
    for kind, name in (("transfer", "segmentation_steps"), ("training", "max_steps")):
        old = before["settings"]["arguments"][kind].get(name)
        new = now["settings"]["arguments"][kind][name]
        if old != new:
            raise SystemExit(f"--resume: {path} ran with {name} {old}, this run {new}; give "
                             "another --out")
    done = list(before["seeds_done"])
    evaluation.runs = [r for r in before["runs"] if r["seed"] in done]
    evaluation.seeds_done = done
    evaluation.backbone_specs = before["settings"]["backbones"]
    evaluation.stage_widths = before["data"]["stage_channels"]
    print(f"--resume: seeds {done} taken from {path}", flush=True)
    return done


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phantoms", choices=sorted(VERSIONS), default="cxr14",
                        help="Phantom version (v1: the first phantoms' benchmark).")
    parser.add_argument("--seeds", type=int, default=3, help="Number of seeds.")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="Seeds are first-seed .. first-seed + seeds - 1.")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="Pre-training steps of 32 images, the same for ID and CAiD "
                             "(default: cxr14 100, v1 96).")
    parser.add_argument("--unlabelled-pool", type=int, default=None,
                        help="Unlabelled pre-training phantoms (default: cxr14 20,000).")
    parser.add_argument("--label-pool", type=int, default=None,
                        help="Labelled phantoms (default: cxr14 2,000); each label fraction "
                             "takes a share; the supervised start trains on as many others.")
    parser.add_argument("--validation-phantoms", type=int, default=None)
    parser.add_argument("--test-phantoms", type=int, default=None)
    parser.add_argument("--finetune-steps", type=int, default=None,
                        help="Fine-tuning steps at every fraction (no early stopping).")
    parser.add_argument("--segmentation-steps", type=int, default=None,
                        help="Steps of every segmentation run (default: cxr14 50, v1 300).")
    parser.add_argument("--eval-steps", type=int, default=50)
    parser.add_argument("--device", default=None,
                        help="'cpu' or 'cuda' (default: cuda where there is one).")
    parser.add_argument("--workers", type=int, default=1, help="Pre-training loader workers.")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "phantom_transfer"))
    parser.add_argument("--resume", action="store_true",
                        help="Keep the seeds OUT/results.json has finished (same settings) "
                             "and run the others.")
    parser.add_argument("--quick", action="store_true",
                        help="Smoke run: 1 seed, 4 pre-training steps, half the labels, "
                             "small sets.")
    a = parser.parse_args(argv)
    version = VERSIONS[a.phantoms]
    for name in ("pretrain_steps", "unlabelled_pool", "label_pool", "validation_phantoms",
                 "test_phantoms", "finetune_steps", "segmentation_steps"):
        if getattr(a, name) is None:
            setattr(a, name, getattr(version, name))
    fractions = list(FRACTIONS)
    if a.quick:
        a.seeds, a.pretrain_steps, a.unlabelled_pool, a.label_pool = 1, 4, 128, 100
        a.validation_phantoms, a.test_phantoms, a.finetune_steps, a.eval_steps = 16, 40, 4, 2
        a.segmentation_steps = 4
        fractions = [0.5]
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    evaluation = TransferEvaluation(
        TransferArguments(backbones=[NAMES[s] for s in version.starts],
                          label_fractions=fractions, seeds=a.seeds,
                          modes=["probe", "finetune", "segment"],
                          label_groups=version.label_groups, probe_stages=version.probe_stages,
                          segmentation_batch_size=8, segmentation_steps=a.segmentation_steps),
        FinetuneDataArguments(train_source=version.source, num_train_phantoms=a.label_pool,
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
    evaluation.plot_title = (f"Label efficiency on {version.source} ({a.label_pool} labelled, "
                             f"{a.test_phantoms} test): {a.pretrain_steps} pre-training steps "
                             f"of 32 images on {a.unlabelled_pool}, {a.finetune_steps} "
                             f"fine-tuning / {a.segmentation_steps} segmentation steps per run")
    started = time.perf_counter()
    done = resume(evaluation, out) if a.resume else []
    supervised = None
    seeds = range(a.first_seed, a.first_seed + a.seeds)
    if "supervised" in version.starts and set(seeds) - set(done):  # one for every seed
        supervised = out / "supervised" / "backbone"
        if not (a.resume and (supervised / "config.json").is_file()):
            t = time.perf_counter()
            supervised = supervised_backbone(version, a.first_seed, a.label_pool,
                                             a.validation_phantoms, 2 * a.finetune_steps,
                                             a.eval_steps, out / "supervised", device)
            print(f"trained the supervised start in {time.perf_counter() - t:.0f} s",
                  flush=True)
    for seed in seeds:
        if seed in done:
            continue
        starts = {NAMES["random"]: "random"}
        for method in ("ID", "CAiD"):
            t = time.perf_counter()
            starts[NAMES[method]] = str(pretrain_backbone(
                version, method, seed, a.pretrain_steps, out / f"seed{seed}" / method,
                a.workers, device, a.unlabelled_pool))
            print(f"[seed {seed}] pre-trained {method} in {time.perf_counter() - t:.0f} s",
                  flush=True)
        if supervised is not None:
            starts[NAMES["supervised"]] = str(supervised)
        evaluation.run_seed(seed, starts)
    results = evaluation.write()
    print()
    print(evaluation.markdown(results))
    print(f"\n{a.seeds} seed(s), {a.pretrain_steps} pre-training steps on "
          f"{a.unlabelled_pool} unlabelled phantoms, {a.finetune_steps} fine-tuning and "
          f"{a.segmentation_steps} segmentation steps per run; wall time {(time.perf_counter() - started) / 60:.1f} min; wrote "
          f"{out / 'results.json'}, {out / 'results.md'} and {out / 'label_efficiency.png'}")
    return results


if __name__ == "__main__":
    main()
