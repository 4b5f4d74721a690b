"""Training on a streaming Hugging Face dataset: crops from an iterable, a held-out head.

A streaming ``datasets.IterableDataset`` has no length and no random access, so it is read
in order, each process its own part (``HFStreamingSource``), and the training loop ends an
epoch when the first process runs out. Validation needs the same images every epoch: the
first ``n`` images of the stream are held out (kept decoded in memory, identical on every
process) and skipped by training.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from .crops import _mix_seed, cut_views, sample_crop_box
from .hf_sources import HFStreamingSource

__all__ = ["MemorySource", "StreamingTwoCrops", "take_head"]


class MemorySource:
    """An image source over decoded grey images held in memory (``ids``, ``images``)."""

    def __init__(self, ids: list[str], images: list[np.ndarray]) -> None:
        if len(ids) != len(images):
            raise ValueError(f"{len(ids)} ids for {len(images)} images")
        self.ids, self.images = list(ids), list(images)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> np.ndarray:
        return self.images[i]

    def image_id(self, i: int) -> str:
        return self.ids[i]


def take_head(stream: HFStreamingSource, n: int) -> MemorySource:
    """The first ``n`` decodable images of ``stream`` (read as one process) in memory."""
    if stream.world_size != 1:
        raise ValueError("take_head reads the whole, unsplit stream (world_size=1)")
    ids, images = [], []
    for image_id, image in stream:
        ids.append(image_id)
        images.append(image)
        if len(images) == n:
            break
    if not images:
        raise ValueError(f"the stream {stream.name} yielded no decodable image")
    return MemorySource(ids, images)


class StreamingTwoCrops(IterableDataset):
    """Iterable of ``(crops, bad, position)`` items, like :class:`~caid_hf.data.crops.SkipBadImages`.

    ``crops``: uint8 [2, S, S], two RandomResizedCrops of the next image of this process's
    part of ``stream``, their boxes drawn from ``(seed, epoch, crc32(image_id))``; ``bad``:
    ``(image_id, reason)`` of the undecodable rows skipped since the previous item;
    ``position``: the stream lane's position after the image (see
    :meth:`HFStreamingSource.resume_from`). Images whose id is in ``exclude`` (the held-out
    validation head) are skipped without being decoded.
    """

    def __init__(self, stream: HFStreamingSource, image_size: int,
                 scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), seed: int = 0,
                 reducing_gap: float | None = None, exclude: frozenset[str] = frozenset()):
        super().__init__()
        self.stream = stream
        self.image_size = image_size
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.seed = seed
        self.reducing_gap = reducing_gap
        self.exclude = frozenset(exclude)

    def set_epoch(self, epoch: int) -> None:
        """New crops and a new stream order (shard order, shuffle windows) for ``epoch``."""
        self.stream.set_epoch(epoch)

    def resume_from(self, resume: dict | None) -> None:
        """Resume the stream's lanes at saved positions (:meth:`HFStreamingSource.resume_from`)."""
        self.stream.resume_from(resume)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[tuple[str, str]], dict]]:
        bad: list[tuple[str, str]] = []
        self.stream.on_bad = lambda image_id, reason: bad.append((image_id, reason))
        epoch = self.stream.epoch
        for image_id, image, position in self.stream.iter_items(self.exclude):
            key = zlib.crc32(image_id.encode("utf-8"))
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, epoch, key))
            boxes = [sample_crop_box(*image.shape, self.scale, self.ratio, generator)
                     for _ in range(2)]
            report = list(bad)
            bad.clear()
            yield cut_views(image, boxes, self.image_size, self.reducing_gap), report, position
