"""Pre-training data, sources to batches: the two calls the training loop makes.

:class:`PretrainingData` builds the training and validation sets from the data
arguments (phantoms, split lists, folders, caches, Hugging Face datasets, streams), cuts
them into two crops per image (:class:`~.crops.TwoCropDataset`), and serves them through
DataLoaders. The loop asks it for an epoch's batches (:meth:`PretrainingData.epoch`: the
epoch's crops and order, resuming mid-epoch, every process ending a stream together) and
hands it the unreadable images met (:meth:`PretrainingData.report_bad_files`), which it
lists in ``bad_files.tsv`` and counts against ``max_bad_fraction``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from .bad_files import BadFileLog
from .crops import SkipBadImages, TwoCropDataset, collate_crops
from .hf_sources import HFStreamingSource
from .patients import patient_ids_of
from .source_spec import PHANTOMS, hold_out, is_hf_spec, open_hf_spec, source_from_spec
from .streaming import StreamingTwoCrops, take_head

__all__ = ["LoaderSettings", "PretrainingData", "seed_worker"]


class LoaderSettings:
    """How batches are served: batch sizes, workers (None: one per spare core, see
    :func:`caid_hf.runs.default_num_workers`), prefetch, page-locked memory, the seed of the
    data order."""

    def __init__(self, batch_size: int, eval_batch_size: int | None, num_workers: int,
                 prefetch_factor: int, pin_memory: bool, seed: int) -> None:
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.seed = seed


class PretrainingData:
    """The training and validation data of one pre-training process.

    Training crops are drawn per image and epoch from ``(seed, epoch, index)``, so they do
    not depend on workers or on resuming; validation crops are fixed per image, so every
    epoch is measured on the same views. With ``data_args.streaming`` the training set
    reads this process's part of the stream.

    Attributes: ``train_set`` and ``val_set`` (items ``(crops, bad_files)``),
    ``train_loader`` and ``val_loader`` (batches ``{"crops": uint8 [B, 2, S, S],
    "bad_files": [...]}``), ``streaming``, ``num_train`` (an int, or "streamed"),
    ``bad_files`` (the run's :class:`BadFileLog`) and ``data_wait`` (seconds the loop waited
    for batches since :meth:`take_data_wait`).
    """

    def __init__(self, data_args, image_size: int, seed: int, loader: LoaderSettings,
                 accelerator, output_dir: Path) -> None:
        self.data_args, self.image_size, self.seed = data_args, image_size, seed
        self.accelerator = accelerator
        self.hf_options = data_args.hf_options()
        self.streaming = bool(data_args.streaming)
        if self.streaming:
            self.train_set, self.val_set = self._streaming_sets()
            self.train_crops = self.train_set
        else:
            self.train_set, self.val_set = self._map_style_sets()
        self.num_train = "streamed" if self.streaming else len(self.train_set)
        self.num_workers = loader.num_workers
        self.train_loader, self.val_loader = self._loaders(loader)
        self.bad_files = BadFileLog(
            output_dir / "bad_files.tsv" if accelerator.is_main_process else None,
            len(self.val_set) + (0 if self.streaming else len(self.train_set)),
            data_args.max_bad_fraction)
        self._new_bad: list = []
        self.data_wait = 0.0
        self._stream_state: dict | None = None  # the epoch's lane positions (a stream)
        self._stream_resume: dict | None = None

    # -- building -----------------------------------------------------------------------

    def _crops(self, source, fixed: bool = False) -> SkipBadImages:
        scale = (self.data_args.crop_scale_min, self.data_args.crop_scale_max)
        return SkipBadImages(TwoCropDataset(source, self.image_size, scale=scale, seed=self.seed,
                                            per_epoch=not fixed,
                                            reducing_gap=self.data_args.crop_reducing_gap))

    def _source(self, spec: str, num_phantoms: int, phantom_seed: int):
        return source_from_spec(spec, self.data_args.images_root, num_phantoms,
                                self.data_args.phantom_size, phantom_seed, self.hf_options,
                                self.data_args.bits_stored)

    def _map_style_sets(self):
        args = self.data_args
        train = self._source(args.train_source, args.num_train_phantoms, self.seed)
        train_set = self._crops(train)
        self.train_crops = train_set.dataset  # its set_epoch picks the epoch's crops
        if args.validation_source is not None:
            val = self._source(args.validation_source, args.num_validation_phantoms, self.seed + 1)
            return train_set, self._crops(val, fixed=True)
        if args.train_source == PHANTOMS:  # held-out phantoms come from another seed
            val = self._source(PHANTOMS, args.num_validation_phantoms, self.seed + 1)
            return train_set, self._crops(val, fixed=True)
        patients = patient_ids_of(train, args.patient_id_from, args.train_source)
        return hold_out(train_set, self._crops(train, fixed=True), args.validation_fraction,
                        self.seed, patients)

    def _stream(self, rank: int, world: int) -> HFStreamingSource:
        args = self.data_args
        dataset = open_hf_spec(args.train_source, args.images_root, self.hf_options,
                               streaming=True)
        stream = HFStreamingSource(dataset, image_column=self.hf_options.image_column,
                                   id_column=self.hf_options.id_column, rank=rank,
                                   world_size=world, shuffle_buffer=args.streaming_shuffle_buffer,
                                   seed=self.seed, name=args.train_source)
        stream.bits_stored = args.bits_stored
        return stream

    def _streaming_sets(self):
        """This process's part of the stream, and a map-style validation set: the
        validation_source, or the stream's first ``streaming_validation_images`` images."""
        args = self.data_args
        if not is_hf_spec(args.train_source):
            raise ValueError(f"streaming=true needs a Hugging Face train_source ('hf:NAME', a "
                             f"parquet/arrow file or a saved dataset), got {args.train_source!r}")
        exclude: frozenset[str] = frozenset()
        if args.validation_source is not None:
            val_set = self._crops(self._source(args.validation_source,
                                               args.num_validation_phantoms, self.seed + 1),
                                  fixed=True)
        else:  # the same head on every process: read unsplit, in stored order
            head = take_head(self._stream(0, 1), args.streaming_validation_images)
            exclude = frozenset(head.ids)
            val_set = self._crops(head, fixed=True)
        train_set = StreamingTwoCrops(
            self._stream(self.accelerator.process_index, self.accelerator.num_processes),
            self.image_size, (args.crop_scale_min, args.crop_scale_max), seed=self.seed,
            reducing_gap=args.crop_reducing_gap, exclude=exclude)
        return train_set, val_set

    def _loaders(self, loader: LoaderSettings) -> tuple[DataLoader, DataLoader]:
        """Grey uint8 crops travel to the device (4x smaller than float RGB); workers
        persist across epochs and prefetch; batches are page-locked on a GPU. Worker RNGs
        derive from the run's seed (:func:`seed_worker`), though the crops themselves are
        seeded per image."""
        kwargs = {"num_workers": loader.num_workers, "collate_fn": collate_crops,
                  "pin_memory": self.accelerator.device.type == "cuda" and loader.pin_memory}
        if loader.num_workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=loader.prefetch_factor,
                          worker_init_fn=seed_worker)
        if self.streaming:  # a stream, already split per process
            # its own generator: the workers' base seed must not come from (and move) the
            # global RNG, or a resumed run would draw its key shuffles from another state
            train = DataLoader(self.train_set, batch_size=loader.batch_size, drop_last=True,
                               generator=torch.Generator().manual_seed(loader.seed), **kwargs)
        else:
            train = DataLoader(self.train_set, batch_size=loader.batch_size, shuffle=True,
                               drop_last=True,
                               generator=torch.Generator().manual_seed(loader.seed), **kwargs)
            if len(train) == 0:
                raise ValueError(f"{len(self.train_set)} training images make no full batch of "
                                 f"per_device_train_batch_size={loader.batch_size}")
        val = DataLoader(self.val_set, batch_size=loader.eval_batch_size,
                         generator=torch.Generator().manual_seed(loader.seed), **kwargs)
        return train, val

    def prepare_with(self, *objects):
        """``accelerator.prepare`` the given model/optimizer together with the loaders (a
        stream is split per process already: Accelerate must not shard it again); returns
        the prepared objects."""
        if self.streaming:
            *prepared, self.val_loader = self.accelerator.prepare(*objects, self.val_loader)
        else:
            *prepared, self.train_loader, self.val_loader = self.accelerator.prepare(
                *objects, self.train_loader, self.val_loader)
        return prepared

    # -- serving --------------------------------------------------------------------------

    # -- the stream's position --------------------------------------------------------------

    @property
    def stream_lanes(self) -> int:
        """The lanes a stream is read in: one per DataLoader worker."""
        return max(1, self.num_workers)

    def stream_position(self) -> dict | None:
        """This process's place in the stream's epoch (for a checkpoint), or None before the
        first batch or when not streaming: ``{"epoch", "lanes", "first_lane", "num_shards",
        "positions"}`` as :meth:`HFStreamingSource.resume_from` takes it."""
        if self._stream_state is None or not any(self._stream_state["positions"]):
            return None
        return {**self._stream_state, "positions": list(self._stream_state["positions"])}

    def resume_stream(self, saved: dict | None, epoch: int, batches: int) -> str | None:
        """Resume the stream at ``saved`` (this process's :meth:`stream_position` of a
        checkpoint taken ``batches`` batches into ``epoch``): the next :meth:`epoch` starts
        there without re-reading. Returns None when it will, else why it cannot and the
        epoch's first ``batches`` batches are read again and dropped (``skip_first_batches``)."""
        self._stream_resume = None
        if not self.streaming or batches == 0:
            return None
        if saved is None:
            return "the checkpoint holds no stream position (saved by an older caid-hf)"
        shards = self.train_set.stream.num_shards
        try:
            lanes, positions = int(saved["lanes"]), saved["positions"]
            int(saved["epoch"]), int(saved["first_lane"])
            if not isinstance(positions, list) or len(positions) != lanes:
                raise ValueError("one position per DataLoader worker")
        except (KeyError, TypeError, ValueError) as error:
            return f"the checkpoint's stream position is unreadable ({error!r})"
        if int(saved.get("num_shards", shards)) != shards:
            return (f"the checkpoint's stream position is for {saved['num_shards']} shards, "
                    f"the stream now has {shards}")
        if int(saved["lanes"]) != self.stream_lanes:
            return (f"the checkpoint's stream position is for {saved['lanes']} DataLoader "
                    f"workers, this run has {self.stream_lanes}")
        if int(saved["epoch"]) != epoch:
            return f"the checkpoint's stream position is of epoch {saved['epoch']}, not {epoch}"
        self._stream_resume = saved
        return None

    # -- serving --------------------------------------------------------------------------

    def epoch(self, epoch: int, skip_batches: int = 0):
        """The batches of ``epoch``, the first ``skip_batches`` left out (a resumed run);
        a stream resumed by :meth:`resume_stream` starts at its saved position instead. For
        a stream, the epoch ends for every process as soon as one runs out. Unreadable
        images met are kept for :meth:`report_bad_files`; the wait for each batch is added
        to ``data_wait``."""
        if not self.streaming:
            self.train_loader.set_epoch(epoch)  # the seedable sampler's order
        self.train_crops.set_epoch(epoch)  # the crops of this epoch, in every worker
        if self.streaming:
            resume, self._stream_resume = self._stream_resume, None
            if resume is not None and int(resume["epoch"]) != epoch:
                resume = None
            self.train_set.resume_from(resume)  # reaches the workers: they start after this
            self._stream_state = resume or {"epoch": epoch, "lanes": self.stream_lanes,
                                            "first_lane": 0,
                                            "num_shards": self.train_set.stream.num_shards,
                                            "positions": [None] * self.stream_lanes}
            self._stream_state = {**self._stream_state,
                                  "positions": list(self._stream_state["positions"])}
            if resume is not None:
                skip_batches = 0
        loader = self.train_loader
        if skip_batches:
            loader = self.accelerator.skip_first_batches(self.train_loader, skip_batches)
        iterator = iter(loader)
        while True:
            started = time.perf_counter()
            batch = next(iterator, None)
            if self.streaming and self.accelerator.num_processes > 1:
                finished = torch.tensor(float(batch is None), device=self.accelerator.device)
                if self.accelerator.reduce(finished, reduction="sum").item() > 0:
                    batch = None
            self.data_wait += time.perf_counter() - started
            if batch is None:
                return
            self._new_bad.extend(batch["bad_files"])
            position = batch.pop("stream_position", None)
            if position is not None:  # the lane that delivered it, and who delivers next
                self._stream_state["positions"][position["lane"]] = position
                self._stream_state["first_lane"] = (position["lane"] + 1) % position["lanes"]
            yield batch

    def validation_batches(self):
        """The validation batches (the same views every epoch); unreadable images met are
        kept for :meth:`report_bad_files`."""
        for batch in self.val_loader:
            self._new_bad.extend(batch["bad_files"])
            yield batch

    def take_data_wait(self) -> float:
        """Seconds waited for batches since the last call."""
        waited, self.data_wait = self.data_wait, 0.0
        return waited

    def report_bad_files(self, images_seen: int | None = None, say=None) -> None:
        """Merge every process's newly met unreadable images into the log (the main process
        writes them to bad_files.tsv), and stop the run on every process alike when too many
        images are bad. For a stream of unknown length, ``images_seen`` (all processes) is
        the denominator, checked once at least 1,000 images were seen."""
        accelerator = self.accelerator
        new, self._new_bad = self._new_bad, []
        merged = gather_object(new) if accelerator.num_processes > 1 else new
        for image_id, reason in self.bad_files.add(merged):
            (say or accelerator.print)(f"skipped unreadable image {image_id}: {reason}")
        if images_seen is not None:
            self.bad_files.total_images = max(1, images_seen + len(self.bad_files))
            if self.bad_files.total_images < 1000:
                return
        self.bad_files.check()


def seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's RNGs in a DataLoader worker from torch's per-worker seed
    (itself derived from the loader's seeded generator), for sources that use them."""
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)

