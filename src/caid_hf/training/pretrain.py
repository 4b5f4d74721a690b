"""CAiD pre-training with Accelerate: one CPU, one GPU or many nodes, same code.

Flat loop, top to bottom: prepare, loop, augment, forward, backward, step, log,
validate, save. Launch with ``accelerate launch scripts/pretrain.py --config FILE``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
import yaml
from accelerate.utils import (
    gather_object,
    set_seed,
)
from torch.utils.data import DataLoader, IterableDataset
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from ..configuration_caid import CAiDConfig
from ..console import (
    RunConsole,
    describe_hardware,
    format_duration,
    quiet_loading,
    quiet_progress_bars,
)
from ..data.augment import AugmentationConfig, ViewAugmenter
from ..data.bad_files import BadFileLog
from ..data.crops import SkipBadImages, TwoCropDataset, collate_crops
from ..data.hf_sources import HFStreamingSource
from ..data.source_spec import (
    PHANTOMS,
    HFOptions,
    hold_out,
    is_hf_spec,
    open_hf_spec,
    source_from_spec,
)
from ..data.streaming import StreamingTwoCrops, take_head
from ..image_processing_caid import CAiDImageProcessor
from ..model_card import build_model_card, write_model_card
from ..modeling_caid import CAiDForPreTraining
from ..publishing import push_folder
from . import performance
from .arguments import DataArguments, PretrainingArguments, parse_pretraining_args
from .checkpointing import (
    TrainState,
    atomic_file,
    atomic_folder,
    latest_checkpoint,
    load_checkpoint,
    lock_output_dir,
    resumable_checkpoint,
    save_checkpoint,
)
from .preemption import PREEMPTED_EXIT_CODE, PreemptionHandler, TrainingPreempted


def build_datasets(data_args: DataArguments, image_size: int, seed: int, accelerator=None):
    """(train, validation) datasets of ``(crops, bad_files)`` items (:class:`SkipBadImages`).

    Training crops are drawn per image and epoch from ``(seed, epoch, index)`` (call
    ``set_epoch`` on the training set), so they do not depend on workers or on resuming;
    validation crops are fixed per image, so every epoch is measured on the same views.
    With ``data_args.streaming`` the training set is a :class:`StreamingTwoCrops` reading
    this process's part of the stream.
    """
    scale = (data_args.crop_scale_min, data_args.crop_scale_max)
    hf_options = HFOptions(split=data_args.hf_split, config_name=data_args.hf_config_name,
                           image_column=data_args.image_column, id_column=data_args.id_column)

    def crops(source, fixed: bool = False):
        return SkipBadImages(TwoCropDataset(source, image_size, scale=scale, seed=seed,
                                            per_epoch=not fixed,
                                            reducing_gap=data_args.crop_reducing_gap))

    def source(spec, num_phantoms, phantom_seed):
        return source_from_spec(spec, data_args.images_root, num_phantoms,
                                data_args.phantom_size, phantom_seed, hf_options)

    if data_args.streaming:
        return build_streaming_datasets(data_args, image_size, seed, hf_options, crops, source,
                                        accelerator)
    train_source = source(data_args.train_source, data_args.num_train_phantoms, seed)
    if data_args.validation_source is not None:
        val_source = source(data_args.validation_source, data_args.num_validation_phantoms, seed + 1)
        return crops(train_source), crops(val_source, fixed=True)
    if data_args.train_source == PHANTOMS:  # held-out phantoms come from another seed
        val_source = source(PHANTOMS, data_args.num_validation_phantoms, seed + 1)
        return crops(train_source), crops(val_source, fixed=True)
    return hold_out(crops(train_source), crops(train_source, fixed=True),
                    data_args.validation_fraction, seed)


def build_streaming_datasets(data_args, image_size, seed, hf_options, crops, source, accelerator):
    """A streaming training set (this process's part) and a map-style validation set: the
    validation_source, or the stream's first ``streaming_validation_images`` images."""
    if not is_hf_spec(data_args.train_source):
        raise ValueError(f"streaming=true needs a Hugging Face train_source ('hf:NAME', a "
                         f"parquet/arrow file or a saved dataset), got {data_args.train_source!r}")
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1

    def stream(rank: int, world: int) -> HFStreamingSource:
        dataset = open_hf_spec(data_args.train_source, data_args.images_root, hf_options,
                               streaming=True)
        return HFStreamingSource(dataset, image_column=hf_options.image_column,
                                 id_column=hf_options.id_column, rank=rank, world_size=world,
                                 shuffle_buffer=data_args.streaming_shuffle_buffer, seed=seed,
                                 name=data_args.train_source)

    exclude: frozenset[str] = frozenset()
    if data_args.validation_source is not None:
        val_set = crops(source(data_args.validation_source, data_args.num_validation_phantoms,
                               seed + 1), fixed=True)
    else:  # the same head on every process: read unsplit, in stored order
        head = take_head(stream(0, 1), data_args.streaming_validation_images)
        exclude = frozenset(head.ids)
        val_set = crops(head, fixed=True)
    train_set = StreamingTwoCrops(
        stream(rank, world), image_size, (data_args.crop_scale_min, data_args.crop_scale_max),
        seed=seed, reducing_gap=data_args.crop_reducing_gap, exclude=exclude)
    return train_set, val_set


def default_num_workers(local_processes: int) -> int:
    """Decode/crop workers per training process: this machine's usable cores shared by the
    local training processes, one core each left to the training process itself (1 to 8)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // max(1, local_processes) - 1))


def build_loaders(train_set, val_set, args: PretrainingArguments, accelerator):
    """DataLoaders of ``{"crops": uint8 [B, 2, S, S], "bad_files": [...]}`` batches.

    Grey uint8 crops travel to the device (4x smaller than float RGB); workers persist
    across epochs and prefetch; batches are page-locked on a GPU. Worker RNGs derive from
    the run's seed (``seed_worker``), though the crops themselves are seeded per image.
    """
    workers = args.dataloader_num_workers
    if workers is None:
        workers = default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE",
                                                         accelerator.num_processes)))
    kwargs = {"num_workers": workers, "collate_fn": collate_crops,
              "pin_memory": accelerator.device.type == "cuda" and args.dataloader_pin_memory}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=args.dataloader_prefetch_factor,
                      worker_init_fn=seed_worker)
    if isinstance(train_set, IterableDataset):  # a stream, already split per process
        train_loader = DataLoader(train_set, batch_size=args.per_device_train_batch_size,
                                  drop_last=True, **kwargs)
    else:
        train_loader = DataLoader(train_set, batch_size=args.per_device_train_batch_size,
                                  shuffle=True, drop_last=True,
                                  generator=torch.Generator().manual_seed(args.seed), **kwargs)
    val_loader = DataLoader(val_set, batch_size=args.per_device_eval_batch_size
                            or args.per_device_train_batch_size,
                            generator=torch.Generator().manual_seed(args.seed), **kwargs)
    if not isinstance(train_set, IterableDataset) and len(train_loader) == 0:
        raise ValueError(
            f"{len(train_set)} training images make no full batch of "
            f"per_device_train_batch_size={args.per_device_train_batch_size}"
        )
    return train_loader, val_loader, workers


def seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's RNGs in a DataLoader worker from torch's per-worker seed
    (itself derived from the loader's seeded generator), for sources that use them."""
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def crop_datasets(dataset):
    """The dataset whose ``set_epoch`` picks the crops: the :class:`TwoCropDataset` inside a
    training set (through Subset / SkipBadImages), or the :class:`StreamingTwoCrops`."""
    while not isinstance(dataset, (TwoCropDataset, StreamingTwoCrops)):
        dataset = dataset.dataset
    return dataset


def synced_batches(loader, accelerator, streaming: bool):
    """The loader's batches; for a stream, the epoch ends for every process as soon as one
    process runs out (one tiny all-reduce per step), so all take the same number of steps."""
    if not streaming or accelerator.num_processes == 1:
        yield from loader
        return
    iterator = iter(loader)
    while True:
        batch = next(iterator, None)
        finished = torch.tensor(float(batch is None), device=accelerator.device)
        if accelerator.reduce(finished, reduction="sum").item() > 0:
            return
        yield batch


def prepare_output_dir(output_dir: Path, args: PretrainingArguments, accelerator) -> None:
    """Refuse to mix two runs in one folder; clear it only when asked to."""
    previous = [output_dir / name for name in ("checkpoints", "best", "final")
                if (output_dir / name).exists()]
    if not previous or args.resume_from_checkpoint:
        return
    if not args.overwrite_output_dir:
        raise FileExistsError(
            f"output_dir {output_dir} already holds a run ({', '.join(p.name for p in previous)}); "
            "continue it with --resume_from_checkpoint latest, choose another --output_dir, or "
            "pass --overwrite_output_dir true to delete it"
        )
    if accelerator.is_main_process:
        for path in previous:
            shutil.rmtree(path)
    accelerator.wait_for_everyone()


def check_init_from_architecture(init_from: str, config: CAiDConfig) -> None:
    """The run's architecture must be the checkpoint's, or loading would half-succeed."""
    saved = CAiDConfig.from_pretrained(init_from)
    fields = ["encoder_name", "encoder_depth", "decoder_channels", "in_channels"]
    if "CAiDForPreTraining" in (saved.architectures or []):  # the objective is loaded too
        fields += [name for name in config.objective_fields() if name not in fields]
        if saved.discrimination_method != config.discrimination_method:
            fields = ["discrimination_method"]
    for name in fields:
        if getattr(saved, name) != getattr(config, name):
            raise ValueError(
                f"--init_from {init_from} has {name}={getattr(saved, name)!r} but this run asks "
                f"for {name}={getattr(config, name)!r}; drop the override or start from scratch"
            )


def check_run_config(config: CAiDConfig, args: PretrainingArguments, num_processes: int,
                     data_args: DataArguments | None = None) -> None:
    """Refuse configurations that would fail or silently misbehave, before any compute."""
    if data_args is not None and data_args.streaming and args.max_steps <= 0:
        raise ValueError("streaming=true: a stream has no known length, so set max_steps "
                         "(the number of optimizer steps to train)")
    batch = args.per_device_train_batch_size
    if batch < 2:
        raise ValueError(
            f"per_device_train_batch_size={batch} is too small: BatchNorm needs at least 2 "
            "images per process (and instance discrimination more than one image)"
        )
    splits = config.shuffle_bn_splits
    if config.discrimination_method == "moco_v2" and num_processes == 1 and batch % splits:
        raise ValueError(
            f"shuffle_bn_splits={splits} must divide per_device_train_batch_size={batch}: "
            "one process emulates shuffle-BN by encoding the batch in that many equal parts"
        )
    global_batch = batch * num_processes
    if config.discrimination_method == "moco_v2" and config.queue_size % global_batch:
        raise ValueError(
            f"queue_size={config.queue_size} must be divisible by the global batch size "
            f"per_device_train_batch_size × processes = {global_batch}"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and num_processes == 1:
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but no process group formed: every process "
            "would train alone. On CPU-only machines launch with ACCELERATE_USE_CPU=true "
            "(or --use_cpu true)."
        )


@torch.no_grad()
def evaluate(model, loader, augmentation: AugmentationConfig, seed: int, config: CAiDConfig,
             accelerator, bad_files: list | None = None, pictures: list | None = None) -> dict:
    """Mean validation losses over the whole loader, with the same views every epoch.

    Runs the unwrapped model (no DDP collectives, so processes may see uneven batches) in
    eval mode: no momentum update, no enqueue, BatchNorm running statistics. Batches of one
    image are left out (Barlow Twins standardises over the batch). ``val/embedding_std`` is
    the image-weighted mean of the batches' collapse indicators. Unreadable images met are
    appended to ``bad_files``. In CAiD mode, ``pictures`` (when given) receives the first
    batch's (distorted input, reconstruction, target) triple, each [b, 1, S, S] on the CPU:
    the same images and views at every evaluation.
    """
    model = accelerator.unwrap_model(model).eval()
    both = config.context_prediction and config.reconstruct_views == "both"
    augment = ViewAugmenter(augmentation, config.context_prediction, seed=seed, key_target=both)
    # sums of: loss, discrimination loss, reconstruction loss, positive-key hits (MoCo),
    # embedding std; image count
    totals = torch.zeros(6, device=accelerator.device)
    for batch in loader:
        crops = batch["crops"]
        if bad_files is not None:
            bad_files.extend(batch["bad_files"])
        n = crops.shape[0]
        if n < 2:
            continue
        views = augment(crops)
        out = model(views.query, views.key, labels=views.target, key_labels=views.key_target)
        if pictures is not None and not pictures and out.reconstruction is not None:
            pictures.append(tuple(t[:8, :1].float().cpu() for t in
                                  (views.query, out.reconstruction, views.target)))
        zero = torch.zeros((), device=totals.device)
        rec = out.reconstruction_loss if out.reconstruction_loss is not None else zero
        hits = (out.logits.argmax(dim=1) == 0).sum() if out.logits is not None else zero
        totals += torch.stack([out.loss.detach() * n, out.discrimination_loss.detach() * n,
                               rec.to(totals.device) * n, hits.to(totals.dtype),
                               out.embedding_std.to(totals.device) * n,
                               torch.tensor(float(n), device=totals.device)])
    totals = accelerator.reduce(totals, reduction="sum")
    model.train()
    n = totals[5].clamp(min=1)
    metrics = {"val/loss": (totals[0] / n).item(),
               "val/discrimination_loss": (totals[1] / n).item(),
               "val/embedding_std": (totals[4] / n).item()}
    if config.discrimination_method == "moco_v2":
        metrics["val/contrastive_loss"] = metrics["val/discrimination_loss"]
        metrics["val/contrastive_accuracy"] = (totals[3] / n).item()
    if config.context_prediction:
        metrics["val/reconstruction_loss"] = (totals[2] / n).item()
    return metrics


def timed(iterable, seconds: list[float]):
    """Yield from ``iterable``, adding the time spent waiting for each item to ``seconds[0]``
    (the training loop's data wait: ≈ 0 when the loader keeps up with the device)."""
    iterator = iter(iterable)
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        finally:
            seconds[0] += time.perf_counter() - start
        yield item


def _constant_one(step: int) -> float:
    return 1.0


def build_lr_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int,
                       total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule of every parameter group: linear warm-up then cosine decay to 0
    (``kind="cosine"``) or constant; groups marked ``fix_lr`` (SimSiam's predictor, see
    :meth:`~caid_hf.CAiDForPreTraining.optimizer_param_groups`) keep their initial rate."""
    if kind == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup_steps)
    for i, group in enumerate(optimizer.param_groups):
        if group.get("fix_lr"):
            scheduler.lr_lambdas[i] = _constant_one
            group["lr"] = group["initial_lr"]
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return scheduler


def step_flags(model, loss: torch.Tensor, accelerator, stop_requested: bool) -> tuple[bool, bool]:
    """(update is finite, stop was requested) for the optimizer step about to be taken,
    agreed by every process through one all-reduce of two numbers.

    Finite means: this step's loss and every gradient are finite. Under fp16 the gradient
    scaler already skips steps with overflowing gradients (and must see them to lower its
    scale), so only the loss is checked then.
    """
    bad = (~torch.isfinite(loss.detach())).float().reshape(())
    if accelerator.scaler is None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads:
            norms = torch.stack(torch._foreach_norm(grads))
            bad = bad + (~torch.isfinite(norms)).any().float()
    flags = torch.stack([bad.to(accelerator.device),
                         torch.tensor(float(stop_requested), device=accelerator.device)])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    flags = flags.tolist()
    return flags[0] == 0, flags[1] > 0


GRID_COLUMNS = ("distorted input", "reconstruction", "target")
GRID_MIN_TILE = 128  # px: smaller views are enlarged (nearest) so the grid reads at a glance
GRID_LABEL_HEIGHT = 20  # px of the column-label band above the tiles


def save_reconstruction_grid(triple: tuple[torch.Tensor, torch.Tensor, torch.Tensor], path: Path,
                             accelerator=None, step: int | None = None) -> torch.Tensor:
    """One row per image: distorted input | reconstruction | target (each [b, 1, S, S] in
    [0, 1]) under a band naming the columns, written as a PNG and, when a TensorBoard
    tracker runs, as the image ``val/reconstructions``. Views smaller than
    :data:`GRID_MIN_TILE` px are enlarged by a whole factor with nearest-neighbour sampling
    (each pixel a block, nothing smoothed away). Returns the picture, float [3, H, W] in
    [0, 1]."""
    import numpy as np
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    factor = max(1, math.ceil(GRID_MIN_TILE / triple[0].shape[-1]))
    inputs, reconstructions, targets = (
        torch.nn.functional.interpolate(t.float().clamp(0, 1), scale_factor=factor,
                                        mode="nearest") for t in triple)
    rows = torch.stack([inputs, reconstructions, targets], dim=1).flatten(0, 1)
    padding = 2
    grid = make_grid(rows, nrow=3, padding=padding, pad_value=1.0)
    tiles = (grid[0].mul(255).round().byte().numpy())
    picture = Image.new("L", (tiles.shape[1], tiles.shape[0] + GRID_LABEL_HEIGHT), 255)
    picture.paste(Image.fromarray(tiles), (0, GRID_LABEL_HEIGHT))
    draw = ImageDraw.Draw(picture)
    tile = inputs.shape[-1]
    for column, label in enumerate(GRID_COLUMNS):
        centre = padding + column * (tile + padding) + tile / 2
        draw.text((centre, GRID_LABEL_HEIGHT / 2), label, fill=0, anchor="mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    image = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).expand(3, -1, -1)
    if accelerator is not None:
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"val/reconstructions": image[None]}, step=step)
    return image


def run_probe(probe, model, state: TrainState, accelerator, console: RunConsole) -> None:
    """Score the current encoder with the online probe (main process; the others wait), log
    ``probe/*`` and print one line."""
    def work():
        result = probe(accelerator.unwrap_model(model).caid)
        accelerator.log(result.logs(), step=state.global_step)
        state.history.append({"step": state.global_step, **result.logs()})
        console.say(f"step {state.global_step} online probe: linear-probe AUC "
                    f"{result.linear_probe_auc:.4f}, k-NN AUC {result.knn_auc:.4f}")

    on_main_process(accelerator, work)


def on_main_process(accelerator, work) -> None:
    """Run ``work()`` on the main process only, then meet the others; an error there is raised
    after the barrier, so the other processes are never left waiting for a failed save/push."""
    error = None
    if accelerator.is_main_process:
        try:
            work()
        except Exception as exc:  # re-raised below, once every process is past the barrier
            error = exc
    accelerator.wait_for_everyone()
    if error is not None:
        raise error


def save_backbone(accelerator, model, folder: Path, card: dict) -> None:
    """Write the published backbone from the main process: config.json, model.safetensors, the
    preprocessor_config.json of the [0, 1] preprocessing it was trained with, and its model card
    (``card``: keyword arguments of :func:`~caid_hf.model_card.write_model_card`)."""
    def work():
        backbone = accelerator.unwrap_model(model).caid
        with atomic_folder(folder) as tmp:  # a full disk or a kill keeps the previous folder
            with quiet_progress_bars():
                backbone.save_pretrained(tmp)
            CAiDImageProcessor.from_caid_config(backbone.config).save_pretrained(tmp)
            write_model_card(tmp, **card)

    on_main_process(accelerator, work)


def push_backbone(accelerator, folder: Path, args: PretrainingArguments) -> None:
    """Push (or, with hub_dry_run, list) a backbone folder from the main process."""
    on_main_process(accelerator, lambda: push_folder(
        folder, args.hub_model_id, revision=args.hub_revision, private=args.hub_private_repo,
        dry_run=args.hub_dry_run))


def apply_speed_settings(model: CAiDForPreTraining, args: PretrainingArguments, accelerator
                         ) -> list[str]:
    """channels_last, gradient checkpointing and compilation as ``args`` ask (see
    :mod:`.performance`), in place on the unprepared model; returns what the step will use."""
    device = accelerator.device
    settings = [{"no": "fp32"}.get(args.mixed_precision, f"{args.mixed_precision} autocast")]
    if device.type == "cuda" and not args.full_determinism:  # fixed shapes: let cuDNN choose
        torch.backends.cudnn.benchmark = True
    if args.channels_last and performance.use_channels_last(device):
        performance.to_channels_last(model)
        settings.append("channels_last")
    if args.gradient_checkpointing:
        performance.enable_gradient_checkpointing(model)
        settings.append("gradient checkpointing")
    if args.torch_compile:
        performance.compile_model(model, device)
        settings.append("compiled")
    return settings


VALIDATION_NAMES = {  # metric key → its short name on the console, in this order
    "val/loss": "loss", "val/contrastive_loss": "MoCo", "val/discrimination_loss": "ID loss",
    "val/contrastive_accuracy": "positive top-1", "val/reconstruction_loss": "reconstruction MSE",
    "val/embedding_std": "embedding std"}


def validation_line(step: int, epoch: int, metrics: dict, is_best: bool) -> str:
    """One short console line of an epoch's validation metrics."""
    shown = []
    for key, name in VALIDATION_NAMES.items():
        if key not in metrics or (key == "val/discrimination_loss"
                                  and "val/contrastive_loss" in metrics):
            continue
        value = metrics[key]
        shown.append(f"{name} {value:.1%}" if key == "val/contrastive_accuracy"
                     else f"{name} {value:.4f}")
    return (f"step {step} (epoch {epoch}) validation: " + ", ".join(shown)
            + (" (best)" if is_best else ""))


def run_summary(output_dir: Path, state: TrainState, seconds: float, images_per_second: float,
                tensorboard: bool) -> list[str]:
    """The closing lines of a run: time and speed, best/ and final/, what else was written."""
    lines = [f"done: {state.global_step} steps in {format_duration(seconds)} "
             f"({images_per_second:.1f} images/s)"]
    if (output_dir / "best").is_dir():
        lines.append(f"  best validation loss {state.best_val_loss:.4f} at step "
                     f"{state.best_step} -> {output_dir / 'best'}")
    lines.append(f"  last step {state.global_step} -> {output_dir / 'final'}")
    extras = [f"{output_dir / 'checkpoints'} (resume with --resume_from_checkpoint latest)"]
    if (output_dir / "pictures").is_dir():
        extras.append(f"{output_dir / 'pictures'} (reconstruction grids)")
    if tensorboard:
        extras.append(f"TensorBoard: tensorboard --logdir {output_dir / 'tensorboard'}")
    lines += [f"  {line}" for line in extras]
    return lines


def write_trainer_state(output_dir: Path, state: TrainState, extra: dict) -> None:
    """``trainer_state.json``: steps, best validation loss and step, history, run facts."""
    summary = {"global_step": state.global_step, "best_val_loss": state.best_val_loss,
               "best_step": state.best_step, **extra, "history": state.history}
    (output_dir / "trainer_state.json").write_text(json.dumps(summary, indent=2))


def record_bad_files(accelerator, log: BadFileLog, new: list, images_seen: int | None = None,
                     say=None) -> None:
    """Merge every process's newly met unreadable images into ``log`` (the main process
    writes them to bad_files.tsv), clear ``new``, and stop the run on every process alike
    when too many images are bad. For a stream of unknown length, ``images_seen`` (all
    processes) is the denominator, checked once at least 1,000 images were seen."""
    merged = gather_object(list(new)) if accelerator.num_processes > 1 else list(new)
    new.clear()
    for image_id, reason in log.add(merged):
        (say or accelerator.print)(f"skipped unreadable image {image_id}: {reason}")
    if images_seen is not None:
        log.total_images = max(1, images_seen + len(log))
        if log.total_images < 1000:
            return
    log.check()


@dataclasses.dataclass
class PretrainResult:
    """What a run leaves: the trained model (this process's copy) and its bookkeeping.

    ``output_dir/best`` holds the backbone with the lowest validation loss (reached at
    ``best_step``), ``output_dir/final`` the last one; ``history`` is every logged record.
    """

    model: CAiDForPreTraining
    output_dir: Path
    global_step: int
    best_val_loss: float
    best_step: int
    history: list


def pretrain(model_args, data_args: DataArguments, args: PretrainingArguments) -> PretrainResult:
    """Run CAiD pre-training with the given arguments (see :mod:`.arguments`).

    While it runs, SIGTERM / SIGINT ask for a clean stop (:mod:`.preemption`); the previous
    signal handlers are back when it returns or raises.
    """
    with PreemptionHandler() as preemption, contextlib.ExitStack() as cleanup:
        return _pretrain(model_args, data_args, args, preemption, cleanup)


def _pretrain(model_args, data_args: DataArguments, args: PretrainingArguments,
              preemption: PreemptionHandler, cleanup: contextlib.ExitStack) -> PretrainResult:
    output_dir = Path(args.output_dir)
    accelerator, args = performance.make_accelerator(
        args, output_dir, gradient_accumulation_steps=args.gradient_accumulation_steps)
    config = CAiDConfig(**dataclasses.asdict(model_args))
    check_run_config(config, args, accelerator.num_processes, data_args)
    lock_output_dir(accelerator, output_dir, cleanup)  # before anything reads or deletes there
    prepare_output_dir(output_dir, args, accelerator)
    set_seed(args.seed, deterministic=args.full_determinism)  # the same initial weights everywhere

    if args.init_from:
        check_init_from_architecture(args.init_from, config)
        with quiet_loading():
            model = CAiDForPreTraining.from_pretrained(args.init_from, config=config)
    else:
        model = CAiDForPreTraining(config)
    # from here on each process draws its own crops and key shuffles
    set_seed(args.seed, device_specific=True, deterministic=args.full_determinism)
    train_set, val_set = build_datasets(data_args, config.image_size, args.seed, accelerator)
    streaming = isinstance(train_set, IterableDataset)
    num_train = "streamed" if streaming else len(train_set)
    train_loader, val_loader, num_workers = build_loaders(train_set, val_set, args, accelerator)
    bad_files = BadFileLog(output_dir / "bad_files.tsv" if accelerator.is_main_process else None,
                           len(val_set) + (0 if streaming else len(train_set)),
                           data_args.max_bad_fraction)

    settings = apply_speed_settings(model, args, accelerator)
    optimizer = torch.optim.SGD(model.optimizer_param_groups(args.fix_predictor_lr),
                                lr=args.learning_rate, momentum=args.sgd_momentum,
                                weight_decay=args.weight_decay,
                                **performance.sgd_implementation(accelerator.device))
    settings.append("fused SGD" if optimizer.defaults.get("fused") else "SGD")
    if streaming:  # split per process already: Accelerate must not shard it again
        model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)
        total_steps, num_epochs = args.max_steps, "?"
    else:
        model, optimizer, train_loader, val_loader = accelerator.prepare(
            model, optimizer, train_loader, val_loader)
        steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
        total_steps = (args.max_steps if args.max_steps > 0
                       else args.num_train_epochs * steps_per_epoch)
        num_epochs = math.ceil(total_steps / steps_per_epoch)
    # Stepped by hand once per optimizer step (a prepared scheduler steps once per process).
    scheduler = build_lr_scheduler(optimizer, args.lr_scheduler_type, args.warmup_steps, total_steps)
    # Each process draws its own views; the stream is part of the checkpoint.
    augmentation = AugmentationConfig(reference_compat=data_args.reference_compat,
                                      jitter_p=data_args.color_jitter_p, blur_p=data_args.blur_p)
    augmenter = ViewAugmenter(augmentation, config.context_prediction,
                              seed=args.seed * 1000 + accelerator.process_index,
                              key_target=config.reconstruct_views == "both")
    state = TrainState()
    console = RunConsole(enabled=accelerator.is_main_process)
    probe = None
    if args.probe_steps and accelerator.is_main_process:
        from .online_probe import OnlineProbe

        # probe phantoms are drawn at the view size, as downstream phantoms are: a larger
        # phantom shrunk to the view would blur its few-pixel nodules
        probe = OnlineProbe(args.probe_source, config.image_size, args.probe_num_images,
                            config.image_size, args.probe_images_root,
                            args.probe_embedding, seed=args.seed)
    train_crops = crop_datasets(train_set)
    new_bad: list = []  # unreadable images met since the last check, this process

    def images_seen() -> int | None:  # the bad-fraction denominator of a stream
        if not streaming:
            return None
        return state.global_step * args.per_device_train_batch_size * accelerator.num_processes \
            * args.gradient_accumulation_steps + len(val_set)

    run = {"model": dataclasses.asdict(model_args), "data": dataclasses.asdict(data_args),
           "training": dataclasses.asdict(args)}
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "run_config.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
    if args.resume_from_checkpoint:
        path = args.resume_from_checkpoint
        if path == "latest":
            latest_checkpoint(output_dir)  # warns about newer folders without the marker
            path = resumable_checkpoint(output_dir, accelerator.num_processes,
                                        accelerator.scaler is not None, say=console.say)
        if path is None:  # the same command starts a run and continues it after a kill
            console.say(f"--resume_from_checkpoint latest: no complete checkpoint in "
                        f"{output_dir}/checkpoints yet, starting from step 0")
        else:
            load_checkpoint(accelerator, path, state, scheduler, augmenter)
            console.say(f"resumed from {path} at step {state.global_step}")

    def save(best: bool = False) -> None:
        if best:
            state.best_checkpoint = f"checkpoint_{state.global_step}"
        save_checkpoint(accelerator, output_dir, state, scheduler, augmenter,
                        keep=args.save_total_limit, say=console.say)

    if args.report_to != "none":
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                   for part in run.values() for k, v in part.items()}
        accelerator.init_trackers("tensorboard", config=hparams)

    global_batch = args.per_device_train_batch_size * accelerator.num_processes
    method = config.discrimination_method + (" + context prediction (CAiD)"
                                             if config.context_prediction else " (ID only)")
    console.header(
        f"CAiD pre-training: {method}, {config.encoder_name} U-Net, {config.image_size} px "
        f"views -> {output_dir}",
        f"  data: {num_train} train / {len(val_set)} validation images from "
        f"{data_args.train_source}, {num_workers} loader worker(s) per process",
        f"  plan: {total_steps} steps ({num_epochs} epochs) of global batch "
        f"{global_batch * args.gradient_accumulation_steps}, validation at each epoch end",
        f"  on {describe_hardware(accelerator)}: {', '.join(settings)}",
        *([f"  online probe every {args.probe_steps} steps: k-NN and linear probe on "
           f"{probe.description} ({args.probe_embedding} embedding)"] if probe else []))
    console.bar(total_steps, initial=state.global_step, desc="pre-training")
    model.train()
    last_log, images_since_log = time.perf_counter(), 0
    data_wait = [0.0]  # seconds spent waiting for the loader since the last log
    stopping = False

    def leave_preempted() -> None:
        console.summary(f"stopped by {preemption.signal_name} after step {state.global_step}; "
                        f"the same command resumes the run (exit status {PREEMPTED_EXIT_CODE})")
        preemption.restore()
        accelerator.end_training()
        raise TrainingPreempted(state.global_step)
    run_facts = {"num_train_images": num_train, "num_validation_images": len(val_set),
                 "hardware": describe_hardware(accelerator)}
    started = time.perf_counter()
    base_model = args.init_from if args.init_from and not Path(args.init_from).exists() else None

    def card() -> dict:
        facts = {**run_facts, "training_time_s": round(time.perf_counter() - started, 1)}
        if accelerator.is_main_process:
            write_trainer_state(output_dir, state, facts)
        return {"run_dir": output_dir, "base_model": base_model, "repo_id": args.hub_model_id,
                **facts}

    while state.global_step < total_steps:
        epoch = state.epoch
        if not streaming:
            train_loader.set_epoch(epoch)  # the seedable sampler's order
        train_crops.set_epoch(epoch)  # the crops of this epoch, in every worker
        loader = train_loader
        if state.batches_in_epoch:  # resuming mid-epoch: skip what was already seen
            loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
        for batch in timed(synced_batches(loader, accelerator, streaming), data_wait):
            crops = batch["crops"].to(accelerator.device, non_blocking=True)
            new_bad.extend(batch["bad_files"])
            # the key branch follows the query once per optimizer step, not per micro-batch
            first_micro_batch = state.batches_in_epoch % args.gradient_accumulation_steps == 0
            with accelerator.accumulate(model):
                views = augmenter(crops)
                out = model(views.query, views.key, labels=views.target,
                            key_labels=views.key_target, update_momentum=first_micro_batch)
                accelerator.backward(out.loss)
                finite, stop = True, False
                if accelerator.sync_gradients:  # one small all-reduce decides for every process
                    finite, stop = step_flags(model, out.loss, accelerator, preemption.requested)
                if finite:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            images_since_log += crops.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no step, no decay
                with warnings.catch_warnings():  # a skipped non-finite update still counts
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                    scheduler.step()
            state.global_step += 1
            console.update(1)
            if finite:
                state.consecutive_nonfinite = 0
            else:
                state.nonfinite_steps += 1
                state.consecutive_nonfinite += 1
                console.say(f"step {state.global_step}: non-finite loss or gradient, update "
                            f"skipped ({state.nonfinite_steps} skipped so far)")
                if state.consecutive_nonfinite >= args.max_consecutive_nonfinite_steps:
                    last = latest_checkpoint(output_dir, warn=False)
                    raise FloatingPointError(
                        f"stopped at step {state.global_step}: the loss or the gradients were "
                        f"non-finite at {state.consecutive_nonfinite} consecutive steps (steps "
                        f"{state.global_step - state.consecutive_nonfinite + 1}-"
                        f"{state.global_step}); the last good checkpoint is "
                        f"{last or 'none (nothing saved yet)'}. Lower the learning rate or check "
                        "the data, then resume from it")
            if state.global_step % args.logging_steps == 0 or state.global_step == 1:
                record_bad_files(accelerator, bad_files, new_bad, images_seen(), console.say)
                now = time.perf_counter()
                logs = {"train/loss": out.loss.item(),
                        "train/discrimination_loss": out.discrimination_loss.item(),
                        "train/embedding_std": out.embedding_std.item(),
                        "train/lr": scheduler.get_last_lr()[0], "train/epoch": epoch,
                        "train/images_per_second": images_since_log / max(now - last_log, 1e-9),
                        "train/data_wait_fraction": data_wait[0] / max(now - last_log, 1e-9)}
                if out.logits is not None:  # MoCo: its InfoNCE and positive-key top-1
                    logs["train/contrastive_loss"] = out.contrastive_loss.item()
                    logs["train/contrastive_accuracy"] = \
                        (out.logits.argmax(dim=1) == 0).float().mean().item()
                if out.reconstruction_loss is not None:
                    logs["train/reconstruction_loss"] = out.reconstruction_loss.item()
                logs["train/nonfinite_steps"] = state.nonfinite_steps
                accelerator.log(logs, step=state.global_step)
                console.update(0, loss=f"{logs['train/loss']:.4f}")
                console.log(f"step {state.global_step}/{total_steps}: loss "
                            f"{logs['train/loss']:.4f}, "
                            f"{logs['train/images_per_second']:.1f} images/s")
                state.history.append({"step": state.global_step, **logs})
                last_log, images_since_log, data_wait[0] = now, 0, 0.0
            if args.probe_steps and (state.global_step % args.probe_steps == 0
                                     or state.global_step == total_steps):
                run_probe(probe, model, state, accelerator, console)
            end_of_epoch = not streaming and state.batches_in_epoch == len(train_loader)
            stopping = stopping or stop
            if stop and not end_of_epoch and state.global_step < total_steps:
                save()  # SIGTERM / SIGINT: this step is done; keep it and leave
                leave_preempted()
            if args.save_steps and state.global_step % args.save_steps == 0 and not end_of_epoch:
                save()  # (the epoch end saves after validation)
            if state.global_step >= total_steps:
                break
        else:  # the epoch ran to its end
            state.epoch, state.batches_in_epoch = epoch + 1, 0
        pictures: list = []
        metrics = evaluate(model, val_loader, augmentation, args.seed, config, accelerator, new_bad,
                           pictures)
        if pictures and accelerator.is_main_process:
            save_reconstruction_grid(pictures[0], output_dir / "pictures" /
                                     f"reconstructions_step{state.global_step:07d}.png",
                                     accelerator, state.global_step)
        record_bad_files(accelerator, bad_files, new_bad, images_seen(), console.say)
        metrics["epoch"] = epoch
        metrics["data/bad_files"] = len(bad_files)
        accelerator.log(metrics, step=state.global_step)
        state.history.append({"step": state.global_step, **metrics})
        is_best = metrics["val/loss"] < state.best_val_loss
        console.say(validation_line(state.global_step, epoch, metrics, is_best)
                    + (f"; {len(bad_files)} unreadable images skipped so far"
                       if len(bad_files) else ""))
        if is_best:
            state.best_val_loss, state.best_step = metrics["val/loss"], state.global_step
            save_backbone(accelerator, model, output_dir / "best", card())
            if args.hub_push_every_best and (args.push_to_hub or args.hub_dry_run):
                push_backbone(accelerator, output_dir / "best", args)
        if state.batches_in_epoch == 0 or state.global_step >= total_steps:
            save(best=is_best)
        if stopping and state.global_step < total_steps:  # signalled at the epoch's last step
            leave_preempted()
    console.close()
    preemption.restore()

    final_card = card()
    save_backbone(accelerator, model, output_dir / "final", final_card)
    if accelerator.is_main_process and (output_dir / "best").is_dir():
        with atomic_file(output_dir / "best" / "README.md") as tmp:  # the whole run's facts
            build_model_card(output_dir / "best", **final_card).save(tmp)
    if args.push_to_hub or args.hub_dry_run:
        push_backbone(accelerator, output_dir / "best", args)
    trained = [r for r in state.history if "train/images_per_second" in r]
    speed = (sum(r["train/images_per_second"] for r in trained) / len(trained)) if trained else 0
    console.summary(*run_summary(output_dir, state, final_card["training_time_s"], speed,
                                 args.report_to != "none"))
    # the plain model: without the autocast wrapper Accelerate put around its forward
    result = PretrainResult(model=accelerator.unwrap_model(model, keep_fp32_wrapper=False),
                            output_dir=output_dir,
                            global_step=state.global_step, best_val_loss=state.best_val_loss,
                            best_step=state.best_step, history=state.history)
    accelerator.end_training()
    return result


def main(argv: list[str] | None = None, prog: str | None = None) -> PretrainResult:
    """Entry point of ``caid-hf pretrain`` and ``scripts/pretrain.py``: ``[--config
    FILE.yaml] [--field value ...]``. Raises on errors (the command line turns a user's
    mistake into a message, see :func:`caid_hf.console.run_command`)."""
    return pretrain(*parse_pretraining_args(argv, prog=prog))
