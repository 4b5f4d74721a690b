"""CAiD models: the U-Net backbone and its pre-training wrapper.

The U-Net is assembled from segmentation_models_pytorch parts so that the backbone's
state-dict keys are exactly those of ``smp.Unet`` with the same encoder, and the
original repository's loading recipes keep working on our safetensors files.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import SegmentationHead
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder, UnetDecoderBlock
from segmentation_models_pytorch.encoders import get_encoder
from segmentation_models_pytorch.encoders.resnet import ResNetEncoder
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput, SemanticSegmenterOutput
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_caid import CAiDConfig


@dataclass
class CAiDModelOutput(ModelOutput):
    """Output of :class:`CAiDModel`.

    Args:
        last_hidden_state: deepest encoder features [B, C, H/32, W/32].
        pooler_output: global average pool of ``last_hidden_state`` [B, C], the embedding.
        reconstruction: restored image [B, 1, H, W] in [0, 1] (sigmoid), or ``None`` when not
            computed.
        hidden_states: every encoder stage (input first), when ``output_hidden_states``.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


def global_pool(feature_map: torch.Tensor) -> torch.Tensor:
    """Global average pool [B, C, h, w] → [B, C] (the backbone's ``pooler_output``)."""
    return feature_map.mean(dim=(2, 3))


def smp_unet(config: CAiDConfig) -> nn.Module:
    """A randomly initialised ``smp.Unet`` of the same architecture as ``CAiDModel(config)``:
    one output channel, sigmoid activation unless configured off (the original's U-Net)."""
    import segmentation_models_pytorch as smp

    return smp.Unet(
        config.encoder_name,
        encoder_depth=config.encoder_depth,
        encoder_weights=None,
        decoder_channels=config.decoder_channels,
        in_channels=config.in_channels,
        classes=1,
        activation="sigmoid" if config.reconstruction_activation == "sigmoid" else None,
    )


@contextmanager
def _batch_norm_statistics_kept(module: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm running statistic (mean, var, batch count) inside ``module`` on
    exit: a checkpointed segment's recomputation must not update them a second time."""
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def check_pixel_values(pixel_values: torch.Tensor, config: CAiDConfig,
                       name: str = "pixel_values") -> None:
    """Refuse a model input the U-Net cannot take as is, naming its shape.

    ``pixel_values`` must be a [B, C, H, W] tensor with ``C = config.in_channels`` and H, W
    multiples of ``2 ** config.encoder_depth`` (32). smp's U-Net does not check this itself:
    other sides run silently (smp 0.6's decoder interpolates to each skip's size) or fail
    deep inside older smp versions; this turns the README's rule into a clear error.

    Raises:
        TypeError: not a tensor.
        ValueError: wrong number of dimensions or channels, or sides not divisible.
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, C, H, W], got {type(pixel_values).__name__}")
    shape = list(pixel_values.shape)
    if pixel_values.ndim != 4:
        raise ValueError(
            f"{name} has shape {shape}: expected 4 dimensions [B, C, H, W] (a single image "
            f"needs a batch axis, e.g. pixel_values[None])"
        )
    if shape[1] != config.in_channels:
        raise ValueError(
            f"{name} has shape {shape}: expected {config.in_channels} channels in dimension 1 "
            f"([B, C, H, W]; grey images are replicated to 3, e.g. by CAiDImageProcessor)"
        )
    multiple = 2 ** config.encoder_depth
    if shape[2] % multiple or shape[3] % multiple:
        raise ValueError(
            f"{name} has shape {shape}: height and width must be multiples of {multiple} (the "
            f"encoder downsamples {config.encoder_depth} times); resize or pad the images, "
            f"e.g. with CAiDImageProcessor"
        )


# smp 0.6's decoder blocks are called with the target size (older ones upsample by 2)
_DECODER_BLOCKS_TAKE_SIZES = "target_height" in inspect.signature(UnetDecoderBlock.forward).parameters


def _resnet_stages(encoder: ResNetEncoder) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The stages of an smp ResNet encoder, in the order (and with the depth) of its
    ``forward``: stage i maps feature i to feature i + 1 (stem, maxpool + layer1, layer2, …)."""
    stages = [
        lambda x: encoder.relu(encoder.bn1(encoder.conv1(x))),
        lambda x: encoder.layer1(encoder.maxpool(x)),
        encoder.layer2,
        encoder.layer3,
        encoder.layer4,
    ]
    return stages[:encoder._depth]


# What a saved backbone, classifier or U-Net folder offers to Auto classes as remote code
# (the files are copied beside the weights, see caid_hf/__init__.py)
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_caid.CAiDConfig",
    "AutoModel": "modeling_caid.CAiDModel",
    "AutoModelForImageClassification": "modeling_caid.CAiDForImageClassification",
    "AutoModelForSemanticSegmentation": "modeling_caid.CAiDForSemanticSegmentation",
    "AutoImageProcessor": "image_processing_caid.CAiDImageProcessor",
}


class CAiDPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading conventions shared by all CAiD models.

    Gradient checkpointing (``gradient_checkpointing_enable()``, or
    ``activation_checkpointing_enable()`` on transformers versions that renamed it) makes
    the backbone keep only each encoder stage's and decoder block's output during the
    forward pass and recompute the rest during the backward pass: less activation memory
    (high-resolution films), about one more encoder + decoder forward of compute per step.
    It acts in training mode with gradients enabled; MoCo's momentum key branch runs without
    gradients and is never checkpointed. BatchNorm running statistics are updated once per
    forward, as without checkpointing (the recomputation restores them).
    """

    config_class = CAiDConfig
    base_model_prefix = "caid"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``; a class registered for an Auto class (the
        backbone and the downstream models) also writes its code and an ``auto_map`` naming
        all three, so its folder starts any of them with ``trust_remote_code=True``."""
        if getattr(type(self), "_auto_class", None) is not None:
            self.config.auto_map = dict(REMOTE_CODE_AUTO_MAP)
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The same schemes the parts get from their own libraries: torchvision's ResNet init
        # for encoder convolutions, smp's for decoder and head, torch's default for Linear.
        scheme = getattr(module, "_caid_init", None)
        if isinstance(module, nn.Conv2d):
            if scheme == "decoder":
                init.kaiming_uniform_(module.weight, mode="fan_in", nonlinearity="relu")
            elif scheme == "head":
                init.xavier_uniform_(module.weight)
            else:
                init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and scheme == "classifier":
            init.normal_(module.weight, std=0.01)  # a new linear head starts near zero logits
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm)):
            if getattr(module, "weight", None) is not None:
                init.ones_(module.weight)
                init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)


class CAiDModel(CAiDPreTrainedModel):
    """The CAiD U-Net: an smp encoder, the smp U-Net decoder and a 1-channel reconstruction head.

    ``state_dict()`` keys equal ``smp.Unet(config.encoder_name)``'s. Inputs are 3-channel
    images in [0, 1] without mean/std normalisation, H and W multiples of 32
    (``2 ** encoder_depth``; other inputs are refused, see :func:`check_pixel_values`).
    """

    def __init__(self, config: CAiDConfig, add_decoder: bool = True,
                 add_reconstruction_head: bool = True):
        super().__init__(config)
        self.encoder = get_encoder(
            config.encoder_name, in_channels=config.in_channels, depth=config.encoder_depth, weights=None
        )
        # Downstream heads build only what they use: a classifier no decoder, a segmenter no
        # reconstruction head (the published backbone always has both).
        self.decoder = self.segmentation_head = None
        if add_decoder:
            self.decoder = UnetDecoder(
                encoder_channels=self.encoder.out_channels,
                decoder_channels=config.decoder_channels,
                n_blocks=config.encoder_depth,
                add_center_block=config.encoder_name.startswith("vgg"),
            )
            for m in self.decoder.modules():
                m._caid_init = "decoder"
            if add_reconstruction_head:
                self.segmentation_head = SegmentationHead(config.decoder_channels[-1], 1, kernel_size=3)
                for m in self.segmentation_head.modules():
                    m._caid_init = "head"
        # set (with _gradient_checkpointing_func) by transformers' gradient_checkpointing_enable()
        self.gradient_checkpointing = False
        # functions module → (a factory of a context manager that restores the module's state
        # of that moment): state a layer's forward reads that may change between a
        # checkpointed segment's first pass and its recomputation in the backward pass (set by
        # code that changes how layers behave around a forward, such as pre-training)
        self.recomputation_hooks: list[Callable[[nn.Module], Callable[[], AbstractContextManager]]] = []
        self.post_init()

    @property
    def embedding_dim(self) -> int:
        """Channels C of the deepest encoder stage (the pooled embedding's size)."""
        return self.encoder.out_channels[-1]

    @property
    def _checkpointing_active(self) -> bool:
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled()

    def _checkpointed(self, function: Callable, *inputs: torch.Tensor, module: nn.Module):
        """``function(*inputs)`` through transformers' checkpoint function, always
        non-reentrant (reentrant checkpointing would give the weights no gradient: the
        images need none); the backward pass's recomputation leaves the BatchNorm
        statistics of ``module`` untouched and sees the state the first pass saw
        (:attr:`recomputation_hooks`)."""
        replays: list[Callable[[], AbstractContextManager]] = []
        passes = 0

        def run(*args):
            nonlocal passes
            passes += 1
            if passes == 1:
                replays.extend(capture(module) for capture in self.recomputation_hooks)
                return function(*args)
            with ExitStack() as stack:
                for replay in replays:
                    stack.enter_context(replay())
                stack.enter_context(_batch_norm_statistics_kept(module))
                return function(*args)

        return self._gradient_checkpointing_func(run, *inputs, use_reentrant=False)

    def encode(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's stage features of ``pixel_values`` [B, 3, H, W] in [0, 1]: a list,
        input first, then [B, C_i, H / 2^i, W / 2^i] for i = 1 … depth.

        Equals ``self.encoder(pixel_values)``; with gradient checkpointing on (training mode),
        every ResNet stage is a checkpointed segment (other smp encoders: the whole encoder
        is one segment).

        Raises:
            ValueError: ``pixel_values`` is not [B, 3, H, W] with H, W multiples of 32
                (:func:`check_pixel_values`); every model's forward comes through here.
        """
        check_pixel_values(pixel_values, self.config)
        if not self._checkpointing_active:
            return self.encoder(pixel_values)
        if not isinstance(self.encoder, ResNetEncoder):
            return self._checkpointed(self.encoder, pixel_values, module=self.encoder)
        features = [pixel_values]
        for stage in _resnet_stages(self.encoder):
            features.append(self._checkpointed(stage, features[-1], module=self.encoder))
        return features

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The U-Net decoder on :meth:`encode`'s features → [B, decoder_channels[-1], H, W].

        Equals ``self.decoder(features)``; with gradient checkpointing on (training mode),
        every decoder block is a checkpointed segment."""
        if not self._checkpointing_active:
            return self.decoder(features)
        if not _DECODER_BLOCKS_TAKE_SIZES:  # an smp older than 0.6: the decoder is one segment
            return self._checkpointed(self.decoder, features, module=self.decoder)
        # smp's UnetDecoder.forward written out: it runs its blocks in one loop with no hook
        # per block, so a checkpointed segment per block needs the loop here (without
        # checkpointing, smp's own forward runs, above)
        sizes = [f.shape[2:] for f in features][::-1]
        head, *skips = features[1:][::-1]
        x = head
        if not isinstance(self.decoder.center, nn.Identity):
            x = self._checkpointed(self.decoder.center, head, module=self.decoder.center)
        for i, block in enumerate(self.decoder.blocks):
            height, width = sizes[i + 1]
            skip = (skips[i],) if i < len(skips) else ()
            x = self._checkpointed(lambda y, *s, b=block, h=height, w=width: b(y, h, w, *s),
                                   x, *skip, module=block)
        return x

    def reconstruct(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Decoder + head on the encoder stages → [B, 1, H, W] (sigmoid unless configured off)."""
        if self.segmentation_head is None:
            raise ValueError("this CAiDModel was built without its decoder or reconstruction head")
        out = self.segmentation_head(self.decode(features))
        return torch.sigmoid(out) if self.config.reconstruction_activation == "sigmoid" else out

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        compute_reconstruction: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> CAiDModelOutput | tuple:
        """Encode ``pixel_values`` [B, 3, H, W] (float in [0, 1]); also reconstruct the image
        when ``compute_reconstruction`` (default: whenever this model has its reconstruction head)."""
        if compute_reconstruction is None:
            compute_reconstruction = self.segmentation_head is not None
        features = self.encode(pixel_values)
        output = CAiDModelOutput(
            last_hidden_state=features[-1],
            pooler_output=global_pool(features[-1]),
            reconstruction=self.reconstruct(features) if compute_reconstruction else None,
            hidden_states=tuple(features) if output_hidden_states else None,
        )
        return output

    def to_torchvision(self, num_classes: int = 1000) -> nn.Module:
        """A torchvision ResNet carrying this encoder's weights (its ``fc`` freshly initialised)."""
        import torchvision

        name = self.config.encoder_name
        if not (name.startswith("resnet") or name.startswith("resnext")) or not hasattr(
            torchvision.models, name
        ):
            raise ValueError(f"to_torchvision() supports torchvision ResNets; encoder is {name!r}")
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        missing, unexpected = model.load_state_dict(self.encoder.state_dict(), strict=False)
        head = {"fc.weight", "fc.bias"} if num_classes else set()  # num_classes=0: no head
        if set(missing) != head or unexpected:
            raise RuntimeError(f"encoder does not match torchvision {name}: {missing} {unexpected}")
        return model.to(self.device)

    def to_timm(self, num_classes: int = 1000) -> nn.Module:
        """A timm ResNet (same name as the encoder) carrying this encoder's weights (a new
        ``fc``; none with ``num_classes=0``, a feature extractor)."""
        import timm

        name = self.config.encoder_name
        if not (name.startswith("resnet") or name.startswith("resnext")) or not timm.is_model(name):
            raise ValueError(f"to_timm() supports timm ResNets; encoder is {name!r}")
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        missing, unexpected = model.load_state_dict(self.encoder.state_dict(), strict=False)
        head = {"fc.weight", "fc.bias"} if num_classes else set()  # num_classes=0: no head
        if set(missing) != head or unexpected:
            raise RuntimeError(f"encoder does not match timm {name}: {missing} {unexpected}")
        return model.to(self.device)

    def export_smp(self, folder) -> None:
        """Write a folder that ``segmentation_models_pytorch.from_pretrained(folder)`` loads."""
        self.to_smp().save_pretrained(folder)

    def to_smp(self) -> nn.Module:
        """A ``segmentation_models_pytorch.Unet`` with exactly these weights (sigmoid activation)."""
        if self.segmentation_head is None:
            raise ValueError("to_smp() needs the full U-Net; this CAiDModel has no decoder/head")
        model = smp_unet(self.config)
        model.load_state_dict(self.state_dict())
        return model.to(self.device)


def _classification_loss(config: CAiDConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' convention: regression, single-label (CE) or multi-label (BCE) by problem_type,
    inferred from ``num_labels`` and the labels' dtype when unset."""
    if config.problem_type is None:
        if config.num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    logits = logits.float()
    if config.problem_type == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.float().view(-1)) if config.num_labels == 1 \
            else F.mse_loss(logits, labels.float())
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(logits, labels.view(-1).long())
    labels = labels.float()
    known = ~(labels.isnan() | (labels == -100))  # ignored entries (e.g. uncertain findings)
    if bool(known.all()):
        return F.binary_cross_entropy_with_logits(logits, labels)
    # the mean over the known entries; 0 (with a graph) when a batch has none
    losses = F.binary_cross_entropy_with_logits(logits, labels.nan_to_num(0.0).clamp(0, 1),
                                                reduction="none")
    return (losses * known).sum() / known.sum().clamp(min=1)


class CAiDForImageClassification(CAiDPreTrainedModel):
    """CAiD encoder → global average pool → dropout → linear head with ``config.num_labels``.

    Only the encoder is built and loaded (a backbone's decoder and reconstruction head are
    ignored). Losses follow transformers' image classifiers: regression (MSE),
    ``single_label_classification`` (cross-entropy) or ``multi_label_classification``
    (BCE with logits, e.g. the 14 ChestX-ray14 findings).
    """

    _keys_to_ignore_on_load_unexpected = [r"decoder\.", r"segmentation_head\.", r"objective\."]

    def __init__(self, config: CAiDConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.caid = CAiDModel(config, add_decoder=False)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(self.caid.embedding_dim, config.num_labels)
        self.classifier._caid_init = "classifier"
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        """pixel_values [B, 3, H, W] in [0, 1] → logits [B, num_labels]; ``labels``: [B] class
        indices (single-label), [B, num_labels] floats in {0, 1} (multi-label; NaN or -100
        entries are ignored: left out of the loss) or targets."""
        out = self.caid(pixel_values, compute_reconstruction=False,
                        output_hidden_states=output_hidden_states)
        logits = self.classifier(self.dropout(out.pooler_output))
        loss = _classification_loss(self.config, logits, labels) if labels is not None else None
        output = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return output


class CAiDForSemanticSegmentation(CAiDPreTrainedModel):
    """The CAiD U-Net (encoder + decoder from the checkpoint) with a new segmentation head.

    The head (``classifier``, a 3×3 convolution) has ``config.num_labels`` channels; logits come at input resolution. Loss: one
    label → BCE-with-logits + soft Dice; several labels → cross-entropy + soft Dice (smp's
    ``DiceLoss``); ``config.segmentation_dice_weight`` scales the Dice term (0 turns it off).
    """

    # the backbone's reconstruction head is not this model's head
    _keys_to_ignore_on_load_unexpected = [r"segmentation_head\.", r"objective\."]

    def __init__(self, config: CAiDConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.caid = CAiDModel(config, add_reconstruction_head=False)
        # named apart from the backbone's ``segmentation_head`` (its 1-channel reconstruction
        # head) so that a checkpoint never fills the new head
        self.classifier = SegmentationHead(config.decoder_channels[-1], config.num_labels,
                                           kernel_size=3)
        for m in self.classifier.modules():
            m._caid_init = "head"
        self.post_init()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits [B, L, H, W]; labels [B, 1, H, W] or [B, H, W] in {0, 1} for one label,
        [B, H, W] class indices for several (``semantic_loss_ignore_index`` pixels left out)."""
        from segmentation_models_pytorch.losses import DiceLoss

        logits = logits.float()
        dice_weight = getattr(self.config, "segmentation_dice_weight", 1.0)
        if self.num_labels == 1:
            target = labels.float().view_as(logits)
            loss = F.binary_cross_entropy_with_logits(logits, target)
            dice = DiceLoss("binary", from_logits=True)
        else:
            target = labels.long().view(logits.shape[0], *logits.shape[2:])
            ignore = self.config.semantic_loss_ignore_index
            loss = F.cross_entropy(logits, target, ignore_index=ignore)
            dice = DiceLoss("multiclass", from_logits=True, ignore_index=ignore)
        return loss + dice_weight * dice(logits, target) if dice_weight else loss

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SemanticSegmenterOutput | tuple:
        """pixel_values [B, 3, H, W] in [0, 1] → logits [B, num_labels, H, W]."""
        logits = self.classifier(self.caid.decode(self.caid.encode(pixel_values)))
        loss = self.loss(logits, labels) if labels is not None else None
        output = SemanticSegmenterOutput(loss=loss, logits=logits)
        return output


# save_pretrained writes this file (and the files it imports) beside the weights and names the
# classes in config.json's auto_map, so a folder loads with trust_remote_code=True without
# caid-hf
CAiDModel.register_for_auto_class("AutoModel")
CAiDForImageClassification.register_for_auto_class("AutoModelForImageClassification")
CAiDForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
