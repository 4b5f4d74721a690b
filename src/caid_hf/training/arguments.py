"""Run configuration: a YAML file plus command-line overrides, parsed into dataclasses.

Flag names follow transformers' ``TrainingArguments`` where the meaning is the same, and
every field of :class:`~caid_hf.CAiDConfig` is a flag too (``--encoder_name resnet18``).
Precedence: dataclass defaults < YAML file (``--config``) < command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config_parsing import checked_arguments, parse_config_args
from ..config_parsing import load_yaml_config as _load_yaml_config
from ..data.augmentation_config import AugmentationConfig
from ..data.options import HFOptions, check_patient_rule
from ..model_settings import CAiDSettings


@dataclass
@checked_arguments
class ModelArguments(CAiDSettings):
    """Every CAiDConfig setting (defined, documented and checked in
    :class:`~caid_hf.model_settings.CAiDSettings`), overridable from YAML or the command line."""


@dataclass
@checked_arguments
class DataArguments(AugmentationConfig):
    """Where the images come from, how crops are cut, and every setting of the view
    augmentation (:class:`~caid_hf.data.augmentation_config.AugmentationConfig`'s fields;
    pixel sizes refer to a reference_size view)."""

    train_source: str = field(
        default="phantoms",
        metadata={"help": "'phantoms' (embedded synthetic chest phantoms); a split-list file "
                          "(ChestX-ray14 style, paths relative to --images_root); a folder of "
                          "PNG/JPEG/DICOM files; a `caid-hf prepare-data` cache folder; a "
                          "datasets save_to_disk folder or parquet/arrow file; or 'hf:NAME' "
                          "(datasets.load_dataset, Hub id or path; 'hf:imagefolder' reads "
                          "--images_root)."},
    )
    validation_source: str | None = field(
        default=None,
        metadata={"help": "Same kinds as train_source. Unset: phantoms get their own held-out "
                          "phantoms; other sources hold out --validation_fraction."},
    )
    images_root: str | None = field(
        default=None, metadata={"help": "Folder the split lists' relative paths start from."}
    )
    hf_split: str = field(default="train", metadata={"help": "Split of a Hugging Face dataset source."})
    hf_config_name: str | None = field(default=None, metadata={"help": "Config of an 'hf:NAME' dataset."})
    image_column: str | None = field(
        default=None, metadata={"help": "Image column of a Hugging Face dataset (default: the "
                                        "first datasets.Image column)."}
    )
    id_column: str | None = field(
        default=None, metadata={"help": "Column naming each image of a Hugging Face dataset "
                                        "(default: the stored path, or the row)."}
    )
    streaming: bool = field(
        default=False, metadata={"help": "Stream a Hugging Face train_source instead of "
                                         "downloading it: each process reads its own part; needs "
                                         "--max_steps; an epoch ends when a process runs out."}
    )
    streaming_shuffle_buffer: int = field(
        default=0, metadata={"help": "Rows per streaming shuffle window (the shard order is "
                                     "shuffled too; 0: stored order)."}
    )
    streaming_validation_images: int = field(
        default=256, metadata={"help": "Without a validation_source, the first N images of a "
                                       "stream are held out (kept in memory) for validation."}
    )
    validation_fraction: float = field(
        default=0.05, metadata={"help": "Share of the training images held out when there is no "
                                        "validation_source (phantoms excepted)."}
    )
    patient_id_from: str = field(
        default="auto", metadata={"help": "Where a film's patient id comes from, so that held-out "
                                          "validation images share no patient with training: "
                                          "'auto' (ChestX-ray14 file names 00000001_000.png, "
                                          "else image-level), 'filename_prefix', 'column:NAME' "
                                          "(HF datasets), 'regex:PATTERN' or 'none'."}
    )
    bits_stored: int | None = field(
        default=None, metadata={"help": "Bit depth of 16-bit PNG and DICOM pixels (e.g. 12), "
                                        "for the whole source; default: the file's header "
                                        "(DICOM BitsStored, PNG sBIT), else a per-image guess."}
    )
    num_train_phantoms: int = field(default=1000, metadata={"help": "Phantoms to train on."})
    num_validation_phantoms: int = field(default=200, metadata={"help": "Held-out phantoms."})
    phantom_size: int = field(default=256, metadata={"help": "Side of the generated phantoms (px)."})
    crop_scale_min: float = field(default=0.2, metadata={"help": "RandomResizedCrop scale lower bound."})
    crop_scale_max: float = field(default=1.0, metadata={"help": "RandomResizedCrop scale upper bound."})
    crop_reducing_gap: float | None = field(
        default=None,
        metadata={"help": "PIL's two-step resize for the crops: unset resizes exactly as the "
                          "original; 1.0 roughly halves the crop cost (mean difference about half "
                          "a grey level)."},
    )
    max_bad_fraction: float = field(
        default=0.01,
        metadata={"help": "Unreadable images are skipped, counted and listed in "
                          "<output_dir>/bad_files.tsv; the run stops when more than this fraction "
                          "of the images is bad."},
    )

    def hf_options(self) -> HFOptions:
        """How a Hugging Face dataset source is read."""
        return HFOptions(split=self.hf_split, config_name=self.hf_config_name,
                         image_column=self.image_column, id_column=self.id_column,
                         patient_id_from=self.patient_id_from)

    def __post_init__(self) -> None:
        mistakes = AugmentationConfig.mistakes(self)
        try:
            check_patient_rule(self.patient_id_from)
        except ValueError as error:
            mistakes.append(str(error))
        if mistakes:
            raise ValueError("\n".join(mistakes))


@dataclass
@checked_arguments
class PretrainingArguments:
    """The optimisation and bookkeeping of a pre-training run."""

    output_dir: str = field(default="outputs/caid", metadata={"help": "Where everything is written."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Delete a previous run's checkpoints/, best/ and final/ "
                                         "in output_dir instead of refusing to start."}
    )
    num_train_epochs: int = field(default=800, metadata={"help": "Epochs (the original's default)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; overrides epochs if > 0."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Batch per process."})
    per_device_eval_batch_size: int | None = field(default=None, metadata={"help": "Default: train batch."})
    learning_rate: float = field(
        default=0.03, metadata={"help": "Peak SGD learning rate: used as given with scale_lr none "
                                        "(the paper: 0.03 for a global batch of 256), else the "
                                        "rate of a global batch of 256."}
    )
    scale_lr: str = field(
        default="none", metadata={"help": "Scale learning_rate with the global batch B "
                                          "(per_device_train_batch_size × processes × "
                                          "gradient_accumulation_steps): 'linear' (× B/256, as "
                                          "SimSiam and Barlow Twins define it, and MoCo's authors "
                                          "advise for large batches, with warm-up), 'sqrt' "
                                          "(× sqrt(B/256)) or 'none' (as given: the paper's "
                                          "rule and the default for every method)."}
    )
    sgd_momentum: float = field(default=0.9, metadata={"help": "SGD momentum (not MoCo's)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "SGD weight decay."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "'cosine' or 'constant' (per step)."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    fix_predictor_lr: bool = field(
        default=True, metadata={"help": "SimSiam: keep the predictor's learning rate at "
                                        "learning_rate (no warm-up, no decay), as SimSiam does."}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per step."})
    mixed_precision: str = field(
        default="auto", metadata={"help": "'auto': decided at start-up by timing a few training "
                                          "steps of this model and batch in fp32 and, where "
                                          "the CPU has bf16 instructions (AVX-512 BF16, AMX), "
                                          "in bf16 (bf16 must be 5 %% faster); the result is "
                                          "kept per machine and model shape in "
                                          "~/.cache/caid-hf (or $CAID_HF_CACHE), and a resumed "
                                          "run keeps the choice it started with. GPUs need no "
                                          "measuring: bf16 from Ampere on. Or 'no' (fp32), "
                                          "'bf16' or 'fp16'. Losses and MoCo's queue stay fp32."}
    )
    channels_last: bool | None = field(
        default=None, metadata={"help": "Train in channels_last memory format (checkpoints and "
                                        "published weights are the same either way). Unset: "
                                        "on GPUs; on a CPU timed against contiguous tensors "
                                        "at start-up with the precision (channels_last is "
                                        "faster on some CPUs, slower on others)."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute each encoder stage and decoder block in the "
                                         "backward pass: less activation memory (512 px films), "
                                         "about 20 %% more compute."}
    )
    torch_compile: bool = field(
        default=False, metadata={"help": "model.compile() the model (first steps take minutes)."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of everything random."})
    logging_steps: int = field(default=10, metadata={"help": "Log scalars every N optimizer steps."})
    save_steps: int = field(default=0, metadata={"help": "Also save the training state every N steps "
                                                       "(it is always saved at each epoch end)."})
    save_total_limit: int = field(
        default=3, metadata={"help": "Newest training states kept (plus the one of the best "
                                     "validation loss); 0 keeps all."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest': the newest complete one "
                                        "in output_dir (none yet: start from step 0, so one command "
                                        "both starts and continues a run)."}
    )
    max_consecutive_nonfinite_steps: int = field(
        default=10, metadata={"help": "Steps with a non-finite loss or gradient are skipped; this "
                                      "many in a row stop the run."}
    )
    full_determinism: bool = field(
        default=False, metadata={"help": "torch.use_deterministic_algorithms and deterministic "
                                         "cuDNN: bit-identical reruns and resumes, slower."}
    )
    init_from: str | None = field(
        default=None, metadata={"help": "Start from a CAiD folder or Hub id (backbone or full "
                                        "pre-training model) instead of random weights."}
    )
    report_to: str = field(default="tensorboard", metadata={"help": "'tensorboard' or 'none'."})
    push_to_hub: bool = field(
        default=False, metadata={"help": "Push the best backbone (with processor and card) to the "
                                         "Hub at the end of the run, from the main process."}
    )
    hub_model_id: str | None = field(default=None, metadata={"help": "'namespace/name' to push to."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the repo as private."})
    hub_revision: str | None = field(default=None, metadata={"help": "Branch to push to."})
    hub_push_every_best: bool = field(
        default=False, metadata={"help": "Also push each time the validation loss reaches a new best."}
    )
    hub_license: str = field(
        default="apache-2.0", metadata={"help": "Licence id of the pushed weights' card (Hub "
                                                "ids: apache-2.0, mit, cc-by-nc-4.0 …, or 'other' "
                                                "with --hub_license_name and --hub_license_link). "
                                                "Weights trained on MIMIC-CXR or CheXpert usually "
                                                "fall under those data sets' terms."}
    )
    hub_license_name: str | None = field(default=None, metadata={"help": "Short name of an 'other' licence."})
    hub_license_link: str | None = field(default=None, metadata={"help": "URL of an 'other' licence's text."})
    hub_datasets: list[str] | None = field(
        default=None, metadata={"help": "Hub dataset ids the weights were trained on (card metadata)."}
    )
    hub_dry_run: bool = field(
        default=False, metadata={"help": "Print what would be pushed (repo, revision, files and "
                                         "sizes) without contacting the Hub."}
    )
    dataloader_num_workers: int | None = field(
        default=None, metadata={"help": "CPU decode/crop worker processes per training process. "
                                        "Unset: the CPU cores of this machine per local process, "
                                        "minus one for the training process itself (1 to 8)."}
    )
    dataloader_prefetch_factor: int = field(
        default=4, metadata={"help": "Batches each worker prepares ahead."}
    )
    dataloader_pin_memory: bool = field(
        default=True, metadata={"help": "Page-locked batches for faster copies to the GPU (GPU only)."}
    )
    use_cpu: bool = field(default=False, metadata={"help": "Train on the CPU even if a GPU exists."})
    probe_steps: int = field(
        default=0, metadata={"help": "Every N optimizer steps (and at the last), score the "
                                     "current encoder's frozen features with a k-NN and a "
                                     "linear probe on --probe_source (logged as probe/*): do "
                                     "the features improve, not only the losses? 0: off."}
    )
    probe_source: str = field(
        default="phantoms", metadata={"help": "Labelled set of the online probe: 'phantoms' "
                                              "(label 'nodule'; drawn at image_size, fit on "
                                              "--probe_num_images, scored on as many others) or a labelled source "
                                              "fine-tuning reads (CSV, split list with labels, "
                                              "HF dataset; 5-fold cross-validation)."}
    )
    probe_images_root: str | None = field(
        default=None, metadata={"help": "Folder the probe source's paths are relative to."}
    )
    probe_num_images: int = field(default=256, metadata={"help": "Phantoms the probe fits on."})
    probe_embedding: str = field(
        default="stages", metadata={"help": "'stages' (every encoder stage's average: small "
                                            "findings live in low-level features) or 'pooled' "
                                            "(pooler_output)."}
    )
    probe_batch_norm_statistics: str = field(
        default="model", metadata={"help": "'model': embed with the encoder's running "
                                           "BatchNorm statistics; 'data': re-estimate them "
                                           "on the probe's images first (on a copy), the "
                                           "fair way to compare with a random encoder."}
    )

    def __post_init__(self):
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError("mixed_precision must be 'auto', 'no', 'bf16' or 'fp16', "
                             f"got {self.mixed_precision!r}")
        if self.lr_scheduler_type not in ("cosine", "constant"):
            raise ValueError(f"lr_scheduler_type must be 'cosine' or 'constant', got {self.lr_scheduler_type!r}")
        if self.report_to not in ("tensorboard", "none"):
            raise ValueError(f"report_to must be 'tensorboard' or 'none', got {self.report_to!r}")
        if self.scale_lr not in LR_SCALING:
            raise ValueError(f"scale_lr must be one of {LR_SCALING}, got {self.scale_lr!r}")
        if (self.push_to_hub or self.hub_dry_run) and not self.hub_model_id:
            raise ValueError("push_to_hub / hub_dry_run need hub_model_id ('namespace/name')")
        if self.probe_batch_norm_statistics not in ("model", "data"):
            raise ValueError(f"probe_batch_norm_statistics must be 'model' or 'data', got "
                             f"{self.probe_batch_norm_statistics!r}")
        if self.probe_embedding not in ("stages", "pooled"):
            raise ValueError(f"probe_embedding must be 'stages' or 'pooled', got "
                             f"{self.probe_embedding!r}")


LR_SCALING = ("none", "linear", "sqrt")
LR_BASE_BATCH = 256  # the global batch the learning rate is given for (MoCo, SimSiam)


def scaled_learning_rate(learning_rate: float, rule: str, global_batch: int) -> float:
    """``learning_rate`` for a global batch of ``global_batch`` under ``rule``: as given
    (``none``), × B/256 (``linear``) or × sqrt(B/256) (``sqrt``)."""
    ratio = global_batch / LR_BASE_BATCH
    return {"none": learning_rate, "linear": learning_rate * ratio,
            "sqrt": learning_rate * ratio ** 0.5}[rule]


ARGUMENT_CLASSES = (ModelArguments, DataArguments, PretrainingArguments)

# --help's groups: DataArguments' crop and appearance settings join the augmentation's, and
# PretrainingArguments splits by purpose
_CROP_SETTINGS = ("crop_scale_min", "crop_scale_max", "crop_reducing_gap")
_TRAINING_GROUPS = {
    "speed and devices": ("mixed_precision", "channels_last", "gradient_checkpointing",
                          "torch_compile", "dataloader_num_workers", "dataloader_prefetch_factor",
                          "dataloader_pin_memory", "use_cpu", "full_determinism"),
    "output and checkpoints": ("output_dir", "overwrite_output_dir", "logging_steps",
                               "save_steps", "save_total_limit", "resume_from_checkpoint",
                               "report_to", "max_consecutive_nonfinite_steps"),
}


HELP_GROUP_ORDER = ("model (CAiDConfig)", "data", "augmentation", "optimisation",
                    "speed and devices", "output and checkpoints", "online probe",
                    "publishing to the Hub")


def help_group(kind: type, name: str) -> str:
    """The ``--help`` group of pre-training argument ``name`` of class ``kind``."""
    if kind is ModelArguments:
        return "model (CAiDConfig)"
    if kind is DataArguments:
        return ("augmentation" if name in AugmentationConfig.__dataclass_fields__
                or name in _CROP_SETTINGS
                else "data")
    if name.startswith("probe_"):
        return "online probe"
    if name.startswith("hub_") or name == "push_to_hub":
        return "publishing to the Hub"
    for group, names in _TRAINING_GROUPS.items():
        if name in names:
            return group
    return "optimisation"


def load_yaml_config(path: str | Path) -> dict:
    """A flat YAML mapping of pre-training argument names (see
    :func:`caid_hf.config_parsing.load_yaml_config`)."""
    return _load_yaml_config(path, ARGUMENT_CLASSES)


def parse_pretraining_args(argv: list[str] | None = None, prog: str | None = None):
    """Parse ``[--config FILE.yaml] [--field value ...]`` → (model_args, data_args, training_args)."""
    return parse_config_args(ARGUMENT_CLASSES, argv, prog=prog, group_of=help_group,
                             group_order=HELP_GROUP_ORDER,
                             description="CAiD pre-training: a YAML file (--config) plus "
                                         "command-line overrides; every CAiDConfig field is a "
                                         "flag too.")
