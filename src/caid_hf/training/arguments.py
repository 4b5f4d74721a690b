"""Run configuration: a YAML file plus command-line overrides, parsed into dataclasses.

Flag names follow transformers' ``TrainingArguments`` where the meaning is the same, and
every field of :class:`~caid_hf.CAiDConfig` is a flag too (``--encoder_name resnet18``).
Precedence: dataclass defaults < YAML file (``--config``) < command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from ..configuration_caid import CAiDConfig
from ..console import ConfigurationError, option_strings, unknown_flags_message
from ..data.sources import read_text_file


@dataclass
class DataArguments:
    """Where the images come from and how views are made."""

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
        default=0, metadata={"help": "Images in the streaming shuffle buffer (0: stored order)."}
    )
    streaming_validation_images: int = field(
        default=256, metadata={"help": "Without a validation_source, the first N images of a "
                                       "stream are held out (kept in memory) for validation."}
    )
    validation_fraction: float = field(
        default=0.05, metadata={"help": "Share of the training images held out when there is no "
                                        "validation_source (phantoms excepted)."}
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
    color_jitter_p: float = field(
        default=0.8, metadata={"help": "Probability of the brightness/contrast jitter of each view "
                                       "(0.8 as the original). Lower it when images differ mainly "
                                       "in global brightness, as the synthetic phantoms do."}
    )
    blur_p: float = field(default=0.5, metadata={"help": "Probability of the Gaussian blur of each view."})
    max_bad_fraction: float = field(
        default=0.01,
        metadata={"help": "Unreadable images are skipped, counted and listed in "
                          "<output_dir>/bad_files.tsv; the run stops when more than this fraction "
                          "of the images is bad."},
    )
    reference_compat: bool = field(
        default=False,
        metadata={"help": "Reproduce the original's augmentation exactly: target not flipped with "
                          "the view, distortion sizes in absolute pixels."},
    )


@dataclass
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
        default=0.03, metadata={"help": "Peak SGD learning rate, used as given (the paper: 0.03 for "
                                        "a global batch of 256)."}
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
        default="auto", metadata={"help": "'auto' (bf16 autocast where the hardware computes in bf16: "
                                          "Ampere or newer GPUs, CPUs with AVX-512 BF16 or AMX; "
                                          "fp32 elsewhere), 'no', 'bf16' or 'fp16'. Losses and "
                                          "MoCo's queue stay fp32."}
    )
    channels_last: bool = field(
        default=True, metadata={"help": "Train in channels_last memory format (faster on GPUs and "
                                        "on CPUs; checkpoints and published weights are the same)."}
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

    def __post_init__(self):
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError("mixed_precision must be 'auto', 'no', 'bf16' or 'fp16', "
                             f"got {self.mixed_precision!r}")
        if self.lr_scheduler_type not in ("cosine", "constant"):
            raise ValueError(f"lr_scheduler_type must be 'cosine' or 'constant', got {self.lr_scheduler_type!r}")
        if self.report_to not in ("tensorboard", "none"):
            raise ValueError(f"report_to must be 'tensorboard' or 'none', got {self.report_to!r}")
        if (self.push_to_hub or self.hub_dry_run) and not self.hub_model_id:
            raise ValueError("push_to_hub / hub_dry_run need hub_model_id ('namespace/name')")
        if self.probe_steps < 0:
            raise ValueError(f"probe_steps must be >= 0 (0: no online probe), got {self.probe_steps}")
        if self.probe_embedding not in ("stages", "pooled"):
            raise ValueError(f"probe_embedding must be 'stages' or 'pooled', got "
                             f"{self.probe_embedding!r}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _model_arguments_class() -> type:
    """A dataclass with one field per CAiDConfig argument, defaults taken from CAiDConfig."""
    fields = []
    for name, param in inspect.signature(CAiDConfig.__init__).parameters.items():
        if name == "self" or param.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        default = param.default
        if isinstance(default, (list, tuple)):
            fields.append((name, list[int], field(default_factory=lambda d=default: list(d))))
        else:
            fields.append((name, type(default), field(default=default)))
    cls = dataclasses.make_dataclass("ModelArguments", fields)
    cls.__doc__ = "Every CAiDConfig field, overridable from YAML or the command line."
    return cls


ModelArguments = _model_arguments_class()
ARGUMENT_CLASSES = (ModelArguments, DataArguments, PretrainingArguments)


def known_fields(classes: tuple[type, ...] = ARGUMENT_CLASSES) -> list[str]:
    return [f.name for cls in classes for f in dataclasses.fields(cls)]


def _type_name(kind) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        kind, getattr(kind, "__name__", str(kind)))


def _coerce(value, annotation):
    """``value`` (from YAML) as the field type ``annotation``; TypeError when it is not one.

    Numbers written like ``1e-3`` arrive from YAML as strings (YAML 1.1) and become floats;
    ``true``/``false`` strings become bools; integers are accepted for float fields."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option)
            except TypeError as error:
                errors.append(error)
        raise errors[0] if errors else TypeError("null")
    if typing.get_origin(annotation) is list:
        values = value if isinstance(value, list) else None
        if values is None:
            raise TypeError(f"expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else str) for v in values]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise TypeError(f"expected {_type_name(annotation)}, got {value!r}")


def _field_types(classes: tuple[type, ...]) -> dict[str, object]:
    return {name: hint for cls in classes
            for name, hint in typing.get_type_hints(cls).items()
            if name in {f.name for f in dataclasses.fields(cls)}}


def load_yaml_config(path: str | Path, classes: tuple[type, ...] = ARGUMENT_CLASSES) -> dict:
    """Read a flat YAML mapping of argument names (fields of ``classes``). Unknown names
    raise with a suggestion, values of the wrong type with the expected one, syntax errors
    with the line; every message names the file. An empty file is refused (it would start
    a run of every default)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(read_text_file(path))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ValueError(f"{path}{where}: invalid YAML: {problem}") from None
    if values is None:
        raise ValueError(f"{path} is empty: write the run's settings as 'name: value' lines "
                         "(configs/demo.yaml is an example)")
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values")
    names = known_fields(classes)
    types_by_name = _field_types(classes)
    checked = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{path}: unknown key {key!r}{hint}")
        try:
            checked[key] = _coerce(value, types_by_name[key])
        except TypeError as error:
            raise ValueError(f"{path}: {key}: {error}") from None
    return checked


def _at_least(low: float, *also: object):
    text = f">= {low:g}" + "".join(f" or {a}" for a in also)
    return (lambda v: v in also or v >= low), text


def _between(low: float, high: float, low_open: bool = False, high_open: bool = False):
    text = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return (lambda v: (low < v if low_open else low <= v) and (v < high if high_open else v <= high),
            text)


# The range of every numeric argument of pre-training and fine-tuning (None always allowed
# where the type allows it), checked before any model is built.
VALUE_RULES = {
    **dict.fromkeys(("num_train_epochs", "per_device_train_batch_size",
                     "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps",
                     "max_consecutive_nonfinite_steps", "dataloader_prefetch_factor",
                     "num_train_phantoms", "num_validation_phantoms", "num_test_phantoms",
                     "max_train_samples", "num_labels", "probe_num_images", "queue_size",
                     "projection_dim"), _at_least(1)),
    **dict.fromkeys(("warmup_steps", "save_steps", "save_total_limit", "probe_steps", "seed",
                     "streaming_shuffle_buffer", "streaming_validation_images",
                     "dataloader_num_workers", "eval_steps", "early_stopping_patience",
                     "bootstrap_resamples", "phantom_seed", "weight_decay",
                     "early_stopping_threshold"), _at_least(0)),
    "max_steps": _at_least(1, -1),
    "early_stopping_min_steps": _at_least(0, -1),
    "learning_rate": _between(0, 10, low_open=True),
    "sgd_momentum": _between(0, 1, high_open=True),
    "momentum": _between(0, 1),
    "contrastive_temperature": _between(0, 100, low_open=True),
    **dict.fromkeys(("contrastive_weight", "reconstruction_weight", "segmentation_dice_weight",
                     "barlow_off_diagonal_weight"), _at_least(0)),
    **dict.fromkeys(("shuffle_bn_splits", "encoder_depth", "in_channels"), _at_least(1)),
    **dict.fromkeys(("color_jitter_p", "blur_p", "max_bad_fraction", "classifier_dropout"),
                    _between(0, 1)),
    "validation_fraction": _between(0, 1, high_open=True),
    "label_fraction": _between(0, 1, low_open=True),
    **dict.fromkeys(("crop_scale_min", "crop_scale_max"), _between(0, 1, low_open=True)),
    "confidence_level": _between(0, 1, low_open=True, high_open=True),
    "phantom_size": _at_least(32),
}


def check_values(outputs: tuple, yaml_values: dict, config_path: str | None) -> None:
    """Refuse a value out of its field's range (:data:`VALUE_RULES`), naming the field and
    where it was set (the YAML file or the command line)."""
    for output in outputs:
        for item in dataclasses.fields(output):
            rule = VALUE_RULES.get(item.name)
            value = getattr(output, item.name)
            if rule is None or value is None or isinstance(value, (bool, str, list)):
                continue
            accept, text = rule
            if not accept(value):
                where = (f"{config_path}: {item.name}" if item.name in yaml_values
                         else f"--{item.name}")
                raise ConfigurationError(f"{where} must be {text}, got {value!r}")


def parse_config_args(classes: tuple[type, ...], argv: list[str] | None = None,
                      prog: str | None = None, description: str | None = None) -> tuple:
    """Parse ``[--config FILE.yaml] [--field value ...]`` into one instance of each of
    ``classes`` (dataclass defaults < YAML file < command line).

    Flags are accepted as ``--snake_case`` and ``--kebab-case``; a flag no field takes
    stops with argparse's usage line, exit status 2 and "did you mean" (as an unknown YAML
    key does). Every value is checked for its type and range before anything is built, and
    a bad one is named with the file (or flag) it came from."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    # the generated usage lists every field (60 lines): too long above an error message
    parser = HfArgumentParser(classes, prog=prog, description=description,
                              usage="%(prog)s [--config FILE.yaml] [--field value ...] "
                                    "(--help lists every field)")
    parser.add_argument("--config", default=None, help="YAML file of argument values.")
    yaml_values = load_yaml_config(known.config, classes) if known.config else {}
    parser.set_defaults(**yaml_values)
    try:
        *outputs, remaining = parser.parse_args_into_dataclasses(args=rest,
                                                                 return_remaining_strings=True)
    except ValueError as error:  # a __post_init__ check: say where the value came from
        message = str(error)
        name = message.split(" ", 1)[0]
        if known.config and name in yaml_values:
            raise ConfigurationError(f"{known.config}: {message}") from None
        raise
    if remaining:
        parser.error(unknown_flags_message(remaining, option_strings(parser)))
    outputs = tuple(outputs[: len(classes)])
    check_values(outputs, yaml_values, known.config)
    return outputs


def parse_pretraining_args(argv: list[str] | None = None, prog: str | None = None):
    """Parse ``[--config FILE.yaml] [--field value ...]`` → (model_args, data_args, training_args)."""
    return parse_config_args(ARGUMENT_CLASSES, argv, prog=prog,
                             description="CAiD pre-training: a YAML file (--config) plus "
                                         "command-line overrides; every CAiDConfig field is a "
                                         "flag too.")
