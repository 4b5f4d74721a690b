"""The per-sample CPU work of the data pipeline: decode and two random crops.

Everything after the crops (appearance jitter, blur, flip, distortion and the
reconstruction target) runs batched on the device in ``augment.py``, so a
DataLoader worker only decodes an image and cuts two views out of it.

Each crop is cut out first and then resized with PIL's antialiased bilinear filter on
the grey image, exactly as the original does (torchvision's ``RandomResizedCrop`` on PIL
images: ``crop`` then ``resize``), so the filter never reads pixels outside the box.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .sources import ImageSource

__all__ = ["SkipBadImages", "TwoCropDataset", "collate_crops", "cut_views", "sample_crop_box"]


def sample_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box ``(top, left, box_height, box_width)``.

    The rule of torchvision's ``RandomResizedCrop``: up to 10 attempts draw an area
    fraction ~ U(scale) and a log-uniform aspect ratio in ``ratio``; the first box that
    fits is placed uniformly. If none fits, the largest centred box whose aspect ratio is
    clamped to ``ratio``. Draws from ``generator`` (torch's global RNG when None).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        draws = torch.rand(2, generator=generator).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * draws[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[1])
        box_width = round(math.sqrt(target_area * aspect))
        box_height = round(math.sqrt(target_area / aspect))
        if 0 < box_width <= width and 0 < box_height <= height:
            top = int(torch.randint(0, height - box_height + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - box_width + 1, (1,), generator=generator))
            return top, left, box_height, box_width
    image_ratio = width / height
    if image_ratio < min(ratio):
        box_width, box_height = width, round(width / min(ratio))
    elif image_ratio > max(ratio):
        box_height, box_width = height, round(height * max(ratio))
    else:
        box_width, box_height = width, height
    return (height - box_height) // 2, (width - box_width) // 2, box_height, box_width


def cut_views(image: np.ndarray, boxes, image_size: int,
              reducing_gap: float | None = None) -> torch.Tensor:
    """uint8 [len(boxes), S, S]: each ``(top, left, box_height, box_width)`` box of the grey
    uint8 [H, W] ``image`` cut out, then resized to S = ``image_size`` with PIL's
    antialiased bilinear filter: bit for bit torchvision's ``resized_crop`` on a PIL image,
    the original's views (``reducing_gap``: see :class:`TwoCropDataset`). Resizing with
    ``resize(box=...)`` instead would let the filter read pixels outside the box."""
    picture = Image.fromarray(np.ascontiguousarray(image))
    size = (image_size, image_size)
    views = np.empty((len(boxes), *size), dtype=np.uint8)
    for view, (top, left, box_height, box_width) in zip(views, boxes):
        box = (left, top, left + box_width, top + box_height)
        view[...] = np.asarray(picture.crop(box).resize(size, Image.Resampling.BILINEAR,
                                                        reducing_gap=reducing_gap))
    return torch.from_numpy(views)


def _mix_seed(*values: int) -> int:
    """One 63-bit seed from several integers (splitmix64 steps), stable across processes."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return state >> 1


class TwoCropDataset(Dataset):
    """Two independent RandomResizedCrops of each image of a source.

    ``dataset[i]`` is a uint8 tensor [2, image_size, image_size] in 0..255:
    two crops of the grey image ``source.load(i)`` (uint8 [H, W]), each
    covering a ``scale`` fraction of the image area with aspect ratio in
    ``ratio``, resized with PIL's antialiased bilinear filter (the CAiD views before
    augmentation). A DataLoader batches them to
    [B, 2, image_size, image_size].

    Where the crop boxes come from:

    - ``seed=None``: torch's global RNG, so ``torch.manual_seed`` (and DataLoader worker
      seeding) makes them reproducible.
    - ``seed`` set, ``per_epoch=False``: a stream seeded by ``(seed, i)``: image ``i``
      always gets the same two crops whichever worker loads it (the fixed views of a
      validation set).
    - ``seed`` set, ``per_epoch=True``: a stream seeded by ``(seed, epoch, i)``, the
      epoch set by :meth:`set_epoch`: new crops every epoch, yet the crops of a batch do
      not depend on workers, their RNG or where a run was resumed. The epoch lives in
      shared memory, so persistent DataLoader workers see ``set_epoch`` too.

    ``reducing_gap`` is PIL's two-step resize (``Image.resize(reducing_gap=...)``):
    None (default) resizes exactly like the original; 1.0 first averages whole pixel
    blocks while the box stays at least ``image_size`` wide, about half the work for
    large crops, at a mean difference of about half a grey level.
    """

    def __init__(
        self,
        source: ImageSource,
        image_size: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        seed: int | None = None,
        per_epoch: bool = False,
        reducing_gap: float | None = None,
    ) -> None:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {tuple(scale)}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"crop ratio must satisfy 0 < low <= high, got {tuple(ratio)}")
        if per_epoch and seed is None:
            raise ValueError("per_epoch crops need a seed")
        if reducing_gap is not None and reducing_gap < 1.0:
            raise ValueError(f"reducing_gap must be None or >= 1.0, got {reducing_gap}")
        self.source = source
        self.image_size = image_size
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.seed = seed
        self.per_epoch = per_epoch
        self.reducing_gap = reducing_gap
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of ``epoch`` (only with ``per_epoch=True``; otherwise a no-op)."""
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.source)

    def _generator(self, i: int) -> torch.Generator | None:
        if self.seed is None:
            return None
        values = (self.seed, int(self._epoch), i) if self.per_epoch else (self.seed, i)
        return torch.Generator().manual_seed(_mix_seed(*values))

    def crop_boxes(self, i: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """The two ``(top, left, box_height, box_width)`` boxes of image ``i``."""
        generator = self._generator(i)
        return [sample_crop_box(height, width, self.scale, self.ratio, generator) for _ in range(2)]

    def crops(self, i: int, boxes_of: int | None = None) -> torch.Tensor:
        """The two crops of image ``i``, with the boxes drawn for index ``boxes_of`` (default
        ``i``; :class:`SkipBadImages` uses it for a stand-in image). Errors of
        ``source.load`` propagate."""
        image = self.source.load(i)
        if not isinstance(image, np.ndarray) or image.ndim != 2 or image.dtype != np.uint8:
            kind = f"{image.dtype} {list(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
            raise TypeError(
                f"source image {self.source.image_id(i)!r} must be grey uint8 [H, W], got {kind}"
            )
        boxes = self.crop_boxes(i if boxes_of is None else boxes_of, *image.shape)
        return cut_views(image, boxes, self.image_size, self.reducing_gap)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.crops(i)


BAD_IMAGE_ERRORS = (ValueError, OSError)  # FileNotFoundError is an OSError


class SkipBadImages(Dataset):
    """Training view of a :class:`TwoCropDataset` that survives unreadable images.

    ``item = (crops, bad)``: ``crops`` as ``dataset[i]``; when image ``i`` cannot be
    read (missing, empty, truncated, not an image: the source raises ``ValueError`` or
    ``OSError``) the next readable image (``i + 1``, ``i + 2``, … modulo the length) takes
    its place with image ``i``'s crop boxes, so batches keep their shape and stay
    reproducible, and ``bad`` lists ``(image_id, reason)`` of every image skipped.
    Batch with :func:`collate_crops`.

    Raises:
        RuntimeError: ``max_tries`` images in a row are unreadable.
    """

    def __init__(self, dataset: TwoCropDataset, max_tries: int = 100) -> None:
        self.dataset = dataset
        self.max_tries = max_tries

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[tuple[str, str]]]:
        n = len(self.dataset)
        bad: list[tuple[str, str]] = []
        for step in range(min(self.max_tries, n)):
            j = (i + step) % n
            try:
                return self.dataset.crops(j, boxes_of=i), bad
            except BAD_IMAGE_ERRORS as error:
                bad.append((self.dataset.source.image_id(j), _reason(error)))
        raise RuntimeError(
            f"{len(bad)} images in a row could not be read, starting at "
            f"{bad[0][0]!r} ({bad[0][1]}); is the data source right?"
        )


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, ValueError) else f"{type(error).__name__}: {text}"


def collate_crops(items: list[tuple]) -> dict:
    """``{"crops": uint8 [B, 2, S, S], "bad_files": [(image_id, reason), ...]}``; items of a
    stream, ``(crops, bad, position)``, add ``"stream_position"``: the last item's (a batch
    comes from one DataLoader worker, so from one lane)."""
    batch = {"crops": torch.stack([item[0] for item in items]),
             "bad_files": [record for item in items for record in item[1]]}
    if len(items[0]) > 2:
        batch["stream_position"] = items[-1][2]
    return batch
