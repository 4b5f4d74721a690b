"""Configuration of CAiD models (backbone, pre-training objective, downstream heads)."""

from __future__ import annotations

from transformers import PretrainedConfig

# The paper's setting: CAiDConfig's defaults, and what every other part falls back to
DEFAULT_IMAGE_SIZE = 224
DEFAULT_QUEUE_SIZE = 65536
DEFAULT_MOMENTUM = 0.999

PROJECTION_HEADS = ("mlp", "linear")
RECONSTRUCTION_ACTIVATIONS = ("sigmoid", "identity")
RECONSTRUCT_VIEWS = ("first", "both")


def available_encoders() -> list[str] | None:
    """Names of the segmentation_models_pytorch encoders CAiD can use (e.g. ``resnet50``);
    None without segmentation_models_pytorch (a Hub visitor loading only the image
    processor, whose remote code imports this file: nothing to check against)."""
    try:
        from segmentation_models_pytorch.encoders import encoders
    except ImportError:
        return None
    return sorted(encoders)


# The objectives (caid_hf.objectives.OBJECTIVES, which tests keep in step with these names)
# live apart: this file is also a Hub repository's remote code and imports only transformers.
DISCRIMINATION_METHODS = ("moco_v2", "barlow_twins", "simsiam")
# whose second view goes through the query encoder, so the U-Net can reconstruct it too
SYMMETRIC_METHODS = ("barlow_twins", "simsiam")


def check_image_size(image_size: int, what: str = "image_size") -> None:
    """Refuse a model input side that is not a positive multiple of 32 (the U-Net halves it
    five times), naming the nearest allowed sides: ``--image_size 100`` → 96 or 128."""
    if image_size > 0 and image_size % 32 == 0:
        return
    lower = image_size // 32 * 32
    nearest = [s for s in (lower, lower + 32) if s > 0] or [32]
    raise ValueError(f"{what} must be a positive multiple of 32 (the U-Net halves it 5 "
                     f"times), got {image_size}; use {' or '.join(map(str, nearest))}")


class CAiDConfig(PretrainedConfig):
    r"""Configuration of a CAiD U-Net and its pre-training objective.

    Defaults reproduce the paper's setting: a ResNet-50 U-Net on 224 px
    views, MoCo-v2 with an MLP head, a queue of 65,536 keys of dimension 128, momentum
    0.999, temperature 0.2, loss ``1 * L_ID + 10 * L_MSE`` on a sigmoid reconstruction.

    Args:
        encoder_name: segmentation_models_pytorch encoder name (``resnet18``, ``resnet50`` ...).
        encoder_depth: number of encoder stages used by the U-Net (5, the whole encoder).
        decoder_channels: channels of the U-Net decoder blocks, one per stage.
        in_channels: input channels; grey radiographs are replicated to 3.
        image_size: side of the square training views in pixels (divisible by 32).
        discrimination_method: instance-discrimination objective: ``moco_v2`` (the one the
            original code ships), ``barlow_twins`` or ``simsiam`` (in the paper, not in the
            original code). Barlow Twins and SimSiam have no momentum encoder and no queue: both
            views go through the one encoder with gradients, and every BatchNorm layer of the
            pre-training model (encoder, decoder, heads) normalises over the global batch when
            several processes run, as both methods' originals do with synchronised BatchNorm.
        context_prediction: ``True`` is CAiD (instance discrimination + reconstruction);
            ``False`` is the plain instance-discrimination baseline (the decoder is not used).
        reconstruct_views: which views the U-Net restores in CAiD mode. ``first`` (default): the
            first (query) view, against ``labels``, as the original does. ``both``: also the
            second view, against ``key_labels``; the reconstruction loss is then the mean of the
            two views' MSE. Only for the symmetric methods (``barlow_twins``, ``simsiam``): MoCo's
            second view goes through the momentum encoder, which has no decoder and no gradient.
        queue_size: MoCo queue length K; must be divisible by the global batch size.
        momentum: MoCo momentum m of the key encoder.
        contrastive_temperature: MoCo softmax temperature T (not ``temperature``: transformers
            reserves that name for generation).
        projection_dim: output dimension of the MoCo projection head.
        projection_head: ``mlp`` (Linear-ReLU-Linear, MoCo-v2) or ``linear`` (MoCo-v1).
        shuffle_bn_splits: on a single process, BatchNorm statistics (encoders and decoder)
            are computed over this many sub-batches and the key batch is shuffled across
            them, emulating the cross-process shuffle-BN of MoCo (1 disables the emulation). Ignored when several
            processes run: the real cross-process shuffle is used. MoCo only.
        barlow_projector_dims: output widths of the Barlow Twins projector's linear layers
            (BatchNorm + ReLU after all but the last); 8192 × 3 as Barlow Twins on ResNet-50.
        barlow_off_diagonal_weight: λ of the Barlow Twins loss, the weight of the squared
            off-diagonal cross-correlations (redundancy reduction) against the on-diagonal
            invariance term; 0.0051 as Barlow Twins.
        simsiam_projector_dims: output widths of the SimSiam projector's linear layers
            (BatchNorm after every one, ReLU after all but the last); 2048 × 3 as SimSiam.
        simsiam_predictor_hidden_dim: bottleneck width of the SimSiam predictor
            (d → hidden → d with d the projector's output); 512 as SimSiam.
        contrastive_weight: weight of the instance-discrimination loss, whatever the method.
        reconstruction_weight: weight of the reconstruction (MSE) loss.
        reconstruction_activation: activation of the reconstruction output (``sigmoid``).
        classifier_dropout: dropout before a downstream classification head.
        segmentation_dice_weight: weight of the soft-Dice term of the segmentation loss
            (added to BCE for one label, to cross-entropy for several; 0 turns it off).
        semantic_loss_ignore_index: label value left out of the multi-label segmentation loss
            (unlabelled pixels), 255 as in transformers' segmenters.
    """

    model_type = "caid"

    def __init__(
        self,
        encoder_name: str = "resnet50",
        encoder_depth: int = 5,
        decoder_channels: list[int] | tuple[int, ...] = (256, 128, 64, 32, 16),
        in_channels: int = 3,
        image_size: int = DEFAULT_IMAGE_SIZE,
        discrimination_method: str = "moco_v2",
        context_prediction: bool = True,
        reconstruct_views: str = "first",
        queue_size: int = DEFAULT_QUEUE_SIZE,
        momentum: float = DEFAULT_MOMENTUM,
        contrastive_temperature: float = 0.2,
        projection_dim: int = 128,
        projection_head: str = "mlp",
        shuffle_bn_splits: int = 2,
        barlow_projector_dims: list[int] | tuple[int, ...] = (8192, 8192, 8192),
        barlow_off_diagonal_weight: float = 0.0051,
        simsiam_projector_dims: list[int] | tuple[int, ...] = (2048, 2048, 2048),
        simsiam_predictor_hidden_dim: int = 512,
        contrastive_weight: float = 1.0,
        reconstruction_weight: float = 10.0,
        reconstruction_activation: str = "sigmoid",
        classifier_dropout: float = 0.0,
        segmentation_dice_weight: float = 1.0,
        semantic_loss_ignore_index: int = 255,
        **kwargs,
    ):
        self.encoder_name = encoder_name
        self.encoder_depth = int(encoder_depth)
        self.decoder_channels = [int(c) for c in decoder_channels]
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        self.discrimination_method = discrimination_method
        self.context_prediction = bool(context_prediction)
        self.reconstruct_views = reconstruct_views
        self.queue_size = int(queue_size)
        self.momentum = float(momentum)
        self.contrastive_temperature = float(contrastive_temperature)
        self.projection_dim = int(projection_dim)
        self.projection_head = projection_head
        self.shuffle_bn_splits = int(shuffle_bn_splits)
        self.barlow_projector_dims = [int(d) for d in barlow_projector_dims]
        self.barlow_off_diagonal_weight = float(barlow_off_diagonal_weight)
        self.simsiam_projector_dims = [int(d) for d in simsiam_projector_dims]
        self.simsiam_predictor_hidden_dim = int(simsiam_predictor_hidden_dim)
        self.contrastive_weight = float(contrastive_weight)
        self.reconstruction_weight = float(reconstruction_weight)
        self.reconstruction_activation = reconstruction_activation
        self.classifier_dropout = float(classifier_dropout)
        self.segmentation_dice_weight = float(segmentation_dice_weight)
        self.semantic_loss_ignore_index = int(semantic_loss_ignore_index)
        super().__init__(**kwargs)
        self.validate_caid()

    def validate_caid(self) -> None:
        """Raise one ``ValueError`` naming every invalid field, a line each (each line
        starts with the field's name)."""
        mistakes = self.caid_mistakes()
        if mistakes:
            raise ValueError("\n".join(mistakes))

    def caid_mistakes(self) -> list[str]:
        """Every invalid field's message, in the order of the arguments."""
        mistakes: list[str] = []
        encoders = available_encoders()
        if encoders is not None and self.encoder_name not in encoders:
            mistakes.append(
                f"encoder_name={self.encoder_name!r} is not a segmentation_models_pytorch encoder; "
                f"choose one of: {', '.join(encoders[:12])}, ..."
            )
        if self.encoder_depth != 5:
            # smp keeps the unused stages of a shallower encoder: they would never get a
            # gradient (DDP refuses that) and would be exported as random weights.
            mistakes.append(f"encoder_depth must be 5 (the full encoder), got {self.encoder_depth}")
        if len(self.decoder_channels) != self.encoder_depth:
            mistakes.append(
                f"decoder_channels needs one entry per encoder stage ({self.encoder_depth}), "
                f"got {self.decoder_channels}"
            )
        if any(c <= 0 for c in self.decoder_channels):
            mistakes.append(f"decoder_channels must be positive, got {self.decoder_channels}")
        if self.in_channels <= 0:
            mistakes.append(f"in_channels must be positive, got {self.in_channels}")
        try:
            check_image_size(self.image_size)
        except ValueError as error:
            mistakes.append(str(error))
        if self.discrimination_method not in DISCRIMINATION_METHODS:
            mistakes.append(
                f"discrimination_method={self.discrimination_method!r} is unknown; "
                f"choose one of {DISCRIMINATION_METHODS}"
            )
        if self.reconstruct_views not in RECONSTRUCT_VIEWS:
            mistakes.append(
                f"reconstruct_views={self.reconstruct_views!r} is unknown; "
                f"choose one of {RECONSTRUCT_VIEWS}"
            )
        if self.reconstruct_views == "both" and self.discrimination_method not in SYMMETRIC_METHODS:
            mistakes.append(
                "reconstruct_views='both' needs a symmetric method (barlow_twins, simsiam): "
                f"{self.discrimination_method}'s second view is not encoded by the query "
                "encoder (MoCo's goes through the momentum encoder, without decoder or gradient)"
            )
        if self.queue_size <= 0:
            mistakes.append(f"queue_size must be positive, got {self.queue_size}")
        if not 0.0 <= self.momentum < 1.0:
            mistakes.append(f"momentum must be in [0, 1), got {self.momentum}")
        if self.contrastive_temperature <= 0:
            mistakes.append(
                f"contrastive_temperature must be positive, got {self.contrastive_temperature}"
            )
        if self.projection_dim <= 0:
            mistakes.append(f"projection_dim must be positive, got {self.projection_dim}")
        if self.projection_head not in PROJECTION_HEADS:
            mistakes.append(
                f"projection_head={self.projection_head!r} is unknown; choose one of {PROJECTION_HEADS}"
            )
        if self.shuffle_bn_splits < 1:
            mistakes.append(f"shuffle_bn_splits must be >= 1, got {self.shuffle_bn_splits}")
        for name in ("barlow_projector_dims", "simsiam_projector_dims"):
            dims = getattr(self, name)
            if not dims or any(d <= 0 for d in dims):
                mistakes.append(f"{name} needs at least one positive width, got {dims}")
        if self.barlow_off_diagonal_weight < 0:
            mistakes.append(
                f"barlow_off_diagonal_weight must be >= 0, got {self.barlow_off_diagonal_weight}"
            )
        if self.simsiam_predictor_hidden_dim <= 0:
            mistakes.append(
                f"simsiam_predictor_hidden_dim must be positive, got {self.simsiam_predictor_hidden_dim}"
            )
        if self.contrastive_weight < 0:
            mistakes.append(f"contrastive_weight must be >= 0, got {self.contrastive_weight}")
        if self.reconstruction_weight < 0:
            mistakes.append(f"reconstruction_weight must be >= 0, got {self.reconstruction_weight}")
        if self.reconstruction_activation not in RECONSTRUCTION_ACTIVATIONS:
            mistakes.append(
                f"reconstruction_activation={self.reconstruction_activation!r} is unknown; "
                f"choose one of {RECONSTRUCTION_ACTIVATIONS}"
            )
        if self.segmentation_dice_weight < 0:
            mistakes.append(
                f"segmentation_dice_weight must be >= 0, got {self.segmentation_dice_weight}"
            )
        if not 0.0 <= self.classifier_dropout < 1.0:
            mistakes.append(f"classifier_dropout must be in [0, 1), got {self.classifier_dropout}")
        return mistakes

# save_pretrained writes this file beside the weights and names it in config.json's auto_map
CAiDConfig.register_for_auto_class()
