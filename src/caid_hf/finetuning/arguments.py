"""Fine-tuning configuration: a YAML file plus command-line overrides, as in pre-training.

Three written-out dataclasses, parsed by :mod:`caid_hf.config_parsing`; flag names follow
``TrainingArguments`` where the meaning is the same (``--output_dir``,
``--learning_rate``, ``--metric_for_best_model``, ``--early_stopping_patience`` …).
Precedence: dataclass defaults < YAML file (``--config``) < command line. An unknown YAML
key stops the run with a suggestion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import config_parsing
from ..data.options import check_patient_rule
from ..model_settings import check_image_size
from .label_formats import BLANK_POLICIES, LABEL_FORMATS, UNCERTAIN_POLICIES

TASKS = ("classification", "segmentation")
PROBLEM_TYPES = ("multi_label_classification", "single_label_classification")
# metric name → whether higher is better
METRICS = {"mean_auc": True, "accuracy": True, "dice": True, "iou": True, "loss": False}


@dataclass
@config_parsing.checked_arguments
class FinetuneModelArguments:
    """What model to fine-tune and where its weights start from."""

    task: str = field(default="classification",
                      metadata={"help": "'classification' (image-level labels) or "
                                        "'segmentation' (masks)."})
    init_from: str = field(
        default="random",
        metadata={"help": "A CAiD folder or Hub id (a pre-trained backbone or a fine-tuned "
                          "model); 'random' (random initialisation); 'imagenet' "
                          "(segmentation_models_pytorch's ImageNet encoder weights, from the HF "
                          "cache or downloaded); or a .pth/.pt/.safetensors file holding a "
                          "torchvision/timm ResNet state dict (ImageNet weights you have)."})
    encoder_name: str = field(default="resnet50",
                              metadata={"help": "Encoder for random / ImageNet initialisation "
                                                "(a CAiD checkpoint brings its own)."})
    image_size: int | None = field(
        default=None, metadata={"help": "Side of the square model input (multiple of 32). "
                                        "Default: the checkpoint's image_size (224 otherwise)."})
    problem_type: str = field(
        default="multi_label_classification",
        metadata={"help": "Classification: 'multi_label_classification' (sigmoid + BCE per "
                          "label, the default) or 'single_label_classification' (softmax + "
                          "cross-entropy; exactly one positive label per image)."})
    num_labels: int | None = field(
        default=None, metadata={"help": "Segmentation: 1 for binary masks (non-zero = "
                                        "foreground, the default), C >= 2 for masks of class "
                                        "indices 0..C-1. Classification: taken from the data."})
    classifier_dropout: float = field(default=0.0, metadata={"help": "Dropout before the "
                                                                     "classification head."})
    segmentation_dice_weight: float = field(default=1.0, metadata={
        "help": "Weight of the soft-Dice term added to the segmentation loss (0: off)."})
    freeze_encoder: bool = field(default=False, metadata={
        "help": "Train only what follows the encoder (head; decoder too for segmentation); the "
                "encoder's BatchNorm statistics stay as loaded."})

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got "
                             f"{self.problem_type!r}")
        if self.image_size is not None:
            check_image_size(self.image_size)
        if self.num_labels is not None and self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")


@dataclass
@config_parsing.checked_arguments
class FinetuneDataArguments:
    """Where the labelled images come from (see :mod:`caid_hf.finetuning.data`)."""

    train_source: str = field(
        default="phantoms",
        metadata={"help": "'phantoms' (synthetic phantoms, label 'nodule' and nodule masks); a "
                          "CSV file (image paths + labels, or + mask paths); a ChestX-ray14 "
                          "split list ('path label ...' per line); a folder of images with "
                          "masks/ (segmentation); a Hugging Face dataset ('hf:NAME', a "
                          "save_to_disk folder, parquet/arrow files)."})
    validation_source: str | None = field(
        default=None, metadata={"help": "Same kinds. Unset: phantoms get their own; other "
                                        "sources hold out --validation_fraction of train."})
    test_source: str | None = field(
        default=None, metadata={"help": "Same kinds; measured once with the best model, with "
                                        "bootstrap confidence intervals. Unset: phantoms get "
                                        "their own; others report the validation set."})
    images_root: str | None = field(default=None, metadata={
        "help": "Folder that split-list / CSV paths are relative to (default: the list's)."})
    masks_root: str | None = field(default=None, metadata={
        "help": "Segmentation from a folder: the masks' folder (default FOLDER/masks)."})
    image_column: str | None = field(default=None, metadata={
        "help": "CSV / Hugging Face image column (default: found by name or type)."})
    label_columns: list[str] | None = field(default=None, metadata={
        "help": "CSV / Hugging Face label column(s) (default: numeric columns / 'label')."})
    mask_column: str | None = field(default=None, metadata={
        "help": "CSV column of mask paths, or Hugging Face image column of masks "
                "(default 'mask')."})
    label_names: list[str] | None = field(default=None, metadata={
        "help": "Names of the labels (classes for segmentation), for metrics and config."})
    label_format: str = field(default="auto", metadata={
        "help": "Layout of a label CSV: 'auto' (from its header), 'binary' (0/1/-1/blank "
                "columns), 'names' (|-separated findings, ChestX-ray14's Data_Entry_2017.csv), "
                "'chexpert', 'mimic' or 'padchest' (docs/data.md)."})
    uncertain_labels: str = field(default="ignore", metadata={
        "help": "Uncertain (-1) labels: 'ignore' (left out of the loss and the metrics, "
                "U-Ignore), 'ones' (U-Ones) or 'zeros' (U-Zeros)."})
    blank_labels: str = field(default="zeros", metadata={
        "help": "Blank (not mentioned) labels: 'zeros' (negative, as CheXpert's labeller "
                "means it) or 'ignore'."})
    accept_unknown_findings: bool = field(default=False, metadata={
        "help": "Read finding names outside the data set's vocabulary (ChestX-ray14's 14, "
                "PadChest's 193, or --label_names for other name columns) as findings of "
                "their own; default: refuse the file, naming every line holding one."})
    views: list[str] | None = field(default=None, metadata={
        "help": "Keep only these views: 'frontal', 'lateral' or the data set's codes (PA, AP, "
                "...), from MIMIC's ViewPosition, PadChest's Projection, ChestX-ray14's View "
                "Position or --view_column; CheXpert: Frontal/Lateral decides, AP/PA only "
                "refines frontal films (default: every view)."})
    view_column: str | None = field(default=None, metadata={
        "help": "CSV column of view codes for --views (default: the layout's)."})
    metadata_csv: str | None = field(default=None, metadata={
        "help": "MIMIC-CXR: the per-image metadata CSV (default: mimic-cxr-2.0.0-metadata.csv"
                "[.gz] next to the labels CSV)."})
    patient_id_from: str = field(default="auto", metadata={
        "help": "Where a film's patient id comes from, so that held-out validation images and "
                "label fractions are drawn by patient: 'auto' (CheXpert patientNNNNN, MIMIC "
                "subject_id, PadChest PatientID, ChestX-ray14 file names; else image-level), "
                "'filename_prefix', 'column:NAME', 'regex:PATTERN' or 'none'."})
    bits_stored: int | None = field(default=None, metadata={
        "help": "Bit depth of 16-bit PNG and DICOM pixels (e.g. 12) for every source; default: "
                "the file's header (DICOM BitsStored, PNG sBIT), else a per-image guess."})
    max_bad_fraction: float = field(default=0.01, metadata={
        "help": "Images missing when a CSV is read, or unreadable when loaded, are left out "
                "and listed with their CSV line in <output_dir>/bad_files.tsv; the run stops "
                "when more than this fraction of the images is bad."})
    hf_split: str = field(default="train", metadata={"help": "Training split of a HF dataset."})
    hf_validation_split: str = field(default="validation", metadata={
        "help": "Split of a HF validation_source/test_source naming the same dataset."})
    hf_test_split: str = field(default="test", metadata={"help": "Split of a HF test_source."})
    hf_config_name: str | None = field(default=None, metadata={"help": "Config of 'hf:NAME'."})
    validation_fraction: float = field(default=0.1, metadata={
        "help": "Share of the training images held out when there is no validation_source."})
    label_fraction: float = field(default=1.0, metadata={
        "help": "Train on this seeded random share of the labelled training images "
                "(few-label experiments, e.g. 0.05)."})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "Train on at most this many images (after label_fraction)."})
    num_train_phantoms: int = field(default=400, metadata={"help": "Phantoms to train on."})
    num_validation_phantoms: int = field(default=100, metadata={"help": "Validation phantoms."})
    num_test_phantoms: int = field(default=200, metadata={"help": "Test phantoms."})
    phantom_size: int = field(default=128, metadata={"help": "Side of the phantoms (px)."})
    phantom_seed: int = field(default=1000, metadata={
        "help": "Seed of the training phantoms (validation +1, test +2); pre-training uses "
                "seeds near its --seed, so the default keeps the sets apart."})
    crop_scale_min: float = field(default=0.8, metadata={
        "help": "Training RandomResizedCrop area lower bound (1.0 with flip off: no "
                "augmentation)."})
    horizontal_flip: bool = field(default=False, metadata={
        "help": "Random horizontal flips in training (off: chest anatomy is not symmetric)."})

    def __post_init__(self):
        # label_fraction, crop_scale_min and max_bad_fraction: their ranges (VALUE_RULES);
        # fine-tuning also needs a validation share above 0
        if self.validation_fraction <= 0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")
        for name, allowed in (("label_format", LABEL_FORMATS),
                              ("uncertain_labels", UNCERTAIN_POLICIES),
                              ("blank_labels", BLANK_POLICIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        check_patient_rule(self.patient_id_from)


@dataclass
@config_parsing.checked_arguments
class FinetuningArguments:
    """Optimisation, model selection and bookkeeping of a fine-tuning run."""

    output_dir: str = field(default="outputs/finetune", metadata={"help": "Where the model, "
                                                                          "processor and card go."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace a previous fine-tuned model in output_dir instead of refusing."})
    num_train_epochs: int = field(default=20, metadata={"help": "Epochs."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; overrides epochs."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch per process."})
    per_device_eval_batch_size: int | None = field(default=None, metadata={
        "help": "Default: the training batch."})
    optimizer: str = field(default="adamw", metadata={"help": "'adamw' or 'sgd' (momentum 0.9)."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay."})
    lr_scheduler_type: str = field(default="cosine", metadata={
        "help": "'cosine' or 'constant', per optimizer step."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    eval_steps: int = field(default=0, metadata={
        "help": "Validate every N optimizer steps (0: at the end of every epoch)."})
    metric_for_best_model: str | None = field(default=None, metadata={
        "help": "Validation metric that picks the best model and drives early stopping: "
                "'mean_auc' (classification default), 'accuracy', 'dice' (segmentation "
                "default), 'iou' or 'loss'."})
    early_stopping_patience: int = field(default=5, metadata={
        "help": "Stop after this many validations without improvement (0: never stop early)."})
    early_stopping_min_steps: int = field(default=-1, metadata={
        "help": "Validations before this step never count towards early stopping (-1: the "
                "first half of the run): a new head sits at chance for tens of steps before "
                "the network finds a small finding, and stopping on that plateau ends runs "
                "at chance (measured: benchmarks/demo_finetuning_diagnosis.md)."})
    early_stopping_threshold: float = field(default=0.0, metadata={
        "help": "An improvement must exceed this to count."})
    bootstrap_resamples: int = field(default=1000, metadata={
        "help": "Bootstrap replicates of the test metrics' confidence intervals (0: none)."})
    confidence_level: float = field(default=0.95, metadata={"help": "Of the intervals."})
    mixed_precision: str = field(default="auto", metadata={
        "help": "'auto' (bf16 autocast where the hardware computes in bf16, as in pre-training; "
                "fp32 elsewhere), 'no', 'bf16' or 'fp16'."})
    seed: int = field(default=42, metadata={"help": "Seed of everything random."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N optimizer steps."})
    report_to: str = field(default="tensorboard", metadata={"help": "'tensorboard' or 'none'."})
    dataloader_num_workers: int | None = field(default=None, metadata={
        "help": "Loader worker processes per training process (default: from the CPU count)."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on the CPU even with a GPU."})

    def __post_init__(self):
        checks = {"mixed_precision": ("auto", "no", "bf16", "fp16"), "optimizer": ("adamw", "sgd"),
                  "lr_scheduler_type": ("cosine", "constant"),
                  "report_to": ("tensorboard", "none")}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.metric_for_best_model is not None and self.metric_for_best_model not in METRICS:
            raise ValueError(f"metric_for_best_model must be one of {list(METRICS)}, got "
                             f"{self.metric_for_best_model!r}")
        if not 0 < self.confidence_level < 1:
            raise ValueError(f"confidence_level must be in (0, 1), got {self.confidence_level}")


ARGUMENT_CLASSES = (FinetuneModelArguments, FinetuneDataArguments, FinetuningArguments)


def load_yaml_config(path: str | Path) -> dict:
    """A flat YAML mapping of fine-tuning argument names; unknown names raise with a
    suggestion, naming the file."""
    return config_parsing.load_yaml_config(path, ARGUMENT_CLASSES)


def parse_finetuning_args(argv: list[str] | None = None, prog: str | None = None
                          ) -> tuple[FinetuneModelArguments, FinetuneDataArguments,
                                     FinetuningArguments]:
    """Parse ``[--config FILE.yaml] [--field value ...]`` → (model, data, training) arguments."""
    return config_parsing.parse_config_args(
        ARGUMENT_CLASSES, argv, prog=prog,
        description="Fine-tune a classifier or U-Net from a CAiD backbone: a YAML file "
                    "(--config) plus command-line overrides.")
