"""What a pre-training run shows and leaves besides weights: console lines, the closing
summary, reconstruction pictures and ``trainer_state.json``."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..console import format_duration
from ..runs import write_run_state
from .checkpointing import TrainState

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
    """``trainer_state.json`` of a pre-training run (:func:`caid_hf.runs.write_run_state`:
    the model is selected by ``val/loss``)."""
    write_run_state(output_dir, state.global_step, "val/loss", state.best_val_loss,
                    state.best_step, extra, state.history)


GRID_COLUMNS = ("distorted input", "reconstruction", "target")
GRID_MIN_TILE = 128  # px: smaller views are enlarged (nearest) so the grid reads at a glance
GRID_LABEL_HEIGHT = 20  # px of the column-label band above the tiles


def _caption_font(draw, text: str, width: int):
    """Pillow's own font at the largest size from 12 px down to 8 px that fits ``text`` in
    ``width`` where Pillow has FreeType (its small bitmap font drops the colon of
    ``phantoms:cxr14``), else the bitmap font."""
    from PIL import ImageFont

    try:
        for size in range(12, 7, -1):
            font = ImageFont.load_default(size=size)
            if draw.textlength(text, font=font) <= width - 4:
                break
        return font
    except (TypeError, ImportError, OSError):  # no FreeType in this Pillow
        return ImageFont.load_default()


def grid_caption(step: int | None, loss: float | None, source: str | None) -> str:
    """The grid's title line, e.g. ``step 192 | val loss 5.0180 | synthetic chest phantoms
    (phantoms:cxr14)``."""
    from ..data.source_spec import PHANTOM_SPECS

    parts = []
    if step is not None:
        parts.append(f"step {step}")
    if loss is not None:
        parts.append(f"val loss {loss:.4f}")
    if source is not None:
        parts.append(f"synthetic chest phantoms ({source})" if source in PHANTOM_SPECS
                     else f"data: {source}")
    return " | ".join(parts)


def save_reconstruction_grid(triple: tuple[torch.Tensor, torch.Tensor, torch.Tensor], path: Path,
                             accelerator=None, step: int | None = None,
                             loss: float | None = None, source: str | None = None
                             ) -> torch.Tensor:
    """One row per image: distorted input | reconstruction | target (each [b, 1, S, S] in
    [0, 1]) under a caption (step, validation loss, data source: :func:`grid_caption`) and
    a band naming the columns, written as a PNG and, when a TensorBoard tracker runs, as
    the image ``val/reconstructions``. The PNG also carries ``step``, ``val_loss`` and
    ``source`` as text chunks. Views smaller than :data:`GRID_MIN_TILE` px are enlarged by
    a whole factor with nearest-neighbour sampling (each pixel a block, nothing smoothed
    away). Returns the picture, float [3, H, W] in [0, 1]."""
    import numpy as np
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo
    from torchvision.utils import make_grid

    factor = max(1, math.ceil(GRID_MIN_TILE / triple[0].shape[-1]))
    inputs, reconstructions, targets = (
        torch.nn.functional.interpolate(t.float().clamp(0, 1), scale_factor=factor,
                                        mode="nearest") for t in triple)
    rows = torch.stack([inputs, reconstructions, targets], dim=1).flatten(0, 1)
    padding = 2
    grid = make_grid(rows, nrow=3, padding=padding, pad_value=1.0)
    tiles = (grid[0].mul(255).round().byte().numpy())
    caption = grid_caption(step, loss, source)
    top = GRID_LABEL_HEIGHT if caption else 0
    picture = Image.new("L", (tiles.shape[1], tiles.shape[0] + top + GRID_LABEL_HEIGHT), 255)
    picture.paste(Image.fromarray(tiles), (0, top + GRID_LABEL_HEIGHT))
    draw = ImageDraw.Draw(picture)
    if caption:
        draw.text((picture.width / 2, top / 2), caption, fill=0, anchor="mm",
                  font=_caption_font(draw, caption, picture.width))
    tile = inputs.shape[-1]
    for column, label in enumerate(GRID_COLUMNS):
        centre = padding + column * (tile + padding) + tile / 2
        draw.text((centre, top + GRID_LABEL_HEIGHT / 2), label, fill=0, anchor="mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = PngInfo()
    for key, value in (("step", step), ("val_loss", loss), ("source", source)):
        if value is not None:
            text.add_text(key, str(value))
    picture.save(path, pnginfo=text)
    image = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).expand(3, -1, -1)
    if accelerator is not None:
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"val/reconstructions": image[None]}, step=step)
    return image
