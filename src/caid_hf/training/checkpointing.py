"""Training checkpoints that survive kills, full disks and preemption.

A checkpoint is the folder ``<output_dir>/checkpoints/checkpoint_<step>``: Accelerate's
``save_state`` (model as safetensors, optimizer, gradient scaler, every process's Python,
NumPy, torch and CUDA RNG) plus this package's own state, written without pickled objects:
``checkpoint_state.json`` (counters, best validation loss, skip counts), ``scheduler.pt`` and
``augmentation.pt`` (plain tensors and numbers, read back with ``weights_only=True``).

Writes are atomic: everything goes to ``checkpoints/.tmp-checkpoint_<step>``, is flushed to
disk, gets a ``COMPLETE`` marker and only then is renamed into place. A folder without the
marker (a kill mid-rename on an odd file system, a copy gone wrong) is never resumed from.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..runs import agree_on_error, default_file_mode, fix_permissions

MARKER = "COMPLETE"
STATE_FILE = "checkpoint_state.json"  # TrainState; the run-level trainer_state.json differs
SCHEDULER_FILE = "scheduler.pt"
AUGMENTATION_FILE = "augmentation.pt"
_NAME = re.compile(r"checkpoint_(\d+)")


@dataclass
class TrainState:
    """Counters of a run, saved with every checkpoint as JSON."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_val_loss: float = math.inf
    best_step: int = -1
    best_checkpoint: str | None = None
    nonfinite_steps: int = 0
    consecutive_nonfinite: int = 0
    history: list[dict] = field(default_factory=list)
    # a stream's place mid-epoch, one entry per process (PretrainingData.stream_position)
    stream_positions: list | None = None
    # what the step ran with ({"mixed_precision": "no" | "bf16" | …, "channels_last": bool,
    # "device": "cpu" | "cuda" | …}), so that a resumed run keeps it (recorded_step_settings)
    step_settings: dict | None = None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if key not in self.__dataclass_fields__:
                raise ValueError(f"unknown field {key!r} in a saved training state")
            setattr(self, key, value)

    def to_json(self) -> str:
        state = self.state_dict()
        state["best_val_loss"] = None if math.isinf(self.best_val_loss) else self.best_val_loss
        return json.dumps(state, indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        state = json.loads(text)
        if state.get("best_val_loss") is None:
            state["best_val_loss"] = math.inf
        result = cls()
        result.load_state_dict(state)
        return result


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the previous one is kept."""


class CheckpointDamagedError(ValueError):
    """A file of a checkpoint is missing or unreadable; the message names it."""


def checkpoint_number(path: str | Path) -> int:
    """N of a ``checkpoint_N`` folder."""
    match = _NAME.fullmatch(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint_N folder")
    return int(match.group(1))


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint folder whose save finished (it has the marker)."""
    return (Path(path) / MARKER).is_file()


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint_N`` folders of a run, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in folder.iterdir()
                   if p.is_dir() and (m := _NAME.fullmatch(p.name)) and is_complete(p))
    return [p for _, p in found]


def latest_checkpoint(output_dir: str | Path, warn: bool = True) -> Path | None:
    """The newest complete ``<output_dir>/checkpoints/checkpoint_N`` folder, or None.

    Newer folders without the ``COMPLETE`` marker (a save that was interrupted) are skipped,
    with a warning naming them when ``warn``.
    """
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    numbered = sorted(((int(m.group(1)), p) for p in folder.iterdir()
                       if p.is_dir() and (m := _NAME.fullmatch(p.name))), reverse=True)
    for _, path in numbered:
        if is_complete(path):
            return path
        if warn:
            warnings.warn(f"skipping {path}: it has no {MARKER} marker (its save was interrupted "
                          "or it was copied incompletely)", stacklevel=2)
    return None


def _fsync_tree(folder: Path) -> int:
    """Flush every file of ``folder`` and the folder itself to disk; returns its size in bytes."""
    size = 0
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            size += path.stat().st_size
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)
    return size


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "no space left on the device"
    return f"{type(exc).__name__}: {exc}"


def save_checkpoint(accelerator, output_dir: Path, state: TrainState, scheduler,
                    augmenter, keep: int, say=None) -> Path:
    """Write ``checkpoint_<global_step>`` atomically, then keep only the newest ``keep``
    complete checkpoints plus ``state.best_checkpoint``. Every process must call it.
    ``say`` prints the line reporting the save (default ``accelerator.print``).

    Raises :class:`CheckpointSaveError` (on every process) when writing failed; the partial
    folder is removed and the previous checkpoints are untouched.
    """
    root = Path(output_dir) / "checkpoints"
    name = f"checkpoint_{state.global_step}"
    final, tmp = root / name, root / f".tmp-{name}"
    started = time.perf_counter()
    error = None
    if accelerator.is_main_process:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a kill during an earlier save
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as exc:
            error = exc
    error = agree_on_error(accelerator, error)
    augmentation = augmenter.state_dict()  # a collective: every process's stream
    if error is None:
        try:
            accelerator.save_state(str(tmp))  # model, optimizer, scaler, RNG of every process
        except Exception as exc:  # noqa: BLE001 - reported below with the checkpoint's name
            error = exc
    error = agree_on_error(accelerator, error)
    size = 0
    if error is None and accelerator.is_main_process:
        try:
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
            torch.save(augmentation, tmp / AUGMENTATION_FILE)
            (tmp / STATE_FILE).write_text(state.to_json())
            fix_permissions(tmp)
            size = _fsync_tree(tmp)
            (tmp / MARKER).write_text(json.dumps({"global_step": state.global_step,
                                                  "bytes": size}))
            _fsync_tree(tmp)
            if final.exists():  # a previous save of this very step (a resumed run)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
        except Exception as exc:  # noqa: BLE001 - reported below with the checkpoint's name
            error = exc
    error = agree_on_error(accelerator, error)
    if error is not None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(output_dir, warn=False)
        kept = f"the last good checkpoint {last} is kept" if last else "there is no earlier checkpoint"
        raise CheckpointSaveError(
            f"saving {final} failed ({_describe(error)}); {kept}. Free space in {root} (or "
            "lower save_total_limit) and resume with --resume_from_checkpoint latest"
        ) from (error if isinstance(error, BaseException) else None)
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, keep, state.best_checkpoint)
        (say or accelerator.print)(f"saved {final} ({size / 2**20:.1f} MiB) in "
                                   f"{time.perf_counter() - started:.1f} s")
    accelerator.wait_for_everyone()
    return final


def recover_folder(final: str | Path) -> None:
    """Undo an :func:`atomic_folder` replacement cut between its two renames: when ``final``
    is missing and its ``.old-`` copy is there, put the copy back."""
    final = Path(final)
    old = final.with_name(f".old-{final.name}")
    if old.is_dir() and not final.exists():
        os.replace(old, final)
    elif old.is_dir():
        shutil.rmtree(old, ignore_errors=True)


class atomic_folder:  # noqa: N801 - used as a context manager, like tempfile's
    """Write a folder (``best/``, ``final/``) so that it is either the old or the new one,
    never half of each: the body writes into ``.tmp-<name>`` next to it, which is flushed
    to disk and renamed into place on success; on an error (a full disk) the temporary
    folder is removed, the previous folder is kept and :class:`CheckpointSaveError` says so.

    ``with atomic_folder(output_dir / "best") as folder: model.save_pretrained(folder)``
    """

    def __init__(self, final: str | Path) -> None:
        self.final = Path(final)
        self.tmp = self.final.with_name(f".tmp-{self.final.name}")
        self.old = self.final.with_name(f".old-{self.final.name}")

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        recover_folder(self.final)
        if self.tmp.exists():  # left by a kill during an earlier write
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, kind, error, traceback) -> bool:
        if error is None:
            try:
                fix_permissions(self.tmp)
                _fsync_tree(self.tmp)
                if self.final.exists():
                    os.replace(self.final, self.old)
                os.replace(self.tmp, self.final)
                _fsync_dir(self.final.parent)
                shutil.rmtree(self.old, ignore_errors=True)
                return False
            except OSError as exc:
                error = exc
        shutil.rmtree(self.tmp, ignore_errors=True)
        recover_folder(self.final)
        if not isinstance(error, (OSError, CheckpointSaveError)):
            return False  # not a write failure: the caller's error, raised as it is
        kept = (f"the previous {self.final} is kept" if self.final.is_dir()
                else f"{self.final} was not written")
        raise CheckpointSaveError(
            f"saving {self.final} failed ({_describe(error)}); {kept}. Free space in "
            f"{self.final.parent} and run the same command again (with "
            "--resume_from_checkpoint latest it continues from the last checkpoint)"
        ) from error


class atomic_file:  # noqa: N801 - a context manager
    """Replace one file whole: the body writes the yielded temporary path, which is renamed
    over ``final`` on success and removed on an error."""

    def __init__(self, final: str | Path) -> None:
        self.final = Path(final)
        self.tmp = self.final.with_name(f".tmp-{self.final.name}")

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, kind, error, traceback) -> bool:
        if error is None:
            try:
                os.chmod(self.tmp, default_file_mode())
                os.replace(self.tmp, self.final)
                return False
            except OSError as exc:
                error = exc
        self.tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise CheckpointSaveError(f"writing {self.final} failed ({_describe(error)}); the "
                                      "previous file is kept") from error
        return False


def prune_checkpoints(output_dir: str | Path, keep: int, best: str | None = None) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep`` (``keep <= 0`` keeps all),
    sparing the one named ``best``; incomplete folders are left for inspection. Returns
    the deleted folders."""
    if keep <= 0:
        return []
    complete = list_checkpoints(output_dir)
    doomed = [p for p in complete[:-keep] if p.name != best]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.bin"
SCALER_FILE = "scaler.pt"


def rng_state_file(process_index: int) -> str:
    """Accelerate's name for one process's Python, NumPy, torch and CUDA RNG states."""
    return f"random_states_{process_index}.pkl"


def _damaged(path: Path, what: str, reason: object) -> CheckpointDamagedError:
    return CheckpointDamagedError(
        f"checkpoint file {path} {what} ({reason}); the checkpoint cannot be resumed "
        "bit for bit. Resume from an earlier checkpoint (--resume_from_checkpoint "
        f"{path.parent.parent}/checkpoint_N, or 'latest', which skips damaged ones) or copy "
        "the file again")


def verify_checkpoint(path: str | Path, num_processes: int = 1,
                      with_scaler: bool = False) -> dict[int, dict]:
    """Check that every file a resume reads is present and readable, before anything is
    loaded (so a damaged checkpoint changes no weight): the marker and this package's files,
    ``model.safetensors`` (its header and size), ``optimizer.bin``, the gradient scaler
    when used, and each process's RNG file (which Accelerate's ``load_state`` would skip
    with an INFO line, silently changing the rest of the run).

    Returns the RNG states by process index. Raises :class:`CheckpointDamagedError` naming
    the first missing or unreadable file, ValueError for a folder without the marker.
    """
    from accelerate.utils import load as accelerate_load
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: no such folder")
    if not is_complete(path):
        raise ValueError(f"--resume_from_checkpoint {path}: the folder has no {MARKER} marker, "
                         "so its save did not finish; use an earlier checkpoint or 'latest'")
    required = [STATE_FILE, SCHEDULER_FILE, AUGMENTATION_FILE, MODEL_FILE, OPTIMIZER_FILE,
                *([SCALER_FILE] if with_scaler else []),
                *(rng_state_file(i) for i in range(num_processes))]
    for name in required:
        if not (path / name).is_file():
            raise _damaged(path / name, "is missing", "the save was not made by this version "
                           "of caid-hf, or the folder was copied incompletely")
    try:
        TrainState.from_json((path / STATE_FILE).read_text(encoding="utf-8"))
    except (ValueError, TypeError, UnicodeDecodeError) as error:
        raise _damaged(path / STATE_FILE, "is unreadable", error) from error
    try:
        with safe_open(str(path / MODEL_FILE), framework="pt") as weights:
            if not list(weights.keys()):
                raise _damaged(path / MODEL_FILE, "is unreadable", "it holds no tensor")
    except (SafetensorError, OSError) as error:
        raise _damaged(path / MODEL_FILE, "is unreadable", error) from error
    for name in (OPTIMIZER_FILE, SCHEDULER_FILE, AUGMENTATION_FILE,
                 *([SCALER_FILE] if with_scaler else [])):
        try:
            safe_torch_load(path / name, mmap=True)
        except Exception as error:  # noqa: BLE001 - any failure: name the file
            raise _damaged(path / name, "is unreadable", _one_line(error)) from error
    states = {}
    for index in range(num_processes):
        file = path / rng_state_file(index)
        try:
            state = accelerate_load(file, map_location="cpu")
        except Exception as error:  # noqa: BLE001 - any failure: name the file
            raise _damaged(file, "is unreadable", _one_line(error)) from error
        missing = [k for k in ("random_state", "numpy_random_seed", "torch_manual_seed")
                   if not isinstance(state, dict) or k not in state]
        if missing:
            raise _damaged(file, "is unreadable", f"no {', '.join(missing)} in it")
        states[index] = state
    return states


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def resumable_checkpoint(output_dir: str | Path, num_processes: int = 1,
                         with_scaler: bool = False, say=None) -> Path | None:
    """For ``--resume_from_checkpoint latest``: the newest complete checkpoint that
    :func:`verify_checkpoint` accepts. Each newer damaged one is reported through ``say``
    (default: a warning) and skipped; when every checkpoint is damaged the newest one's
    error is raised (never a silent restart from step 0). None when there is no complete
    checkpoint at all."""
    complete = list_checkpoints(output_dir)
    first_error = None
    for path in reversed(complete):
        try:
            verify_checkpoint(path, num_processes, with_scaler)
        except CheckpointDamagedError as error:
            first_error = first_error or error
            message = (f"{error.args[0].split('; the checkpoint cannot')[0]}: skipping "
                       f"{path.name}")
            if say is not None:
                say(message)
            else:
                warnings.warn(message, stacklevel=2)
            continue
        if path != complete[-1]:
            (say or print)(f"resuming from {path.name}, the newest undamaged checkpoint")
        return path
    if first_error is not None:
        raise first_error
    return None


def recorded_step_settings(output_dir: str | Path,
                           resume_from: str) -> tuple[Path, dict | None] | None:
    """What a run about to resume (``--resume_from_checkpoint``: a folder or ``latest``)
    recorded about its step (:attr:`TrainState.step_settings`), read before anything is
    built: ``(checkpoint, settings)``, settings None for a checkpoint that holds no record
    (saved by an older caid-hf, or unreadable: the resume itself then says why). None when
    there is nothing to resume (``latest`` with no complete checkpoint: a new run).

    Every checkpoint of a run holds the same record, so ``latest`` reads the newest one
    whose state file is readable."""
    folders = (list(reversed(list_checkpoints(output_dir))) if resume_from == "latest"
               else [Path(resume_from)])
    for folder in folders:
        try:
            saved = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        record = saved.get("step_settings") if isinstance(saved, dict) else None
        return folder, record if isinstance(record, dict) else None
    return (folders[0], None) if folders else None


def load_checkpoint(accelerator, path: str | Path, state: TrainState, scheduler,
                    augmenter) -> None:
    """Restore a run from a complete checkpoint folder, reading no pickled objects: model
    weights from safetensors, tensors and numbers with ``torch.load(weights_only=True)``.

    Every file is checked first (:func:`verify_checkpoint`), and this process's RNG states
    are set again after Accelerate's ``load_state``, which ignores a failure to set them.
    """
    import random

    import numpy as np

    path = Path(path)
    states = verify_checkpoint(path, accelerator.num_processes,
                               with_scaler=getattr(accelerator, "scaler", None) is not None)
    try:
        accelerator.load_state(str(path))
    except Exception as error:  # noqa: BLE001 - verified files that still fail: say where
        raise CheckpointDamagedError(f"resuming from {path} failed: {_one_line(error)}") from error
    rng = states[accelerator.process_index]
    try:
        random.setstate(rng["random_state"])
        np.random.set_state(rng["numpy_random_seed"])
        torch.set_rng_state(rng["torch_manual_seed"])
        if torch.cuda.is_available() and "torch_cuda_manual_seed" in rng:
            torch.cuda.set_rng_state_all(rng["torch_cuda_manual_seed"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise _damaged(path / rng_state_file(accelerator.process_index), "holds unusable RNG "
                       "states", _one_line(error)) from error
    scheduler.load_state_dict(safe_torch_load(path / SCHEDULER_FILE))
    augmenter.load_state_dict(safe_torch_load(path / AUGMENTATION_FILE))
    state.load_state_dict(TrainState.from_json((path / STATE_FILE).read_text()).state_dict())


def safe_torch_load(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors, numbers, strings
    and containers only; a file holding any other pickled object is refused with its name.
    ``mmap`` maps the tensors instead of reading them (a cheap check of a large file)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
            raise ValueError(
                f"{path} holds pickled Python objects, which caid-hf does not load (they could "
                "run arbitrary code); only tensors, numbers and containers are accepted"
            ) from exc
        raise
