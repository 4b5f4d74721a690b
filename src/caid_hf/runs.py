"""What every training run shares, pre-training and fine-tuning alike.

The Accelerator (precision already decided: see :func:`resolve_precision`), the
learning-rate schedule, the output folder (its check, its lock, file permissions),
worker defaults, ``run_config.yaml`` and trackers, and the two rules that keep processes
in step: work done on the main process only, and an error on any process stopping all.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
import yaml
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from .performance import resolve_mixed_precision

__all__ = [
    "OutputDirInUseError",
    "OutputLock",
    "agree_on_error",
    "build_lr_scheduler",
    "default_file_mode",
    "default_num_workers",
    "fix_permissions",
    "lock_output_dir",
    "make_accelerator",
    "on_main_process",
    "prepare_output_dir",
    "resolve_precision",
    "start_run_records",
]


def resolve_precision(requested: str, use_cpu: bool) -> str:
    """``mixed_precision`` without measuring: ``'auto'`` becomes bf16 where the device has
    bf16 arithmetic (:func:`~caid_hf.performance.resolve_mixed_precision`), else ``'no'``;
    anything else stays. Fine-tuning decides so when its arguments are built (so
    run_config.yaml and the model card say what ran); pre-training times both on a CPU
    instead (:func:`caid_hf.training.pretrain.decide_step_settings`)."""
    device = "cpu" if use_cpu or not torch.cuda.is_available() else "cuda"
    return resolve_mixed_precision(requested, device)


def forget_accelerator_settings() -> None:
    """Let the next ``Accelerator`` in this process choose its own mixed precision.

    Accelerate keeps one ``AcceleratorState`` per process and refuses a second Accelerator
    with another precision; a notebook or benchmark that runs pre-training in bf16 and then
    fine-tuning in fp32 needs the first run's settings forgotten. The process group and device
    (Accelerate's ``PartialState``) are kept.
    """
    from accelerate.state import AcceleratorState

    if hasattr(AcceleratorState, "_reset_state"):
        AcceleratorState._reset_state()


def make_accelerator(args, output_dir: str | Path, **accelerator_args):
    """The ``Accelerator`` of one training run.

    ``args`` needs ``use_cpu``, ``mixed_precision`` (decided; ``'auto'`` is resolved by
    :func:`resolve_precision`),
    ``report_to`` and ``seed``. An earlier run's Accelerate settings in this process are
    forgotten; every process draws one data order from ``args.seed`` (each takes its shard,
    whatever its RNG seed), and uneven last validation batches stay uneven instead of being
    padded with repeated images. Checkpoints are named, written atomically and pruned by
    caid-hf itself, so ``output_dir`` is only Accelerate's project folder.
    ``accelerator_args`` go to ``Accelerator`` as they are (e.g. gradient accumulation).
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    forget_accelerator_settings()
    return Accelerator(
        cpu=args.use_cpu or not torch.cuda.is_available(),
        mixed_precision=resolve_precision(args.mixed_precision, args.use_cpu),
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                  data_seed=args.seed, even_batches=False),
        **accelerator_args)


def _constant_one(step: int) -> float:
    return 1.0


def build_lr_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int,
                       total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule of every parameter group: linear warm-up then cosine decay to 0
    (``kind="cosine"``) or constant; groups marked ``fix_lr`` (SimSiam's predictor, see
    :meth:`~caid_hf.CAiDForPreTraining.optimizer_param_groups`) keep their initial rate."""
    if kind == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, max(total_steps, 1))
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup_steps)
    for i, group in enumerate(optimizer.param_groups):
        if group.get("fix_lr"):
            scheduler.lr_lambdas[i] = _constant_one
            group["lr"] = group["initial_lr"]
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return scheduler


def default_num_workers(local_processes: int | None = None) -> int:
    """Decode/crop workers per training process: this machine's usable cores shared by the
    local training processes (``LOCAL_WORLD_SIZE`` when unset), one core each left to the
    training process itself (1 to 8)."""
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // max(1, local_processes) - 1))


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


def plain_model(accelerator, model):
    """The prepared ``model`` as the user's class left it: without DDP and without the
    autocast wrapper Accelerate put on its ``forward``. (Accelerate's own
    ``keep_fp32_wrapper=False`` unwraps every ``functools.wraps`` layer, so it would also strip
    transformers' ``can_return_tuple`` from the model's forward.)"""
    model = accelerator.unwrap_model(model)
    model.__dict__.pop("forward", None)  # the class's forward again
    model.__dict__.pop("_original_forward", None)
    return model


def agree_on_error(accelerator, error: BaseException | None):
    """An error on any process becomes an error on every process (so none waits alone).
    ``accelerator``: an ``Accelerator`` or Accelerate's ``PartialState`` (before the
    Accelerator exists)."""
    from accelerate.utils import reduce

    if accelerator.num_processes == 1:
        return error
    flag = torch.tensor(float(error is not None), device=accelerator.device)
    if reduce(flag, reduction="sum").item() > 0 and error is None:
        return RuntimeError("another process failed to write its part")
    return error


def prepare_output_dir(output_dir: Path, held: list[str], overwrite: bool, resume: bool,
                       accelerator=None, what: str = "a run") -> None:
    """Refuse to mix two runs in one folder: when ``output_dir`` already holds any of
    ``held`` (file or folder names) and the run neither resumes nor overwrites, stop with
    the choices; with ``overwrite`` delete them (main process). ``accelerator``: an
    ``Accelerator``, Accelerate's ``PartialState`` or None (one process)."""
    previous = [output_dir / name for name in held if (output_dir / name).exists()]
    if not previous or resume:
        return
    if not overwrite:
        resume_hint = ("continue it with --resume_from_checkpoint latest, " if "checkpoints" in held
                       else "")
        raise FileExistsError(
            f"output_dir {output_dir} already holds {what} ({', '.join(p.name for p in previous)}); "
            f"{resume_hint}choose another --output_dir, or pass --overwrite_output_dir true to "
            "delete it"
        )
    if accelerator is None or accelerator.is_main_process:
        for path in previous:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if accelerator is not None:
        accelerator.wait_for_everyone()


def start_run_records(accelerator, output_dir: Path, run: dict, report_to: str) -> None:
    """Write ``run_config.yaml`` (every argument, as resolved) from the main process and
    start the TensorBoard tracker with the arguments as its hyper-parameters."""
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "run_config.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
    if report_to != "none":
        accelerator.init_trackers("tensorboard", config={
            k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for part in run.values() for k, v in part.items()})


RUN_STATE_FILE = "trainer_state.json"


def write_run_state(output_dir: Path, global_step: int, metric: str, best_metric: float | None,
                    best_step: int, facts: dict, history: list) -> Path:
    """``trainer_state.json`` of a finished (or running) pre-training or fine-tuning run, one
    schema for both: ``global_step``, ``metric_for_best_model``, ``best_metric`` (null when
    never measured), ``best_step``, the run's facts (image counts, hardware, time …) and the
    logged ``history``."""
    import json
    import math

    best = None if best_metric is None or not math.isfinite(best_metric) else best_metric
    state = {"global_step": global_step, "metric_for_best_model": metric, "best_metric": best,
             "best_step": best_step, **facts, "history": history}
    path = Path(output_dir) / RUN_STATE_FILE
    path.write_text(json.dumps(state, indent=2))
    return path


def run_record(*parts) -> dict:
    """``{"model": …, "data": …, "training": …}`` of the argument dataclasses, for
    :func:`start_run_records`."""
    return {name: dataclasses.asdict(part)
            for name, part in zip(("model", "data", "training"), parts, strict=True)}


_UMASK: int | None = None


def default_file_mode() -> int:
    """``0o666`` less the process umask: the mode ``open()`` gives a new file. safetensors
    and ``tempfile`` create files 0600, which colleagues on a shared cluster cannot read."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


def fix_permissions(folder: str | Path) -> None:
    """Give every file below ``folder`` the mode a plain ``open()`` would (see
    :func:`default_file_mode`); folders get the same plus the execute (search) bits."""
    mode = default_file_mode()
    for path in [Path(folder), *Path(folder).rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, mode | (0o111 & ~(_UMASK or 0)) if path.is_dir() else mode)


LOCK_FILE = ".caid-hf.lock"


class OutputDirInUseError(RuntimeError):
    """Another run holds the output folder's lock."""


class OutputLock:
    """An exclusive lock on an output folder, held for the whole run by its main process.

    ``fcntl.flock`` on ``<output_dir>/.caid-hf.lock``, which records the holder's PID, host
    and start time. The kernel drops the lock when the holder exits, however it exits, so a
    crashed run leaves no stale lock; a second run on the folder (a duplicate job, two
    ``--resume_from_checkpoint latest`` started together) refuses at once, naming the
    holder. (On network file systems without flock support the lock is not taken, with a
    warning.)
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self._handle = None

    def acquire(self) -> OutputLock:
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a process that wrote no details"
            handle.close()
            raise OutputDirInUseError(
                f"output_dir {self.path.parent} is in use by another caid-hf run ({holder}); "
                "wait for it to finish, stop it, or choose another --output_dir"
            ) from None
        except OSError as error:  # no flock on this file system
            warnings.warn(f"cannot lock {self.path} ({error}); make sure no other run uses "
                          f"{self.path.parent}", stacklevel=2)
        handle.seek(0)
        handle.truncate()
        handle.write(f"PID {os.getpid()} on host {socket.gethostname()}, started "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file drops the lock
            self._handle = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_output_dir(accelerator, output_dir: Path, cleanup) -> None:
    """Take the output folder's lock on the main process (released by ``cleanup``, an
    ``ExitStack``); when another run holds it, every process stops with the holder named.
    ``accelerator``: an ``Accelerator`` or Accelerate's ``PartialState``."""
    lock, error = OutputLock(output_dir), None
    if accelerator.is_main_process:
        try:
            lock.acquire()
            cleanup.callback(lock.release)
        except OutputDirInUseError as exc:
            error = exc
    error = agree_on_error(accelerator, error)
    if error is not None:
        raise error
