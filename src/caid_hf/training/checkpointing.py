"""Training checkpoints that survive kills, full disks and preemption.

A checkpoint is the folder ``<output_dir>/checkpoints/checkpoint_<step>``: Accelerate's
``save_state`` (model as safetensors, optimizer, gradient scaler, every process's Python,
NumPy, torch and CUDA RNG) plus this package's own state, written without pickled objects:
``trainer_state.json`` (counters, best validation loss, skip counts), ``scheduler.pt`` and
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

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
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
    error = _agree(accelerator, error)
    augmentation = augmenter.state_dict()  # a collective: every process's stream
    if error is None:
        try:
            accelerator.save_state(str(tmp))  # model, optimizer, scaler, RNG of every process
        except Exception as exc:  # noqa: BLE001 - reported below with the checkpoint's name
            error = exc
    error = _agree(accelerator, error)
    size = 0
    if error is None and accelerator.is_main_process:
        try:
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
            torch.save(augmentation, tmp / AUGMENTATION_FILE)
            (tmp / STATE_FILE).write_text(state.to_json())
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
    error = _agree(accelerator, error)
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


def _agree(accelerator, error: BaseException | None):
    """An error on any process becomes an error on every process (so none waits alone)."""
    if accelerator.num_processes == 1:
        return error
    flag = torch.tensor(float(error is not None), device=accelerator.device)
    if accelerator.reduce(flag, reduction="sum").item() > 0 and error is None:
        return RuntimeError("another process failed to write its part")
    return error


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


def load_checkpoint(accelerator, path: str | Path, state: TrainState, scheduler,
                    augmenter) -> None:
    """Restore a run from a complete checkpoint folder, reading no pickled objects: model
    weights from safetensors, tensors and numbers with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: no such folder")
    if not is_complete(path):
        raise ValueError(f"--resume_from_checkpoint {path}: the folder has no {MARKER} marker, "
                         "so its save did not finish; use an earlier checkpoint or 'latest'")
    for name in (STATE_FILE, SCHEDULER_FILE, AUGMENTATION_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path} lacks {name}; it was not written by this "
                                    "version of caid-hf")
    accelerator.load_state(str(path))
    scheduler.load_state_dict(safe_torch_load(path / SCHEDULER_FILE))
    augmenter.load_state_dict(safe_torch_load(path / AUGMENTATION_FILE))
    state.load_state_dict(TrainState.from_json((path / STATE_FILE).read_text()).state_dict())


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors, numbers, strings
    and containers only; a file holding any other pickled object is refused with its name."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
            raise ValueError(
                f"{path} holds pickled Python objects, which caid-hf does not load (they could "
                "run arbitrary code); only tensors, numbers and containers are accepted"
            ) from exc
        raise
