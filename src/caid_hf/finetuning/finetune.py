"""Fine-tune a CAiD backbone for classification or segmentation, with Accelerate.

Flat loop, top to bottom: data, model, prepare, loop (forward, backward, step, log),
validate (best model, early stopping), test with bootstrap intervals, save. Launch with
``caid-hf finetune --config FILE`` or ``accelerate launch scripts/finetune.py --config FILE``.

The output folder is a model that ``AutoModelForImageClassification`` /
``AutoModelForSemanticSegmentation`` load (after ``import caid_hf``): ``config.json`` with
the label names, ``model.safetensors``, ``preprocessor_config.json``, a model card
(``README.md``) with the test metrics, ``test_results.json``, ``trainer_state.json`` and
``run_config.yaml``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from ..configuration_caid import CAiDConfig
from ..console import (
    RunConsole,
    describe_hardware,
    format_duration,
    quiet_loading,
    quiet_progress_bars,
)
from ..data.source_spec import PHANTOMS, HFOptions
from ..image_processing_caid import CAiDImageProcessor
from ..modeling_caid import CAiDForImageClassification, CAiDForSemanticSegmentation
from ..training import performance
from ..training.checkpointing import default_file_mode, lock_output_dir
from .arguments import (
    METRICS,
    FinetuneDataArguments,
    FinetuneModelArguments,
    FinetuningArguments,
    parse_finetuning_args,
)
from .data import (
    ClassificationDataset,
    LabelledSourceOptions,
    SegmentationDataset,
    labelled_source_from_spec,
)
from .metrics import (
    classification_metrics,
    classification_report,
    confusion_counts,
    segmentation_metrics,
    segmentation_report,
)
from .model_card import write_finetuned_card

_WEIGHT_FILES = (".pth", ".pt", ".bin", ".safetensors")
_MODEL_FILES = ("config.json", "model.safetensors")


@dataclasses.dataclass
class LabelledSplits:
    """The labelled sources of a run and the image indices each set uses."""

    train: object
    train_indices: list[int]
    validation: object
    validation_indices: list[int]
    test: object
    test_indices: list[int]
    test_split: str  # "test", or "validation" when there is no test set
    test_source: str
    label_names: list[str]


def _seeded_order(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def build_splits(model_args: FinetuneModelArguments, data_args: FinetuneDataArguments,
                 seed: int) -> LabelledSplits:
    """Open the training, validation and test sources and pick their images.

    Without a validation source, phantoms get their own (phantom_seed + 1) and other sources
    hold out ``validation_fraction`` of the training images (seeded). Then
    ``label_fraction`` and ``max_train_samples`` shrink the training images (seeded). Without
    a test source, phantoms get their own (phantom_seed + 2), others report on validation.
    """
    segmentation = model_args.task == "segmentation"
    options = LabelledSourceOptions(
        task=model_args.task, images_root=data_args.images_root,
        masks_root=data_args.masks_root, image_column=data_args.image_column,
        label_columns=data_args.label_columns, mask_column=data_args.mask_column,
        label_names=data_args.label_names,
        hf=HFOptions(split=data_args.hf_split, config_name=data_args.hf_config_name),
        phantom_size=data_args.phantom_size, phantom_seed=data_args.phantom_seed,
        binary_masks=(model_args.num_labels or 1) == 1)

    def open_source(spec: str, num_phantoms: int, offset: int, split: str | None):
        options.num_phantoms = num_phantoms
        return labelled_source_from_spec(spec, options, split=split,
                                         phantom_seed_offset=offset)

    train = open_source(data_args.train_source, data_args.num_train_phantoms, 0, None)
    train_indices = list(range(len(train)))
    if data_args.validation_source is not None:
        validation = open_source(data_args.validation_source, data_args.num_validation_phantoms,
                                 1, data_args.hf_validation_split)
        validation_indices = list(range(len(validation)))
    elif data_args.train_source == PHANTOMS:
        validation = open_source(PHANTOMS, data_args.num_validation_phantoms, 1, None)
        validation_indices = list(range(len(validation)))
    else:
        order = _seeded_order(len(train), seed)
        n_val = max(1, round(len(train) * data_args.validation_fraction))
        if len(train) - n_val < 1:
            raise ValueError(f"validation_fraction={data_args.validation_fraction} leaves no "
                             f"training images out of {len(train)} in {data_args.train_source}")
        validation, validation_indices = train, sorted(order[:n_val])
        train_indices = sorted(order[n_val:])
    keep = max(1, math.ceil(len(train_indices) * data_args.label_fraction))
    if data_args.max_train_samples is not None:
        keep = min(keep, data_args.max_train_samples)
    if keep < len(train_indices):
        picked = _seeded_order(len(train_indices), seed + 1)[:keep]
        train_indices = sorted(train_indices[k] for k in picked)
    if data_args.test_source is not None:
        test = open_source(data_args.test_source, data_args.num_test_phantoms, 2,
                           data_args.hf_test_split)
        test_split, test_spec = "test", data_args.test_source
    elif data_args.train_source == PHANTOMS:
        test, test_split, test_spec = open_source(PHANTOMS, data_args.num_test_phantoms, 2,
                                                  None), "test", "phantoms (held out)"
    else:
        test, test_split = validation, "validation"
        test_spec = data_args.validation_source or f"{data_args.train_source} (held out)"
    test_indices = validation_indices if test is validation else list(range(len(test)))

    names = train.label_names
    if segmentation:
        num_labels = model_args.num_labels or 1
        if names is None or len(names) != num_labels:
            names = (["foreground"] if num_labels == 1
                     else ["background"] + [f"class_{k}" for k in range(1, num_labels)])
        if data_args.label_names is not None and len(data_args.label_names) != num_labels:
            raise ValueError(f"label_names has {len(data_args.label_names)} names but "
                             f"num_labels={num_labels}")
    else:
        for other, what in ((validation, "validation_source"), (test, "test_source")):
            if list(other.label_names) != list(names):
                raise ValueError(f"{what} has labels {other.label_names} but train_source has "
                                 f"{names}; they must be the same, in the same order")
    return LabelledSplits(train, train_indices, validation, validation_indices, test,
                          test_indices, test_split, test_spec, list(names))


def load_encoder_weights(model, weights: str) -> None:
    """Put ImageNet (or other) encoder weights into ``model.caid.encoder``.

    ``weights``: ``"imagenet"`` (segmentation_models_pytorch's weights for the encoder,
    read from the Hugging Face cache or downloaded) or a ``.pth``/``.pt``/``.bin``/
    ``.safetensors`` file with a torchvision or timm ResNet state dict (a ``module.``
    prefix is dropped, and so is the ``fc`` head).

    Raises:
        RuntimeError: the weights cannot be fetched (e.g. offline and not cached).
        ValueError: the file's keys do not fit the encoder (missing and unexpected keys named).
    """
    encoder = model.caid.encoder
    name = model.config.encoder_name
    if weights == "imagenet":
        from segmentation_models_pytorch.encoders import get_encoder

        try:
            state = get_encoder(name, weights="imagenet").state_dict()
        except Exception as error:  # noqa: BLE001 - name the encoder and the way out
            raise RuntimeError(
                f"cannot load ImageNet weights for encoder {name!r} ({error}); they come from "
                "the Hugging Face Hub (cached in HF_HOME). Without network, give a weights file "
                "as init_from (a torchvision ResNet state dict .pth or .safetensors)") from error
    else:
        path = Path(weights)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items()
                 if not k.removeprefix("module.").startswith("fc.")}
    # nn.Module's own method: smp's encoders override it without returning the key report
    missing, unexpected = torch.nn.Module.load_state_dict(encoder, state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights}: the weights do not fit encoder {name!r}: missing "
                         f"{sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")


def build_model(model_args: FinetuneModelArguments, label_names: list[str]):
    """The classifier or segmenter, initialised as ``model_args.init_from`` says.

    Returns:
        A :class:`~caid_hf.CAiDForImageClassification` (``num_labels = len(label_names)``)
        or :class:`~caid_hf.CAiDForSemanticSegmentation` (``num_labels`` 1 for binary
        masks, else the class count), with ``id2label`` / ``label2id`` set.
    """
    segmentation = model_args.task == "segmentation"
    num_labels = (model_args.num_labels or 1) if segmentation else len(label_names)
    settings = {"num_labels": num_labels,
                "id2label": dict(enumerate(label_names)),
                "label2id": {name: k for k, name in enumerate(label_names)},
                "classifier_dropout": model_args.classifier_dropout,
                "segmentation_dice_weight": model_args.segmentation_dice_weight}
    if not segmentation:
        settings["problem_type"] = model_args.problem_type
    if model_args.image_size is not None:
        settings["image_size"] = model_args.image_size
    model_class = CAiDForSemanticSegmentation if segmentation else CAiDForImageClassification
    init = model_args.init_from
    weights_file = Path(init).suffix in _WEIGHT_FILES and Path(init).is_file()
    if init in ("random", "imagenet") or weights_file:
        settings.setdefault("image_size", 224)
        model = model_class(CAiDConfig(encoder_name=model_args.encoder_name, **settings))
        if init != "random":
            load_encoder_weights(model, init)
    else:
        # a fine-tuned model with other labels: only its head is replaced
        with quiet_loading():
            model, info = model_class.from_pretrained(init, ignore_mismatched_sizes=True,
                                                      output_loading_info=True, **settings)
        head = ("classifier.", "segmentation_head.")
        others = [k for k in info["missing_keys"] if not k.startswith(head)]
        if others:
            warnings.warn(f"{init} lacks {len(others)} weights besides the new head, which "
                          f"start from their initialisation: {sorted(others)[:8]}", stacklevel=2)
    if model_args.freeze_encoder:
        model.caid.encoder.requires_grad_(False)
    return model


def build_lr_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    if kind == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup_steps, max(total_steps, 1))
    return get_constant_schedule_with_warmup(optimizer, warmup_steps)


def _num_workers(value: int | None) -> int:
    if value is not None:
        return value
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores - 1))


@torch.no_grad()
def predict(model, loader, accelerator, task: str, single_label: bool = False) -> dict:
    """Run ``model`` over ``loader`` (every process its shard) and gather per-image results.

    Returns:
        ``{"loss": mean loss over the images, "num_images": N}`` plus, for classification,
        ``"scores"`` float32 [N, L] (sigmoid, or softmax for single-label) and ``"labels"``
        float32 [N, L] in {0, 1}; for segmentation ``"counts"`` int64 [N, C, 3] (TP, FP, FN
        per class; C = 2 for binary masks).
    """
    model.eval()
    config = accelerator.unwrap_model(model).config
    loss_sum, parts = 0.0, []
    for batch in loader:
        out = model(**batch)
        n = batch["pixel_values"].shape[0]
        loss_sum += out.loss.item() * n
        logits = out.logits.float()
        if task == "classification":
            labels = batch["labels"]
            if single_label:
                scores = logits.softmax(-1)
                labels = torch.nn.functional.one_hot(labels, logits.shape[-1]).float()
            else:
                scores = logits.sigmoid()
            parts.append((scores.cpu().numpy(), labels.float().cpu().numpy()))
        elif logits.shape[1] == 1:
            counts = confusion_counts((logits[:, 0] > 0).long(), batch["labels"][:, 0].long(), 2)
            parts.append(counts.cpu().numpy())
        else:
            counts = confusion_counts(logits.argmax(1), batch["labels"], logits.shape[1],
                                      ignore_index=config.semantic_loss_ignore_index)
            parts.append(counts.cpu().numpy())
    model.train()
    gathered = gather_object([(loss_sum, parts)]) if accelerator.num_processes > 1 \
        else [(loss_sum, parts)]
    parts = [p for _, process_parts in gathered for p in process_parts]
    total_loss = sum(loss for loss, _ in gathered)
    if task == "classification":
        result = {"scores": np.concatenate([s for s, _ in parts]),
                  "labels": np.concatenate([y for _, y in parts])}
        n = len(result["scores"])
    else:
        result = {"counts": np.concatenate(parts)}
        n = len(result["counts"])
    result.update(loss=total_loss / max(n, 1), num_images=n)
    return result


def compute_metrics(prediction: dict, label_names: list[str]) -> dict[str, float]:
    """Point metrics of :func:`predict`'s output plus its ``loss``."""
    if "scores" in prediction:
        metrics = classification_metrics(prediction["labels"], prediction["scores"], label_names)
    else:
        metrics = segmentation_metrics(prediction["counts"], label_names)
    return {"loss": prediction["loss"], **metrics}


def prepare_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse to overwrite a saved model unless asked to."""
    existing = [name for name in _MODEL_FILES if (output_dir / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"output_dir {output_dir} already holds a model ({', '.join(existing)});"
                              " choose another --output_dir or pass --overwrite_output_dir true")


@dataclasses.dataclass
class FinetuneResult:
    """What a run leaves: the best model (on the CPU), its folder and its numbers."""

    model: torch.nn.Module
    output_dir: Path
    best_metric: float
    best_step: int
    global_step: int
    stopped_early: bool
    history: list
    test_report: dict


def finetune(model_args: FinetuneModelArguments, data_args: FinetuneDataArguments,
             args: FinetuningArguments) -> FinetuneResult:
    """Fine-tune with the given arguments (see :mod:`.arguments`); returns the result and
    writes the model folder to ``args.output_dir``."""
    with contextlib.ExitStack() as cleanup:
        return _finetune(model_args, data_args, args, cleanup)


def _finetune(model_args: FinetuneModelArguments, data_args: FinetuneDataArguments,
              args: FinetuningArguments, cleanup: contextlib.ExitStack) -> FinetuneResult:
    output_dir = Path(args.output_dir)
    prepare_output_dir(output_dir, args.overwrite_output_dir)
    accelerator, args = performance.make_accelerator(args, output_dir)
    lock_output_dir(accelerator, output_dir, cleanup)
    set_seed(args.seed)
    task, segmentation = model_args.task, model_args.task == "segmentation"
    single_label = not segmentation and model_args.problem_type == "single_label_classification"
    metric = args.metric_for_best_model or ("dice" if segmentation else "mean_auc")
    if ((metric in ("dice", "iou")) != segmentation and metric != "loss") or \
            (metric == "accuracy" and not single_label):
        raise ValueError(f"metric_for_best_model={metric!r} does not fit task={task!r}"
                         + ("" if segmentation else f", problem_type={model_args.problem_type!r}"))
    greater_is_better = METRICS[metric]

    splits = build_splits(model_args, data_args, args.seed)
    model = build_model(model_args, splits.label_names)
    image_size = model.config.image_size
    if segmentation:
        def dataset(source, indices, train=False):
            return SegmentationDataset(source, image_size, model.config.num_labels, train=train,
                                       indices=indices, crop_scale_min=data_args.crop_scale_min,
                                       horizontal_flip=data_args.horizontal_flip)
    else:
        def dataset(source, indices, train=False):
            return ClassificationDataset(source, image_size, single_label, train=train,
                                         indices=indices, crop_scale_min=data_args.crop_scale_min,
                                         horizontal_flip=data_args.horizontal_flip)
    train_set = dataset(splits.train, splits.train_indices, train=True)
    val_set = dataset(splits.validation, splits.validation_indices)
    test_set = dataset(splits.test, splits.test_indices)
    workers = _num_workers(args.dataloader_num_workers)
    loader_kwargs = {"num_workers": workers, "persistent_workers": workers > 0,
                     "pin_memory": accelerator.device.type == "cuda"}
    batch_size = min(args.per_device_train_batch_size, len(train_set))  # few labels: one batch
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(args.seed), **loader_kwargs)
    eval_batch = args.per_device_eval_batch_size or args.per_device_train_batch_size
    val_loader = DataLoader(val_set, batch_size=eval_batch, **loader_kwargs)
    test_loader = DataLoader(test_set, batch_size=eval_batch, **loader_kwargs)

    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate,
                                      weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=args.learning_rate, momentum=0.9,
                                    weight_decay=args.weight_decay)
    model, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader, test_loader)
    steps_per_epoch = len(train_loader)
    total_steps = args.max_steps if args.max_steps > 0 else args.num_train_epochs * steps_per_epoch
    scheduler = build_lr_scheduler(optimizer, args.lr_scheduler_type, args.warmup_steps,
                                   total_steps)

    run = {"model": dataclasses.asdict(model_args), "data": dataclasses.asdict(data_args),
           "training": dataclasses.asdict(args)}
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "run_config.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
    if args.report_to != "none":
        accelerator.init_trackers("tensorboard", config={
            k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for part in run.values() for k, v in part.items()})
    console = RunConsole(enabled=accelerator.is_main_process)
    min_steps = (args.early_stopping_min_steps if args.early_stopping_min_steps >= 0
                 else total_steps // 2)
    stopping_rule = (f", early stopping after {args.early_stopping_patience} validations "
                     f"without improvement from step {min_steps} on"
                     if args.early_stopping_patience else "")
    console.header(
        f"fine-tuning ({task}: {', '.join(splits.label_names)}) from {model_args.init_from}, "
        f"{model.config.encoder_name} at {image_size} px -> {output_dir}",
        f"  data: {len(train_set)} train / {len(val_set)} validation / {len(test_set)} "
        f"{splits.test_split} images",
        f"  plan: {total_steps} steps of batch {batch_size * accelerator.num_processes}, best model "
        f"by validation {metric}{stopping_rule}",
        f"  on {describe_hardware(accelerator)}")

    step, history, stopped_early = 0, [], False
    best_value, best_step, best_state, bad_evals = None, 0, None, 0
    started = time.perf_counter()
    console.bar(total_steps, desc="fine-tuning")

    def validate() -> bool:
        """Validate, keep the best weights; True when early stopping says stop."""
        nonlocal best_value, best_step, best_state, bad_evals
        metrics = compute_metrics(predict(model, val_loader, accelerator, task, single_label),
                                  splits.label_names)
        value = metrics[metric]
        logs = {f"val/{k}": v for k, v in metrics.items()}
        accelerator.log(logs, step=step)
        history.append({"step": step, **logs})
        margin = args.early_stopping_threshold
        improved = math.isfinite(value) and (
            best_value is None or (value > best_value + margin if greater_is_better
                                   else value < best_value - margin))
        if improved:
            best_value, best_step, bad_evals = value, step, 0
            best_state = {k: v.detach().to("cpu", copy=True)
                          for k, v in accelerator.unwrap_model(model).state_dict().items()}
        elif step >= min_steps:  # the opening plateau does not count
            bad_evals += 1
        console.say(f"step {step}: validation {metric} {value:.4f}"
                    f"{' (best)' if improved else ''}, loss {metrics['loss']:.4f}")
        return bool(args.early_stopping_patience) and bad_evals >= args.early_stopping_patience

    def train_mode() -> None:
        model.train()
        if model_args.freeze_encoder:  # keep the loaded BatchNorm statistics
            accelerator.unwrap_model(model).caid.encoder.eval()

    train_mode()
    validated_at = -1
    while step < total_steps and not stopped_early:
        for batch in train_loader:
            out = model(**batch)
            accelerator.backward(out.loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            console.update(1)
            if step % args.logging_steps == 0 or step == 1:
                logs = {"train/loss": out.loss.item(), "train/lr": scheduler.get_last_lr()[0]}
                accelerator.log(logs, step=step)
                history.append({"step": step, **logs})
                console.update(0, loss=f"{logs['train/loss']:.4f}")
                console.log(f"step {step}/{total_steps}: loss {logs['train/loss']:.4f}")
            end_of_epoch = step % steps_per_epoch == 0
            if (step % args.eval_steps == 0) if args.eval_steps else end_of_epoch:
                stopped_early, validated_at = validate(), step
                train_mode()
            if stopped_early or step >= total_steps:
                break
    if validated_at != step:  # the steps since the last validation count too
        validate()
    console.close()
    if stopped_early:
        console.say(f"stopped early at step {step} of {total_steps}: validation {metric} did "
                    f"not improve for {args.early_stopping_patience} validations (best "
                    f"{best_value:.4f} at step {best_step}; --early_stopping_patience 0 "
                    "trains every step)")

    unwrapped = accelerator.unwrap_model(model)
    if best_state is None:
        console.say(f"validation {metric} was never defined; keeping the last weights")
        best_value, best_step = math.nan, step
    else:
        unwrapped.load_state_dict(best_state)
    prediction = predict(model, test_loader, accelerator, task, single_label)
    report_fn = segmentation_report if segmentation else classification_report
    report = report_fn(prediction["counts"] if segmentation else prediction["labels"],
                       *(() if segmentation else (prediction["scores"],)), splits.label_names,
                       num_resamples=args.bootstrap_resamples,
                       confidence=args.confidence_level, seed=args.seed) \
        if accelerator.is_main_process else {}
    report.update(split=splits.test_split, source=splits.test_source, loss=prediction["loss"])
    state = {"metric_for_best_model": metric, "best_metric": best_value, "best_step": best_step,
             "global_step": step, "stopped_early": stopped_early,
             "num_train_images": len(train_set), "num_validation_images": len(val_set),
             "hardware": describe_hardware(accelerator),
             "training_time_s": round(time.perf_counter() - started, 1)}
    if accelerator.is_main_process:
        with quiet_progress_bars():
            unwrapped.save_pretrained(output_dir)
        CAiDImageProcessor(size=image_size).save_pretrained(output_dir)
        for weights in output_dir.glob("model*.safetensors"):  # safetensors writes 0600
            os.chmod(weights, default_file_mode())
        (output_dir / f"{splits.test_split}_results.json").write_text(json.dumps(report, indent=2))
        (output_dir / "trainer_state.json").write_text(
            json.dumps({**state, "history": history}, indent=2))
        write_finetuned_card(output_dir, run, report, state)
        summary = ", ".join(f"{k} {v:.4f}" for k, v in report["metrics"].items()
                            if "/" not in k)
        images = step * batch_size * accelerator.num_processes
        console.summary(
            f"done: {step} steps in {format_duration(state['training_time_s'])} "
            f"({images / max(state['training_time_s'], 1e-9):.1f} images/s)",
            f"  best validation {metric} {best_value:.4f} at step {best_step} (its weights are "
            "the ones saved and tested)",
            f"  {splits.test_split} ({report['num_samples']} images): {summary}",
            f"  model -> {output_dir} ({splits.test_split}_results.json, trainer_state.json, "
            "README.md)")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    # the plain model: without the autocast wrapper Accelerate put around its forward
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    return FinetuneResult(model=unwrapped.cpu().eval(), output_dir=output_dir,
                          best_metric=best_value, best_step=best_step, global_step=step,
                          stopped_early=stopped_early, history=history, test_report=report)


def main(argv: list[str] | None = None, prog: str | None = None) -> FinetuneResult:
    """Entry point of ``caid-hf finetune`` and ``scripts/finetune.py``: ``[--config
    FILE.yaml] [--field value ...]``. Raises on errors (the command line turns a user's
    mistake into a message, see :func:`caid_hf.console.run_command`)."""
    return finetune(*parse_finetuning_args(argv, prog=prog))
