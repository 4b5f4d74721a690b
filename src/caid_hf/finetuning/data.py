"""Labelled data for fine-tuning and feature evaluation: images with class labels or masks.

A labelled source is an image source (``len``, ``load(i)`` → grey uint8 [H, W],
``image_id(i)``) that also knows its ``label_names`` and either

- ``targets``: float32 [N, L] in {0, 1}, one row per image (classification; multi-hot for
  multi-label data, one-hot for single-label data; NaN marks an ignored entry, such as an
  uncertain CheXpert label under ``uncertain_labels=ignore``, left out of the loss and the
  metrics), or
- ``load_mask(i)``: int64 [H, W] per image (segmentation; {0, 1} for binary masks, class
  indices for multi-class ones, ``ignore_index`` for unlabelled pixels).

One string names a source, as in pre-training (:func:`labelled_source_from_spec`):

- ``phantoms``: the embedded synthetic chest phantoms; label ``nodule`` (present or not) and
  the nodule masks;
- a ``.csv`` (or ``.csv.gz``) file: an image-path column and label columns (1, 0, -1 for
  uncertain, blank), one column of ``|``-separated finding names as in ChestX-ray14's
  ``Data_Entry_2017.csv``, or CheXpert's, MIMIC-CXR's and PadChest's own layouts (see
  :mod:`caid_hf.finetuning.label_formats`); or an image and a mask column for
  segmentation; paths relative to ``images_root`` (default: the CSV's folder);
- a Hugging Face dataset (``hf:NAME``, a ``save_to_disk`` folder, parquet/arrow files): an
  image column and a label column (``ClassLabel``, a sequence of ``ClassLabel`` or of
  numbers, or several numeric columns), or a mask image column;
- a folder (segmentation): images with masks of the same relative path (any image suffix)
  in ``masks_root`` (default: ``FOLDER/masks``), which ``caid-hf phantoms --masks`` writes;
- any other file: a ChestX-ray14 split list, ``path label label …`` per line (the official
  lists carry the 14 findings in :data:`CHESTXRAY14_LABELS` order).

The torch datasets (:class:`ClassificationDataset`, :class:`SegmentationDataset`) turn a
source into ``pixel_values`` float32 [3, S, S] in [0, 1] (the :class:`CAiDImageProcessor`
preprocessing, no mean/std normalisation) plus ``labels``.
"""

from __future__ import annotations

import io
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..data.crops import BAD_IMAGE_ERRORS
from ..data.patients import check_patient_rule, patient_ids_from_names
from ..data.source_spec import PHANTOM_SPECS, HFOptions, is_hf_spec, open_hf_spec
from ..data.sources import (
    IMAGE_EXTENSIONS,
    SplitListSource,
    _check_index,
    decode_grey,
)
from .label_formats import CHESTXRAY14_FINDINGS, read_label_table

__all__ = [
    "CHESTXRAY14_LABELS",
    "ClassificationDataset",
    "CSVLabelledSource",
    "HFLabelledSource",
    "LabelledSourceOptions",
    "MaskFolderSource",
    "PhantomLabelledSource",
    "SegmentationDataset",
    "SplitListLabelledSource",
    "collate_labelled",
    "decode_mask",
    "labelled_source_from_spec",
]

# The 14 findings of ChestX-ray14, in the column order of the official split lists.
CHESTXRAY14_LABELS = CHESTXRAY14_FINDINGS


@dataclass
class LabelledSourceOptions:
    """How to read labels and masks; every field has a flag of the same name in fine-tuning."""

    task: str = "classification"
    images_root: str | None = None
    masks_root: str | None = None
    image_column: str | None = None
    label_columns: list[str] | None = None
    mask_column: str | None = None
    label_names: list[str] | None = None
    hf: HFOptions = field(default_factory=HFOptions)
    num_phantoms: int = 200
    phantom_size: int = 128
    phantom_seed: int = 0
    binary_masks: bool = True
    label_format: str = "auto"
    uncertain_labels: str = "ignore"
    blank_labels: str = "zeros"
    views: list[str] | None = None
    view_column: str | None = None
    metadata_csv: str | None = None
    patient_id_from: str = "auto"
    bits_stored: int | None = None
    accept_unknown_findings: bool = False


def decode_mask(path: str | os.PathLike | io.BytesIO | None = None,
                image: Image.Image | None = None, binary: bool = True,
                name: str | None = None) -> np.ndarray:
    """Read a mask file (a path or stored bytes, or an open PIL image) as int64 [H, W].

    Pixel values are kept as stored: a palette PNG gives its palette indices, an 8- or
    16-bit grey PNG its values. With ``binary`` every non-zero pixel becomes 1 (masks saved
    as {0, 255} or {0, 1} alike); RGB masks are only accepted as binary masks.

    Raises:
        ValueError: the file is not a readable image, or an RGB mask for several classes;
            the message names the file (or ``name``).
    """
    name = name or (os.fspath(path) if path is not None else "mask image")
    if image is None:
        try:
            with Image.open(path) as opened:
                opened.load()
                return decode_mask(image=opened, binary=binary, name=name)
        except (UnidentifiedImageError, OSError, SyntaxError,
                Image.DecompressionBombError) as error:
            if isinstance(error, FileNotFoundError):
                raise FileNotFoundError(f"mask not found: {name}") from error
            raise ValueError(f"cannot decode mask {name}: {error}") from error
    if image.mode in ("RGB", "RGBA", "LA"):
        if not binary:
            raise ValueError(f"{name}: an {image.mode} mask cannot hold class indices; save "
                             "multi-class masks as grey or palette PNGs")
        image = image.convert("L")
    values = np.asarray(image).astype(np.int64)
    return (values > 0).astype(np.int64) if binary else values


def _checked_relative_path(name: str, root: Path, where: str) -> str:
    """``name`` if it is a relative path that stays inside ``root``; else ``ValueError``."""
    posix_name = name.replace("\\", "/")
    if posix_name.startswith("/") or PureWindowsPath(name).drive:
        raise ValueError(f"{where}: absolute path {name!r}; paths must be relative to {root}")
    if posixpath.normpath(posix_name).split("/")[0] == "..":
        raise ValueError(f"{where}: path {name!r} leaves {root}")
    return name


def _default_names(count: int) -> list[str]:
    return CHESTXRAY14_LABELS if count == len(CHESTXRAY14_LABELS) else \
        [f"label_{k}" for k in range(count)]


def _check_names(names: list[str] | None, count: int, where: str) -> list[str] | None:
    if names is not None and len(names) != count:
        raise ValueError(f"{where}: label_names has {len(names)} names but the data has "
                         f"{count} labels")
    return names


class SplitListLabelledSource(SplitListSource):
    """A ChestX-ray14 split list whose lines carry the labels: ``path l1 l2 … lL``.

    Paths are checked as in pre-training (:class:`~caid_hf.data.sources.SplitListSource`).
    Labels are numbers in {0, 1}; every line must carry the same number of them. Names:
    ``label_names``, else the 14 ChestX-ray14 findings when there are 14, else
    ``label_0 …``.

    Raises:
        ValueError: a line without labels, with another number of labels than the first, or
            with a label other than 0 or 1; the message gives file and line number.
    """

    def __init__(self, split_file: str | os.PathLike, images_root: str | os.PathLike,
                 label_names: list[str] | None = None) -> None:
        self._rows: list[list[float]] = []
        self._count: int | None = None
        super().__init__(split_file, images_root)  # reads the list once, lines via _line_labels
        self.targets = np.asarray(self._rows, dtype=np.float32)
        self.label_names = _check_names(label_names, self._count, str(self.split_file)) \
            or _default_names(self._count)
        del self._rows

    def _line_labels(self, number: int, name: str, labels: list[str]) -> None:
        if not labels:
            raise ValueError(f"{self.split_file}:{number}: {name!r} has no labels; a "
                             "fine-tuning split list needs 'path label label ...'")
        if self._count is None:
            self._count = len(labels)
        elif len(labels) != self._count:
            raise ValueError(f"{self.split_file}:{number}: {len(labels)} labels, but the "
                             f"first line has {self._count}")
        values = [float(label) for label in labels]
        if any(v not in (0.0, 1.0) for v in values):
            raise ValueError(f"{self.split_file}:{number}: labels must be 0 or 1, got "
                             f"{labels}")
        self._rows.append(values)


class CSVLabelledSource:
    """Images listed in a CSV file, with labels (classification) or mask paths (segmentation).

    The layouts of ChestX-ray14, CheXpert, MIMIC-CXR and PadChest are read as they come,
    detected from the header or named by ``label_format`` (see
    :mod:`caid_hf.finetuning.label_formats`): uncertain (-1) and blank cells follow
    ``uncertain_labels`` / ``blank_labels``, an ignored entry is NaN in ``targets`` (left out
    of the loss and the metrics), and ``views`` keeps some views only.

    Every image (and mask) is looked up when the table is read, one ``stat`` per row: a row
    whose file is missing is left out and listed in ``bad_images`` as ``(image path,
    "FILE:LINE: image not found: …")``, so the caller can log and count it (fine-tuning and
    ``evaluate-features`` write ``bad_files.tsv`` and stop beyond ``max_bad_fraction``).
    ``rows_read`` is the number of rows before that (after ``views``).

    Args:
        csv_file: the CSV file (header row required; ``.csv.gz`` too).
        images_root: folder the image (and mask) paths are relative to; default the CSV's
            (CheXpert: the folder above it, where its paths start).
        image_column: column of image paths; default the layout's, else the first of
            ``image``, ``path``, ``Path``, ``image_path``, ``file``, ``filename``,
            ``Image Index`` present, else the first (if it holds image file names).
        label_columns: classification: the label columns; default the layout's, else every
            other column whose cells are all 1, 0, -1 or blank. One column of names holds
            ``|``-separated findings (ChestX-ray14's ``Finding Labels``).
        mask_column: segmentation: column of mask paths.
        label_names: the label names; for a column of finding names (ChestX-ray14, PadChest)
            the findings to keep, in this order (a listed finding absent from the file
            warns and gives an all-zero column).
        binary_masks: read masks as {0, 1} (non-zero = foreground).
        patient_id_from: how ``patient_ids`` are read (:mod:`caid_hf.data.patients`).
        accept_unknown_findings: read finding names outside the data set's vocabulary as
            findings of their own instead of refusing the file.
        check_images: look every image up now (``False``: find missing ones when loading).

    Raises:
        FileNotFoundError: the CSV file or ``images_root`` does not exist, or none of the
            listed images does.
        ValueError: a named column is missing (the columns are listed), a label cell that is
            not 1, 0, -1 or blank, or an absolute / escaping path; messages name file,
            physical line and column.
    """

    bits_stored: int | None = None  # of 16-bit pixels (None: the header's, else guessed)

    def __init__(self, csv_file: str | os.PathLike, images_root: str | os.PathLike | None = None,
                 image_column: str | None = None, label_columns: list[str] | None = None,
                 mask_column: str | None = None, label_names: list[str] | None = None,
                 binary_masks: bool = True, label_format: str = "auto",
                 uncertain_labels: str = "ignore", blank_labels: str = "zeros",
                 views: list[str] | None = None, view_column: str | None = None,
                 metadata_csv: str | None = None, patient_id_from: str = "auto",
                 accept_unknown_findings: bool = False, check_images: bool = True) -> None:
        self.csv_file = Path(csv_file)
        segmentation = mask_column is not None
        table = read_label_table(
            self.csv_file, None if images_root is None else str(images_root), image_column,
            label_columns, label_names, "binary" if segmentation and label_format == "auto"
            else label_format, uncertain_labels, blank_labels, views, view_column,
            metadata_csv, with_labels=not segmentation,
            accept_unknown_findings=accept_unknown_findings)
        self.base, self.label_format = table.base, table.label_format
        if not self.base.is_dir():
            raise FileNotFoundError(f"images folder not found: {self.base}")
        for k, path in enumerate(table.paths):
            _checked_relative_path(path, self.base, f"{table.image_where(k)} column "
                                                    f"{table.path_column!r}")
        if segmentation:
            if mask_column not in table.rows[0]:
                raise ValueError(f"{self.csv_file}: no column {mask_column!r} (columns: "
                                 f"{list(table.rows[0])})")
            for k, row in enumerate(table.rows):
                _checked_relative_path(row[mask_column], self.base, table.where(k, mask_column))
        self.rows_read = len(table.paths)
        self.bad_images: list[tuple[str, str]] = []
        if check_images:
            self._leave_out_missing(table, mask_column)
        self.relative_paths = table.paths
        self._image_file = table.image_file or table.csv_file
        self._image_lines = table.image_lines or table.lines
        self.binary_masks = binary_masks
        self.targets, self.label_names = table.targets, table.label_names
        self.dropped_views = table.dropped_views
        self.patient_ids = self._patient_ids(table, patient_id_from)
        self.mask_paths = [r[mask_column] for r in table.rows] if segmentation else None

    def _leave_out_missing(self, table, mask_column: str | None) -> None:
        """Drop the rows whose image (or mask) file does not exist, recording each with the
        line that names it."""
        keep = []
        for k, (path, row) in enumerate(zip(table.paths, table.rows)):
            missing = [(what, name) for what, name in
                       (("image", path), ("mask", row[mask_column] if mask_column else None))
                       if name is not None and not os.path.isfile(self.base / name)]
            if missing:
                what, name = missing[0]
                self.bad_images.append((path, f"{table.image_where(k)}: {what} not found: "
                                              f"{self.base / name}"))
            else:
                keep.append(k)
        if not keep:
            shown = "; ".join(reason for _, reason in self.bad_images[:3])
            raise FileNotFoundError(
                f"{self.csv_file}: none of the {len(table.paths)} images exists below "
                f"{self.base} ({shown}); is images_root right?")
        if len(keep) < len(table.paths):
            table.select(keep)

    def _patient_ids(self, table, rule: str) -> list[str] | None:
        check_patient_rule(rule)
        if rule == "auto" and table.patient_rule is not None:
            rule = table.patient_rule
        if rule.startswith("column:"):
            column = rule[len("column:"):]
            if column not in table.rows[0]:
                raise ValueError(f"{self.csv_file}: patient_id_from {rule!r}: no column "
                                 f"{column!r} (columns: {list(table.rows[0])})")
            return [(r[column] or "").strip() or f"line {table.lines[k]}"
                    for k, r in enumerate(table.rows)]
        return patient_ids_from_names(table.paths, rule, str(self.csv_file))

    def patient_ids_for(self, rule: str) -> list[str] | None:
        """The patient ids read when the source was opened (its ``patient_id_from``); a
        name rule asked for now is read from the paths."""
        if rule == "none":
            return None
        if rule == "auto" or rule.startswith("column:"):
            return self.patient_ids
        return patient_ids_from_names(self.relative_paths, rule, str(self.csv_file))

    def __len__(self) -> int:
        return len(self.relative_paths)

    def row_place(self, i: int) -> str:
        """``FILE:LINE`` of the CSV record that names image ``i``."""
        return f"{self._image_file}:{self._image_lines[_check_index(i, len(self))]}"

    def load(self, i: int) -> np.ndarray:
        """Image ``i`` as grey uint8 [H, W]."""
        return decode_grey(self.base / self.relative_paths[_check_index(i, len(self))],
                           self.bits_stored)

    def load_mask(self, i: int) -> np.ndarray:
        """Mask ``i`` as int64 [H, W] (see :func:`decode_mask`)."""
        if self.mask_paths is None:
            raise ValueError(f"{self.csv_file}: no mask column was given (mask_column)")
        return decode_mask(self.base / self.mask_paths[_check_index(i, len(self))],
                           binary=self.binary_masks)

    def image_id(self, i: int) -> str:
        return self.relative_paths[_check_index(i, len(self))]


class MaskFolderSource:
    """Image files below ``images_root`` with their masks below ``masks_root``.

    A mask has the image's relative path with any image suffix (``a/b.png`` ↔
    ``masks/a/b.png``). Files below ``masks_root`` are never taken as images.

    Raises:
        FileNotFoundError: a folder is missing, or an image has no mask (the first few are
            named).
    """

    bits_stored: int | None = None  # of 16-bit pixels (None: the header's, else guessed)

    def __init__(self, images_root: str | os.PathLike, masks_root: str | os.PathLike | None = None,
                 binary_masks: bool = True, label_names: list[str] | None = None) -> None:
        self.base = Path(images_root)
        self.masks_root = Path(masks_root) if masks_root is not None else self.base / "masks"
        for folder, what in ((self.base, "images"), (self.masks_root, "masks")):
            if not folder.is_dir():
                raise FileNotFoundError(f"{what} folder not found: {folder}")

        def images_below(root: Path, skip: Path | None) -> dict[str, str]:
            found = {}
            for path in sorted(root.rglob("*")):
                relative = path.relative_to(root)
                if (path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
                        and not any(part.startswith(".") for part in relative.parts)
                        and (skip is None or not path.resolve().is_relative_to(skip))):
                    found[relative.with_suffix("").as_posix()] = relative.as_posix()
            return found

        images = images_below(self.base, self.masks_root.resolve())
        masks = images_below(self.masks_root, None)
        if not images:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {self.base}")
        missing = [images[stem] for stem in images if stem not in masks]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) of {self.base} have no mask in {self.masks_root} "
                f"(same relative path, any image suffix): {', '.join(missing[:5])}")
        self.relative_paths = [images[stem] for stem in images]
        self.mask_paths = [masks[stem] for stem in images]
        self.binary_masks = binary_masks
        self.label_names = label_names

    def __len__(self) -> int:
        return len(self.relative_paths)

    def load(self, i: int) -> np.ndarray:
        return decode_grey(self.base / self.relative_paths[_check_index(i, len(self))],
                           self.bits_stored)

    def load_mask(self, i: int) -> np.ndarray:
        return decode_mask(self.masks_root / self.mask_paths[_check_index(i, len(self))],
                           binary=self.binary_masks)

    def image_id(self, i: int) -> str:
        return self.relative_paths[_check_index(i, len(self))]


class PhantomLabelledSource:
    """Synthetic chest phantoms with their labels and masks.

    ``version="v1"``: the first phantoms, label ``nodule`` (any nodule drawn) and nodule
    masks. ``version="cxr14"``: the ChestX-ray14-like phantoms, the eight findings of
    ``caid_hf.data.chest_phantoms.FINDINGS`` (read without drawing the images) and, for
    segmentation, the union of the masks of the localised findings.

    Each phantom is drawn on first use and kept (2 × size² bytes each), since fine-tuning
    reads every image many times.
    """

    def __init__(self, num_images: int, size: int = 128, seed: int = 0,
                 version: str = "v1") -> None:
        from ..data.sources import PhantomSource

        self._phantoms = PhantomSource(num_images, size=size, seed=seed, version=version)
        self.num_images, self.size, self.seed, self.version = num_images, size, seed, version
        self.label_names = self._phantoms.label_names
        self._drawn: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _phantom(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        i = _check_index(i, len(self))
        if i not in self._drawn:
            if self.version == "v1":
                from ..data.phantoms import generate_phantom

                self._drawn[i] = generate_phantom(i, size=self.size, seed=self.seed)
            else:  # one drawing for both (the source keeps its last phantom)
                self._drawn[i] = (self._phantoms.load(i), self._phantoms.load_mask(i))
        return self._drawn[i]

    @property
    def targets(self) -> np.ndarray:
        """float32 [N, len(label_names)] in {0, 1}."""
        if self.version == "v1":
            return np.asarray([[float(self._phantom(i)[1].any())] for i in range(len(self))],
                              dtype=np.float32)
        return self._phantoms.targets

    def __len__(self) -> int:
        return self.num_images

    def load(self, i: int) -> np.ndarray:
        """Phantom ``i``: grey uint8 [size, size]."""
        return self._phantom(i)[0]

    def load_mask(self, i: int) -> np.ndarray:
        """Mask of phantom ``i`` (v1: its nodules; cxr14: its localised findings): int64
        [size, size] in {0, 1}."""
        return self._phantom(i)[1].astype(np.int64)

    def image_id(self, i: int) -> str:
        return f"phantom_{_check_index(i, len(self)):05d}"


class HFLabelledSource:
    """A Hugging Face dataset with an image column and labels or a mask image column.

    Labels (``label_columns``; default the ``label``/``labels`` column, else every
    ``ClassLabel`` column):

    - one ``ClassLabel`` column: one-hot rows over its names (single-label data);
    - one sequence column of ``ClassLabel`` (finding names): multi-hot rows;
    - one sequence column of numbers: those numbers (0/1) as the row;
    - several numeric (or binary ``ClassLabel``) columns: one label each.

    Raises:
        ValueError: a named column is missing (the columns are listed) or has a type that
            cannot be labels; the message names the dataset.
    """

    def __init__(self, dataset, name: str, image_column: str | None = None,
                 label_columns: list[str] | None = None, mask_column: str | None = None,
                 label_names: list[str] | None = None, binary_masks: bool = True,
                 uncertain_labels: str = "ignore", blank_labels: str = "zeros",
                 patient_id_from: str = "auto") -> None:
        from datasets import ClassLabel, Sequence, Value
        from datasets import Image as ImageFeature

        from ..data.hf_sources import HFImageSource

        self.name = name
        self.images = HFImageSource(dataset, image_column=image_column, name=name)
        features, columns = dataset.features, list(dataset.features)
        self.binary_masks = binary_masks
        self.targets, self.label_names, self.masks = None, label_names, None
        self.patient_ids = self._patient_ids(dataset, patient_id_from)
        if mask_column is not None:
            if mask_column not in features or not isinstance(features[mask_column], ImageFeature):
                raise ValueError(f"dataset {name}: mask_column {mask_column!r} must be a "
                                 f"datasets.Image column (columns: {columns})")
            self.masks = dataset.select_columns([mask_column]).cast_column(
                mask_column, ImageFeature(decode=False)).with_format(None)
            self.mask_column = mask_column
            return
        if label_columns is None:
            label_columns = [c for c in ("label", "labels") if c in features][:1] or \
                [c for c in columns if isinstance(features[c], ClassLabel)]
            if not label_columns:
                raise ValueError(f"dataset {name}: no label column found (columns: {columns}); "
                                 "name them with label_columns")
        for c in label_columns:
            if c not in features:
                raise ValueError(f"dataset {name}: no column {c!r} (columns: {columns})")
        table = dataset.select_columns(label_columns).with_format(None)
        where = f"dataset {name} column"
        if len(label_columns) == 1:
            column = label_columns[0]
            feature, values = features[column], table[column]
            inner = getattr(feature, "feature", None)
            if isinstance(feature, ClassLabel):
                names = list(feature.names)
                targets = np.zeros((len(values), len(names)), dtype=np.float32)
                targets[np.arange(len(values)), np.asarray(values, dtype=np.int64)] = 1.0
            elif isinstance(feature, (Sequence, list)) or isinstance(inner, (ClassLabel, Value)):
                inner = inner if inner is not None else feature[0]
                if isinstance(inner, ClassLabel):
                    names = list(inner.names)
                    targets = np.zeros((len(values), len(names)), dtype=np.float32)
                    for row, present in enumerate(values):
                        targets[row, list(present)] = 1.0
                else:
                    targets = np.asarray(values, dtype=np.float32)
                    if targets.ndim != 2:
                        raise ValueError(f"{where} {column!r}: label sequences differ in length")
                    names = _default_names(targets.shape[1])
            elif isinstance(feature, Value):
                targets, names = np.asarray(values, dtype=np.float32)[:, None], [column]
            else:
                raise ValueError(f"{where} {column!r} is {feature}; expected ClassLabel, a "
                                 "sequence of ClassLabel or numbers, or numeric columns")
        else:
            for c in label_columns:
                if not isinstance(features[c], (Value, ClassLabel)):
                    raise ValueError(f"{where} {c!r} is {features[c]}, not a number")
            targets = np.stack([np.asarray(table[c], dtype=np.float32) for c in label_columns], 1)
            names = list(label_columns)
        self.targets = _apply_label_policies(targets, f"{where}(s) {label_columns}",
                                             uncertain_labels, blank_labels)
        self.label_names = _check_names(label_names, targets.shape[1], f"dataset {name}") or names

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> np.ndarray:
        return self.images.load(i)

    def _patient_ids(self, dataset, rule: str) -> list[str] | None:
        check_patient_rule(rule)
        if rule.startswith("column:"):
            column = rule[len("column:"):]
            if column not in dataset.features:
                raise ValueError(f"dataset {self.name}: patient_id_from {rule!r}: no column "
                                 f"{column!r} (columns: {list(dataset.features)})")
            return [str(v) for v in dataset.select_columns([column]).with_format(None)[column]]
        if rule == "none":
            return None
        return patient_ids_from_names(self.images.image_ids(), rule, f"dataset {self.name}")

    def patient_ids_for(self, rule: str) -> list[str] | None:
        """The patient ids read when the source was opened (its ``patient_id_from``); a
        name rule asked for now is read from the image ids."""
        if rule == "none":
            return None
        if rule == "auto" or rule.startswith("column:"):
            return self.patient_ids
        return patient_ids_from_names(self.images.image_ids(), rule, f"dataset {self.name}")

    def load_mask(self, i: int) -> np.ndarray:
        """Mask of row ``i`` as int64 [H, W] (see :func:`decode_mask`)."""
        if self.masks is None:
            raise ValueError(f"dataset {self.name}: no mask_column was given")
        value = self.masks[int(_check_index(i, len(self)))][self.mask_column] or {}
        where = f"dataset {self.name}, row {i} ({self.image_id(i)}) mask"
        stored = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
        if not stored:
            raise ValueError(f"{where}: the row holds no mask")
        return decode_mask(stored, binary=self.binary_masks, name=where)

    def image_id(self, i: int) -> str:
        return self.images.image_id(i)


def _apply_label_policies(targets: np.ndarray, where: str, uncertain: str, blank: str
                          ) -> np.ndarray:
    """Numeric labels with -1 (uncertain) and NaN (missing) → {0, 1, NaN} by the policies."""
    targets = np.array(targets, dtype=np.float32)
    known = np.isin(targets, (0.0, 1.0, -1.0)) | np.isnan(targets)
    if not known.all():
        bad = targets[~known][0]
        raise ValueError(f"{where}: labels must be 1, 0, -1 (uncertain) or missing, got {bad}")
    uncertain_entries, missing_entries = targets == -1.0, np.isnan(targets)
    targets[uncertain_entries] = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}[uncertain]
    if blank == "zeros":
        targets[missing_entries] = 0.0
    return targets


def labelled_source_from_spec(spec: str, options: LabelledSourceOptions, split: str | None = None,
                              phantom_seed_offset: int = 0):
    """The labelled source a spec names (see :func:`_open_labelled`), decoding 16-bit pixels
    with ``options.bits_stored``."""
    source = _open_labelled(spec, options, split, phantom_seed_offset)
    if options.bits_stored is not None:
        for part in (source, getattr(source, "images", None)):
            if hasattr(part, "bits_stored"):
                part.bits_stored = options.bits_stored
    return source


def _open_labelled(spec: str, options: LabelledSourceOptions, split: str | None,
                   phantom_seed_offset: int):
    """The labelled source a spec names (see the module docstring).

    Args:
        spec: ``phantoms``, a CSV file, a Hugging Face dataset spec, a folder (segmentation)
            or a split-list file.
        options: columns, roots and phantom settings.
        split: the split of a Hugging Face dataset (default ``options.hf.split``).
        phantom_seed_offset: added to ``options.phantom_seed``, so training, validation and
            test phantoms are different images.

    Raises:
        FileNotFoundError: nothing exists at ``spec``.
        ValueError: a folder for classification (a folder carries no labels), a split list
            for segmentation, or a problem of the source itself.
    """
    segmentation = options.task == "segmentation"
    binary = options.binary_masks
    if spec in PHANTOM_SPECS:
        return PhantomLabelledSource(options.num_phantoms, options.phantom_size,
                                     options.phantom_seed + phantom_seed_offset,
                                     version=PHANTOM_SPECS[spec])
    if is_hf_spec(spec):
        hf = options.hf if split is None else HFOptions(split=split,
                                                        config_name=options.hf.config_name)
        dataset = open_hf_spec(spec, options.images_root, hf)
        return HFLabelledSource(dataset, spec, image_column=options.image_column,
                                label_columns=None if segmentation else options.label_columns,
                                mask_column=(options.mask_column or "mask") if segmentation
                                else None,
                                label_names=options.label_names, binary_masks=binary,
                                uncertain_labels=options.uncertain_labels,
                                blank_labels=options.blank_labels,
                                patient_id_from=options.patient_id_from)
    path = Path(spec)
    if path.is_dir():
        if not segmentation:
            raise ValueError(f"{spec} is a folder: folders carry no class labels; give a CSV "
                             "file (image paths and labels, --images_root the folder) or a "
                             "split list")
        return MaskFolderSource(path, options.masks_root, binary_masks=binary,
                                label_names=options.label_names)
    if not path.is_file():
        raise FileNotFoundError(f"data source {spec!r} is neither 'phantoms', 'hf:NAME', a "
                                "CSV file, a split-list file, a parquet/arrow file nor a folder")
    if path.suffix.lower() == ".csv" or path.name.lower().endswith(".csv.gz"):
        if segmentation and not options.mask_column:
            raise ValueError(f"{spec}: segmentation from a CSV file needs mask_column, the "
                             "column of mask paths")
        return CSVLabelledSource(path, options.images_root, image_column=options.image_column,
                                 label_columns=options.label_columns,
                                 mask_column=options.mask_column if segmentation else None,
                                 label_names=options.label_names, binary_masks=binary,
                                 label_format=options.label_format,
                                 uncertain_labels=options.uncertain_labels,
                                 blank_labels=options.blank_labels, views=options.views,
                                 view_column=options.view_column,
                                 metadata_csv=options.metadata_csv,
                                 patient_id_from=options.patient_id_from,
                                 accept_unknown_findings=options.accept_unknown_findings)
    if segmentation:
        raise ValueError(f"{spec}: a split list carries class labels, not masks; for "
                         "segmentation give a folder with masks/, a CSV with mask_column, or a "
                         "Hugging Face dataset with a mask column")
    return SplitListLabelledSource(path, options.images_root if options.images_root is not None
                                   else path.parent, label_names=options.label_names)


def _to_unit_float(grey: np.ndarray) -> torch.Tensor:
    """Grey uint8 [H, W] → float32 [1, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(grey)).float().div_(255.0).unsqueeze(0)


class _LabelledDataset(Dataset):
    """Shared resizing and augmentation of the classification and segmentation datasets.

    Evaluation: the image is resized to ``image_size`` × ``image_size`` exactly as
    :class:`~caid_hf.CAiDImageProcessor` does (bilinear, antialiased; masks nearest).
    Training (``train=True``): a RandomResizedCrop with area in ``[crop_scale_min, 1]``
    and aspect ratio in [3/4, 4/3], and a horizontal flip with ``horizontal_flip``, applied
    alike to image and mask (torchvision's v2 transforms).

    ``report_bad_images``: an image (or mask) that cannot be read (missing, truncated, not
    an image: the source raises ``ValueError`` or ``OSError``) does not stop the loader;
    its item is a stand-in (black pixels, labels the loss and the metrics leave out: NaN,
    -100 or the ignore index, see :meth:`_ignored_labels`) with ``readable`` False and
    ``bad_file`` ``(image_id, "FILE:LINE: reason")``; batch such items with
    :func:`collate_labelled`. Without it, items are ``pixel_values`` and ``labels`` only
    and an unreadable image raises.
    """

    def __init__(self, source, image_size: int, train: bool = False,
                 crop_scale_min: float = 0.8, horizontal_flip: bool = False,
                 indices: list[int] | None = None, report_bad_images: bool = False) -> None:
        self.source = source
        self.image_size = image_size
        self.train = train
        self.report_bad_images = report_bad_images
        self.indices = list(range(len(source))) if indices is None else list(indices)
        if train:
            steps = [v2.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0),
                                          antialias=True)]
            if horizontal_flip:
                steps.append(v2.RandomHorizontalFlip())
            self.transform = v2.Compose(steps)
        else:
            self.transform = v2.Resize((image_size, image_size), antialias=True)

    def __len__(self) -> int:
        return len(self.indices)

    def _image_and_mask(self, i: int, with_mask: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """pixel_values float32 [3, S, S] in [0, 1] and mask int64 [S, S] (or None)."""
        k = self.indices[i]
        image = tv_tensors.Image(_to_unit_float(self.source.load(k)))
        if with_mask:
            mask = torch.from_numpy(self.source.load_mask(k))
            if tuple(mask.shape) != tuple(image.shape[-2:]):
                raise ValueError(f"mask of {self.source.image_id(k)} is {list(mask.shape)} "
                                 f"but the image is {list(image.shape[-2:])}")
            image, mask = self.transform(image, tv_tensors.Mask(mask))
            mask = mask.as_subclass(torch.Tensor)
        else:
            image, mask = self.transform(image), None
        image = image.as_subclass(torch.Tensor).clamp_(0.0, 1.0)
        return image.expand(3, -1, -1).contiguous(), mask

    def _ignored_labels(self) -> torch.Tensor:
        raise NotImplementedError

    def _item(self, i: int, labels) -> dict:
        """The item of image ``i`` (``labels(image, mask)`` builds its labels), or with
        ``report_bad_images`` the stand-in of an unreadable one."""
        if not self.report_bad_images:
            return labels(*self._image_and_mask(i, self._with_mask))
        try:
            item = labels(*self._image_and_mask(i, self._with_mask))
        except BAD_IMAGE_ERRORS as error:
            k = self.indices[i]
            place = self.source.row_place(k) if hasattr(self.source, "row_place") else None
            reason = " ".join(str(error).split()) or type(error).__name__
            if not isinstance(error, ValueError):
                reason = f"{type(error).__name__}: {reason}"
            bad = (self.source.image_id(k), f"{place}: {reason}" if place else reason)
            return {"pixel_values": torch.zeros(3, self.image_size, self.image_size),
                    "labels": self._ignored_labels(), "readable": False, "bad_file": bad}
        return {**item, "readable": True, "bad_file": None}


def collate_labelled(items: list[dict]) -> dict:
    """Batch items of a dataset with ``report_bad_images``: ``pixel_values`` float32
    [B, 3, S, S], ``labels`` stacked, ``readable`` bool [B] and ``bad_files`` (the
    ``(image_id, reason)`` of each unreadable image)."""
    return {"pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "labels": torch.stack([item["labels"] for item in items]),
            "readable": torch.tensor([item["readable"] for item in items], dtype=torch.bool),
            "bad_files": [item["bad_file"] for item in items if item["bad_file"] is not None]}


class ClassificationDataset(_LabelledDataset):
    """Items ``{"pixel_values": float32 [3, S, S] in [0, 1], "labels": float32 [L] in {0, 1}}``
    (or, with ``single_label``, ``labels`` int64 [], the class index); an unreadable image's
    stand-in has labels NaN (or -100), which the loss and the metrics leave out."""

    _with_mask = False

    def __init__(self, source, image_size: int, single_label: bool = False, **kwargs) -> None:
        super().__init__(source, image_size, **kwargs)
        self.targets = source.targets[self.indices]
        self.single_label = single_label
        if single_label and np.isnan(self.targets).any():
            bad = int(np.flatnonzero(np.isnan(self.targets).any(axis=1))[0])
            raise ValueError(
                f"single_label_classification needs a known label for every image; "
                f"{source.image_id(self.indices[bad])} has ignored (uncertain or blank) entries; "
                "use problem_type multi_label_classification or uncertain_labels ones/zeros")
        if single_label and not (self.targets.sum(axis=1) == 1).all():
            bad = int(np.flatnonzero(self.targets.sum(axis=1) != 1)[0])
            raise ValueError(
                f"single_label_classification needs exactly one positive label per image; "
                f"{source.image_id(self.indices[bad])} has {int(self.targets[bad].sum())}")

    def _ignored_labels(self) -> torch.Tensor:
        if self.single_label:
            return torch.tensor(-100)  # cross-entropy's ignore_index
        return torch.full((self.targets.shape[1],), float("nan"))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        def labels(image, _):
            target = torch.from_numpy(self.targets[i])
            return {"pixel_values": image,
                    "labels": target.argmax() if self.single_label else target}

        return self._item(i, labels)


class SegmentationDataset(_LabelledDataset):
    """Items ``{"pixel_values": float32 [3, S, S] in [0, 1], "labels": ...}``: float32
    [1, S, S] in {0, 1} for ``num_labels=1`` (binary), int64 [S, S] class indices otherwise.

    An unreadable image's stand-in (``report_bad_images``) has a mask of ``ignore_index``
    for several classes (left out of loss and counts); a binary mask cannot say "ignore",
    so there it is empty (the evaluation drops it by ``readable``; in training it is one
    black image with an empty mask)."""

    _with_mask = True

    def __init__(self, source, image_size: int, num_labels: int = 1, ignore_index: int = 255,
                 **kwargs) -> None:
        super().__init__(source, image_size, **kwargs)
        self.num_labels = num_labels
        self.ignore_index = ignore_index

    def _ignored_labels(self) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        if self.num_labels == 1:
            return torch.zeros(1, *size)
        return torch.full(size, self.ignore_index, dtype=torch.long)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        def labels(image, mask):
            return {"pixel_values": image,
                    "labels": mask.float().unsqueeze(0) if self.num_labels == 1 else mask.long()}

        return self._item(i, labels)
