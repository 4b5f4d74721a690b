"""Label efficiency: downstream scores against the share of labels used, from several starts.

``caid-hf evaluate-transfer`` measures what a pre-trained backbone is worth on a user's own
labelled data. For every backbone (a CAiD folder, a Hub id, or ``random``: a randomly
initialised network of the same encoder), every label fraction and every seed:

- ``probe``: a logistic regression per label on the frozen encoder's every-stage embedding
  (:func:`~caid_hf.finetuning.features.extract_embeddings` with ``embedding="stages"``) of
  the labelled images, scored by ROC-AUC on the test images. The encoder's BatchNorm
  statistics are first re-estimated on the training pool's images
  (:func:`~caid_hf.finetuning.features.recalibrate_batch_norm`): a random network has none
  of its own, and measuring every start with statistics of the same images is fair to all.
  With ``probe_stages``, each encoder stage is also probed on its own (its average-pooled
  features), which shows where the reusable low- and mid-level features are.
- ``finetune``: :func:`~caid_hf.finetuning.finetune.finetune` of a classifier on the
  labelled images; its best-validation weights are scored on the test set (ROC-AUC).
- ``segment``: the same for a U-Net on the images' masks (Dice; binary masks), for sources
  with masks (phantoms, a CSV with ``mask_column``).

The labelled images at a fraction are drawn once per (fraction, seed) and every backbone and
mode uses them (:func:`draw_labelled_subset`): ceil(n · fraction) of the n pool images, whole
patients at a time where the images have patient ids, redrawn until every label has a
positive and a negative example where the pool allows it. A label still lacking one has no
AUC in that run (NaN), and the means over labels skip it; results.md lists every such case.

The data are the fine-tuning data (:class:`~caid_hf.finetuning.arguments.FinetuneDataArguments`:
every source, label format and patient rule). The validation set picks the fine-tuned
checkpoint. A source without a test set of its own (neither ``test_source`` nor phantoms)
gets one held out, by patient, from the training images (``test_fraction``), so the scores
never come from the images that chose the checkpoint. Validation and test sets are the same
for every seed; seeds change the labelled subset, the random initialisation and the
fine-tuning order.

Writes to ``output_dir``, after every run (the plot after every seed), so a stopped run
still shows what it has: ``results.json`` (settings, data, hardware, every subset's images
and every run's numbers, per label), ``results.md`` (per mode a table of backbones against
fractions, mean ± std over seeds; per label group and per encoder stage where asked) and
``label_efficiency.png`` (metric against label fraction, one panel per mode).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .. import config_parsing
from ..configuration_caid import CAiDConfig
from ..console import format_duration, quiet_loading
from ..data.patients import grouped_hold_out, patient_ids_of, take_patients
from ..model_settings import DEFAULT_IMAGE_SIZE, check_image_size
from ..modeling_caid import CAiDModel
from ..performance import describe_cpu
from . import finetune as finetune_module
from .arguments import FinetuneDataArguments, FinetuneModelArguments, FinetuningArguments
from .features import extract_embeddings, recalibrate_batch_norm
from .metrics import per_class_auc

__all__ = [
    "MODES",
    "LabelledSubset",
    "TransferArguments",
    "TransferEvaluation",
    "TransferTrainingArguments",
    "draw_labelled_subset",
    "evaluate_transfer",
    "linear_probe_aucs",
    "parse_label_groups",
    "parse_transfer_args",
]

RANDOM = "random"
MODES = ("probe", "finetune", "segment")
# what each mode's number is, for table titles and axis labels
MODE_METRICS = {"probe": "test mean AUC, frozen linear probe (every encoder stage)",
                "finetune": "test mean AUC, fine-tuned classifier",
                "segment": "test Dice, fine-tuned U-Net"}
PANEL_TITLES = {"probe": "frozen linear probe", "finetune": "fine-tuned classification",
                "segment": "fine-tuned segmentation"}
MAX_DRAWS = 100  # draws of a labelled subset before settling for the best one
DRAW_SEED_STEP = 100_003  # seed of redraw k: seed + 1 + k * DRAW_SEED_STEP
# A Hub model id: "name" or "namespace/name" (a local path with more parts is a folder).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_KEPT_RUN_FILES = ("test_results.json", "validation_results.json", "trainer_state.json",
                   "bad_files.tsv")


@dataclass
@config_parsing.checked_arguments
class TransferArguments:
    """What is compared: the backbones, label fractions, seeds and modes."""

    backbones: list[str] = field(metadata={
        "help": "The starts to compare: CAiD backbone folders (e.g. outputs/demo/best), Hub "
                "ids (org/name), and 'random' (a randomly initialised network of "
                "--encoder_name)."})
    label_fractions: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.25, 1.0],
                                         metadata={"help": "Shares of the training pool's "
                                                           "labels to train on, each in (0, 1]."})
    seeds: int = field(default=3, metadata={
        "help": "Seeds per (backbone, fraction): seed .. seed + seeds - 1 (--seed)."})
    modes: list[str] = field(default_factory=lambda: ["probe", "finetune"], metadata={
        "help": "'probe' (frozen linear probe), 'finetune' (fine-tuned classifier), "
                "'segment' (fine-tuned U-Net on the masks; phantoms, or a CSV with "
                "--mask_column)."})
    label_groups: list[str] | None = field(default=None, metadata={
        "help": "Label groups tabled on their own, e.g. 'global=Cardiomegaly,Emphysema' "
                "'local=Nodule,Mass' (mean AUC over each group's labels)."})
    probe_stages: bool = field(default=False, metadata={
        "help": "Also probe every encoder stage on its own (stage 1..5, average-pooled)."})
    encoder_name: str | None = field(default=None, metadata={
        "help": "Encoder of 'random' (default: the first CAiD backbone's, else resnet50)."})
    image_size: int | None = field(default=None, metadata={
        "help": "Side of the model input for every backbone, a multiple of 32 (default: the "
                "first CAiD backbone's image_size, else 224)."})
    test_fraction: float = field(default=0.2, metadata={
        "help": "Share of the training images held out (by patient) as the test set when the "
                "source has none (no --test_source; phantoms have their own)."})
    segmentation_batch_size: int | None = field(default=None, metadata={
        "help": "Training batch of 'segment' runs (default: --per_device_train_batch_size)."})
    segmentation_steps: int | None = field(default=None, metadata={
        "help": "Optimizer steps of 'segment' runs (default: --max_steps, or the epochs)."})
    keep_models: bool = field(default=False, metadata={
        "help": "Keep every fine-tuned model in OUTPUT_DIR/runs (default: keep only their "
                "test results and training history)."})

    def __post_init__(self):
        if not self.backbones:
            raise ValueError("backbones: name at least one backbone (a folder, a Hub id or "
                             "'random')")
        repeated = sorted({b for b in self.backbones if self.backbones.count(b) > 1})
        if repeated:
            raise ValueError(f"backbones names {repeated} more than once")
        bad = [f for f in self.label_fractions if not 0 < f <= 1]
        if not self.label_fractions or bad:
            raise ValueError(f"label_fractions must each be in (0, 1], got "
                             f"{self.label_fractions}")
        self.label_fractions = sorted(set(self.label_fractions))
        if self.seeds < 1:
            raise ValueError(f"seeds must be 1 or more, got {self.seeds}")
        unknown = [m for m in self.modes if m not in MODES]
        if not self.modes or unknown:
            raise ValueError(f"modes must be some of {list(MODES)}, got {self.modes}")
        self.modes = [m for m in MODES if m in self.modes]
        if self.image_size is not None:
            check_image_size(self.image_size)
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        for name in ("segmentation_batch_size", "segmentation_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be 1 or more, got {getattr(self, name)}")
        parse_label_groups(self.label_groups)


@dataclass
class TransferTrainingArguments(FinetuningArguments):
    """The fine-tuning settings of every ``finetune`` / ``segment`` run, with defaults
    suited to many runs (no bootstrap intervals, no trackers)."""

    output_dir: str = field(default="outputs/transfer", metadata={
        "help": "Where results.json, results.md and label_efficiency.png go (fine-tuning "
                "runs in runs/)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace the results of an earlier run in output_dir instead of refusing."})
    bootstrap_resamples: int = field(default=0, metadata={
        "help": "Bootstrap replicates of each fine-tuning run's test intervals (0: none; "
                "the seeds' spread is the error bar here)."})
    seed: int = field(default=0, metadata={
        "help": "First seed; it also draws the held-out validation and test images, the "
                "same for every seed."})
    report_to: str = field(default="none", metadata={"help": "'tensorboard' or 'none'."})


ARGUMENT_CLASSES = (TransferArguments, FinetuneDataArguments, TransferTrainingArguments)


def parse_transfer_args(argv: list[str] | None = None, prog: str | None = None
                        ) -> tuple[TransferArguments, FinetuneDataArguments,
                                   TransferTrainingArguments]:
    """Parse ``[--config FILE.yaml] [--field value ...]`` → (transfer, data, training)
    arguments."""
    return config_parsing.parse_config_args(
        ARGUMENT_CLASSES, argv, prog=prog,
        description="Label efficiency of pre-trained backbones on labelled data: frozen "
                    "linear probes and fine-tuning (and segmentation) at several label "
                    "fractions and seeds. Writes OUTPUT_DIR/results.json, results.md and "
                    "label_efficiency.png.")


def parse_label_groups(groups: list[str] | None) -> dict[str, list[str]]:
    """``["global=A,B", "local=C"]`` → ``{"global": ["A", "B"], "local": ["C"]}``; a
    malformed entry raises ValueError naming ``label_groups``."""
    parsed: dict[str, list[str]] = {}
    for entry in groups or []:
        name, sep, labels = entry.partition("=")
        members = [label.strip() for label in labels.split(",") if label.strip()]
        if not sep or not name.strip() or not members:
            raise ValueError(f"label_groups entries are NAME=LABEL,LABEL,...; got {entry!r}")
        if name.strip() in parsed:
            raise ValueError(f"label_groups names group {name.strip()!r} twice")
        parsed[name.strip()] = members
    return parsed


def _check_data_args(data_args: FinetuneDataArguments) -> None:
    if data_args.label_fraction != 1.0 or data_args.max_train_samples is not None:
        raise ValueError("label_fraction and max_train_samples do not apply here: the "
                         "command draws its own labelled subsets (label_fractions)")


def resolve_backbone(spec: str) -> CAiDConfig | None:
    """The config of a backbone named on the command line (``None`` for ``random``).

    Raises:
        FileNotFoundError: a path that does not exist and cannot be a Hub id.
        ValueError: a folder without ``config.json``, or a Hub id that cannot be loaded.
    """
    if spec == RANDOM:
        return None
    path = Path(spec)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"backbones: {spec} is not a CAiD backbone folder (no "
                             "config.json); give the folder a pre-training run saved, e.g. "
                             "OUTPUT_DIR/best")
    elif not _HUB_ID.match(spec):
        raise FileNotFoundError(f"backbones: no folder {spec}")
    try:
        with quiet_loading():
            config = CAiDConfig.from_pretrained(spec)
    except (OSError, ValueError) as error:
        raise ValueError(f"backbones: {spec!r} is neither a folder here nor a model the Hub "
                         f"gives ({error})") from None
    if config.model_type != "caid":
        raise ValueError(f"backbones: {spec} is a {config.model_type!r} model, not a CAiD "
                         "backbone")
    return config


class SourceSubset:
    """Some images of a labelled source, seen as a source of their own (``len``, ``load``,
    ``image_id``, ``targets`` [M, L], ``label_names``), for the feature functions that read
    a whole source."""

    def __init__(self, source, indices: list[int]) -> None:
        self.source, self.indices = source, list(indices)
        self.targets = np.asarray(source.targets)[self.indices]
        self.label_names = source.label_names

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> np.ndarray:
        return self.source.load(self.indices[i])

    def image_id(self, i: int) -> str:
        return self.source.image_id(self.indices[i])


@dataclass
class LabelledSubset:
    """The labelled images of one (fraction, seed): indices into the training source."""

    fraction: float
    seed: int
    indices: list[int]
    draws: int  # how many draws it took (1: the first draw had both classes of every label)
    draw_seed: int
    labels_without_both_classes: list[str]
    positives: dict[str, int]
    negatives: dict[str, int]
    patients: int | None  # distinct patients among the images (None: no patient ids)


def _labels_lacking_a_class(targets: np.ndarray) -> np.ndarray:
    """bool [L]: labels whose known entries (of targets [M, L], NaN = ignored) lack a
    positive or a negative."""
    return ~((targets == 1).any(axis=0) & (targets == 0).any(axis=0))


def draw_labelled_subset(pool: list[int], targets: np.ndarray, label_names: list[str],
                         fraction: float, seed: int, patients: list[str] | None = None,
                         max_draws: int = MAX_DRAWS) -> LabelledSubset:
    """The labelled images at ``fraction`` for ``seed``.

    A draw is :func:`~caid_hf.data.patients.take_patients` of ``pool``: ceil(len(pool) ·
    fraction) images, whole patients at a time when ``patients`` (one id per image of the
    source) is given. The first draw uses seed + 1, as ``finetune --label_fraction`` does;
    while some label has no positive or no negative among the drawn images but has both in
    the pool, it is redrawn (up to ``max_draws`` times; then the draw missing the fewest
    labels is kept).

    Args:
        pool: indices of the training pool's images in the source.
        targets: float32 [N, L] of the whole source, in {0, 1} (NaN = ignored).
    """
    targets = np.asarray(targets, dtype=np.float32)
    fixable = ~_labels_lacking_a_class(targets[pool])
    best = None
    for draw in range(max_draws):
        draw_seed = seed + 1 + draw * DRAW_SEED_STEP
        indices = take_patients(pool, fraction, draw_seed, patients)
        lacking = _labels_lacking_a_class(targets[indices])
        misses = int((lacking & fixable).sum())
        if best is None or misses < best[0]:
            best = (misses, draw + 1, draw_seed, indices, lacking)
        if misses == 0 or len(indices) == len(pool):
            break
    _, draws, draw_seed, indices, lacking = best
    chosen = targets[indices]
    return LabelledSubset(
        fraction=fraction, seed=seed, indices=list(indices), draws=draws, draw_seed=draw_seed,
        labels_without_both_classes=[n for n, bad in zip(label_names, lacking) if bad],
        positives={n: int((chosen[:, j] == 1).sum()) for j, n in enumerate(label_names)},
        negatives={n: int((chosen[:, j] == 0).sum()) for j, n in enumerate(label_names)},
        patients=None if patients is None else len({patients[i] for i in indices}))


def linear_probe_aucs(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                      test_y: np.ndarray, seed: int = 0) -> np.ndarray:
    """Test ROC-AUC per label, float64 [L], of a logistic regression per label on
    standardised features (the linear probe of ``evaluate-features``).

    Args:
        train_x, train_y: features [N, C] and labels [N, L] in {0, 1} (NaN = ignored: left
            out of that label's fit).
        test_x, test_y: the same for the scored images.

    Returns:
        NaN for a label whose training entries lack a class (no probe can be fit; one
        example of a class is enough) or whose test entries do.
    """
    scores = np.zeros(test_y.shape, dtype=np.float64)
    fitted = np.zeros(test_y.shape[1], dtype=bool)
    for j in range(test_y.shape[1]):
        known = np.isfinite(train_y[:, j])
        y = train_y[known, j].astype(int)
        if len(np.unique(y)) < 2:
            continue
        probe = make_pipeline(StandardScaler(),
                              LogisticRegression(max_iter=2000, random_state=seed))
        scores[:, j] = probe.fit(train_x[known], y).predict_proba(test_x)[:, 1]
        fitted[j] = True
    auc = per_class_auc(test_y, scores)
    auc[~fitted] = math.nan
    return auc


def _nanmean(values) -> float:
    finite = [float(v) for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g} %"


def _mean_std(values: list[float], expected: int) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "n/a"
    text = (f"{finite[0]:.3f}" if len(finite) == 1
            else f"{statistics.mean(finite):.3f} ± {statistics.stdev(finite):.3f}")
    return text if len(finite) == expected else f"{text} ({len(finite)}/{expected} seeds)"


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file, so that stopping the run mid-write leaves the last
    complete file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


class TransferEvaluation:
    """One label-efficiency evaluation: opens the data, draws the labelled subsets, runs
    probes and fine-tuning per seed (:meth:`run_seed`) and writes the results (:meth:`write`).

    ``backbones`` of :meth:`run_seed` map a display name to a start (folder, Hub id or
    ``random``); a name may start from another folder at every seed (a benchmark that
    pre-trains per seed), and its results gather under the name.
    """

    def __init__(self, args: TransferArguments, data_args: FinetuneDataArguments,
                 training_args: FinetuningArguments, encoder_name: str = "resnet50",
                 image_size: int = DEFAULT_IMAGE_SIZE) -> None:
        _check_data_args(data_args)
        self.args, self.data_args, self.training_args = args, data_args, training_args
        self.encoder_name, self.image_size = encoder_name, image_size
        self.out = Path(training_args.output_dir)
        self.groups = parse_label_groups(args.label_groups)
        self.device = torch.device("cpu" if training_args.use_cpu or not torch.cuda.is_available()
                                   else "cuda")
        self.started = time.perf_counter()
        self.splits = self._open_splits("classification")
        self.label_names = list(self.splits.label_names)
        for group, members in self.groups.items():
            unknown = [m for m in members if m not in self.label_names]
            if unknown:
                raise ValueError(f"label_groups: group {group!r} names {unknown}, not labels "
                                 f"of {data_args.train_source}; its labels: {self.label_names}")
        self.segmentation_splits = (self._segmentation_splits() if "segment" in args.modes
                                    else None)
        self.patients = patient_ids_of(self.splits.train, data_args.patient_id_from,
                                       data_args.train_source)
        self.pool = list(self.splits.train_indices)
        self.targets = np.asarray(self.splits.train.targets, dtype=np.float32)
        self.subsets: dict[tuple[float, int], LabelledSubset] = {}
        self.runs: list[dict] = []
        self.backbone_specs: dict[str, list[str]] = {}
        self.seeds_done: list[int] = []
        self.stage_widths: list[int] | None = None
        self.plot_title: str | None = None  # default: the source and the seeds

    # -- data --------------------------------------------------------------------------

    def _model_args(self, task: str, init_from: str = RANDOM) -> FinetuneModelArguments:
        return FinetuneModelArguments(task=task, init_from=init_from,
                                      encoder_name=self.encoder_name, image_size=self.image_size)

    def _open_splits(self, task: str):
        """The fine-tuning splits of the whole pool (validation held out or its own set),
        plus a held-out test set when the source has none."""
        data_args = dataclasses.replace(self.data_args, label_fraction=1.0)
        seed = self.training_args.seed
        splits = finetune_module.build_splits(self._model_args(task), data_args, seed)
        if splits.test_split == "validation":  # no test images of its own: hold some out
            pool = list(splits.train_indices)
            patients = patient_ids_of(splits.train, data_args.patient_id_from,
                                      data_args.train_source)
            groups = None if patients is None else [patients[i] for i in pool]
            kept, held = grouped_hold_out(len(pool), self.args.test_fraction, seed, groups,
                                          what=f"training images of {data_args.train_source}")
            splits.train_indices = sorted(pool[k] for k in kept)
            splits.test, splits.test_indices = splits.train, sorted(pool[k] for k in held)
            splits.test_split = "test"
            splits.test_source = (f"{data_args.train_source} (held out: "
                                  f"{_percent(self.args.test_fraction)} of the training images)")
        return splits

    def _segmentation_splits(self):
        """The segmentation view of the same images: its sources, with the classification
        splits' indices."""
        try:
            splits = self._open_splits("segmentation")
        except ValueError as error:
            raise ValueError(f"modes segment: {error}") from None
        cls = self.splits
        if len(splits.train) != len(cls.train) or len(splits.test) != len(cls.test):
            raise ValueError("modes segment: the segmentation view of the data has other "
                             f"images than its labels ({len(splits.train)} against "
                             f"{len(cls.train)} training images)")
        splits.train_indices, splits.validation_indices = cls.train_indices, cls.validation_indices
        splits.test_indices, splits.test_split = cls.test_indices, cls.test_split
        if cls.test is cls.train:
            splits.test, splits.test_source = splits.train, cls.test_source
        return splits

    def subset(self, fraction: float, seed: int) -> LabelledSubset:
        """The labelled images of (fraction, seed), drawn once and kept."""
        key = (fraction, seed)
        if key not in self.subsets:
            self.subsets[key] = draw_labelled_subset(self.pool, self.targets, self.label_names,
                                                     fraction, seed, self.patients)
        return self.subsets[key]

    # -- the three modes ---------------------------------------------------------------

    def _load_backbone(self, spec: str, seed: int) -> CAiDModel:
        if spec == RANDOM:
            torch.manual_seed(seed)
            return CAiDModel(CAiDConfig(encoder_name=self.encoder_name,
                                        image_size=self.image_size), add_decoder=False)
        with quiet_loading():
            return CAiDModel.from_pretrained(spec)

    def _embeddings(self, spec: str, seed: int) -> tuple:
        """Every-stage embeddings of the pool [N, C] and the test images [M, C], the test
        labels [M, L] and the stages' widths, with BatchNorm statistics re-estimated on the
        pool (recomputed at every seed: one pass over the images, little beside fine-tuning,
        and no store of every backbone's embeddings of a large pool)."""
        backbone = self._load_backbone(spec, seed)
        batch = self.training_args.per_device_eval_batch_size or 64
        workers = self.training_args.dataloader_num_workers or 0
        pool = SourceSubset(self.splits.train, self.pool)
        test = SourceSubset(self.splits.test, self.splits.test_indices)
        recalibrate_batch_norm(backbone, pool, self.image_size, batch, self.device)
        x, _ = extract_embeddings(backbone, pool, self.image_size, batch, self.device,
                                  workers, embedding="stages")
        test_x, test_y = extract_embeddings(backbone, test, self.image_size, batch,
                                            self.device, workers, embedding="stages")
        widths = list(backbone.encoder.out_channels[1:])  # [0] is the input image
        return x, test_x, test_y, widths

    def probe(self, name: str, spec: str, seed: int) -> list[dict]:
        """Linear probes of ``spec``'s frozen every-stage embedding at every fraction
        (and of each stage with ``probe_stages``); returns the runs' records."""
        started = time.perf_counter()
        x, test_x, test_y, widths = self._embeddings(spec, seed)
        self.stage_widths = widths
        views = {"probe": slice(None)}
        if self.args.probe_stages:
            ends = np.cumsum(widths)
            views.update({f"probe:stage{k + 1}": slice(int(end - w), int(end))
                          for k, (w, end) in enumerate(zip(widths, ends))})
        row_of = {index: row for row, index in enumerate(self.pool)}
        records = []
        seconds = (time.perf_counter() - started) / len(self.args.label_fractions)
        for fraction in self.args.label_fractions:
            subset = self.subset(fraction, seed)
            rows = [row_of[i] for i in subset.indices]
            for mode, columns in views.items():
                auc = linear_probe_aucs(x[rows][:, columns], self.targets[subset.indices],
                                        test_x[:, columns], test_y, seed)
                records.append(self._record(name, spec, mode, fraction, seed, subset,
                                            dict(zip(self.label_names, auc.tolist())),
                                            seconds=seconds))
        return records

    def finetune(self, name: str, spec: str, mode: str, fraction: float, seed: int) -> dict:
        """One fine-tuning run (``mode`` ``finetune`` or ``segment``) from ``spec`` on the
        labelled subset of (fraction, seed); returns its record."""
        segmentation = mode == "segment"
        subset = self.subset(fraction, seed)
        splits = dataclasses.replace(self.segmentation_splits if segmentation else self.splits,
                                     train_indices=list(subset.indices))
        run_dir = self.out / "runs" / _slug(name) / mode / f"fraction{fraction:g}_seed{seed}"
        training = {"output_dir": str(run_dir), "overwrite_output_dir": True, "seed": seed}
        if segmentation and self.args.segmentation_batch_size:
            training["per_device_train_batch_size"] = self.args.segmentation_batch_size
        if segmentation and self.args.segmentation_steps:
            training["max_steps"] = self.args.segmentation_steps
        args = FinetuningArguments(**{**_fields_of(self.training_args, FinetuningArguments),
                                      **training})
        data_args = dataclasses.replace(self.data_args, label_fraction=fraction)
        model_args = self._model_args("segmentation" if segmentation else "classification",
                                      spec)
        started = time.perf_counter()
        result = finetune_module.finetune(model_args, data_args, args, splits=splits)
        metrics = result.test_report["metrics"]
        if segmentation:
            per_label = {k.split("/", 1)[1]: v for k, v in metrics.items()
                         if k.startswith("dice/")}
        else:
            per_label = {n: metrics[f"auc/{n}"] for n in self.label_names}
        if not self.args.keep_models:
            for path in run_dir.iterdir():
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.name not in _KEPT_RUN_FILES:
                    path.unlink()
        return self._record(name, spec, mode, fraction, seed, subset, per_label,
                            seconds=time.perf_counter() - started,
                            best_step=result.best_step, global_step=result.global_step,
                            best_validation=result.best_metric,
                            value=metrics["dice"] if segmentation else None)

    def _record(self, name: str, spec: str, mode: str, fraction: float, seed: int,
                subset: LabelledSubset, per_label: dict[str, float], seconds: float,
                value: float | None = None, **extra) -> dict:
        """A run's numbers: AUCs of labels without both classes in the subset are NaN (no
        classifier could learn them) and the means skip them."""
        if mode != "segment":
            per_label = {n: (math.nan if n in subset.labels_without_both_classes else v)
                         for n, v in per_label.items()}
            value = _nanmean(per_label.values())
        record = {"backbone": name, "start": spec, "mode": mode, "fraction": fraction,
                  "seed": seed, "metric": "dice" if mode == "segment" else "mean_auc",
                  "value": value, "per_label": per_label,
                  "undefined_labels": [n for n, v in per_label.items() if not math.isfinite(v)],
                  "num_labelled": len(subset.indices), "seconds": round(seconds, 1), **extra}
        if mode != "segment" and self.groups:
            record["groups"] = {g: _nanmean(per_label[m] for m in members)
                                for g, members in self.groups.items()}
        return record

    # -- a seed ------------------------------------------------------------------------

    def run_seed(self, seed: int, backbones: dict[str, str]) -> None:
        """Every mode, backbone and fraction at ``seed``; results are written after every
        run (the plot after the seed)."""
        for name, spec in backbones.items():
            specs = self.backbone_specs.setdefault(name, [])
            if spec not in specs:
                specs.append(spec)
        for name, spec in backbones.items():
            if "probe" in self.args.modes:
                records = self.probe(name, spec, seed)
                self.runs.extend(records)
                self._say(seed, name, "probe", [r for r in records if r["mode"] == "probe"])
                self.write(plot=False)
            for mode in ("finetune", "segment"):
                if mode not in self.args.modes:
                    continue
                records = []
                for fraction in self.args.label_fractions:
                    records.append(self.finetune(name, spec, mode, fraction, seed))
                    self.runs.append(records[-1])
                    self.write(plot=False)
                self._say(seed, name, mode, records)
        self.seeds_done.append(seed)
        self.write(plot=True)

    def _say(self, seed: int, name: str, mode: str, records: list[dict]) -> None:
        cells = ", ".join(f"{_percent(r['fraction'])} {r['value']:.3f}" for r in records)
        print(f"[seed {seed}] {name} {mode}: {cells} "
              f"({format_duration(time.perf_counter() - self.started)} so far)", flush=True)

    # -- output ------------------------------------------------------------------------

    def results(self) -> dict:
        """Everything measured so far, as results.json holds it."""
        splits = self.splits
        return {
            "settings": {
                "backbones": self.backbone_specs, "label_fractions": self.args.label_fractions,
                "seeds_planned": self.args.seeds, "modes": self.args.modes,
                "label_groups": self.groups, "probe_stages": self.args.probe_stages,
                "encoder_name_of_random": self.encoder_name, "image_size": self.image_size,
                "arguments": {"transfer": dataclasses.asdict(self.args),
                              "data": dataclasses.asdict(self.data_args),
                              "training": dataclasses.asdict(self.training_args)}},
            "hardware": {"device": self._device_name(), "cpu": describe_cpu(),
                         "torch": torch.__version__},
            "data": {"train_source": self.data_args.train_source,
                     "label_names": self.label_names,
                     "pool_images": len(self.pool),
                     "pool_patients": (None if self.patients is None
                                       else len({self.patients[i] for i in self.pool})),
                     "patient_level": self.patients is not None,
                     "validation_images": len(splits.validation_indices),
                     "test_images": len(splits.test_indices), "test_source": splits.test_source,
                     # held out of the training source: which images (else another source)
                     "validation_indices": list(splits.validation_indices)
                     if splits.validation is splits.train else None,
                     "test_indices": list(splits.test_indices)
                     if splits.test is splits.train else None,
                     "stage_channels": self.stage_widths},
            "subsets": [dataclasses.asdict(s) for s in self.subsets.values()],
            "runs": self.runs,
            "seeds_done": self.seeds_done,
            "wall_time_s": round(time.perf_counter() - self.started, 1),
        }

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(self.device)})"
        return "cpu"

    def write(self, plot: bool = True) -> dict:
        """Write results.json and results.md (and label_efficiency.png with ``plot``)."""
        self.out.mkdir(parents=True, exist_ok=True)
        results = self.results()
        _atomic_write(self.out / "results.json", json.dumps(results, indent=2))
        _atomic_write(self.out / "results.md", self.markdown(results))
        if plot:
            plot_label_efficiency(results, self.out / "label_efficiency.png", self.plot_title)
        return results

    def markdown(self, results: dict) -> str:
        """results.md: what was run, then a table per mode (per group, per stage)."""
        data, runs = results["data"], results["runs"]
        seeds = len({r["seed"] for r in runs}) or 1
        patients = (f" of {data['pool_patients']} patients" if data["patient_level"]
                    else " (no patient ids: image-level draws)")
        lines = ["# Label efficiency", "",
                 f"Training pool: {data['pool_images']} images{patients} of "
                 f"{data['train_source']}; {data['validation_images']} validation images pick "
                 f"the fine-tuned checkpoint; scored on {data['test_images']} test images "
                 f"({data['test_source']}). Labels: {', '.join(self.label_names)}.",
                 "",
                 f"Seeds done: {len(results['seeds_done'])} of {self.args.seeds}; cells are "
                 "mean ± std over seeds. Image size "
                 f"{self.image_size} px; 'random' is a randomly initialised "
                 f"{self.encoder_name}. Device: {results['hardware']['device']}; CPU: "
                 f"{results['hardware']['cpu']}; {results['wall_time_s'] / 60:.1f} min.",
                 "", self._subset_note(results), ""]
        for mode in self._modes_run(runs):
            lines += [f"## {self._title(mode)}", "", *self._table(runs, mode, "value", seeds),
                      ""]
            if self.groups and mode != "segment":
                for group, members in self.groups.items():
                    lines += [f"### {mode}, group {group} ({', '.join(members)})", "",
                              *self._table(runs, mode, ("groups", group), seeds), ""]
        undefined: dict[tuple, list[dict]] = {}
        for r in runs:
            if r["undefined_labels"]:
                key = (r["fraction"], r["seed"], tuple(r["undefined_labels"]))
                undefined.setdefault(key, []).append(r)
        if undefined:
            lines += ["## Undefined scores", "",
                      "Labels without a score (no positive or no negative among the run's "
                      "labelled or test images); the runs' means skip them:", ""]
            every_mode, every_backbone = self._modes_run(runs), list(self.backbone_specs)
            for (fraction, seed, labels), group in sorted(undefined.items()):
                modes = [m for m in every_mode if any(r["mode"] == m for r in group)]
                names = [b for b in every_backbone if any(r["backbone"] == b for r in group)]
                lines.append(
                    f"- {_percent(fraction)}, seed {seed}, "
                    f"{'every mode' if modes == every_mode else ', '.join(modes)} of "
                    f"{'every backbone' if names == every_backbone else ', '.join(names)}: "
                    f"{', '.join(labels)}")
            lines.append("")
        return "\n".join(lines)

    def _subset_note(self, results: dict) -> str:
        subsets = results["subsets"]
        redrawn = [s for s in subsets if s["draws"] > 1]
        lacking = [s for s in subsets if s["labels_without_both_classes"]]
        unit = ", whole patients at a time" if results["data"]["patient_level"] else ""
        text = (f"Labelled subsets: at each fraction and seed, a seeded draw of ceil(n × "
                f"fraction) of the n = {len(self.pool)} pool images{unit}, the same images for "
                "every backbone and mode, redrawn (up to "
                f"{MAX_DRAWS} times) until every label has a positive and a negative example "
                f"where the pool allows. {len(redrawn)} of {len(subsets)} subsets were redrawn")
        if lacking:
            cases = "; ".join(f"{_percent(s['fraction'])} seed {s['seed']}: "
                              f"{', '.join(s['labels_without_both_classes'])}" for s in lacking)
            text += f"; labels still lacking a class (their AUC is undefined): {cases}"
        return text + "."

    @staticmethod
    def _modes_run(runs: list[dict]) -> list[str]:
        seen = []
        for r in runs:
            if r["mode"] not in seen:
                seen.append(r["mode"])
        return sorted(seen, key=lambda m: (MODES.index(m.split(":")[0]), m))

    def _title(self, mode: str) -> str:
        if mode.startswith("probe:stage"):
            k = int(mode.removeprefix("probe:stage"))
            width = f", {self.stage_widths[k - 1]} channels" if self.stage_widths else ""
            return f"Linear probe of encoder stage {k} alone (test mean AUC{width})"
        return MODE_METRICS[mode][0].upper() + MODE_METRICS[mode][1:]

    def _table(self, runs: list[dict], mode: str, key, seeds: int) -> list[str]:
        fractions = self.args.label_fractions
        sizes = []
        for f in fractions:
            counts = sorted({len(s.indices) for (g, _), s in self.subsets.items() if g == f})
            sizes.append("?" if not counts else str(counts[0]) if len(counts) == 1
                         else f"{counts[0]}-{counts[-1]}")
        header = " | ".join(f"{_percent(f)} ({n} labelled)" for f, n in zip(fractions, sizes))
        lines = [f"| backbone | {header} |", "|---|" + "---:|" * len(fractions)]
        for name in self.backbone_specs:
            cells = []
            for f in fractions:
                values = [(r[key] if isinstance(key, str) else r[key[0]][key[1]])
                          for r in runs if r["backbone"] == name and r["mode"] == mode
                          and r["fraction"] == f]
                cells.append(_mean_std(values, seeds))
            lines.append(f"| {name} | {' | '.join(cells)} |")
        return lines


def _fields_of(instance, cls) -> dict:
    """The values of ``instance`` for the fields of ``cls`` (a base class of its class)."""
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(cls)}


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "backbone"


def plot_label_efficiency(results: dict, path: str | Path, title: str | None = None) -> Path:
    """Save metric against label fraction (log axis) as a PNG: one panel per mode (the
    per-stage probes are in the tables only), one line per backbone through the seeds'
    means, their spread (± std) shaded, every seed a dot; ``title`` above, followed by the
    number of seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if ":" not in r["mode"]]
    modes = [m for m in MODES if any(r["mode"] == m for r in runs)] or ["probe"]
    fractions = results["settings"]["label_fractions"]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.4), dpi=120,
                             squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, mode in zip(axes[0], modes):
        for k, name in enumerate(results["settings"]["backbones"]):
            colour = colours(k % 10)
            per_fraction = [[r["value"] for r in runs if r["backbone"] == name
                             and r["mode"] == mode and r["fraction"] == f
                             and math.isfinite(r["value"])] for f in fractions]
            shown = [(f, v) for f, v in zip(fractions, per_fraction) if v]
            if not shown:
                continue
            xs = np.array([f for f, _ in shown])
            means = np.array([np.mean(v) for _, v in shown])
            stds = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for _, v in shown])
            ax.plot(xs, means, marker="o", color=colour, label=name)
            ax.fill_between(xs, means - stds, means + stds, color=colour, alpha=0.15)
            for f, v in shown:
                ax.scatter([f] * len(v), v, color=colour, s=10, alpha=0.6)
        ax.set_xscale("log")
        ax.set_xticks(fractions, [_percent(f) for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("share of the training pool's labels")
        ax.set_ylabel(MODE_METRICS[mode])
        ax.set_ylim(0, 1)
        ax.set_title(PANEL_TITLES[mode], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    seeds = len(results["seeds_done"])
    title = title or f"Label efficiency on {results['data']['train_source']}"
    fig.suptitle(f"{title}: mean ± std over {seeds} seed{'s' if seeds != 1 else ''}",
                 fontsize=11)
    fig.tight_layout()
    path = Path(path)
    partial = path.with_name(path.stem + ".partial.png")
    fig.savefig(partial)
    plt.close(fig)
    os.replace(partial, path)
    return path


def evaluate_transfer(args: TransferArguments, data_args: FinetuneDataArguments,
                      training_args: TransferTrainingArguments) -> dict:
    """The whole evaluation of ``caid-hf evaluate-transfer``: every backbone, seed, fraction
    and mode; returns what results.json holds.

    Raises:
        FileExistsError: ``output_dir`` holds results of an earlier run (and
            ``overwrite_output_dir`` is off).
        FileNotFoundError, ValueError: a backbone or a data source that cannot be read,
            named with its flag.
    """
    out = Path(training_args.output_dir)
    if (out / "results.json").exists() and not training_args.overwrite_output_dir:
        raise FileExistsError(f"{out} holds results.json of an earlier run; choose another "
                              "--output_dir or pass --overwrite_output_dir true")
    configs = {spec: resolve_backbone(spec) for spec in args.backbones}
    first = next((c for c in configs.values() if c is not None), None)
    encoder_name = args.encoder_name or (first.encoder_name if first else "resnet50")
    image_size = args.image_size or (first.image_size if first else DEFAULT_IMAGE_SIZE)
    evaluation = TransferEvaluation(args, data_args, training_args, encoder_name, image_size)
    if training_args.overwrite_output_dir and (out / "runs").is_dir():
        shutil.rmtree(out / "runs")
    print(f"caid-hf evaluate-transfer: {len(args.backbones)} backbone(s) × "
          f"{len(args.label_fractions)} label fraction(s) × {args.seeds} seed(s), modes "
          f"{', '.join(args.modes)}; {len(evaluation.pool)} training images of "
          f"{data_args.train_source}, {len(evaluation.splits.test_indices)} test images; "
          f"{image_size} px on {evaluation._device_name()} -> {out}", flush=True)
    first_seed = training_args.seed
    for seed in range(first_seed, first_seed + args.seeds):
        evaluation.run_seed(seed, {spec: spec for spec in args.backbones})
    results = evaluation.write(plot=True)
    print()
    print(evaluation.markdown(results))
    print(f"done in {format_duration(results['wall_time_s'])}: wrote {out / 'results.json'}, "
          f"{out / 'results.md'} and {out / 'label_efficiency.png'}")
    return results


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """Entry point of ``caid-hf evaluate-transfer``: ``[--config FILE.yaml] [--field value
    ...]``."""
    return evaluate_transfer(*parse_transfer_args(argv, prog=prog))
