"""Hugging Face ``datasets`` as image sources: Arrow on disk, the Hub, image folders, parquet.

:class:`HFImageSource` is a map-style :class:`~caid_hf.data.sources.ImageSource`
over a :class:`datasets.Dataset`; :class:`HFStreamingSource` iterates a streaming
:class:`datasets.IterableDataset`, each process and DataLoader worker reading its
own part. :func:`open_hf_dataset` opens either from a name or a path.

Both sources read the image column undecoded (``Image(decode=False)``: the
stored bytes, or a path) and decode it here with PIL and
:func:`~caid_hf.data.sources.pil_to_grey`, for two reasons: every source then
follows the same grey conversion rules (datasets' own decoding would also
rotate by EXIF orientation), and one broken image becomes a ``ValueError``
for that row rather than an exception from inside datasets' iterator.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch.utils.data
from datasets import (
    Dataset,
    DatasetDict,
    Features,
    Image,
    IterableDataset,
    IterableDatasetDict,
    load_dataset,
    load_from_disk,
)
from datasets.distributed import split_dataset_by_node
from datasets.utils.file_utils import is_local_path, xopen
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from ..decoding import pil_to_grey, png_significant_bits
from .sources import _check_index

__all__ = ["HFImageSource", "HFStreamingSource", "decode_image_value", "open_hf_dataset"]

logger = logging.getLogger(__name__)

# Single files that datasets' packaged builders read; a folder of them needs no builder name.
_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
_UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, PILImage.DecompressionBombError)


def decode_image_value(value: dict | None, where: str, bits_stored: int | None = None
                       ) -> np.ndarray:
    """An undecoded ``datasets.Image`` value as grey uint8 [H, W] in 0..255.

    Args:
        value: ``{"bytes": bytes | None, "path": str | None}``, the storage of
            ``Image(decode=False)``. The bytes are decoded when present, else
            the file at ``path`` (local, or a remote URL datasets can open).
        where: names the row in error messages (dataset and image id).
        bits_stored: bit depth of 16-bit pixels; None: the PNG's sBIT chunk, else guessed
            per image (see :func:`~caid_hf.decoding.scale_high_bit_depth`).

    Returns:
        The image by :func:`~caid_hf.data.sources.pil_to_grey`'s rules.

    Raises:
        ValueError: no bytes and no path, a missing file, or data that is not
            a readable image; the message starts with ``where``.
    """
    data = value.get("bytes") if value else None
    path = value.get("path") if value else None
    if not data and not path:
        raise ValueError(f"{where}: the row holds no image bytes and no path")
    try:
        if data:
            stream = io.BytesIO(data)
        elif is_local_path(path):
            stream = path
        else:
            with xopen(path, "rb") as remote:
                stream = io.BytesIO(remote.read())
        with PILImage.open(stream) as image:
            image.load()
            if bits_stored is None and image.format == "PNG" and image.mode != "L":
                bits_stored = png_significant_bits(
                    data or (stream if isinstance(stream, str) else stream.getvalue()))
            return pil_to_grey(image, bits_stored)
    except _UNREADABLE as error:
        # PIL raises SyntaxError for some malformed headers.
        raise ValueError(f"{where}: cannot decode image: {error}") from error


def _describe(dataset: Dataset | IterableDataset, name: str | None) -> str:
    if name:
        return name
    if dataset.info.dataset_name:
        return dataset.info.dataset_name
    files = getattr(dataset, "cache_files", None)
    if files:
        return str(Path(files[0]["filename"]).parent)
    return f"<{type(dataset).__name__} without a name>"


def _resolve_columns(
    features: Features | None, image_column: str | None, id_column: str | None, where: str
) -> tuple[str, str | None]:
    """Validate (or find) the image column, which must be a ``datasets.Image`` feature."""
    if features is None:
        raise ValueError(
            f"dataset {where} has unknown features (e.g. after IterableDataset.map); "
            "give them with dataset.cast_column(<column>, datasets.Image())"
        )
    columns = list(features)
    if image_column is None:
        found = [column for column in columns if isinstance(features[column], Image)]
        if not found:
            raise ValueError(
                f"dataset {where} has no datasets.Image column (columns: {columns}); name "
                "one with image_column= after dataset.cast_column(<column>, datasets.Image())"
            )
        image_column = found[0]
    elif image_column not in features:
        raise ValueError(f"dataset {where} has no column {image_column!r} (columns: {columns})")
    elif not isinstance(features[image_column], Image):
        raise ValueError(
            f"column {image_column!r} of dataset {where} is {features[image_column]}, not "
            f"datasets.Image; cast it with dataset.cast_column({image_column!r}, datasets.Image())"
        )
    if id_column is not None and id_column not in features:
        raise ValueError(f"dataset {where} has no id column {id_column!r} (columns: {columns})")
    return image_column, id_column


def _undecoded_view(dataset, image_column: str, id_column: str | None,
                    extra_column: str | None = None):
    """Only the columns we read, the image left as ``{"bytes", "path"}``, rows as Python objects.

    Casting an Image column to ``decode=False`` only changes the features, not
    the Arrow data, so this is cheap even for a large memory-mapped dataset.
    """
    columns = [image_column] + ([id_column] if id_column not in (None, image_column) else [])
    if extra_column is not None and extra_column not in columns:
        columns.append(extra_column)
    view = dataset.select_columns(columns).cast_column(image_column, Image(decode=False))
    return view.with_format(None)


class HFImageSource:
    """A map-style image source over a :class:`datasets.Dataset`.

    ``bits_stored`` (an attribute, default None) is the bit depth of 16-bit pixels.

    ``load(i)`` decodes row ``i``'s image (grey uint8 [H, W], by
    :func:`~caid_hf.data.sources.pil_to_grey`'s rules); ``image_id(i)`` is the
    ``id_column`` value when given, else the image's stored ``path`` when it
    has one (Hub datasets keep the original file name, ``imagefolder`` the
    file's path), else ``row_000042`` (the row's position in ``dataset``).

    The source keeps a view of ``dataset`` with only the image and id
    columns. A dataset read from disk (``load_from_disk``, ``load_dataset``'s
    Arrow cache) is memory-mapped and pickles as its file names, so the
    source is cheap to send to DataLoader workers; one built in memory
    (``Dataset.from_dict``) pickles all its data.

    Args:
        dataset: the dataset; an index mapping (``shuffle``, ``select``) is kept.
        image_column: the ``datasets.Image`` column; default: the first one.
        id_column: a column naming each image (converted with ``str``).
        name: the dataset's name in error messages; default: its
            ``info.dataset_name`` or the folder of its Arrow files.

    Raises:
        ValueError: no ``datasets.Image`` column, or a named column that is
            missing or not an image; the message names the dataset and lists
            its columns.
    """

    bits_stored: int | None = None

    def __init__(
        self,
        dataset: Dataset,
        image_column: str | None = None,
        id_column: str | None = None,
        name: str | None = None,
        patient_column: str | None = None,
    ) -> None:
        if not isinstance(dataset, Dataset):
            raise TypeError(
                f"HFImageSource needs a datasets.Dataset, got {type(dataset).__name__} "
                "(use HFStreamingSource for an IterableDataset, pick a split of a DatasetDict)"
            )
        self.name = _describe(dataset, name)
        self.image_column, self.id_column = _resolve_columns(
            dataset.features, image_column, id_column, self.name
        )
        self.columns = list(dataset.features)
        if patient_column is not None and patient_column not in dataset.features:
            raise ValueError(f"dataset {self.name}: no column {patient_column!r} for the "
                             f"patient ids (columns: {self.columns})")
        self.patient_column = patient_column
        self.dataset = _undecoded_view(dataset, self.image_column, self.id_column,
                                       patient_column)

    def __len__(self) -> int:
        return self.dataset.num_rows

    def _row_id(self, row: dict, i: int) -> str:
        if self.id_column is not None:
            return str(row[self.id_column])
        path = (row[self.image_column] or {}).get("path")
        return path if path else f"row_{i:06d}"

    def load(self, i: int) -> np.ndarray:
        """Image ``i`` decoded to grey uint8 [H, W] in 0..255.

        Raises:
            IndexError: ``i`` is out of range.
            ValueError: the row has no image, or its bytes (file) are not a
                readable image; the message names the dataset and image id.
        """
        row = self.dataset[int(_check_index(i, len(self)))]
        where = f"dataset {self.name}, row {i} ({self._row_id(row, i)})"
        return decode_image_value(row[self.image_column], where, self.bits_stored)

    def image_id(self, i: int) -> str:
        """The id column's value, else the stored path, else ``row_000042``."""
        return self._row_id(self.dataset[int(_check_index(i, len(self)))], i)

    def image_ids(self) -> list[str]:
        """Every row's :meth:`image_id`, read from the id column or the images' stored paths
        only (the image bytes stay on disk)."""
        if self.id_column is not None:
            return [str(v) for v in self.dataset.select_columns([self.id_column])[self.id_column]]
        column = self.dataset.with_format("arrow").select_columns([self.image_column])[:]
        paths = column.column(self.image_column).combine_chunks().field("path").to_pylist()
        return [p if p else f"row_{i:06d}" for i, p in enumerate(paths)]

    def patient_ids_for(self, rule: str) -> list[str] | None:
        """Patient ids by ``rule`` (:mod:`caid_hf.data.patients`): ``column:NAME`` reads the
        column kept when the source was opened (``patient_column``), name rules the ids."""
        from .patients import patient_ids_from_names

        if rule.startswith("column:"):
            column = rule[len("column:"):]
            if self.patient_column != column:
                raise ValueError(f"dataset {self.name}: patient_id_from {rule!r}: no column "
                                 f"{column!r} was read (columns: {self.columns})")
            return [str(v) for v in self.dataset.select_columns([column])[column]]
        if rule == "none":
            return None
        return patient_ids_from_names(self.image_ids(), rule, f"dataset {self.name}")

    def __repr__(self) -> str:
        return (
            f"HFImageSource({self.name!r}, {len(self)} images, image_column="
            f"{self.image_column!r}, id_column={self.id_column!r})"
        )


class HFStreamingSource(torch.utils.data.IterableDataset):
    """An iterable image source over a streaming :class:`datasets.IterableDataset`.

    Iterating yields ``(image_id, grey)`` pairs, ``grey`` uint8 [H, W] in
    0..255, for this process's part of the data only:
    ``datasets.distributed.split_dataset_by_node`` gives rank ``rank`` of
    ``world_size`` its part, and inside a torch ``DataLoader`` datasets hands
    each worker its own shards (a worker beyond ``num_shards`` yields
    nothing, with a warning from datasets).

    How datasets splits among processes depends on the shard count: when
    ``num_shards`` is a multiple of ``world_size`` each rank reads only its own
    shards; otherwise every rank reads every example and keeps one in
    ``world_size`` (rank ``r`` keeps positions ``r, r + world_size, …`` of the
    common order). The ranks' parts are disjoint and together cover the data
    in both cases, but the second one reads all data on every rank. Both rely
    on all ranks seeing the same order, which is why the shuffle buffer is
    seeded by ``seed`` (the same on every rank) and ``set_epoch`` re-seeds it
    identically everywhere. Pass the unsplit dataset: splitting a dataset
    that is already split divides it again. With a shuffle buffer over
    several parquet shards, datasets pauses
    ``datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN`` (5 s) at the end of
    each pass, in each worker, to let Arrow's reader threads stop.

    ``image_id`` is the ``id_column`` value when given, else the image's
    stored ``path``, else ``sha1:`` and 16 hex digits of the image bytes (a
    stream has no stable row position).

    A row whose image cannot be decoded yields nothing: it is counted in
    ``num_bad`` and reported to ``on_bad(image_id, reason)`` (default: a
    logged warning). In a DataLoader worker both happen in the worker's copy
    of the source, so the main process's ``num_bad`` stays 0; let ``on_bad``
    write somewhere shared when the count matters there (and make it a
    picklable function when workers are spawned rather than forked).

    Args:
        dataset: the streaming dataset (``open_hf_dataset(..., streaming=True)``).
        image_column: the ``datasets.Image`` column; default: the first one.
        id_column: a column naming each image (converted with ``str``).
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: the number of processes reading the data.
        shuffle_buffer: examples in datasets' shuffle buffer; 0 keeps the stored order.
        seed: seeds the shuffle of shards and buffer; must be equal on all ranks.
        on_bad: called with ``(image_id, reason)`` for each undecodable row.
        name: the dataset's name in messages; default: ``info.dataset_name``.

    Raises:
        ValueError: no ``datasets.Image`` column, a named column missing, or
            ``rank`` outside ``0..world_size - 1``.
    """

    bits_stored: int | None = None  # of 16-bit pixels (None: the header's, else guessed)

    def __init__(
        self,
        dataset: IterableDataset,
        image_column: str | None = None,
        id_column: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 0,
        seed: int = 0,
        on_bad: Callable[[str, str], None] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(dataset, IterableDataset):
            raise TypeError(
                f"HFStreamingSource needs a datasets.IterableDataset, got {type(dataset).__name__} "
                "(use HFImageSource for a datasets.Dataset, or dataset.to_iterable_dataset())"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.name = _describe(dataset, name)
        self.image_column, self.id_column = _resolve_columns(
            dataset.features, image_column, id_column, self.name
        )
        self.rank, self.world_size = rank, world_size
        self.on_bad = on_bad
        self.num_bad = 0
        view = _undecoded_view(dataset, self.image_column, self.id_column)
        if shuffle_buffer > 0:
            view = view.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.dataset = split_dataset_by_node(view, rank=rank, world_size=world_size)

    def set_epoch(self, epoch: int) -> None:
        """Re-seed the shard and buffer shuffles for ``epoch`` (the same on every rank).

        Reaches persistent DataLoader workers too: datasets keeps the epoch in
        shared memory.
        """
        self.dataset.set_epoch(epoch)

    def _row_id(self, row: dict) -> str:
        if self.id_column is not None:
            return str(row[self.id_column])
        value = row[self.image_column] or {}
        if value.get("path"):
            return value["path"]
        data = value.get("bytes")
        return f"sha1:{hashlib.sha1(data).hexdigest()[:16]}" if data else "<no image>"

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for row in self.dataset:
            image_id = self._row_id(row)
            try:
                grey = decode_image_value(row[self.image_column], f"dataset {self.name}, {image_id}",
                                          self.bits_stored)
            except ValueError as error:
                self.num_bad += 1
                if self.on_bad is not None:
                    self.on_bad(image_id, str(error))
                else:
                    logger.warning("skipping an undecodable image: %s", error)
                continue
            yield image_id, grey

    def __repr__(self) -> str:
        return (
            f"HFStreamingSource({self.name!r}, rank {self.rank} of {self.world_size}, "
            f"num_shards={self.dataset.num_shards}, image_column={self.image_column!r})"
        )


def _is_saved_dataset(path: str) -> bool:
    folder = Path(path)
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def open_hf_dataset(
    name_or_path: str | os.PathLike,
    split: str = "train",
    config_name: str | None = None,
    streaming: bool = False,
    data_dir: str | os.PathLike | None = None,
) -> Dataset | IterableDataset:
    """Open one split of a Hugging Face dataset, from disk or the Hub.

    - a folder written by ``save_to_disk`` (``state.json``, or
      ``dataset_dict.json`` for a DatasetDict, whose ``split`` is taken) is
      memory-mapped with ``load_from_disk``; with ``streaming=True`` it is
      turned into an IterableDataset with one shard per Arrow file;
    - ``"imagefolder"`` (or another packaged builder: ``"parquet"``, …) reads
      ``data_dir``;
    - a ``.parquet`` or ``.arrow`` file, or a glob of them, is read by that builder;
    - anything else goes to ``load_dataset(name_or_path, config_name,
      split=split, streaming=streaming, data_dir=data_dir)``: a Hub name
      (``"org/name"``) or a local folder of data files (parquet, arrow, images …).

    Args:
        name_or_path: a Hub dataset name, a packaged builder name, or a local path.
        split: the split to return (``"train"``, ``"validation"``, ``"train[:10%]"`` …).
        config_name: the dataset's configuration (subset), when it has several.
        streaming: return an IterableDataset that reads as it goes, downloading nothing upfront.
        data_dir: the folder a builder such as ``"imagefolder"`` reads.

    Returns:
        A :class:`datasets.Dataset`, or an :class:`datasets.IterableDataset` when streaming.

    Raises:
        ValueError: ``"imagefolder"`` without ``data_dir``, an unknown split
            (the message lists the splits), or another error of datasets.
        FileNotFoundError: no dataset at the given path or name.
        ConnectionError: the Hub cannot be reached (e.g. offline) for a Hub name.
        All messages name what was asked for.
    """
    name = os.fspath(name_or_path)
    data_dir = os.fspath(data_dir) if data_dir is not None else None
    asked = f"dataset {name!r}" + (f" (config {config_name!r})" if config_name else "")
    asked += f", split {split!r}" + (f", data_dir {data_dir!r}" if data_dir else "")
    if _is_saved_dataset(name):
        dataset = load_from_disk(name)
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise ValueError(f"{asked}: no such split; the saved dataset has {list(dataset)}")
            dataset = dataset[split]
        if streaming:
            return dataset.to_iterable_dataset(num_shards=max(1, len(dataset.cache_files)))
        return dataset
    if name == "imagefolder" and data_dir is None:
        raise ValueError(f"{asked}: 'imagefolder' needs data_dir, the folder of images")
    builder, data_files = name, None
    suffix = Path(name).suffix.lower()
    if suffix in _FILE_BUILDERS and not Path(name).is_dir():
        builder, data_files = _FILE_BUILDERS[suffix], name
    try:
        dataset = load_dataset(
            builder,
            config_name,
            data_dir=data_dir,
            data_files=data_files,
            split=split,
            streaming=streaming,
        )
    except (FileNotFoundError, ConnectionError, ValueError) as error:
        # datasets' messages often omit the dataset (e.g. 'Unknown split "x"').
        for kind in (FileNotFoundError, ConnectionError, ValueError):
            if isinstance(error, kind):
                raise kind(f"cannot open {asked}: {error}") from error
        raise
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        raise ValueError(f"{asked}: got several splits {list(dataset)}; name one with split=")
    return dataset
