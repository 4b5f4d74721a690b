"""Every setting of a CAiD model: its name, type, default, help and valid range, written once.

:class:`CAiDSettings` is the one definition. :class:`~caid_hf.CAiDConfig` is built from it
(``CAiDConfig(**settings)`` checks them here) and the ``caid-hf pretrain`` flags and YAML keys
of the model are its fields (:class:`caid_hf.training.arguments.ModelArguments`). This file
imports only the standard library: it is checked before torch is loaded, and it travels with
``configuration_caid.py`` as a Hub repository's remote code.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

# The paper's setting, which every other part of the package falls back to
DEFAULT_IMAGE_SIZE = 224
DEFAULT_QUEUE_SIZE = 65536
DEFAULT_MOMENTUM = 0.999

# The objectives (caid_hf.objectives.OBJECTIVES, which tests keep in step with these names)
# live apart: this file is also remote code and imports nothing of the package.
DISCRIMINATION_METHODS = ("moco_v2", "barlow_twins", "simsiam")
# whose second view goes through the query encoder, so the U-Net can reconstruct it too
SYMMETRIC_METHODS = ("barlow_twins", "simsiam")
PROJECTION_HEADS = ("mlp", "linear")
RECONSTRUCTION_ACTIVATIONS = ("sigmoid", "identity")
RECONSTRUCT_VIEWS = ("first", "both")
# segmentation_models_pytorch encoders accepted without importing it (and torch) to look;
# any other name is looked up in its registry
COMMON_ENCODERS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def available_encoders() -> list[str] | None:
    """Names of the segmentation_models_pytorch encoders CAiD can use (e.g. ``resnet50``);
    None without segmentation_models_pytorch (a Hub visitor loading only the image
    processor, whose remote code imports this file: nothing to check against)."""
    try:
        from segmentation_models_pytorch.encoders import encoders
    except ImportError:
        return None
    return sorted(encoders)


def check_image_size(image_size: int, what: str = "image_size") -> None:
    """Refuse a model input side that is not a positive multiple of 32 (the U-Net halves it
    five times), naming the nearest allowed sides: ``--image_size 100`` → 96 or 128."""
    if image_size > 0 and image_size % 32 == 0:
        return
    lower = image_size // 32 * 32
    nearest = [s for s in (lower, lower + 32) if s > 0] or [32]
    raise ValueError(f"{what} must be a positive multiple of 32 (the U-Net halves it 5 "
                     f"times), got {image_size}; use {' or '.join(map(str, nearest))}")


def _setting(default, help: str):
    """A field with ``default`` (lists copied per instance) and its ``--help`` text."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class CAiDSettings:
    """Settings of a CAiD U-Net and its pre-training objective. The defaults are the
    paper's: a ResNet-50 U-Net on 224 px views, MoCo-v2 with an MLP head, a queue of
    65,536 keys of dimension 128, momentum 0.999, temperature 0.2, and the loss
    ``1 * L_ID + 10 * L_MSE`` on a sigmoid reconstruction. Creating one checks every
    field and raises one ``ValueError`` naming every invalid one, a line each."""

    encoder_name: str = _setting(
        "resnet50", "segmentation_models_pytorch encoder name (resnet18, resnet50, ...).")
    encoder_depth: int = _setting(5, "Encoder stages the U-Net uses: 5, the whole encoder.")
    decoder_channels: list[int] = _setting(
        (256, 128, 64, 32, 16), "Channels of the U-Net decoder blocks, one per stage.")
    in_channels: int = _setting(3, "Input channels; grey radiographs are replicated to 3.")
    image_size: int = _setting(
        DEFAULT_IMAGE_SIZE, "Side of the square training views in pixels (a multiple of 32).")
    discrimination_method: str = _setting(
        "moco_v2",
        "Instance-discrimination objective: moco_v2 (the one the original code ships), "
        "barlow_twins or simsiam (in the paper, not in the original code). Barlow Twins and "
        "SimSiam have no momentum encoder and no queue: both views go through the one encoder "
        "with gradients, and every BatchNorm layer of the pre-training model normalises over "
        "the global batch when several processes run, as both methods' originals do with "
        "synchronised BatchNorm.")
    context_prediction: bool = _setting(
        True, "True is CAiD (instance discrimination + reconstruction); false is the plain "
              "instance-discrimination baseline (the decoder is not used).")
    reconstruct_views: str = _setting(
        "first", "Which views the U-Net restores in CAiD mode: first (the query view, as the "
                 "original) or both (also the second view; the reconstruction loss is the "
                 "mean of the two views' MSE). both needs a symmetric method (barlow_twins, "
                 "simsiam): MoCo's second view goes through the momentum encoder, which has "
                 "no decoder and no gradient.")
    queue_size: int = _setting(
        DEFAULT_QUEUE_SIZE, "MoCo queue length K; must be divisible by the global batch size.")
    momentum: float = _setting(DEFAULT_MOMENTUM, "MoCo momentum m of the key encoder.")
    contrastive_temperature: float = _setting(
        0.2, "MoCo softmax temperature T (not 'temperature': transformers reserves that name "
             "for generation).")
    projection_dim: int = _setting(128, "Output dimension of the MoCo projection head.")
    projection_head: str = _setting(
        "mlp", "mlp (Linear-ReLU-Linear, MoCo-v2) or linear (MoCo-v1).")
    shuffle_bn_splits: int = _setting(
        2, "On one process, BatchNorm statistics (encoders and decoder) are computed over this "
           "many sub-batches and the key batch is shuffled across them, emulating MoCo's "
           "cross-process shuffle-BN (1 turns the emulation off). Several processes use the "
           "real shuffle. MoCo only.")
    barlow_projector_dims: list[int] = _setting(
        (8192, 8192, 8192), "Widths of the Barlow Twins projector's linear layers (BatchNorm "
                            "+ ReLU after all but the last), as Barlow Twins on ResNet-50.")
    barlow_off_diagonal_weight: float = _setting(
        0.0051, "Lambda of the Barlow Twins loss: the weight of the squared off-diagonal "
                "cross-correlations against the on-diagonal term, as Barlow Twins.")
    simsiam_projector_dims: list[int] = _setting(
        (2048, 2048, 2048), "Widths of the SimSiam projector's linear layers (BatchNorm after "
                            "every one, ReLU after all but the last), as SimSiam.")
    simsiam_predictor_hidden_dim: int = _setting(
        512, "Bottleneck width of the SimSiam predictor (d -> hidden -> d), as SimSiam.")
    contrastive_weight: float = _setting(
        1.0, "Weight of the instance-discrimination loss, whatever the method.")
    reconstruction_weight: float = _setting(10.0, "Weight of the reconstruction (MSE) loss.")
    reconstruction_activation: str = _setting(
        "sigmoid", "Activation of the reconstruction output: sigmoid or identity.")
    classifier_dropout: float = _setting(
        0.0, "Dropout before a downstream classification head, in [0, 1).")
    segmentation_dice_weight: float = _setting(
        1.0, "Weight of the soft-Dice term of the segmentation loss (added to BCE for one "
             "label, to cross-entropy for several; 0 turns it off).")
    semantic_loss_ignore_index: int = _setting(
        255, "Label value left out of the multi-label segmentation loss (unlabelled pixels), "
             "255 as in transformers' segmenters.")

    def __post_init__(self) -> None:
        mistakes = self.mistakes()
        if mistakes:
            raise ValueError("\n".join(mistakes))

    def mistakes(self) -> list[str]:
        """Every invalid field's message, in the order of the fields, each starting with the
        field's name. Whole-number and list fields are normalised first (``5.0`` → ``5``,
        a tuple → a list)."""
        mistakes = _normalise(self)
        if mistakes:
            return mistakes
        if self.encoder_name not in COMMON_ENCODERS:
            encoders = available_encoders()
            if encoders is not None and self.encoder_name not in encoders:
                close = difflib.get_close_matches(self.encoder_name, encoders, n=3)
                shown = close or encoders[:12] + ["..."]
                mistakes.append(f"encoder_name={self.encoder_name!r} is not a "
                                "segmentation_models_pytorch encoder; "
                                f"{'did you mean' if close else 'choose one of:'} "
                                f"{', '.join(shown)}{'?' if close else ''}")
        if self.encoder_depth != 5:
            # smp keeps the unused stages of a shallower encoder: they would never get a
            # gradient (DDP refuses that) and would be exported as random weights.
            mistakes.append(f"encoder_depth must be 5 (the full encoder), got {self.encoder_depth}")
        if len(self.decoder_channels) != self.encoder_depth:
            mistakes.append(f"decoder_channels needs one entry per encoder stage "
                            f"({self.encoder_depth}), got {self.decoder_channels}")
        positive = ("decoder_channels", "in_channels", "queue_size", "contrastive_temperature",
                    "projection_dim", "simsiam_predictor_hidden_dim")
        for name in positive:
            value = getattr(self, name)
            if (min(value, default=1) if isinstance(value, list) else value) <= 0:
                mistakes.append(f"{name} must be positive, got {value}")
        try:
            check_image_size(self.image_size)
        except ValueError as error:
            mistakes.append(str(error))
        for name, choices in (("discrimination_method", DISCRIMINATION_METHODS),
                              ("reconstruct_views", RECONSTRUCT_VIEWS),
                              ("projection_head", PROJECTION_HEADS),
                              ("reconstruction_activation", RECONSTRUCTION_ACTIVATIONS)):
            if getattr(self, name) not in choices:
                mistakes.append(f"{name}={getattr(self, name)!r} is unknown; choose one of "
                                f"{choices}")
        if self.reconstruct_views == "both" and self.discrimination_method not in SYMMETRIC_METHODS:
            mistakes.append(
                "reconstruct_views='both' needs a symmetric method (barlow_twins, simsiam): "
                f"{self.discrimination_method}'s second view is not encoded by the query "
                "encoder (MoCo's goes through the momentum encoder, without decoder or gradient)")
        for name in ("momentum", "classifier_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                mistakes.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.shuffle_bn_splits < 1:
            mistakes.append(f"shuffle_bn_splits must be >= 1, got {self.shuffle_bn_splits}")
        for name in ("barlow_projector_dims", "simsiam_projector_dims"):
            dims = getattr(self, name)
            if not dims or min(dims) <= 0:
                mistakes.append(f"{name} needs at least one positive width, got {dims}")
        for name in ("barlow_off_diagonal_weight", "contrastive_weight", "reconstruction_weight",
                     "segmentation_dice_weight"):
            if getattr(self, name) < 0:
                mistakes.append(f"{name} must be >= 0, got {getattr(self, name)}")
        return mistakes


def _normalise(settings: CAiDSettings) -> list[str]:
    """Cast each field to its declared type in place (``5.0`` → 5, ``"0.2"`` stays wrong);
    a message for each value that is not of its type."""
    mistakes = []
    kinds = {"int": int, "float": float, "bool": bool, "str": str, "list[int]": list}
    for item in dataclasses.fields(settings):
        value, kind = getattr(settings, item.name), kinds[item.type]
        try:
            if kind is list:
                if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                    raise TypeError
                value = [_whole(v) for v in value]
            elif kind is int:
                value = _whole(value)
            elif kind is float:
                if isinstance(value, (bool, str)):
                    raise TypeError
                value = float(value)
            elif kind is bool:
                value = bool(value)
            elif not isinstance(value, str):
                raise TypeError
        except (TypeError, ValueError):
            mistakes.append(f"{item.name} must be {_TYPE_NAMES[item.type]}, got {value!r}")
            continue
        setattr(settings, item.name, value)
    return mistakes


_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false",
               "str": "a string", "list[int]": "a list of integers"}


def _whole(value) -> int:
    """``value`` as an int when it is a whole number (``5``, ``5.0``); else TypeError."""
    try:
        whole = int(value)
    except (OverflowError, ValueError):  # inf, nan
        raise TypeError(value) from None
    if isinstance(value, (bool, str)) or whole != value:
        raise TypeError(value)
    return whole
