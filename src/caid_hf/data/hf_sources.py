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


CACHE_COLUMNS = ("image_id", "height", "width", "pixels")  # rows of a decode-once cache


def _is_cache_rows(features: Features | None) -> bool:
    """Rows of a caid-hf decode-once cache (raw grey pixels), e.g. its parquet shards."""
    return features is not None and all(column in features for column in CACHE_COLUMNS) and \
        not any(isinstance(feature, Image) for feature in features.values())


class _LaneReader:
    """Reads one lane's shards in order, one undecoded row at a time, and says where it is.

    A cursor ``{"shard": k, "state": s, "row": j}`` is the position after ``j`` rows of the
    lane: in its ``k``-th shard, at datasets' ``state_dict()`` ``s`` of that shard (None: its
    start). Opening a cursor resumes there through datasets' ``load_state_dict``, which
    skips whole Arrow record batches without reading them as rows.
    """

    def __init__(self, view: IterableDataset, shards: list[int], cursor: dict) -> None:
        self.view, self.shards = view, shards
        self.shard, self.row = int(cursor["shard"]), int(cursor["row"])
        self._opened_state = cursor["state"]
        self._part: IterableDataset | None = None
        self._rows_in_part = 0

    def cursor(self) -> dict:
        state = self._opened_state
        if self._part is not None and self._rows_in_part:
            state = self._part.state_dict()
        return {"shard": self.shard, "state": state, "row": self.row}

    def __iter__(self) -> Iterator[dict]:
        while self.shard < len(self.shards):
            part = self.view.shard(num_shards=self.view.num_shards,
                                   index=self.shards[self.shard], contiguous=True)
            if self._opened_state is not None:
                part.load_state_dict(self._opened_state)
            self._part, self._rows_in_part = part, 0
            # .iter() rather than iter(): no second split among DataLoader workers
            for batch in part.iter(batch_size=1):
                self.row += 1
                self._rows_in_part += 1
                yield {column: values[0] for column, values in batch.items()}
            self.shard, self._opened_state, self._part = self.shard + 1, None, None


class HFStreamingSource(torch.utils.data.IterableDataset):
    """An iterable image source over a streaming :class:`datasets.IterableDataset`.

    Iterating yields ``(image_id, grey)`` pairs, ``grey`` uint8 [H, W] in
    0..255, for this process's part of the data only; inside a torch
    ``DataLoader`` each worker reads its own part of that (its *lane*).

    **Who reads what.** The dataset's shards are taken in stored order, or, with
    a shuffle, in an order drawn from ``(seed, epoch)`` (the same on every rank).
    When ``num_shards`` is a multiple of ``world_size`` rank ``r`` reads shards
    ``r, r + world_size, …`` of that order; otherwise every rank reads every
    shard and keeps rows ``r, r + world_size, …``. The rank's shards are dealt
    to its ``L`` lanes (DataLoader workers; 1 without workers) the same way:
    lane ``l`` reads every ``L``-th shard, or, with fewer shards than lanes,
    every shard, keeping every ``L``-th row, so no worker sits idle. The parts
    are disjoint and together cover the data.

    **Shuffle.** ``shuffle_buffer = K > 0`` shuffles the shard order each epoch
    and yields each run of ``K`` rows of a lane in a random order drawn from
    ``(seed, epoch, rank, lane, run)``: a window shuffle, holding ``K``
    undecoded rows in memory as datasets' shuffle buffer would. 0 keeps the
    stored order in every epoch.

    **Position.** :meth:`iter_items` also yields, with each image, the lane's
    position after it (a small JSON-able dict); :meth:`resume_from` starts the
    lanes at saved positions. A resumed lane reopens its shard at datasets'
    ``state_dict()`` and re-reads (undecoded) at most the rows of its current
    shuffle window; nothing already yielded is decoded again. Resuming is exact:
    the same images, in the same order, as an uninterrupted pass.

    ``image_id`` is the ``id_column`` value when given, else the image's
    stored ``path``, else ``sha1:`` and 16 hex digits of the image bytes (a
    stream has no stable row position). The rows of a caid-hf decode-once
    cache (``image_id``, ``height``, ``width``, ``pixels``: e.g. the parquet
    shards of ``prepare-data --shards N --shard-format parquet``) are read as
    raw grey pixels, with their ``image_id``.

    A row whose image cannot be decoded yields nothing: it is counted in
    ``num_bad`` and reported to ``on_bad(image_id, reason)`` (default: a
    logged warning). ``num_decoded`` counts the images decoded. In a
    DataLoader worker both happen in the worker's copy of the source.

    Args:
        dataset: the streaming dataset (``open_hf_dataset(..., streaming=True)``).
        image_column: the ``datasets.Image`` column; default: the first one.
        id_column: a column naming each image (converted with ``str``).
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: the number of processes reading the data.
        shuffle_buffer: rows per shuffle window; 0 keeps the stored order.
        seed: seeds the shuffles; must be equal on all ranks.
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
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be 0 or more, got {shuffle_buffer}")
        self.name = _describe(dataset, name)
        self.cache_rows = image_column is None and _is_cache_rows(dataset.features)
        if self.cache_rows:
            self.image_column, self.id_column = "pixels", id_column or "image_id"
            view = dataset.select_columns(list(CACHE_COLUMNS)).with_format(None)
        else:
            self.image_column, self.id_column = _resolve_columns(
                dataset.features, image_column, id_column, self.name
            )
            view = _undecoded_view(dataset, self.image_column, self.id_column)
        self.dataset = view
        self.num_shards = view.num_shards
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.seed = int(shuffle_buffer), int(seed)
        self.on_bad = on_bad
        self.num_bad = 0
        self.num_decoded = 0
        self._resume: dict | None = None
        # shared with persistent DataLoader workers, like datasets' own epoch
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """The shard order and shuffle windows of ``epoch`` (the same on every rank); reaches
        persistent DataLoader workers too (the epoch is in shared memory)."""
        self._epoch.fill_(int(epoch))

    def resume_from(self, resume: dict | None) -> None:
        """Start the lanes of epoch ``resume["epoch"]`` where a previous pass stopped.

        ``resume``: ``{"epoch": e, "lanes": L, "first_lane": o, "positions": [p_0, …]}``,
        ``p_l`` the last position lane ``l`` delivered (None: it delivered nothing), ``o``
        the lane that delivers next. DataLoader worker ``w`` then plays lane ``(w + o) % L``,
        so the loader's round-robin over workers continues where it was. Set it before the
        loader's workers start; other epochs are unaffected. None: start from the beginning.

        Raises:
            ValueError: a resume made for another number of lanes is used with this one
                (when iterating).
        """
        self._resume = None if resume is None else dict(resume)

    def _lane(self, epoch: int) -> tuple[int, int, dict | None]:
        """(this worker's lane, the number of lanes, the lane's start position or None)."""
        info = torch.utils.data.get_worker_info()
        worker, lanes = (info.id, info.num_workers) if info is not None else (0, 1)
        resume = self._resume
        if resume is None or int(resume["epoch"]) != epoch:
            return worker, lanes, None
        if int(resume["lanes"]) != lanes:
            raise ValueError(f"stream {self.name}: the saved position is for {resume['lanes']} "
                             f"DataLoader workers, this loader has {lanes}")
        lane = (worker + int(resume["first_lane"])) % lanes
        return lane, lanes, resume["positions"][lane]

    def _plan(self, epoch: int, lane: int, lanes: int) -> tuple[list[int], int, int]:
        """(the lane's shards in reading order, row step, row offset)."""
        order = np.arange(self.num_shards)
        if self.shuffle_buffer > 0:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_shards)
        world, rank = self.world_size, self.rank
        if self.num_shards % world == 0:
            mine, step, offset = order[rank::world], 1, 0
        else:
            mine, step, offset = order, world, rank
        if len(mine) >= lanes:
            return [int(s) for s in mine[lane::lanes]], step, offset
        return [int(s) for s in mine], step * lanes, offset * lanes + lane

    def _positioned_rows(self) -> Iterator[tuple[dict, dict]]:
        """This lane's undecoded rows, each with the lane's position after it."""
        epoch = self.epoch
        lane, lanes, start = self._lane(epoch)
        if lanes > 1:
            import fsspec.asyn  # forked workers must not share fsspec's event-loop lock

            fsspec.asyn.reset_lock()
        shards, step, offset = self._plan(epoch, lane, lanes)
        window = max(1, self.shuffle_buffer)
        cursor, block, skip = {"shard": 0, "state": None, "row": 0}, 0, 0
        if start is not None:
            if start["taken"] < start["size"]:  # inside a window: read it again, undecoded
                cursor, block, skip = start["start"], start["block"], start["taken"]
            else:
                cursor, block = start["end"], start["block"] + 1
        reader = _LaneReader(self.dataset, shards, cursor)
        rows = iter(reader)
        while True:
            first, kept = reader.cursor(), []
            for row in rows:
                if (reader.row - 1) % step == offset:
                    kept.append(row)
                    if len(kept) == window:
                        break
            if not kept:
                return
            last = reader.cursor()
            order = range(len(kept))
            if window > 1:
                order = np.random.default_rng(
                    [self.seed, epoch, self.rank, lane, block]).permutation(len(kept))
            for taken, index in enumerate(order, start=1):
                if taken <= skip:
                    continue
                yield kept[index], {"epoch": epoch, "lane": lane, "lanes": lanes,
                                    "block": block, "taken": taken, "size": len(kept),
                                    "start": first, "end": last}
            block, skip = block + 1, 0
            if len(kept) < window:
                return

    def _row_id(self, row: dict) -> str:
        if self.id_column is not None:
            return str(row[self.id_column])
        value = row[self.image_column] or {}
        if value.get("path"):
            return value["path"]
        data = value.get("bytes")
        return f"sha1:{hashlib.sha1(data).hexdigest()[:16]}" if data else "<no image>"

    def decode(self, row: dict, image_id: str) -> np.ndarray:
        """One undecoded row's image as grey uint8 [H, W] (counted in ``num_decoded``).

        Raises:
            ValueError: the row holds no readable image; the message names it.
        """
        self.num_decoded += 1
        where = f"dataset {self.name}, {image_id}"
        if not self.cache_rows:
            return decode_image_value(row[self.image_column], where, self.bits_stored)
        height, width, pixels = row["height"], row["width"], row["pixels"]
        if pixels is None or height is None or width is None or len(pixels) != height * width:
            raise ValueError(f"{where}: the cache row's pixels do not match its "
                             f"{height} x {width} size")
        return np.frombuffer(pixels, dtype=np.uint8).reshape(height, width)

    def iter_items(self, exclude: frozenset[str] = frozenset()
                   ) -> Iterator[tuple[str, np.ndarray, dict]]:
        """``(image_id, grey, position)`` of this lane's images, skipping (undecoded) the
        ids in ``exclude`` and the undecodable rows; ``position`` is the lane's position
        after the image, for :meth:`resume_from`."""
        for row, position in self._positioned_rows():
            image_id = self._row_id(row)
            if image_id in exclude:
                continue
            try:
                grey = self.decode(row, image_id)
            except ValueError as error:
                self.num_bad += 1
                if self.on_bad is not None:
                    self.on_bad(image_id, str(error))
                else:
                    logger.warning("skipping an undecodable image: %s", error)
                continue
            yield image_id, grey, position

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for image_id, grey, _ in self.iter_items():
            yield image_id, grey

    def __repr__(self) -> str:
        return (
            f"HFStreamingSource({self.name!r}, rank {self.rank} of {self.world_size}, "
            f"num_shards={self.num_shards}, image_column={self.image_column!r})"
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
