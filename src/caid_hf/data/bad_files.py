"""Unreadable images met during a run: counted, listed, and a limit on how many.

The data loaders skip an image that cannot be read (see ``crops.SkipBadImages``) and
report it with the batch; the training loop hands those reports to a :class:`BadFileLog`,
which keeps each image once, appends it to ``<output_dir>/bad_files.tsv`` (``image_id``
and ``reason``, tab-separated, with a header) and stops the run when more than
``max_fraction`` of the images are bad: a few broken files in 100,000 are normal, a
quarter of them means a wrong path or a broken disk.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

__all__ = ["BadFileLog", "TooManyBadFiles"]

_HEADER = ("image_id", "reason")


class TooManyBadFiles(RuntimeError):
    """More than ``max_bad_fraction`` of the images could not be read."""


class BadFileLog:
    """The set of bad images of a run and its ``bad_files.tsv``.

    Args:
        path: the TSV file (None: keep the list in memory only, e.g. on non-main processes).
            An existing file (a resumed run) is read back, so counts continue.
        total_images: the number of images the fraction refers to.
        max_fraction: the largest tolerated fraction of bad images.
        remedy: what the stopping message advises (default: pre-training's).
    """

    def __init__(self, path: str | Path | None, total_images: int, max_fraction: float = 0.01,
                 remedy: str | None = None):
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_fraction}")
        self.path = Path(path) if path is not None else None
        self.total_images = max(1, int(total_images))
        self.max_fraction = max_fraction
        self.remedy = remedy or ("Fix or remove them (or run `caid-hf prepare-data`, which "
                                 "leaves them out), or raise max_bad_fraction.")
        self.reasons: dict[str, str] = {}
        if self.path is not None and self.path.is_file():
            with self.path.open(newline="", encoding="utf-8") as handle:
                for row in csv.reader(handle, delimiter="\t"):
                    if len(row) >= 2 and tuple(row[:2]) != _HEADER:
                        self.reasons.setdefault(row[0], row[1])

    def __len__(self) -> int:
        return len(self.reasons)

    @property
    def fraction(self) -> float:
        return len(self) / self.total_images

    def add(self, records: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """Record ``(image_id, reason)`` pairs; returns those not seen before (appended to
        the TSV)."""
        new = []
        for image_id, reason in records:
            if image_id not in self.reasons:
                self.reasons[image_id] = reason
                new.append((image_id, reason))
        if new and self.path is not None:
            fresh = not self.path.is_file()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
                if fresh:
                    writer.writerow(_HEADER)
                writer.writerows(new)
        return new

    def check(self) -> None:
        """Raise :class:`TooManyBadFiles` when the bad fraction exceeds the limit."""
        if self.fraction <= self.max_fraction:
            return
        examples = "; ".join(f"{i} ({r})" for i, r in list(self.reasons.items())[:3])
        where = f"; all of them are listed in {self.path}" if self.path is not None else ""
        raise TooManyBadFiles(
            f"{len(self)} of {self.total_images} images ({self.fraction:.1%}) could not be read, "
            f"more than max_bad_fraction={self.max_fraction:g}: {examples}{where}. {self.remedy}"
        )
