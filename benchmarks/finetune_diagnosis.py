"""Why does fine-tuning from a CAiD backbone stall at chance? Measure, and try fixes.

Runs the package's own fine-tuning loop (``caid_hf.finetuning.finetune.finetune``, nothing in
``src/`` is edited) with two kinds of hooks patched in from this script:

* **instrumentation** (``diagnose``): at chosen optimizer steps (default 0, 1, 5, 20, 60; step
  k = the weights after k updates, measured just before update k+1) it records, on one fixed
  batch of fine-tuning images (the first 32 training phantoms, no augmentation):

  - pooled features (``pooler_output``): mean L2 norm and the mean / min per-channel std
    over the batch, both with the BatchNorm running statistics (eval mode, what validation
    sees) and with batch statistics (train mode, what the training step sees; running
    statistics restored afterwards); the number of "dead" channels (std < 1e-6);
  - BatchNorm: per stage (stem, layer1..layer4) the geometric mean over channels of
    running_var / batch_var of the fine-tuning batch at that layer's input, and the mean
    |running_mean - batch_mean| / batch_std;
  - head logits: std over the batch (eval and train mode) and the mean |logit|;
  - gradient L2 norm per encoder stage and for the head (the gradient of that step);
  - AdamW: the learning rate of every parameter group and, per stage and for the head, the
    update-norm / weight-norm ratio of that step (the effective relative step size);
  - weight L2 norm per stage and for the head;
  - the training loss at every step and validation mean AUC at every epoch (early stopping).

* **recipes** (``recipes``): the same command with prototype fixes applied by wrapping
  ``build_model`` (BatchNorm statistics re-estimated on the training images, zero-init
  head), the optimizer (head / backbone learning-rate split) and the arguments (warm-up,
  learning rate, early stopping, image size, precision); test mean AUC per seed.

* ``probe``: frozen-feature linear probe / k-NN of a backbone (BatchNorm statistics
  re-estimated on the probe images), pooled and all-stage embeddings, as
  ``caid-hf evaluate-features`` computes them.

Examples (CPU, about 1 min per fine-tuning run of 120 steps of ResNet-18 at 64 px)::

    python benchmarks/finetune_diagnosis.py diagnose --init /tmp/diag/demo/best --seed 42
    python benchmarks/finetune_diagnosis.py diagnose --init random --seed 42
    python benchmarks/finetune_diagnosis.py recipes --init /tmp/diag/demo/best random \\
        --recipe baseline bn_head10_warmup --seeds 42 7 19
    python benchmarks/finetune_diagnosis.py probe --init /tmp/diag/demo/best random
    python benchmarks/finetune_diagnosis.py list-recipes

Results are printed and appended as JSON lines to ``--results`` (default
/tmp/diag/results.jsonl).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

CONFIG = "configs/finetune_phantoms_classification.yaml"
# The diagnosis was made on the first phantoms ("nodule present", 100 validation and 200 test
# images, 30 epochs); these flags pin that setting now that the config is the cxr14 task.
FIRST_PHANTOMS = ["--train_source", "phantoms", "--num_validation_phantoms", "100",
                  "--num_test_phantoms", "200", "--num_train_epochs", "30"]
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")

# Prototype fixes. Keys: bn_recal (re-estimate BatchNorm statistics on the training images
# before training), head_lr_mult (head lr = lr * this), zero_head (head weight and bias 0),
# plus any fine-tuning argument (learning_rate, warmup_steps, early_stopping_patience,
# image_size, phantom_size, mixed_precision, num_train_epochs, weight_decay, ...).
RECIPES: dict[str, dict] = {
    "baseline": {},
    "no_es": {"early_stopping_patience": 0},
    "fp32": {"mixed_precision": "no"},
    "bn": {"bn_recal": True},
    "head10": {"head_lr_mult": 10.0},
    "warmup": {"warmup_steps": 12},
    "zero_head": {"zero_head": True},
    "lr3e-4": {"learning_rate": 3e-4},
    "lr3e-3": {"learning_rate": 3e-3},
    "lr1e-4": {"learning_rate": 1e-4},
    "bn_head10": {"bn_recal": True, "head_lr_mult": 10.0},
    "bn_warmup": {"bn_recal": True, "warmup_steps": 12},
    "bn_head10_warmup": {"bn_recal": True, "head_lr_mult": 10.0, "warmup_steps": 12},
    "lr3e-4_head10_warmup": {"learning_rate": 3e-4, "head_lr_mult": 10.0, "warmup_steps": 12},
    "bn_lr3e-4_head10_warmup": {"bn_recal": True, "learning_rate": 3e-4, "head_lr_mult": 10.0,
                                "warmup_steps": 12},
    "lr1e-4_head10_warmup": {"learning_rate": 1e-4, "head_lr_mult": 10.0, "warmup_steps": 12},
    "lr3e-4_head10_warmup_noes": {"learning_rate": 3e-4, "head_lr_mult": 10.0,
                                  "warmup_steps": 12, "early_stopping_patience": 0},
    "lr1e-4_head10_warmup_noes": {"learning_rate": 1e-4, "head_lr_mult": 10.0,
                                  "warmup_steps": 12, "early_stopping_patience": 0},
    "bn_lr1e-4_head10_warmup_noes": {"bn_recal": True, "learning_rate": 1e-4,
                                     "head_lr_mult": 10.0, "warmup_steps": 12,
                                     "early_stopping_patience": 0},
    "lr3e-3_noes": {"learning_rate": 3e-3, "early_stopping_patience": 0},
    "ep30_noes": {"num_train_epochs": 30, "early_stopping_patience": 0},
    "ep30_warmup_noes": {"num_train_epochs": 30, "warmup_steps": 24,
                         "early_stopping_patience": 0},
    "px128_noes": {"image_size": 128, "phantom_size": 128, "early_stopping_patience": 0},
    "px128": {"image_size": 128, "phantom_size": 128},
    "sgd": {"optimizer": "sgd", "learning_rate": 0.01},
    "sgd_bn": {"optimizer": "sgd", "learning_rate": 0.01, "bn_recal": True},
}
_SCRIPT_KEYS = ("bn_recal", "head_lr_mult", "zero_head")

# what the patched hooks see during one run
_CTX: dict = {}


def _stage_of(name: str) -> str:
    """'caid.encoder.layer2.0.conv1.weight' -> 'layer2'; stem conv/bn -> 'stem'; head."""
    if name.startswith("classifier"):
        return "head"
    part = name.split(".")[2] if name.startswith("caid.encoder.") else name
    return part if part in STAGES else "stem"


def _bn_stage(name: str) -> str:
    return name.split(".")[0] if name.split(".")[0] in STAGES else "stem"


@torch.no_grad()
def recalibrate_bn(model, dataset, batch_size: int = 64) -> None:
    """Running statistics of every encoder BatchNorm := the average over ``dataset``."""
    from torch.utils.data import DataLoader

    encoder = model.caid.encoder
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    encoder.train()
    for batch in DataLoader(dataset, batch_size=batch_size):
        encoder(batch["pixel_values"])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


@torch.no_grad()
def measure_model(model, pixel_values) -> dict:
    """Feature, BatchNorm and logit statistics of ``model`` on one batch (fp32)."""
    encoder = model.caid.encoder
    norms = {n: m for n, m in encoder.named_modules() if isinstance(m, nn.BatchNorm2d)}
    saved = {n: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for n, m in norms.items()}
    batch_stats: dict[str, tuple] = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, inp, n=n: batch_stats.__setitem__(
            n, (inp[0].float().mean((0, 2, 3)), inp[0].float().var((0, 2, 3), unbiased=False))))
        for n, m in norms.items()]
    was_training = model.training
    result = {}
    try:
        for mode in ("eval", "train"):
            model.train(mode == "train")
            batch_stats.clear()
            out = model.caid(pixel_values, compute_reconstruction=False)
            pooled = out.pooler_output.float()
            logits = model.classifier(pooled).float()
            std = pooled.std(0)
            result[f"feat_norm_{mode}"] = pooled.norm(dim=1).mean().item()
            result[f"feat_chan_std_{mode}"] = std.mean().item()
            result[f"feat_chan_std_min_{mode}"] = std.min().item()
            result[f"feat_dead_{mode}"] = int((std < 1e-6).sum())
            result[f"feat_chan_mean_{mode}"] = pooled.mean(0).mean().item()
            result[f"logit_std_{mode}"] = logits.std(0).mean().item()
            result[f"logit_absmean_{mode}"] = logits.abs().mean().item()
            if mode == "eval":  # running statistics (before any restore) vs this batch
                ratio: dict[str, list] = {s: [] for s in STAGES}
                shift: dict[str, list] = {s: [] for s in STAGES}
                for n, m in norms.items():
                    mean, var = batch_stats[n]
                    ratio[_bn_stage(n)].append(
                        torch.log((m.running_var + 1e-5) / (var + 1e-5)))
                    shift[_bn_stage(n)].append(
                        (m.running_mean - mean).abs() / (var + 1e-5).sqrt())
                for s in STAGES:
                    result[f"bn_var_ratio_{s}"] = torch.cat(ratio[s]).mean().exp().item()
                    result[f"bn_mean_shift_{s}"] = torch.cat(shift[s]).mean().item()
    finally:
        for h in hooks:
            h.remove()
        for n, m in norms.items():
            m.running_mean.copy_(saved[n][0])
            m.running_var.copy_(saved[n][1])
            m.num_batches_tracked.copy_(saved[n][2])
        model.train(was_training)
    return result


def _norms_by_stage(named, what) -> dict[str, float]:
    sums: dict[str, float] = {}
    for name, p in named:
        t = what(name, p)
        t = t.detach() if t is not None else None
        if t is None:
            continue
        s = _stage_of(name)
        sums[s] = sums.get(s, 0.0) + float(t.float().pow(2).sum())
    return {s: math.sqrt(v) for s, v in sums.items()}


def make_optimizer_class(recipe: dict):
    """AdamW / SGD subclass: optional head lr split, optional instrumentation in step()."""
    base_adamw, base_sgd = _CTX["orig_adamw"], _CTX["orig_sgd"]

    def split(params, lr):
        mult = recipe.get("head_lr_mult")
        model = _CTX.get("model")
        if not mult or model is None:
            return params
        head = {id(p) for p in model.classifier.parameters()}
        params = list(params)
        return [{"params": [p for p in params if id(p) not in head], "lr": lr},
                {"params": [p for p in params if id(p) in head], "lr": lr * mult}]

    def make(base):
        class Instrumented(base):
            def __init__(self, params, lr, **kwargs):
                super().__init__(split(params, lr), lr=lr, **kwargs)
                self._calls = 0

            def step(self, closure=None):
                k = self._calls
                self._calls += 1
                record = k in _CTX.get("record_steps", ())
                model = _CTX.get("model")
                if not record or model is None:
                    return super().step(closure)
                named = list(model.named_parameters())
                row = {"step": k, **measure_model(model, _CTX["fixed_batch"])}
                row.update({f"grad_{s}": v for s, v in _norms_by_stage(
                    named, lambda n, p: p.grad).items()})
                weights = _norms_by_stage(named, lambda n, p: p)
                row.update({f"weight_{s}": v for s, v in weights.items()})
                before = {n: p.detach().clone() for n, p in named}
                result = super().step(closure)
                upd = _norms_by_stage(named, lambda n, p: p.detach() - before[n])
                row.update({f"rel_update_{s}": upd[s] / max(weights[s], 1e-12) for s in upd})
                row["lr_groups"] = [g["lr"] for g in self.param_groups]
                _CTX["rows"].append(row)
                return result
        return Instrumented

    return make(base_adamw), make(base_sgd)


def run_finetune(init: str, seed: int, recipe: dict, out_root: Path,
                 record_steps=(), extra: list[str] | None = None) -> dict:
    """One fine-tuning run of the README command with ``recipe``; returns its numbers."""
    from caid_hf.finetuning import finetune as ft
    from caid_hf.finetuning.arguments import parse_finetuning_args
    from caid_hf.finetuning.data import ClassificationDataset

    argv = ["--config", CONFIG, *FIRST_PHANTOMS, "--seed", str(seed), "--report_to", "none",
            "--dataloader_num_workers", "1", "--bootstrap_resamples", "0",
            "--logging_steps", "1", "--overwrite_output_dir", "true"]
    if init != "random":
        argv += ["--init_from", init]
    for key, value in recipe.items():
        if key not in _SCRIPT_KEYS:
            argv += [f"--{key}", str(value)]
    argv += extra or []
    tag = f"{Path(init).parent.name if init != 'random' else 'random'}_s{seed}_" + \
        "_".join(f"{k}{v}" for k, v in recipe.items())
    out_dir = out_root / (tag or "baseline")
    argv += ["--output_dir", str(out_dir)]
    model_args, data_args, args = parse_finetuning_args(argv)

    _CTX.clear()
    _CTX.update(rows=[], record_steps=set(record_steps), orig_adamw=torch.optim.AdamW,
                orig_sgd=torch.optim.SGD)
    orig_build_splits, orig_build_model = ft.build_splits, ft.build_model

    def build_splits(*a, **k):
        splits = orig_build_splits(*a, **k)
        _CTX["splits"] = splits
        return splits

    def build_model(margs, label_names):
        model = orig_build_model(margs, label_names)
        splits, size = _CTX["splits"], model.config.image_size
        plain = ClassificationDataset(splits.train, size, indices=splits.train_indices)
        _CTX["fixed_batch"] = torch.stack([plain[i]["pixel_values"] for i in range(32)])
        if recipe.get("bn_recal"):
            recalibrate_bn(model, plain)
        if recipe.get("zero_head"):
            nn.init.zeros_(model.classifier.weight)
            nn.init.zeros_(model.classifier.bias)
        _CTX["model"] = model
        return model

    adamw, sgd = make_optimizer_class(recipe)
    ft.build_splits, ft.build_model = build_splits, build_model
    torch.optim.AdamW, torch.optim.SGD = adamw, sgd
    started = time.perf_counter()
    error = None
    try:
        ft.finetune(model_args, data_args, args)
    finally:
        ft.build_splits, ft.build_model = orig_build_splits, orig_build_model
        torch.optim.AdamW, torch.optim.SGD = _CTX["orig_adamw"], _CTX["orig_sgd"]
    seconds = time.perf_counter() - started
    # read what the run wrote (also when finetune() raised after writing its results)
    try:
        state = json.loads((out_dir / "trainer_state.json").read_text())
        report = json.loads((out_dir / "test_results.json").read_text())
    except FileNotFoundError:
        raise RuntimeError(f"fine-tuning failed before writing results: {error}") from None
    history = state["history"]
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    val = [(h["step"], h["val/mean_auc"]) for h in history if "val/mean_auc" in h]
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"init": init, "seed": seed, "recipe": recipe,
            "test_mean_auc": report["metrics"]["mean_auc"],
            "best_val_auc": state["best_metric"], "best_step": state["best_step"],
            "global_step": state["global_step"], "stopped_early": state["stopped_early"],
            "finetune_error": error,
            "train_loss_first10": round(float(np.mean(losses[:10])), 4),
            "train_loss_at": {s: round(losses[s - 1], 4) for s in (12, 24, 36, 60, 120)
                              if s <= len(losses)},
            "train_loss_last10": round(float(np.mean(losses[-10:])), 4),
            "val_auc": [(s, round(v, 3)) for s, v in val], "seconds": round(seconds, 1),
            "rows": _CTX["rows"]}


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def print_rows(rows: list[dict]) -> None:
    keys = [k for k in rows[0] if k not in ("step", "lr_groups")]
    print("metric".ljust(28) + "".join(f"step {r['step']:>4}".rjust(11) for r in rows))
    for k in keys:
        print(k.ljust(28) + "".join(f"{r.get(k, float('nan')):11.4g}" for r in rows))
    print("lr_groups".ljust(28) + "  ".join(str([f"{x:.2g}" for x in r["lr_groups"]])
                                            for r in rows))


def cmd_diagnose(a) -> None:
    for init in a.init:
        for seed in a.seeds:
            res = run_finetune(init, seed, RECIPES[a.recipe[0]], Path(a.output_root),
                               record_steps=a.steps)
            _append(Path(a.results), {"kind": "diagnose", **res})
            print(f"\n== {init} seed {seed} recipe {a.recipe[0]}: test AUC "
                  f"{res['test_mean_auc']:.3f}, val {res['val_auc']}, stopped early "
                  f"{res['stopped_early']} at {res['global_step']}, loss {res['train_loss_at']}"
                  f" ({res['seconds']} s)")
            print_rows(res["rows"])


def cmd_recipes(a) -> None:
    table = []
    for name in a.recipe:
        for init in a.init:
            for seed in a.seeds:
                res = run_finetune(init, seed, RECIPES[name], Path(a.output_root))
                res.pop("rows")
                _append(Path(a.results), {"kind": "recipe", "name": name, **res})
                table.append((name, init, seed, res["test_mean_auc"]))
                print(f"{name:28s} {init:28s} seed {seed:3d}: test AUC "
                      f"{res['test_mean_auc']:.3f} (best val {res['best_val_auc']:.3f} at "
                      f"{res['best_step']}, stopped {res['stopped_early']} at "
                      f"{res['global_step']}; loss {res['train_loss_at']}; {res['seconds']} s)",
                      flush=True)
    print("\nrecipe / init: test mean AUC per seed, mean")
    for name in a.recipe:
        for init in a.init:
            aucs = [t[3] for t in table if t[0] == name and t[1] == init]
            print(f"{name:28s} {init:28s} " + " ".join(f"{x:.3f}" for x in aucs)
                  + f"  mean {np.mean(aucs):.3f} min {np.min(aucs):.3f}")


def cmd_probe(a) -> None:
    from caid_hf import CAiDConfig, CAiDModel
    from caid_hf.finetuning.data import LabelledSourceOptions, labelled_source_from_spec
    from caid_hf.finetuning.features import extract_embeddings, probe_scores, recalibrate_batch_norm

    def source(n, offset):
        opts = LabelledSourceOptions(task="classification", phantom_size=a.image_size,
                                     num_phantoms=n, phantom_seed=1000)
        return labelled_source_from_spec("phantoms", opts, phantom_seed_offset=offset)

    train, test = source(400, 0), source(200, 2)
    for init in a.init:
        torch.manual_seed(0)
        backbone = (CAiDModel(CAiDConfig(encoder_name="resnet18", image_size=a.image_size))
                    if init == "random" else CAiDModel.from_pretrained(init))
        recalibrate_batch_norm(backbone, train, a.image_size)
        for emb in ("pooled", "stages"):
            x, y = extract_embeddings(backbone, train, a.image_size, embedding=emb)
            tx, ty = extract_embeddings(backbone, test, a.image_size, embedding=emb)
            scores = probe_scores(x, y, train.label_names, test_x=tx, test_y=ty) \
                if "test_x" in probe_scores.__code__.co_varnames else \
                probe_scores(x, y, train.label_names)
            print(f"{init:28s} {emb:7s} dim {x.shape[1]:4d}: {scores}")
            _append(Path(a.results), {"kind": "probe", "init": init, "embedding": emb,
                                      "scores": str(scores)})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("command", choices=("diagnose", "recipes", "probe", "list-recipes"))
    p.add_argument("--init", nargs="+", default=["random"],
                   help="'random' and/or backbone folders (e.g. /tmp/diag/demo/best)")
    p.add_argument("--seeds", nargs="+", type=int, default=[42])
    p.add_argument("--recipe", nargs="+", default=["baseline"], help=f"of {list(RECIPES)}")
    p.add_argument("--steps", nargs="+", type=int, default=[0, 1, 5, 20, 60],
                   help="diagnose: optimizer steps to measure at")
    p.add_argument("--image-size", type=int, default=64, help="probe: image side")
    p.add_argument("--output-root", default="/tmp/diag/ft")
    p.add_argument("--results", default="/tmp/diag/results.jsonl")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.command == "list-recipes":
        for k, v in RECIPES.items():
            print(f"{k:28s} {v}")
        return
    {"diagnose": cmd_diagnose, "recipes": cmd_recipes, "probe": cmd_probe}[a.command](a)


if __name__ == "__main__":
    main()
