"""Training-state bookkeeping that Accelerate's ``save_state`` / ``load_state`` carry."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class TrainState:
    """Counters of a run, saved with every checkpoint (``register_for_checkpointing``)."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_val_loss: float = math.inf
    best_step: int = -1
    history: list[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def checkpoint_number(path: Path) -> int:
    """N of a ``checkpoint_N`` folder."""
    return int(re.fullmatch(r"checkpoint_(\d+)", Path(path).name).group(1))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest ``<output_dir>/checkpoints/checkpoint_N`` folder, or None."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    numbered = [(int(m.group(1)), p) for p in folder.iterdir()
                if p.is_dir() and (m := re.fullmatch(r"checkpoint_(\d+)", p.name))]
    return max(numbered)[1] if numbered else None
