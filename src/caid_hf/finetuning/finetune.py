"""Fine-tune a CAiD backbone for classification or segmentation, with Accelerate.

The loop in :func:`finetune` reads top to bottom: :func:`setup_finetune` builds data,
model, optimizer and schedule; each batch goes through :func:`train_step` (forward,
backward, step), is logged, and at each epoch end (or every ``eval_steps``) the model is
validated, its weights kept in :class:`BestWeights` when they are the best so far, and
early stopping decided; then the best weights are tested with bootstrap intervals and
saved. Launch with
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
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader

from ..configuration_caid import CAiDConfig
from ..console import (
    RunConsole,
    describe_hardware,
    format_duration,
    quiet_loading,
    quiet_progress_bars,
)
from ..data.bad_files import BadFileLog
from ..data.patients import grouped_hold_out, patient_ids_of, take_patients
from ..data.source_spec import PHANTOM_SPECS, HFOptions
from ..image_processing_caid import CAiDImageProcessor
from ..model_settings import DEFAULT_IMAGE_SIZE
from ..modeling_caid import CAiDForImageClassification, CAiDForSemanticSegmentation
from ..runs import (
    build_lr_scheduler,
    default_file_mode,
    default_num_workers,
    lock_output_dir,
    make_accelerator,
    plain_model,
    prepare_output_dir,
    resolve_precision,
    run_record,
    start_run_records,
    write_run_state,
)
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
    collate_labelled,
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
    # images of CSV sources found missing when their tables were read: (image_id, reason)
    missing_images: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    rows_read: int = 0  # rows of the sources (each source once), missing images included


def build_splits(model_args: FinetuneModelArguments, data_args: FinetuneDataArguments,
                 seed: int) -> LabelledSplits:
    """Open the training, validation and test sources and pick their images.

    Without a validation source, phantoms get their own (phantom_seed + 1) and other sources
    hold out ``validation_fraction`` of the training images (seeded). Then
    ``label_fraction`` and ``max_train_samples`` shrink the training images (seeded). Both
    draw whole patients when the images have patient ids (``patient_id_from``, see
    :mod:`caid_hf.data.patients`), so no patient is on both sides. Without
    a test source, phantoms get their own (phantom_seed + 2), others report on validation.

    Images that CSV sources found missing (left out when their tables were read) are
    gathered in ``missing_images``, each with the file and line naming it.
    """
    segmentation = model_args.task == "segmentation"
    options = LabelledSourceOptions(
        task=model_args.task, images_root=data_args.images_root,
        masks_root=data_args.masks_root, image_column=data_args.image_column,
        label_columns=data_args.label_columns, mask_column=data_args.mask_column,
        label_names=data_args.label_names,
        hf=HFOptions(split=data_args.hf_split, config_name=data_args.hf_config_name),
        phantom_size=data_args.phantom_size, phantom_seed=data_args.phantom_seed,
        binary_masks=(model_args.num_labels or 1) == 1, label_format=data_args.label_format,
        uncertain_labels=data_args.uncertain_labels, blank_labels=data_args.blank_labels,
        views=data_args.views, view_column=data_args.view_column,
        metadata_csv=data_args.metadata_csv, patient_id_from=data_args.patient_id_from,
        bits_stored=data_args.bits_stored,
        accept_unknown_findings=data_args.accept_unknown_findings)

    def open_source(spec: str, num_phantoms: int, offset: int, split: str | None):
        options.num_phantoms = num_phantoms
        return labelled_source_from_spec(spec, options, split=split,
                                         phantom_seed_offset=offset)

    train = open_source(data_args.train_source, data_args.num_train_phantoms, 0, None)
    train_indices = list(range(len(train)))
    patients = patient_ids_of(train, data_args.patient_id_from, data_args.train_source)
    if data_args.validation_source is not None:
        validation = open_source(data_args.validation_source, data_args.num_validation_phantoms,
                                 1, data_args.hf_validation_split)
        validation_indices = list(range(len(validation)))
    elif data_args.train_source in PHANTOM_SPECS:
        validation = open_source(data_args.train_source, data_args.num_validation_phantoms, 1,
                                 None)
        validation_indices = list(range(len(validation)))
    else:
        train_indices, validation_indices = grouped_hold_out(
            len(train), data_args.validation_fraction, seed, patients,
            what=f"images in {data_args.train_source}")
        validation, validation_indices = train, sorted(validation_indices)
        train_indices = sorted(train_indices)
    train_indices = take_patients(train_indices, data_args.label_fraction, seed + 1, patients,
                                  data_args.max_train_samples)
    if data_args.test_source is not None:
        test = open_source(data_args.test_source, data_args.num_test_phantoms, 2,
                           data_args.hf_test_split)
        test_split, test_spec = "test", data_args.test_source
    elif data_args.train_source in PHANTOM_SPECS:
        test, test_split, test_spec = (open_source(data_args.train_source,
                                                   data_args.num_test_phantoms, 2, None),
                                       "test", f"{data_args.train_source} (held out)")
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
    sources = list({id(s): s for s in (train, validation, test)}.values())
    missing = [record for s in sources for record in getattr(s, "bad_images", [])]
    rows_read = sum(getattr(s, "rows_read", len(s)) for s in sources)
    return LabelledSplits(train, train_indices, validation, validation_indices, test,
                          test_indices, test_split, test_spec, list(names), missing, rows_read)


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
        settings.setdefault("image_size", DEFAULT_IMAGE_SIZE)
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


@torch.no_grad()
def predict(model, loader, accelerator, task: str, single_label: bool = False) -> dict:
    """Run ``model`` over ``loader`` (every process its shard) and gather per-image results.

    Batches of :func:`~caid_hf.finetuning.data.collate_labelled` carry ``readable``:
    unreadable images' stand-ins are left out of the scores and counts (N counts the
    readable images) and listed in ``"bad_files"``.

    Returns:
        ``{"loss": mean loss over the images, "num_images": N, "bad_files": [...]}`` plus,
        for classification,
        ``"scores"`` float32 [N, L] (sigmoid, or softmax for single-label) and ``"labels"``
        float32 [N, L] in {0, 1}; for segmentation ``"counts"`` int64 [N, C, 3] (TP, FP, FN
        per class; C = 2 for binary masks).
    """
    model.eval()
    config = accelerator.unwrap_model(model).config
    loss_sum, parts, bad_files = 0.0, [], []
    for batch in loader:
        readable = batch.pop("readable", None)
        bad_files.extend(batch.pop("bad_files", ()))
        out = model(**batch)
        n = batch["pixel_values"].shape[0]
        loss_sum += out.loss.item() * n
        logits = out.logits.float()
        if readable is not None and not bool(readable.all()):
            # an unreadable image's stand-in counts in no metric (nor, where the labels
            # can say so, in the loss)
            logits, batch = logits[readable], {k: v[readable] for k, v in batch.items()}
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
    gathered = gather_object([(loss_sum, parts, bad_files)]) if accelerator.num_processes > 1 \
        else [(loss_sum, parts, bad_files)]
    parts = [p for _, process_parts, _ in gathered for p in process_parts]
    total_loss = sum(loss for loss, _, _ in gathered)
    bad_files = [record for _, _, process_bad in gathered for record in process_bad]
    if task == "classification":
        result = {"scores": np.concatenate([s for s, _ in parts]),
                  "labels": np.concatenate([y for _, y in parts])}
        n = len(result["scores"])
    else:
        result = {"counts": np.concatenate(parts)}
        n = len(result["counts"])
    result.update(loss=total_loss / max(n + len(bad_files), 1), num_images=n,
                  bad_files=bad_files)
    return result


def compute_metrics(prediction: dict, label_names: list[str]) -> dict[str, float]:
    """Point metrics of :func:`predict`'s output plus its ``loss``."""
    if "scores" in prediction:
        metrics = classification_metrics(prediction["labels"], prediction["scores"], label_names)
    else:
        metrics = segmentation_metrics(prediction["counts"], label_names)
    return {"loss": prediction["loss"], **metrics}


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


@dataclasses.dataclass
class FinetuneRun:
    """Everything one process's fine-tuning run works with, built by :func:`setup_finetune`."""

    model_args: FinetuneModelArguments
    args: FinetuningArguments
    output_dir: Path
    accelerator: Any
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    splits: LabelledSplits
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader
    num_train: int
    num_validation: int
    batch_size: int
    metric: str
    total_steps: int
    min_steps: int  # validations before it do not count towards early stopping
    run: dict  # the arguments, as run_config.yaml holds them
    console: RunConsole
    bad_files: BadFileLog | None = None  # unreadable images met, <output_dir>/bad_files.tsv
    history: list = dataclasses.field(default_factory=list)  # every logged value, by step
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def segmentation(self) -> bool:
        return self.model_args.task == "segmentation"

    @property
    def single_label(self) -> bool:
        return (not self.segmentation
                and self.model_args.problem_type == "single_label_classification")


@dataclasses.dataclass
class BestWeights:
    """The best validation value so far, its step and its weights (copied to the CPU), and
    how many validations since have not improved on it by more than ``margin``."""

    higher_is_better: bool
    margin: float = 0.0
    value: float | None = None
    step: int = 0
    state: dict | None = None
    since: int = 0

    def offer(self, value: float, step: int, model, counts: bool = True) -> bool:
        """Keep ``model``'s weights when ``value`` improves on the best; otherwise count a
        validation without improvement (when ``counts``). Returns whether it improved."""
        improved = math.isfinite(value) and (
            self.value is None or (value > self.value + self.margin if self.higher_is_better
                                   else value < self.value - self.margin))
        if improved:
            self.value, self.step, self.since = value, step, 0
            self.state = {k: v.detach().to("cpu", copy=True)
                          for k, v in model.state_dict().items()}
        elif counts:
            self.since += 1
        return improved


def choose_metric(model_args: FinetuneModelArguments, args: FinetuningArguments) -> str:
    """``metric_for_best_model``, defaulting to Dice (segmentation) or mean AUC; refused
    when it does not fit the task."""
    task, segmentation = model_args.task, model_args.task == "segmentation"
    single_label = not segmentation and model_args.problem_type == "single_label_classification"
    metric = args.metric_for_best_model or ("dice" if segmentation else "mean_auc")
    if ((metric in ("dice", "iou")) != segmentation and metric != "loss") or \
            (metric == "accuracy" and not single_label):
        raise ValueError(f"metric_for_best_model={metric!r} does not fit task={task!r}"
                         + ("" if segmentation else f", problem_type={model_args.problem_type!r}"))
    return metric


def build_datasets(model_args, data_args, splits: LabelledSplits, config,
                   report_bad_images: bool = False) -> tuple:
    """(train, validation, test) datasets of the task at the model's image size;
    ``report_bad_images``: unreadable images become stand-ins the loss and the metrics leave
    out (batch them with :func:`~caid_hf.finetuning.data.collate_labelled`)."""
    segmentation = model_args.task == "segmentation"
    single_label = not segmentation and model_args.problem_type == "single_label_classification"

    def dataset(source, indices, train=False):
        options = {"train": train, "indices": indices, "crop_scale_min": data_args.crop_scale_min,
                   "horizontal_flip": data_args.horizontal_flip,
                   "report_bad_images": report_bad_images}
        if segmentation:
            return SegmentationDataset(source, config.image_size, config.num_labels,
                                       ignore_index=config.semantic_loss_ignore_index, **options)
        return ClassificationDataset(source, config.image_size, single_label, **options)

    return (dataset(splits.train, splits.train_indices, train=True),
            dataset(splits.validation, splits.validation_indices),
            dataset(splits.test, splits.test_indices))


def build_optimizer(model, args: FinetuningArguments) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    return torch.optim.SGD(params, lr=args.learning_rate, momentum=0.9,
                           weight_decay=args.weight_decay)


def setup_finetune(model_args: FinetuneModelArguments, data_args: FinetuneDataArguments,
                   args: FinetuningArguments, cleanup: contextlib.ExitStack,
                   splits: LabelledSplits | None = None) -> FinetuneRun:
    """Check the arguments, take the output folder, build data, model, optimizer and
    schedule, write run_config.yaml and start the trackers. ``splits`` (default: drawn by
    :func:`build_splits` from ``data_args``) are the images to train, validate and test on."""
    # 'auto' is decided first, so run_config.yaml and the model card say what ran
    args.mixed_precision = resolve_precision(args.mixed_precision, args.use_cpu)
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args, output_dir)
    lock_output_dir(accelerator, output_dir, cleanup)
    prepare_output_dir(output_dir, list(_MODEL_FILES), args.overwrite_output_dir, False,
                       accelerator, what="a model")
    set_seed(args.seed)
    metric = choose_metric(model_args, args)
    if splits is None:
        splits = build_splits(model_args, data_args, args.seed)
    bad_files = open_bad_file_log(splits, data_args, output_dir, accelerator)
    model = build_model(model_args, splits.label_names)
    train_set, val_set, test_set = build_datasets(model_args, data_args, splits, model.config,
                                                  report_bad_images=True)
    workers = (args.dataloader_num_workers if args.dataloader_num_workers is not None
               else default_num_workers())
    loader_kwargs = {"num_workers": workers, "persistent_workers": workers > 0,
                     "pin_memory": accelerator.device.type == "cuda",
                     "collate_fn": collate_labelled}
    batch_size = min(args.per_device_train_batch_size, len(train_set))  # few labels: one batch
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(args.seed), **loader_kwargs)
    eval_batch = args.per_device_eval_batch_size or args.per_device_train_batch_size
    val_loader = DataLoader(val_set, batch_size=eval_batch, **loader_kwargs)
    test_loader = DataLoader(test_set, batch_size=eval_batch, **loader_kwargs)
    optimizer = build_optimizer(model, args)
    model, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader, test_loader)
    total_steps = (args.max_steps if args.max_steps > 0
                   else args.num_train_epochs * len(train_loader))
    scheduler = build_lr_scheduler(optimizer, args.lr_scheduler_type, args.warmup_steps,
                                   total_steps)
    run = run_record(model_args, data_args, args)
    start_run_records(accelerator, output_dir, run, args.report_to)
    min_steps = (args.early_stopping_min_steps if args.early_stopping_min_steps >= 0
                 else total_steps // 2)
    return FinetuneRun(model_args=model_args, args=args, output_dir=output_dir,
                       accelerator=accelerator, model=model, optimizer=optimizer,
                       scheduler=scheduler, splits=splits, train_loader=train_loader,
                       val_loader=val_loader, test_loader=test_loader, num_train=len(train_set),
                       num_validation=len(val_set), batch_size=batch_size, metric=metric,
                       total_steps=total_steps, min_steps=min_steps, run=run,
                       console=RunConsole(enabled=accelerator.is_main_process),
                       bad_files=bad_files)


_REMEDY = ("Fix the paths (images_root?) or the files, remove their rows, or raise "
           "max_bad_fraction.")


def open_bad_file_log(splits: LabelledSplits, data_args: FinetuneDataArguments,
                      output_dir: Path, accelerator) -> BadFileLog:
    """The run's log of unreadable images (``<output_dir>/bad_files.tsv``, written by the
    main process), holding the images found missing when the tables were read; stops
    the run when they are more than ``max_bad_fraction`` of the rows read."""
    sources = {id(s): s for s in (splits.train, splits.validation, splits.test)}.values()
    total = splits.rows_read or sum(len(s) for s in sources)
    log = BadFileLog(output_dir / "bad_files.tsv" if accelerator.is_main_process else None,
                     total, data_args.max_bad_fraction, remedy=_REMEDY)
    new = log.add(splits.missing_images)
    if new:
        examples = "; ".join(reason for _, reason in new[:3])
        accelerator.print(f"{len(new)} listed image(s) not found, left out ({examples}"
                          f"{' …' if len(new) > 3 else ''}); all of them are in "
                          f"{output_dir / 'bad_files.tsv'}")
    log.check()
    return log


def report_bad_files(ft: FinetuneRun, records=()) -> None:
    """Add the unreadable images ``records`` (every process's, so call it on all processes
    alike) to ``bad_files.tsv``, say each once, and stop the run when they are more than
    ``max_bad_fraction`` of the images."""
    new = list(records)
    if ft.accelerator.num_processes > 1:
        new = gather_object(new)
    for image_id, reason in ft.bad_files.add(new):
        ft.console.say(f"skipped unreadable image {image_id}: {reason}")
    ft.bad_files.check()


def show_header(ft: FinetuneRun) -> None:
    args, config = ft.args, ft.accelerator.unwrap_model(ft.model).config
    stopping_rule = (f", early stopping after {args.early_stopping_patience} validations "
                     f"without improvement from step {ft.min_steps} on"
                     if args.early_stopping_patience else "")
    ft.console.header(
        f"fine-tuning ({ft.model_args.task}: {', '.join(ft.splits.label_names)}) from "
        f"{ft.model_args.init_from}, {config.encoder_name} at {config.image_size} px -> "
        f"{ft.output_dir}",
        f"  data: {ft.num_train} train / {ft.num_validation} validation / "
        f"{len(ft.test_loader.dataset)} {ft.splits.test_split} images",
        f"  plan: {ft.total_steps} steps of batch {ft.batch_size * ft.accelerator.num_processes}, "
        f"best model by validation {ft.metric}{stopping_rule}",
        f"  on {describe_hardware(ft.accelerator)}")
    ft.console.bar(ft.total_steps, desc="fine-tuning")


def validate(ft: FinetuneRun, step: int) -> dict[str, float]:
    """The validation metrics at ``step``, logged (trackers and history)."""
    prediction = predict(ft.model, ft.val_loader, ft.accelerator, ft.model_args.task,
                         ft.single_label)
    report_bad_files(ft, prediction["bad_files"])
    metrics = compute_metrics(prediction, ft.splits.label_names)
    logs = {f"val/{k}": v for k, v in metrics.items()}
    ft.accelerator.log(logs, step=step)
    ft.history.append({"step": step, **logs})
    return metrics


def validate_and_keep_best(ft: FinetuneRun, step: int, best: BestWeights) -> None:
    """Validate, offer the weights to ``best`` (validations before ``min_steps`` do not
    count towards early stopping) and print one line."""
    metrics = validate(ft, step)
    improved = best.offer(metrics[ft.metric], step, ft.accelerator.unwrap_model(ft.model),
                          counts=step >= ft.min_steps)
    ft.console.say(f"step {step}: validation {ft.metric} {metrics[ft.metric]:.4f}"
                   f"{' (best)' if improved else ''}, loss {metrics['loss']:.4f}")


def train_mode(ft: FinetuneRun) -> None:
    ft.model.train()
    if ft.model_args.freeze_encoder:  # keep the loaded BatchNorm statistics
        ft.accelerator.unwrap_model(ft.model).caid.encoder.eval()


def train_step(ft: FinetuneRun, batch: dict) -> tuple[torch.Tensor, list]:
    """Forward, backward, optimizer and schedule step; returns the loss and the batch's
    unreadable images."""
    batch.pop("readable", None)
    bad_files = batch.pop("bad_files", [])
    out = ft.model(**batch)
    ft.accelerator.backward(out.loss)
    ft.optimizer.step()
    ft.scheduler.step()
    ft.optimizer.zero_grad(set_to_none=True)
    return out.loss, bad_files


def log_step(ft: FinetuneRun, step: int, loss: torch.Tensor) -> None:
    logs = {"train/loss": loss.item(), "train/lr": ft.scheduler.get_last_lr()[0]}
    ft.accelerator.log(logs, step=step)
    ft.history.append({"step": step, **logs})
    ft.console.update(0, loss=f"{logs['train/loss']:.4f}")
    ft.console.log(f"step {step}/{ft.total_steps}: loss {logs['train/loss']:.4f}")


def validation_due(ft: FinetuneRun, step: int) -> bool:
    """Every ``eval_steps``, or at each epoch's end when it is 0."""
    period = ft.args.eval_steps or len(ft.train_loader)
    return step % period == 0


def test_best_model(ft: FinetuneRun, best: BestWeights) -> dict:
    """Put the best weights back and report the test set, with bootstrap intervals (main
    process; the others return an empty report)."""
    if best.state is not None:
        ft.accelerator.unwrap_model(ft.model).load_state_dict(best.state)
    prediction = predict(ft.model, ft.test_loader, ft.accelerator, ft.model_args.task,
                         ft.single_label)
    report_bad_files(ft, prediction["bad_files"])
    report = {}
    if ft.accelerator.is_main_process:
        options = {"num_resamples": ft.args.bootstrap_resamples,
                   "confidence": ft.args.confidence_level, "seed": ft.args.seed}
        if ft.segmentation:
            report = segmentation_report(prediction["counts"], ft.splits.label_names, **options)
        else:
            report = classification_report(prediction["labels"], prediction["scores"],
                                           ft.splits.label_names, **options)
    report.update(split=ft.splits.test_split, source=ft.splits.test_source,
                  loss=prediction["loss"])
    return report


def save_model(ft: FinetuneRun, report: dict, state: dict) -> None:
    """The model folder (main process): weights, processor, test results, trainer state,
    model card, and the closing summary."""
    output_dir, unwrapped = ft.output_dir, ft.accelerator.unwrap_model(ft.model)
    with quiet_progress_bars():
        unwrapped.save_pretrained(output_dir)
    CAiDImageProcessor(size=unwrapped.config.image_size,
                       bits_stored=ft.run["data"].get("bits_stored")).save_pretrained(output_dir)
    for weights in output_dir.glob("model*.safetensors"):  # safetensors writes 0600
        os.chmod(weights, default_file_mode())
    split = ft.splits.test_split
    (output_dir / f"{split}_results.json").write_text(json.dumps(report, indent=2))
    facts = {k: v for k, v in state.items()
             if k not in ("global_step", "metric_for_best_model", "best_metric", "best_step")}
    write_run_state(output_dir, state["global_step"], ft.metric, state["best_metric"],
                    state["best_step"], facts, ft.history)
    write_finetuned_card(output_dir, ft.run, report, state)
    summary = ", ".join(f"{k} {v:.4f}" for k, v in report["metrics"].items() if "/" not in k)
    images = state["global_step"] * ft.batch_size * ft.accelerator.num_processes
    ft.console.summary(
        f"done: {state['global_step']} steps in {format_duration(state['training_time_s'])} "
        f"({images / max(state['training_time_s'], 1e-9):.1f} images/s)",
        f"  best validation {ft.metric} {state['best_metric']:.4f} at step "
        f"{state['best_step']} (its "
        "weights are the ones saved and tested)",
        f"  {split} ({report['num_samples']} images): {summary}",
        f"  model -> {output_dir} ({split}_results.json, trainer_state.json, README.md)")


def finetune(model_args: FinetuneModelArguments, data_args: FinetuneDataArguments,
             args: FinetuningArguments, splits: LabelledSplits | None = None
             ) -> FinetuneResult:
    """Fine-tune with the given arguments (see :mod:`.arguments`); returns the result and
    writes the model folder to ``args.output_dir``. ``splits`` fixes the train, validation
    and test images (e.g. one labelled subset shared by several backbones); by default they
    are drawn from ``data_args`` by :func:`build_splits`."""
    with contextlib.ExitStack() as cleanup:
        ft = setup_finetune(model_args, data_args, args, cleanup, splits)
        show_header(ft)
        best = BestWeights(higher_is_better=METRICS[ft.metric],
                           margin=args.early_stopping_threshold)
        patience, step, validated_at, stopped_early = args.early_stopping_patience, 0, -1, False
        unreported = []  # unreadable training images not yet reported
        train_mode(ft)
        while step < ft.total_steps and not stopped_early:
            for batch in ft.train_loader:
                loss, bad_files = train_step(ft, batch)  # forward, backward, step, schedule
                unreported += bad_files
                step += 1
                ft.console.update(1)
                if step % args.logging_steps == 0 or step == 1:
                    log_step(ft, step, loss)
                    report_bad_files(ft, unreported)
                    unreported = []
                if validation_due(ft, step):
                    report_bad_files(ft, unreported)
                    unreported = []
                    validate_and_keep_best(ft, step, best)
                    validated_at, stopped_early = step, bool(patience) and best.since >= patience
                    train_mode(ft)
                if stopped_early or step >= ft.total_steps:
                    break
        report_bad_files(ft, unreported)
        if validated_at != step:  # the steps since the last validation count too
            validate_and_keep_best(ft, step, best)
        ft.console.close()
        if best.state is None:
            ft.console.say(f"validation {ft.metric} was never defined; keeping the last weights")
            best.value, best.step = math.nan, step
        if stopped_early:
            ft.console.say(f"stopped early at step {step} of {ft.total_steps}: validation "
                           f"{ft.metric} did not improve for {patience} validations (best "
                           f"{best.value:.4f} at step {best.step}; --early_stopping_patience 0 "
                           "trains every step)")
        report = test_best_model(ft, best)
        state = {"metric_for_best_model": ft.metric, "best_metric": best.value,
                 "best_step": best.step, "global_step": step,
                 "stopped_early": stopped_early, "num_train_images": ft.num_train,
                 "num_validation_images": ft.num_validation,
                 "bad_files": len(ft.bad_files),
                 "hardware": describe_hardware(ft.accelerator),
                 "training_time_s": round(time.perf_counter() - ft.started, 1)}
        if ft.accelerator.is_main_process:
            save_model(ft, report, state)
        ft.accelerator.wait_for_everyone()
        ft.accelerator.end_training()
        # the plain model: without the autocast wrapper Accelerate put around its forward
        unwrapped = plain_model(ft.accelerator, ft.model)
        return FinetuneResult(model=unwrapped.cpu().eval(), output_dir=ft.output_dir,
                              best_metric=best.value, best_step=best.step,
                              global_step=step, stopped_early=stopped_early,
                              history=ft.history, test_report=report)


def main(argv: list[str] | None = None, prog: str | None = None) -> FinetuneResult:
    """Entry point of ``caid-hf finetune`` and ``scripts/finetune.py``: ``[--config
    FILE.yaml] [--field value ...]``. Raises on errors (the command line turns a user's
    mistake into a message, see :func:`caid_hf.console.run_command`)."""
    return finetune(*parse_finetuning_args(argv, prog=prog))
