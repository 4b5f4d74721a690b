"""CAiD pre-training with Accelerate: one CPU, one GPU or many nodes, same code.

The loop in :func:`pretrain` reads like Accelerate's examples, top to bottom: each batch
goes through :func:`train_step` (augment, forward, backward, optimizer step), then the
step is counted, logged, probed, and saved (or the run leaves on a signal); each epoch
ends in a validation, the best backbone and a checkpoint. :func:`setup_run` builds the
:class:`PretrainRun` the helpers work with (model, optimizer, scheduler, data, augmenter,
and the checkpointed state).
Launch with ``accelerate launch scripts/pretrain.py --config FILE``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object, set_seed

from .. import performance
from ..configuration_caid import CAiDConfig
from ..console import RunConsole, describe_hardware, quiet_loading, quiet_progress_bars
from ..data.augment import AugmentationConfig, ViewAugmenter
from ..data.pipeline import LoaderSettings, PretrainingData
from ..image_processing_caid import CAiDImageProcessor
from ..model_card import build_model_card, write_model_card
from ..modeling_caid_pretraining import CAiDForPreTraining
from ..objectives import objective_class
from ..publishing import push_folder
from ..runs import (
    build_lr_scheduler,
    default_num_workers,
    lock_output_dir,
    make_accelerator,
    on_main_process,
    plain_model,
    prepare_output_dir,
    run_record,
    start_run_records,
)
from .arguments import (
    DataArguments,
    PretrainingArguments,
    parse_pretraining_args,
    scaled_learning_rate,
)
from .checkpointing import (
    TrainState,
    atomic_file,
    atomic_folder,
    latest_checkpoint,
    load_checkpoint,
    recorded_step_settings,
    resumable_checkpoint,
    save_checkpoint,
)
from .preemption import PREEMPTED_EXIT_CODE, PreemptionHandler, TrainingPreempted
from .reports import run_summary, save_reconstruction_grid, validation_line, write_trainer_state

RUN_FOLDERS = ["checkpoints", "best", "final"]  # what makes an output folder hold a run


def check_init_from_architecture(init_from: str, config: CAiDConfig) -> None:
    """The run's architecture must be the checkpoint's, or loading would half-succeed."""
    saved = CAiDConfig.from_pretrained(init_from)
    fields = ["encoder_name", "encoder_depth", "decoder_channels", "in_channels"]
    if "CAiDForPreTraining" in (saved.architectures or []):  # the objective is loaded too
        objective = objective_class(config.discrimination_method)
        fields += [name for name in objective.config_fields if name not in fields]
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
    objective_class(config.discrimination_method).check_run(config, batch, num_processes)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and num_processes == 1:
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but no process group formed: every process "
            "would train alone. On CPU-only machines launch with ACCELERATE_USE_CPU=true "
            "(or --use_cpu true)."
        )


@torch.no_grad()
def evaluate(model, batches, augmentation: AugmentationConfig, seed: int, config: CAiDConfig,
             accelerator) -> tuple[dict, tuple | None]:
    """Mean validation losses over all ``batches``, with the same views every epoch.

    Runs the unwrapped model (no DDP collectives, so processes may see uneven batches) in
    eval mode: no momentum update, no enqueue, BatchNorm running statistics. Batches of one
    image are left out (Barlow Twins standardises over the batch). ``val/embedding_std`` is
    the image-weighted mean of the batches' collapse indicators. Returns the metrics and, in
    CAiD mode, the first batch's (distorted input, reconstruction, target) triple, each
    [b, 1, S, S] on the CPU: the same images and views at every evaluation (None otherwise).
    """
    model = accelerator.unwrap_model(model).eval()
    both = config.context_prediction and config.reconstruct_views == "both"
    augment = ViewAugmenter(augmentation, config.context_prediction, seed=seed, key_target=both)
    # sums of: loss, discrimination loss, reconstruction loss, positive-key hits (MoCo),
    # embedding std; image count
    totals = torch.zeros(6, device=accelerator.device)
    picture, has_logits = None, False
    for batch in batches:
        crops = batch["crops"]
        n = crops.shape[0]
        if n < 2:
            continue
        views = augment(crops)
        out = model(views.query, views.key, labels=views.target, key_labels=views.key_target)
        if picture is None and out.reconstruction is not None:
            picture = tuple(t[:8, :1].float().cpu() for t in
                            (views.query, out.reconstruction, views.target))
        zero = torch.zeros((), device=totals.device)
        rec = out.reconstruction_loss if out.reconstruction_loss is not None else zero
        has_logits = has_logits or out.logits is not None
        hits = (out.logits.argmax(dim=1) == 0).sum() if out.logits is not None else zero
        totals += torch.stack([out.loss.detach() * n, out.contrastive_loss.detach() * n,
                               rec.to(totals.device) * n, hits.to(totals.dtype),
                               out.embedding_std.to(totals.device) * n,
                               torch.tensor(float(n), device=totals.device)])
    totals = accelerator.reduce(totals, reduction="sum")
    model.train()
    n = totals[5].clamp(min=1)
    metrics = {"val/loss": (totals[0] / n).item(),
               "val/discrimination_loss": (totals[1] / n).item(),
               "val/embedding_std": (totals[4] / n).item()}
    if has_logits:  # MoCo: its InfoNCE and positive-key top-1
        metrics["val/contrastive_loss"] = metrics["val/discrimination_loss"]
        metrics["val/contrastive_accuracy"] = (totals[3] / n).item()
    if config.context_prediction:
        metrics["val/reconstruction_loss"] = (totals[2] / n).item()
    return metrics, picture


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


def save_backbone(accelerator, model, folder: Path, card: dict,
                  bits_stored: int | None = None) -> None:
    """Write the published backbone from the main process: config.json, model.safetensors, the
    preprocessor_config.json of the [0, 1] preprocessing it was trained with, and its model card
    (``card``: keyword arguments of :func:`~caid_hf.model_card.write_model_card``;
    ``bits_stored``: the run's ``--bits_stored``, which the processor then applies too)."""
    def work():
        backbone = accelerator.unwrap_model(model).caid
        with atomic_folder(folder) as tmp:  # a full disk or a kill keeps the previous folder
            with quiet_progress_bars():
                backbone.save_pretrained(tmp)
            CAiDImageProcessor.from_caid_config(backbone.config,
                                                bits_stored=bits_stored).save_pretrained(tmp)
            write_model_card(tmp, **card)

    on_main_process(accelerator, work)


def push_backbone(accelerator, folder: Path, args: PretrainingArguments) -> None:
    """Push (or, with hub_dry_run, list) a backbone folder from the main process."""
    on_main_process(accelerator, lambda: push_folder(
        folder, args.hub_model_id, revision=args.hub_revision, private=args.hub_private_repo,
        dry_run=args.hub_dry_run))


def apply_speed_settings(model: CAiDForPreTraining, args: PretrainingArguments, accelerator
                         ) -> list[str]:
    """channels_last (as decided, :func:`decide_step_settings`), gradient checkpointing and
    compilation as ``args`` ask (see :mod:`.performance`), in place on the unprepared
    model; returns what the step will use."""
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


@dataclasses.dataclass
class PretrainRun:
    """Everything one process's pre-training run works with, built by :func:`setup_run`."""

    args: PretrainingArguments
    config: CAiDConfig
    output_dir: Path
    accelerator: Any
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: PretrainingData
    augmentation: AugmentationConfig
    augmenter: ViewAugmenter
    preemption: PreemptionHandler
    console: RunConsole
    probe: Any
    total_steps: int
    num_epochs: int | str
    settings: list[str]
    base_model: str | None
    step_lines: list[str] = dataclasses.field(default_factory=list)  # the header's, on settings
    state: TrainState = dataclasses.field(default_factory=TrainState)
    started: float = dataclasses.field(default_factory=time.perf_counter)


@dataclasses.dataclass
class StepOutcome:
    """What :func:`train_step` did: the model output, whether the update was finite,
    whether a stop was requested, whether an optimizer step ended (False for the
    micro-batches of gradient accumulation), and the images it took on all processes."""

    out: Any
    finite: bool
    stop: bool
    stepped: bool
    images: int


@dataclasses.dataclass
class Throughput:
    """Images trained since the last log line, and when that line was written."""

    images: int = 0
    since: float = dataclasses.field(default_factory=time.perf_counter)

    def take(self) -> tuple[int, float]:
        """(images, seconds) since the last call (or the start); then counts anew."""
        now = time.perf_counter()
        taken = self.images, max(now - self.since, 1e-9)
        self.images, self.since = 0, now
        return taken


def build_model(config: CAiDConfig, args: PretrainingArguments) -> CAiDForPreTraining:
    """The model with the same initial weights on every process: from ``init_from`` or new."""
    set_seed(args.seed, deterministic=args.full_determinism)
    if not args.init_from:
        return CAiDForPreTraining(config)
    check_init_from_architecture(args.init_from, config)
    with quiet_loading():
        return CAiDForPreTraining.from_pretrained(args.init_from, config=config)


def build_optimizer(model: CAiDForPreTraining, args: PretrainingArguments, device,
                    num_processes: int = 1) -> torch.optim.SGD:
    """SGD at the run's learning rate (``learning_rate`` scaled by ``scale_lr`` for the
    global batch)."""
    global_batch = (args.per_device_train_batch_size * num_processes
                    * args.gradient_accumulation_steps)
    lr = scaled_learning_rate(args.learning_rate, args.scale_lr, global_batch)
    return torch.optim.SGD(model.optimizer_param_groups(args.fix_predictor_lr),
                           lr=lr, momentum=args.sgd_momentum,
                           weight_decay=args.weight_decay,
                           **performance.sgd_implementation(device))


def plan_steps(data: PretrainingData, args: PretrainingArguments) -> tuple[int, int | str]:
    """(optimizer steps of the run, epochs): ``max_steps`` or ``num_train_epochs`` worth."""
    if data.streaming:
        return args.max_steps, "?"
    steps_per_epoch = math.ceil(len(data.train_loader) / args.gradient_accumulation_steps)
    total = args.max_steps if args.max_steps > 0 else args.num_train_epochs * steps_per_epoch
    return total, math.ceil(total / steps_per_epoch)


def calibration_steps(config: CAiDConfig, data_args: DataArguments, args: PretrainingArguments,
                      device: torch.device):
    """``make_step`` for :func:`caid_hf.performance.calibrate_step_settings`: the run's
    training step (forward with the method's loss and the reconstruction loss, backward)
    on the run's model and batch shape, in given settings.

    The model is built afresh from ``config`` (the run's own weights do not change the
    time, and its momentum encoder, queue and BatchNorm statistics stay untouched), once
    per memory format; the views come from the run's augmentation of random crops, made
    once (the augmentation's cost does not depend on the settings, nor does the optimizer
    step's, so neither is timed). Call only inside :func:`~caid_hf.performance.untouched_rng`:
    building the model and MoCo's shuffles draw from the global random stream.
    """
    models: dict[bool, CAiDForPreTraining] = {}
    views = []

    def make_step(settings: performance.StepSettings):
        if not models:
            models[False] = CAiDForPreTraining(config).to(device).train()
            if args.gradient_checkpointing:
                performance.enable_gradient_checkpointing(models[False])
            size, batch = config.image_size, args.per_device_train_batch_size
            crops = torch.randint(0, 256, (batch, 2, size, size), dtype=torch.uint8)
            augmenter = ViewAugmenter(data_args.augmentation_config(), config.context_prediction,
                                      seed=0, key_target=config.reconstruct_views == "both")
            views.append(augmenter(crops.to(device)))
        if settings.channels_last not in models:
            models[True] = performance.to_channels_last(copy.deepcopy(models[False]))
        model, batch = models[settings.channels_last], views[0]

        def step() -> None:
            with performance.autocast(device, settings.dtype):
                out = model(batch.query, batch.key, labels=batch.target,
                            key_labels=batch.key_target)
            out.loss.backward()
            model.zero_grad(set_to_none=True)

        return step

    return make_step


def calibration_shape(config: CAiDConfig, args: PretrainingArguments) -> dict:
    """The part of the calibration's cache key that is the run's model and batch."""
    fields = ["encoder_name", "encoder_depth", "decoder_channels", "in_channels", "image_size",
              "discrimination_method", "context_prediction", "reconstruct_views",
              "shuffle_bn_splits", "queue_size", "projection_dim", "projection_head"]
    objective = objective_class(config.discrimination_method)
    fields += [name for name in objective.config_fields if name not in fields]
    return {**{name: getattr(config, name) for name in fields},
            "batch_size": args.per_device_train_batch_size,
            "gradient_checkpointing": args.gradient_checkpointing}


def decide_step_settings(config: CAiDConfig, data_args: DataArguments,
                         args: PretrainingArguments, output_dir: Path, processes
                         ) -> performance.StepSettingsChoice:
    """Decide ``--mixed_precision auto`` and an unset ``--channels_last`` once for the run
    and write them into ``args`` (so run_config.yaml and the model card say what ran).

    A resumed run takes what its checkpoint recorded (a checkpoint of an older caid-hf:
    what ``auto`` meant then, the CPU's bf16 flags and channels_last), so that it continues
    bit for bit, unless it started on another kind of device. Where the answer is known (a
    GPU; a CPU without bf16 instructions and a memory format given) nothing is measured.
    Otherwise the candidates are timed
    (:func:`caid_hf.performance.calibrate_step_settings`, cached per machine and model
    shape): every process steps, and every process takes the main process's choice.
    ``processes``: Accelerate's ``PartialState``.
    """
    device = processes.device
    requested = (args.mixed_precision, args.channels_last)
    candidates = performance.step_setting_candidates(*requested, device)
    open_question = args.mixed_precision == "auto" or args.channels_last is None
    recorded = (recorded_step_settings(output_dir, args.resume_from_checkpoint)
                if args.resume_from_checkpoint and open_question else None)
    record = None
    if recorded is not None:
        record = recorded[1] or {"mixed_precision": performance.resolve_mixed_precision(
            "auto", device), "channels_last": performance.use_channels_last(device)}
        if record.get("device", device.type) != device.type:
            record = None  # started on another kind of device: no bit-for-bit resume anyway
    if record is not None:
        choice = performance.StepSettingsChoice(performance.StepSettings(
            record["mixed_precision"] if args.mixed_precision == "auto" else args.mixed_precision,
            bool(record["channels_last"]) if args.channels_last is None else args.channels_last),
            "recorded")
    elif len(candidates) == 1:
        choice = performance.StepSettingsChoice(candidates[0],
                                                "known" if open_question else "requested")
    else:  # every process steps (MoCo's key shuffle crosses them); the main one decides
        from accelerate.utils import broadcast_object_list

        def share(value):
            return broadcast_object_list([value])[0] if processes.num_processes > 1 else value

        choice = performance.calibrate_step_settings(
            candidates, calibration_steps(config, data_args, args, device),
            calibration_shape(config, args), share=share, is_main=processes.is_main_process)
    args.mixed_precision = choice.settings.mixed_precision
    args.channels_last = choice.settings.channels_last
    return choice


def step_settings_lines(choice: performance.StepSettingsChoice, requested: tuple,
                        device: torch.device) -> list[str]:
    """The header's lines on the decided precision and memory format: what was chosen, how,
    each candidate's time per step, and the flags that override it."""
    settings = choice.settings
    how = {"requested": "as requested",
           "known": "known for this device, nothing measured",
           "measured": f"measured now in {choice.seconds:.1f} s",
           "cached": "measured at an earlier start on this machine, kept in "
                     f"{performance.calibration_cache_dir()}",
           "recorded": "the choice this run started with, kept on resuming"}[choice.how]
    if not choice.steady:
        how += (f"; a setting's steps varied by over {performance.UNSTEADY:.0%} (a busy "
                "machine?): measured again at a start that finds the machine idle")
    lines = [f"  step settings: {settings.label} ({how})"]
    if choice.ms_per_step:
        timings = "; ".join(f"{label}: {ms:.0f} ms" for label, ms in choice.ms_per_step.items())
        lines.append(f"    time per step: {timings}; another setting must take "
                     f"{performance.CALIBRATION_MARGIN:.0%} less than the first to be chosen")
    decided = [flag for flag, value in zip(("--mixed_precision no|bf16", "--channels_last "
                                            "true|false"), requested) if value in ("auto", None)]
    if decided and choice.how != "requested":
        lines.append(f"    {' and '.join(decided)} override{'s' if len(decided) == 1 else ''} "
                     "this choice")
    if device.type == "cpu":
        lines.append(f"    CPU: {performance.describe_cpu()}")
    return lines


def setup_run(model_args, data_args: DataArguments, args: PretrainingArguments,
              preemption: PreemptionHandler, cleanup: contextlib.ExitStack) -> PretrainRun:
    """Check the arguments, take the output folder, build model, data, optimizer, schedule
    and augmenter, write run_config.yaml and start the trackers."""
    from accelerate import PartialState

    output_dir = Path(args.output_dir)
    # the processes first: the Accelerator takes the precision decided below
    processes = PartialState(cpu=args.use_cpu or not torch.cuda.is_available())
    config = CAiDConfig(**dataclasses.asdict(model_args))
    check_run_config(config, args, processes.num_processes, data_args)
    lock_output_dir(processes, output_dir, cleanup)  # before anything reads or deletes there
    prepare_output_dir(output_dir, RUN_FOLDERS, args.overwrite_output_dir,
                       bool(args.resume_from_checkpoint), processes)
    requested = (args.mixed_precision, args.channels_last)
    step_choice = decide_step_settings(config, data_args, args, output_dir, processes)
    accelerator = make_accelerator(args, output_dir,
                                   gradient_accumulation_steps=args.gradient_accumulation_steps)
    model = build_model(config, args)
    # from here on each process draws its own crops and key shuffles
    set_seed(args.seed, device_specific=True, deterministic=args.full_determinism)
    workers = (args.dataloader_num_workers if args.dataloader_num_workers is not None else
               default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE",
                                                      accelerator.num_processes))))
    loader = LoaderSettings(args.per_device_train_batch_size, args.per_device_eval_batch_size,
                            workers, args.dataloader_prefetch_factor, args.dataloader_pin_memory,
                            args.seed)
    data = PretrainingData(data_args, config.image_size, args.seed, loader, accelerator,
                           output_dir)
    settings = apply_speed_settings(model, args, accelerator)
    optimizer = build_optimizer(model, args, accelerator.device, accelerator.num_processes)
    settings.append("fused SGD" if optimizer.defaults.get("fused") else "SGD")
    model, optimizer = data.prepare_with(model, optimizer)
    total_steps, num_epochs = plan_steps(data, args)
    # Stepped by hand once per optimizer step (a prepared scheduler steps once per process).
    scheduler = build_lr_scheduler(optimizer, args.lr_scheduler_type, args.warmup_steps, total_steps)
    # Each process draws its own views; the stream is part of the checkpoint.
    augmentation = data_args.augmentation_config()
    augmenter = ViewAugmenter(augmentation, config.context_prediction,
                              seed=args.seed * 1000 + accelerator.process_index,
                              key_target=config.reconstruct_views == "both")
    record = run_record(model_args, data_args, args)
    record["step_settings"] = {"requested_mixed_precision": requested[0],
                               "requested_channels_last": requested[1],
                               "decided_by": step_choice.how,
                               "ms_per_step": step_choice.ms_per_step,
                               "steady": step_choice.steady}
    start_run_records(accelerator, output_dir, record, args.report_to)
    base_model = args.init_from if args.init_from and not Path(args.init_from).exists() else None
    return PretrainRun(args=args, config=config, output_dir=output_dir, accelerator=accelerator,
                       model=model, optimizer=optimizer, scheduler=scheduler, data=data,
                       augmentation=augmentation, augmenter=augmenter, preemption=preemption,
                       console=RunConsole(enabled=accelerator.is_main_process),
                       probe=build_probe(args, config, accelerator), total_steps=total_steps,
                       num_epochs=num_epochs, settings=settings, base_model=base_model,
                       step_lines=step_settings_lines(step_choice, requested, accelerator.device))


def build_probe(args: PretrainingArguments, config: CAiDConfig, accelerator):
    """The online probe (main process, ``--probe_steps``), or None."""
    if not args.probe_steps or not accelerator.is_main_process:
        return None
    from .online_probe import OnlineProbe

    # probe phantoms are drawn at the view size, as downstream phantoms are: a larger
    # phantom shrunk to the view would blur its few-pixel nodules
    return OnlineProbe(args.probe_source, config.image_size, args.probe_num_images,
                       config.image_size, args.probe_images_root, args.probe_embedding,
                       seed=args.seed, batch_norm_statistics=args.probe_batch_norm_statistics)


def resume(run: PretrainRun) -> None:
    """Continue from ``--resume_from_checkpoint``: a folder, or ``latest`` (the newest
    undamaged checkpoint; none yet starts from step 0, so one command starts and continues)."""
    path = run.args.resume_from_checkpoint
    if not path:
        return
    if path == "latest":
        latest_checkpoint(run.output_dir)  # warns about newer folders without the marker
        path = resumable_checkpoint(run.output_dir, run.accelerator.num_processes,
                                    run.accelerator.scaler is not None, say=run.console.say)
    if path is None:
        run.console.say(f"--resume_from_checkpoint latest: no complete checkpoint in "
                        f"{run.output_dir}/checkpoints yet, starting from step 0")
        return
    load_checkpoint(run.accelerator, path, run.state, run.scheduler, run.augmenter)
    run.console.say(f"resumed from {path} at step {run.state.global_step}")
    state = run.state
    if run.data.streaming and state.batches_in_epoch:
        saved, processes = state.stream_positions, run.accelerator.num_processes
        if saved is not None and len(saved) != processes:
            why = f"the checkpoint's stream positions are of {len(saved)} processes, not {processes}"
        else:
            why = run.data.resume_stream(saved[run.accelerator.process_index] if saved else None,
                                         state.epoch, state.batches_in_epoch)
        run.console.say(f"the stream resumes at its saved position in epoch {state.epoch}"
                        if why is None else f"{why}: reading the epoch's first "
                        f"{state.batches_in_epoch} batches again to skip them")


def lr_line(args: PretrainingArguments, global_batch: int) -> str:
    """The header's learning-rate line, with the large-batch advice when it applies."""
    lr = scaled_learning_rate(args.learning_rate, args.scale_lr, global_batch)
    rule = ("as given" if args.scale_lr == "none" else
            f"{args.learning_rate:g} x {'' if args.scale_lr == 'linear' else 'sqrt '}"
            f"({global_batch}/256)")
    line = f"  learning rate {lr:g} ({rule}), {args.warmup_steps} warm-up steps"
    if args.scale_lr == "none" and global_batch > 1024:
        line += (f"; a global batch of {global_batch} usually wants --scale_lr linear with "
                 "warm-up (--warmup_steps of about 10 epochs), as MoCo's authors advise")
    return line


def show_header(run: PretrainRun) -> None:
    args, config, data = run.args, run.config, run.data
    global_batch = args.per_device_train_batch_size * run.accelerator.num_processes
    method = config.discrimination_method + (" + context prediction (CAiD)"
                                             if config.context_prediction else " (ID only)")
    run.console.header(
        f"CAiD pre-training: {method}, {config.encoder_name} U-Net, {config.image_size} px "
        f"views -> {run.output_dir}",
        f"  data: {data.num_train} train / {len(data.val_set)} validation images from "
        f"{data.data_args.train_source}, {data.num_workers} loader worker(s) per process",
        f"  plan: {run.total_steps} steps ({run.num_epochs} epochs) of global batch "
        f"{global_batch * args.gradient_accumulation_steps}, validation at each epoch end",
        lr_line(args, global_batch * args.gradient_accumulation_steps),
        f"  on {describe_hardware(run.accelerator)}: {', '.join(run.settings)}",
        *run.step_lines,
        *([f"  online probe every {args.probe_steps} steps: k-NN and linear probe on "
           f"{run.probe.description} ({args.probe_embedding} embedding)"] if run.probe else []))
    run.console.bar(run.total_steps, initial=run.state.global_step, desc="pre-training")


def train_step(run: PretrainRun, batch: dict) -> StepOutcome:
    """Augment, forward, backward and (at the last micro-batch) step the optimizer, unless
    the loss or a gradient is non-finite on any process."""
    accelerator, state = run.accelerator, run.state
    crops = batch["crops"].to(accelerator.device, non_blocking=True)
    # the key branch follows the query once per optimizer step, not per micro-batch
    first_micro_batch = state.batches_in_epoch % run.args.gradient_accumulation_steps == 0
    with accelerator.accumulate(run.model):
        views = run.augmenter(crops)
        out = run.model(views.query, views.key, labels=views.target,
                        key_labels=views.key_target, update_momentum=first_micro_batch)
        accelerator.backward(out.loss)
        finite, stop = True, False
        if accelerator.sync_gradients:  # one small all-reduce decides for every process
            finite, stop = step_flags(run.model, out.loss, accelerator, run.preemption.requested)
        if finite:
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    state.batches_in_epoch += 1
    return StepOutcome(out, finite, stop, stepped=accelerator.sync_gradients,
                       images=crops.shape[0] * accelerator.num_processes)


def count_step(run: PretrainRun, finite: bool) -> None:
    """Advance the schedule and the step counter; count a non-finite update, stopping the
    run after ``max_consecutive_nonfinite_steps`` of them in a row."""
    state = run.state
    if not run.accelerator.optimizer_step_was_skipped:  # fp16 overflow: no step, no decay
        with warnings.catch_warnings():  # a skipped non-finite update still counts
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            run.scheduler.step()
    state.global_step += 1
    run.console.update(1)
    if finite:
        state.consecutive_nonfinite = 0
        return
    state.nonfinite_steps += 1
    state.consecutive_nonfinite += 1
    run.console.say(f"step {state.global_step}: non-finite loss or gradient, update skipped "
                    f"({state.nonfinite_steps} skipped so far)")
    if state.consecutive_nonfinite >= run.args.max_consecutive_nonfinite_steps:
        last = latest_checkpoint(run.output_dir, warn=False)
        raise FloatingPointError(
            f"stopped at step {state.global_step}: the loss or the gradients were non-finite "
            f"at {state.consecutive_nonfinite} consecutive steps (steps "
            f"{state.global_step - state.consecutive_nonfinite + 1}-{state.global_step}); the "
            f"last good checkpoint is {last or 'none (nothing saved yet)'}. Lower the learning "
            "rate or check the data, then resume from it")


def images_seen(run: PretrainRun) -> int | None:
    """The bad-fraction denominator of a stream (None for a data set of known size)."""
    if not run.data.streaming:
        return None
    args = run.args
    return (run.state.global_step * args.per_device_train_batch_size
            * run.accelerator.num_processes * args.gradient_accumulation_steps
            + len(run.data.val_set))


def log_step(run: PretrainRun, out, epoch: int, images: int, seconds: float) -> dict:
    """Log the step's losses, learning rate and speed (TensorBoard, console, history), and
    report the unreadable images met since the last log; returns the logged values."""
    state = run.state
    run.data.report_bad_files(images_seen(run), run.console.say)
    logs = {"train/loss": out.loss.item(),
            "train/discrimination_loss": out.contrastive_loss.item(),
            "train/embedding_std": out.embedding_std.item(),
            "train/lr": run.scheduler.get_last_lr()[0], "train/epoch": epoch,
            "train/images_per_second": images / seconds,
            "train/data_wait_fraction": run.data.take_data_wait() / seconds}
    if out.logits is not None:  # MoCo: its InfoNCE and positive-key top-1
        logs["train/contrastive_loss"] = out.contrastive_loss.item()
        logs["train/contrastive_accuracy"] = (out.logits.argmax(dim=1) == 0).float().mean().item()
    if out.reconstruction_loss is not None:
        logs["train/reconstruction_loss"] = out.reconstruction_loss.item()
    logs["train/nonfinite_steps"] = state.nonfinite_steps
    run.accelerator.log(logs, step=state.global_step)
    run.console.update(0, loss=f"{logs['train/loss']:.4f}")
    run.console.log(f"step {state.global_step}/{run.total_steps}: loss {logs['train/loss']:.4f}, "
                    f"{logs['train/images_per_second']:.1f} images/s")
    state.history.append({"step": state.global_step, **logs})
    return logs


def run_probe(run: PretrainRun) -> None:
    """Score the current encoder with the online probe (main process; the others wait), log
    ``probe/*`` and print one line."""
    def work():
        result = run.probe(run.accelerator.unwrap_model(run.model).caid)
        run.accelerator.log(result.logs(), step=run.state.global_step)
        run.state.history.append({"step": run.state.global_step, **result.logs()})
        run.console.say(f"step {run.state.global_step} online probe: linear-probe AUC "
                        f"{result.linear_probe_auc:.4f}, k-NN AUC {result.knn_auc:.4f}")

    on_main_process(run.accelerator, work)


def save(run: PretrainRun, best: bool = False) -> None:
    """Save the training state as ``checkpoints/checkpoint_<step>`` (every process)."""
    if best:
        run.state.best_checkpoint = f"checkpoint_{run.state.global_step}"
    run.state.stream_positions = None
    run.state.step_settings = {"mixed_precision": run.args.mixed_precision,  # kept on resuming
                               "channels_last": run.args.channels_last,
                               "device": run.accelerator.device.type}
    if run.data.streaming and run.state.batches_in_epoch:  # mid-epoch: where each rank is
        mine = run.data.stream_position()
        run.state.stream_positions = (gather_object([mine]) if run.accelerator.num_processes > 1
                                      else [mine])
    save_checkpoint(run.accelerator, run.output_dir, run.state, run.scheduler, run.augmenter,
                    keep=run.args.save_total_limit, say=run.console.say)


def leave_preempted(run: PretrainRun) -> None:
    """After a signal, once the state is saved: say how to resume, and exit with 75."""
    run.console.summary(f"stopped by {run.preemption.signal_name} after step "
                        f"{run.state.global_step}; the same command resumes the run (exit "
                        f"status {PREEMPTED_EXIT_CODE})")
    run.preemption.restore()
    run.accelerator.end_training()
    raise TrainingPreempted(run.state.global_step)


def at_epoch_end(run: PretrainRun) -> bool:
    """Whether the step just taken was the epoch's last (never known for a stream)."""
    return (not run.data.streaming
            and run.state.batches_in_epoch == len(run.data.train_loader))


def every(step: int, period: int) -> bool:
    return period > 0 and step % period == 0


def card_args(run: PretrainRun) -> dict:
    """The model card's facts about the run (and ``trainer_state.json``, rewritten now)."""
    facts = {"num_train_images": run.data.num_train,
             "num_validation_images": len(run.data.val_set),
             "hardware": describe_hardware(run.accelerator),
             "training_time_s": round(time.perf_counter() - run.started, 1)}
    if run.accelerator.is_main_process:
        write_trainer_state(run.output_dir, run.state, facts)
    args = run.args
    return {"run_dir": run.output_dir, "base_model": run.base_model,
            "repo_id": args.hub_model_id, "license": args.hub_license,
            "license_name": args.hub_license_name, "license_link": args.hub_license_link,
            "datasets": args.hub_datasets, **facts}


def validate(run: PretrainRun, epoch: int) -> tuple[dict, bool]:
    """Validate (losses, a reconstruction picture, the unreadable images so far), log it and
    print one line; returns the metrics and whether the loss is the run's best so far."""
    state, accelerator = run.state, run.accelerator
    metrics, picture = evaluate(run.model, run.data.validation_batches(), run.augmentation,
                                run.args.seed, run.config, accelerator)
    if picture is not None and accelerator.is_main_process:
        save_reconstruction_grid(picture, run.output_dir / "pictures" /
                                 f"reconstructions_step{state.global_step:07d}.png",
                                 accelerator, state.global_step, metrics.get("val/loss"),
                                 run.data.data_args.train_source)
    run.data.report_bad_files(images_seen(run), run.console.say)
    bad = len(run.data.bad_files)
    metrics.update({"epoch": epoch, "data/bad_files": bad})
    accelerator.log(metrics, step=state.global_step)
    state.history.append({"step": state.global_step, **metrics})
    is_best = metrics["val/loss"] < state.best_val_loss
    run.console.say(validation_line(state.global_step, epoch, metrics, is_best)
                    + (f"; {bad} unreadable images skipped so far" if bad else ""))
    return metrics, is_best


def keep_best(run: PretrainRun, val_loss: float) -> None:
    """Record the new best validation loss and write its backbone to ``best/`` (and push it
    with ``hub_push_every_best``)."""
    state, args = run.state, run.args
    state.best_val_loss, state.best_step = val_loss, state.global_step
    save_backbone(run.accelerator, run.model, run.output_dir / "best",
                  {**card_args(run), "weights": "best"}, run.data.data_args.bits_stored)
    if args.hub_push_every_best and (args.push_to_hub or args.hub_dry_run):
        push_backbone(run.accelerator, run.output_dir / "best", args)


def finish_run(run: PretrainRun) -> PretrainResult:
    """Write ``final/`` and the best backbone's card with the whole run's facts, push if
    asked, print the summary."""
    run.console.close()
    run.preemption.restore()
    accelerator, output_dir, args, state = run.accelerator, run.output_dir, run.args, run.state
    final_card = card_args(run)
    save_backbone(accelerator, run.model, output_dir / "final", {**final_card, "weights": "final"},
                  run.data.data_args.bits_stored)
    if accelerator.is_main_process and (output_dir / "best").is_dir():
        with atomic_file(output_dir / "best" / "README.md") as tmp:  # the whole run's facts
            build_model_card(output_dir / "best", **final_card, weights="best").save(tmp)
    if args.push_to_hub or args.hub_dry_run:
        push_backbone(accelerator, output_dir / "best", args)
    trained = [r for r in state.history if "train/images_per_second" in r]
    speed = (sum(r["train/images_per_second"] for r in trained) / len(trained)) if trained else 0
    run.console.summary(*run_summary(output_dir, state, final_card["training_time_s"], speed,
                                     args.report_to != "none"))
    # the plain model: without the autocast wrapper Accelerate put around its forward
    result = PretrainResult(model=plain_model(accelerator, run.model),
                            output_dir=output_dir, global_step=state.global_step,
                            best_val_loss=state.best_val_loss, best_step=state.best_step,
                            history=state.history)
    accelerator.end_training()
    return result


def pretrain(model_args, data_args: DataArguments, args: PretrainingArguments) -> PretrainResult:
    """Run CAiD pre-training with the given arguments (see :mod:`.arguments`).

    While it runs, SIGTERM / SIGINT ask for a clean stop (:mod:`.preemption`): mid-epoch the
    step's state is saved and the run leaves at once; at an epoch's end it leaves after the
    validation. The previous signal handlers are back when it returns or raises.
    """
    with PreemptionHandler() as preemption, contextlib.ExitStack() as cleanup:
        run = setup_run(model_args, data_args, args, preemption, cleanup)
        state = run.state  # what a checkpoint holds: step, epoch, best loss, history ...
        resume(run)
        show_header(run)
        run.model.train()
        throughput, stopping = Throughput(), False
        while state.global_step < run.total_steps:
            epoch = state.epoch
            for batch in run.data.epoch(epoch, state.batches_in_epoch):
                step = train_step(run, batch)  # augment, forward, backward, optimizer step
                throughput.images += step.images
                if not step.stepped:  # a micro-batch of gradient accumulation
                    continue
                count_step(run, step.finite)  # schedule, step counter, non-finite guard
                if every(state.global_step, args.logging_steps) or state.global_step == 1:
                    log_step(run, step.out, epoch, *throughput.take())
                if every(state.global_step, args.probe_steps) or (
                        args.probe_steps and state.global_step == run.total_steps):
                    run_probe(run)  # on the main process; the others wait
                stopping = stopping or step.stop
                if state.global_step >= run.total_steps:
                    break  # its state is saved after the validation below
                if at_epoch_end(run):
                    continue  # saved (or left on a signal) after the validation below
                if stopping:  # a signal mid-epoch: save this step and leave
                    save(run)
                    leave_preempted(run)
                if every(state.global_step, args.save_steps):
                    save(run)
            else:  # the epoch ran to its end
                state.epoch, state.batches_in_epoch = epoch + 1, 0
            metrics, is_best = validate(run, epoch)
            if is_best:
                keep_best(run, metrics["val/loss"])
            if state.batches_in_epoch == 0 or state.global_step >= run.total_steps:
                save(run, best=is_best)
            if stopping and state.global_step < run.total_steps:  # signalled at the epoch end
                leave_preempted(run)
        return finish_run(run)


def main(argv: list[str] | None = None, prog: str | None = None) -> PretrainResult:
    """Entry point of ``caid-hf pretrain`` and ``scripts/pretrain.py``: ``[--config
    FILE.yaml] [--field value ...]``. Raises on errors (the command line turns a user's
    mistake into a message, see :func:`caid_hf.console.run_command`)."""
    return pretrain(*parse_pretraining_args(argv, prog=prog))
