"""Image sources: where the pre-training images come from.

Every source answers three questions: how many images (``len``), the
image at a position (``load(i)``: grey uint8 [H, W]) and a stable name for
it (``image_id(i)``). Sources hold paths, never decoded images, so they are
cheap to pickle into DataLoader workers.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Protocol, runtime_checkable

import numpy as np

from ..decoding import IMAGE_EXTENSIONS, decode_grey
from .chest_phantoms import FINDINGS, LOCALISED_FINDINGS, generate_chest_phantom
from .options import read_text_file
from .phantoms import generate_phantom

__all__ = [
    "ImageFolderSource",
    "ImageSource",
    "PhantomSource",
    "SplitListSource",
    "decode_grey",
]


@runtime_checkable
class ImageSource(Protocol):
    """A sized, indexable collection of grey images."""

    def __len__(self) -> int: ...

    def load(self, i: int) -> np.ndarray:
        """Image ``i`` as grey uint8 [H, W] in 0..255."""
        ...

    def image_id(self, i: int) -> str:
        """A stable name of image ``i`` (a relative path, ``phantom_00042``, …)."""
        ...


def _check_index(i: int, length: int) -> int:
    if not 0 <= i < length:
        raise IndexError(f"image index {i} out of range for a source of {length} images")
    return i


class _FileListSource:
    """Image files named by paths relative to a base folder (``relative_paths``)."""

    base: Path
    relative_paths: list[str]
    bits_stored: int | None = None  # bit depth of 16-bit pixels (None: header, else guessed)

    def __len__(self) -> int:
        return len(self.relative_paths)

    def path(self, i: int) -> Path:
        """The file of image ``i``."""
        return self.base / self.relative_paths[_check_index(i, len(self))]

    def load(self, i: int) -> np.ndarray:
        """Image ``i`` decoded to grey uint8 [H, W]."""
        path = self.path(i)
        if path.is_symlink() and not path.exists():
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            raise ValueError(f"cannot decode image {os.fspath(path)!r}: a broken symbolic link "
                             f"(to {target!r}, which does not exist, or a link loop)")
        return decode_grey(path, self.bits_stored)

    def image_id(self, i: int) -> str:
        """The relative path of image ``i`` (as written in a split list, POSIX for a folder)."""
        return self.relative_paths[_check_index(i, len(self))]


def _check_split_line(split_file: Path, number: int, name: str, labels: list[str]) -> None:
    """A split-list line is ``path [label ...]``: a file name with an image suffix (or none,
    for DICOM files without one) and numeric labels; anything else names file and line."""
    suffix = PurePosixPath(name.replace("\\", "/")).suffix.lower()
    if suffix and suffix not in IMAGE_EXTENSIONS:
        raise ValueError(
            f"{split_file}:{number}: malformed line: {name!r} is not an image file name "
            f"({', '.join(IMAGE_EXTENSIONS)}); expected 'path label label ...' separated by "
            "spaces or tabs"
        )
    for label in labels:
        try:
            float(label)
        except ValueError:
            raise ValueError(
                f"{split_file}:{number}: malformed line: label {label!r} of {name!r} is not a "
                "number; expected 'path label label ...' separated by spaces or tabs"
            ) from None


class SplitListSource(_FileListSource):
    """Images named in a ChestX-ray14 style split list.

    One image per line: the first whitespace-separated token is a path
    relative to ``images_root``; the rest (the labels, numbers) is ignored. Blank lines
    and lines starting with ``#`` are skipped. ``image_id(i)`` is the path as
    written in the list.

    Raises:
        FileNotFoundError: the split file or ``images_root`` does not exist.
        ValueError: a line is malformed (no image file name, non-numeric labels) or its
            path is absolute or leaves ``images_root`` (``..``), with file and line number;
            or the list names no image.
    """

    def __init__(self, split_file: str | os.PathLike, images_root: str | os.PathLike) -> None:
        self.split_file = Path(split_file)
        self.images_root = self.base = Path(images_root)
        if not self.split_file.is_file():
            raise FileNotFoundError(f"split file not found: {self.split_file}")
        if not self.images_root.is_dir():
            raise FileNotFoundError(f"images folder not found: {self.images_root}")
        self.relative_paths: list[str] = []
        lines = read_text_file(self.split_file).splitlines()
        for number, line in enumerate(lines, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, *labels = line.split()
            _check_split_line(self.split_file, number, name, labels)
            posix_name = name.replace("\\", "/")  # lists written on Windows
            if posix_name.startswith("/") or PureWindowsPath(name).drive:
                raise ValueError(
                    f"{self.split_file}:{number}: absolute path {name!r}; "
                    f"paths must be relative to {self.images_root}"
                )
            if posixpath.normpath(posix_name).split("/")[0] == "..":
                raise ValueError(
                    f"{self.split_file}:{number}: path {name!r} leaves {self.images_root}"
                )
            self.relative_paths.append(name)
            self._line_labels(number, name, labels)
        if not self.relative_paths:
            raise ValueError(f"split file {self.split_file} names no images")

    def _line_labels(self, number: int, name: str, labels: list[str]) -> None:
        """Called with the label tokens of each image line (line ``number``) as the list is
        read; pre-training ignores them (a labelled subclass keeps them)."""


class ImageFolderSource(_FileListSource):
    """Every PNG, JPEG and DICOM file below a folder, recursively, sorted by relative path.

    Extensions match case-insensitively; hidden files and folders (names
    starting with ``.``, such as macOS ``._x.png`` resource forks) are
    skipped. Links to folders are followed (each real folder once, so a link
    loop ends). ``image_id(i)`` is the POSIX path relative to ``root``.

    Entries with an image name that are not readable files (dangling links,
    link loops, folders named ``x.png``) are kept: loading them raises
    ``ValueError`` with the reason, so a run lists them in ``bad_files.tsv``
    instead of dropping them silently.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: ``root`` holds no image.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = self.base = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.relative_paths: list[str] = sorted(_image_entries(self.root))
        if not self.relative_paths:
            raise ValueError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in folder {self.root}"
            )


def _image_entries(root: Path) -> list[str]:
    """POSIX paths, relative to ``root``, of the non-hidden entries with an image suffix."""
    found = []
    visited = {os.path.realpath(root)}

    def on_error(error: OSError) -> None:  # an unreadable sub-folder: its images cannot load
        if error.filename and Path(error.filename).suffix.lower() in IMAGE_EXTENSIONS:
            found.append(Path(error.filename).relative_to(root).as_posix())

    for folder, folders, files in os.walk(root, followlinks=True, onerror=on_error):
        here = Path(folder)
        kept = []
        for name in sorted(folders):
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append((here / name).relative_to(root).as_posix())  # a folder named x.png
            real = os.path.realpath(here / name)
            if real not in visited:  # a link back to a folder already walked: a loop, stop
                visited.add(real)
                kept.append(name)
        folders[:] = kept
        found.extend(
            (here / name).relative_to(root).as_posix()
            for name in files
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
        )
    return found


PHANTOM_VERSIONS = ("v1", "cxr14")


class PhantomSource:
    """Synthetic chest phantoms drawn on demand.

    ``version="v1"`` (the default) is the first generator (``phantoms.generate_phantom``):
    ``load(i)`` is phantom ``i`` of the set fixed by ``seed``, grey uint8 [size, size];
    ``load_mask(i)`` its nodule mask, uint8 {0, 1}.

    ``version="cxr14"`` is the ChestX-ray14-like set (``chest_phantoms``): ``load(i)`` as
    above; ``labels(i)`` its findings, uint8 [8] in ``label_names`` order (drawn without
    the image); ``targets`` all of them, float32 [N, 8]; ``load_masks(i)`` the masks of
    the localised findings, uint8 [6, size, size] in ``mask_names`` order;
    ``load_mask(i)`` their union, uint8 [size, size] in {0, 1}.
    """

    def __init__(self, num_images: int, size: int = 256, seed: int = 0, nodules: bool = True,
                 version: str = "v1") -> None:
        if num_images < 1:
            raise ValueError(f"num_images must be positive, got {num_images}")
        if version not in PHANTOM_VERSIONS:
            raise ValueError(f"unknown phantom version {version!r}; choose one of "
                             f"{', '.join(PHANTOM_VERSIONS)}")
        self.num_images = num_images
        self.size = size
        self.seed = seed
        self.nodules = nodules
        self.version = version
        self.label_names = list(FINDINGS) if version == "cxr14" else ["nodule"]
        self.mask_names = list(LOCALISED_FINDINGS) if version == "cxr14" else ["nodule"]
        self._last: tuple[int, object] | None = None  # load() then load_masks() draw once

    def __len__(self) -> int:
        return self.num_images

    def _chest(self, i: int):
        i = _check_index(i, len(self))
        if self._last is None or self._last[0] != i:
            self._last = (i, generate_chest_phantom(i, self.size, self.seed))
        return self._last[1]

    def load(self, i: int) -> np.ndarray:
        """Phantom ``i``: grey uint8 [size, size]."""
        if self.version == "cxr14":
            return self._chest(i).image
        return generate_phantom(_check_index(i, len(self)), self.size, self.seed, self.nodules)[0]

    def load_mask(self, i: int) -> np.ndarray:
        """Nodule mask of phantom ``i`` (``cxr14``: the union of its finding masks): uint8
        [size, size] with values {0, 1}."""
        if self.version == "cxr14":
            return self._chest(i).masks.max(axis=0)
        return generate_phantom(_check_index(i, len(self)), self.size, self.seed, self.nodules)[1]

    def load_masks(self, i: int) -> np.ndarray:
        """Masks of phantom ``i``: uint8 [len(mask_names), size, size] in {0, 1}."""
        if self.version == "cxr14":
            return self._chest(i).masks
        return self.load_mask(i)[None]

    def labels(self, i: int) -> np.ndarray:
        """Findings of phantom ``i``: uint8 [len(label_names)] in {0, 1}."""
        if self.version == "cxr14":
            from .chest_phantoms import chest_phantom_labels

            return chest_phantom_labels(_check_index(i, len(self)), self.seed)
        return np.asarray([self.load_mask(i).any()], dtype=np.uint8)

    @property
    def targets(self) -> np.ndarray:
        """float32 [N, len(label_names)]: every phantom's findings."""
        return np.stack([self.labels(i) for i in range(len(self))]).astype(np.float32)

    def image_id(self, i: int) -> str:
        """``phantom_00042`` style name, matching ``write_phantoms``' file stems."""
        return f"phantom_{_check_index(i, len(self)):05d}"
