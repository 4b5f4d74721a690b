"""Import of the original CAiD repository's checkpoints into our folders.

The original code saves two kinds of ``.pth`` files:

- ``best_checkpoint.pth`` / ``checkpoint.pth``: ``torch.save`` of an ``smp.Unet``'s
  ``state_dict()`` (keys ``encoder.*``, ``decoder.*``, ``segmentation_head.*``, with a
  ``module.`` prefix when saved from a DDP wrapper). Converted to a :class:`CAiDModel`
  folder; our backbone's keys are smp's, so the weights load one to one.
- ``current_checkpoint.pth``: ``{"epoch", "arch", "best_loss", "optimizer", "state_dict"}``
  with the state of the DDP-wrapped MoCo model. Converted to a :class:`CAiDForPreTraining`
  folder (training continues from it) plus its backbone in ``out_dir/backbone``::

      module.encoder_q.backbone.*                  -> caid.*
      module.encoder_q.fc.*                        -> objective.projection_head.*
      module.encoder_k.backbone.encoder.*          -> objective.momentum_encoder.*
      module.encoder_k.fc.*                        -> objective.momentum_projection_head.*
      module.queue [D, K], module.queue_ptr [1]    -> objective.queue, objective.queue_ptr

  Dropped: ``encoder_k.backbone.decoder.*`` and ``encoder_k.backbone.segmentation_head.*``
  (the original runs the U-Net decoder on the key view and discards the result; our momentum
  branch is encoder + projection head only), and ``epoch``, ``best_loss``, ``arch`` and the
  ``optimizer`` state (a continued run starts a fresh optimizer and schedule).

Files are read with ``torch.load(..., weights_only=True)`` only: a checkpoint holding
arbitrary pickled objects is refused rather than executed. Every key must be accounted for;
unknown, missing or mis-shaped keys are reported by name.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from .configuration_caid import CAiDConfig
from .image_processing_caid import CAiDImageProcessor
from .model_settings import DEFAULT_IMAGE_SIZE
from .modeling_caid import CAiDModel, smp_unet
from .modeling_caid_pretraining import CAiDForPreTraining

logger = logging.getLogger(__name__)

# Key-branch U-Net parts of the original that our momentum branch does not have.
DROPPED_MOCO_PREFIXES = ("encoder_k.backbone.decoder.", "encoder_k.backbone.segmentation_head.")
MOCO_KEY_MAP = (
    ("encoder_q.backbone.", "caid."),
    ("encoder_q.fc.", "objective.projection_head."),
    ("encoder_k.backbone.encoder.", "objective.momentum_encoder."),
    ("encoder_k.fc.", "objective.momentum_projection_head."),
)
MOCO_BUFFERS = {"queue": "objective.queue", "queue_ptr": "objective.queue_ptr"}

# (bottleneck blocks?, blocks per stage) -> torchvision/smp ResNet name
_RESNETS = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
    (True, (3, 8, 36, 3)): "resnet152",
}


def load_original_checkpoint(path: str | Path) -> dict:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that name the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds pickled objects other than tensors and plain containers,
            or is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # the listing is only a courtesy in the message
            found = []
        what = f" (it references {', '.join(found)})" if found else ""
        raise ValueError(
            f"refusing to load {path}: it holds pickled Python objects beyond tensors and plain "
            f"containers{what}, which torch.load(weights_only=True) will not execute. Re-save "
            f"the state dict alone from a trusted environment."
        ) from error
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state dict or a dict")
    return dict(obj)


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the ``module.`` prefix DDP / DataParallel add to every key (when all keys have it)."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def infer_encoder_name(unet_state_dict: Mapping[str, torch.Tensor]) -> str:
    """The smp ResNet encoder (resnet18/34/50/101/152) whose weights ``unet_state_dict`` holds.

    Bottleneck blocks have a ``conv3``; the depth follows from the blocks per stage. ResNeXt
    (grouped ``conv2``) and other encoders are not guessed: pass ``encoder_name`` for them.
    """
    sd = unet_state_dict
    blocks = []
    for stage in range(1, 5):
        prefix = f"encoder.layer{stage}."
        indices = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
        blocks.append(len(indices))
    bottleneck = "encoder.layer1.0.conv3.weight" in sd
    name = _RESNETS.get((bottleneck, tuple(blocks)))
    conv2 = sd.get("encoder.layer1.0.conv2.weight")
    grouped = conv2 is not None and conv2.ndim == 4 and conv2.shape[0] != conv2.shape[1]
    if name is None or (bottleneck and grouped):
        raise ValueError(
            f"cannot infer the encoder from the weights (bottleneck={bottleneck}, blocks per "
            f"stage={blocks}); pass encoder_name (an smp encoder name such as 'resnext50_32x4d')"
        )
    return name


def infer_unet_config(
    unet_state_dict: Mapping[str, torch.Tensor], encoder_name: str | None = None, **config_overrides
) -> CAiDConfig:
    """A :class:`CAiDConfig` matching an ``smp.Unet`` state dict (no ``module.`` prefix).

    ``in_channels`` comes from the first convolution, ``decoder_channels`` from the decoder
    blocks; ``image_size`` stays 224 (the original's) unless overridden. ``config_overrides``
    win over everything inferred.
    """
    sd = unet_state_dict
    decoder_keys = [f"decoder.blocks.{i}.conv1.0.weight" for i in range(5)]
    missing = [k for k in ["encoder.conv1.weight", *decoder_keys] if k not in sd]
    if missing:
        raise ValueError(f"not an smp.Unet state dict with a 5-stage decoder; missing {missing}")
    fields = {
        "encoder_name": encoder_name or infer_encoder_name(sd),
        "in_channels": sd["encoder.conv1.weight"].shape[1],
        "decoder_channels": [sd[k].shape[0] for k in decoder_keys],
        "image_size": DEFAULT_IMAGE_SIZE,  # the original trains on 224-px views
    }
    fields.update(config_overrides)
    return CAiDConfig(**fields)


def map_moco_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Rename the original MoCo state (no ``module.`` prefix) to :class:`CAiDForPreTraining`'s.

    Returns ``(mapped, dropped, unknown)``: the renamed tensors, the original keys deliberately
    left out (key-branch decoder and head) and the original keys no rule covers.
    """
    mapped, dropped, unknown = {}, [], []
    for key, value in state_dict.items():
        if key.startswith(DROPPED_MOCO_PREFIXES):
            dropped.append(key)
        elif key in MOCO_BUFFERS:
            mapped[MOCO_BUFFERS[key]] = value
        else:
            for source, target in MOCO_KEY_MAP:
                if key.startswith(source):
                    mapped[target + key[len(source):]] = value
                    break
            else:
                unknown.append(key)
    return mapped, dropped, unknown


def _load_exactly(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict(strict=True)`` with the missing, unexpected and mis-shaped keys named."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = sorted(
        f"{k} {list(state_dict[k].shape)} (expected {list(expected[k].shape)})"
        for k in set(expected) & set(state_dict)
        if state_dict[k].shape != expected[k].shape
    )
    problems = [
        f"{label}: {', '.join(keys)}"
        for label, keys in (("unknown keys", unexpected), ("missing keys", missing),
                            ("shape mismatches", mis_shaped))
        if keys
    ]
    if problems:
        raise ValueError(f"{path} does not match {type(model).__name__}; " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def original_unet(config: CAiDConfig, unet_state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The original's model: an ``smp.Unet`` (1 class, sigmoid) holding ``unet_state_dict``."""
    unet = smp_unet(config)
    unet.load_state_dict(unet_state_dict, strict=True)
    return unet


@torch.no_grad()
def _verify_reconstruction(model: CAiDModel, unet_state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """Our reconstruction must equal the original ``smp.Unet``'s bit for bit (eval mode, 64 px)."""
    unet = original_unet(model.config, unet_state_dict).eval()
    was_training = model.training
    model.eval()
    x = torch.rand(1, model.config.in_channels, 64, 64, generator=torch.Generator().manual_seed(0))
    ours = model(pixel_values=x).reconstruction
    model.train(was_training)
    if not torch.equal(ours, unet(x)):
        raise RuntimeError(f"converted {path} does not reproduce the original U-Net's output")


def _save_backbone(model: CAiDModel, folder: Path) -> None:
    model.save_pretrained(folder)
    CAiDImageProcessor.from_caid_config(model.config).save_pretrained(folder)


def _moco_hyperparameters(checkpoint: Mapping) -> dict:
    """``contrastive_temperature`` and ``momentum`` from a checkpoint that stores its run's
    arguments as a mapping (``args``: ``moco_t`` / ``moco_m``); the original's own
    ``current_checkpoint.pth`` stores none, so both then keep CAiDConfig's 0.2 / 0.999
    unless given."""
    args = checkpoint.get("args")
    if not isinstance(args, Mapping):
        return {}
    found = {}
    for key, field in (("moco_t", "contrastive_temperature"), ("moco_m", "momentum")):
        if isinstance(args.get(key), (int, float)) and not isinstance(args.get(key), bool):
            found[field] = float(args[key])
    return found


def convert_original_checkpoint(
    path: str | Path,
    out_dir: str | Path,
    encoder_name: str | None = None,
    *,
    verify: bool = True,
    **config_overrides,
) -> Path:
    """Convert an original CAiD ``.pth`` checkpoint into a ``from_pretrained`` folder.

    Args:
        path: ``best_checkpoint.pth`` / ``checkpoint.pth`` (an ``smp.Unet`` state dict) or
            ``current_checkpoint.pth`` (the MoCo training state); see the module docstring
            for the formats and what is dropped.
        out_dir: output folder. A U-Net state dict becomes a :class:`CAiDModel` folder
            (config.json, model.safetensors, preprocessor_config.json). A MoCo state becomes a
            :class:`CAiDForPreTraining` folder, with its backbone also in ``out_dir/backbone``.
        encoder_name: smp encoder of the checkpoint; inferred from the weights for
            resnet18/34/50/101/152 when ``None``.
        verify: check that the converted backbone's reconstruction equals the original
            ``smp.Unet``'s exactly on a random 64 px input (cheap; eval mode).
        **config_overrides: further :class:`CAiDConfig` fields (``image_size``,
            ``contrastive_temperature`` ...). For a MoCo state ``queue_size``,
            ``projection_dim`` and ``projection_head`` come from the queue and head shapes;
            ``contrastive_temperature`` and ``momentum`` from the checkpoint's ``args``
            (``moco_t``, ``moco_m``) when it stores them as a mapping, else CAiDConfig's
            0.2 / 0.999, unless given here (``caid-hf convert-original --temperature
            --momentum``).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds arbitrary pickled objects, or keys are unknown, missing
            or mis-shaped after mapping (all named in the message).
    """
    path, out_dir = Path(path), Path(out_dir)
    checkpoint = load_original_checkpoint(path)
    is_training_state = isinstance(checkpoint.get("state_dict"), Mapping)
    state = strip_module_prefix(checkpoint["state_dict"] if is_training_state else checkpoint)
    non_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if non_tensors:
        raise ValueError(f"{path}: the state dict has entries that are not tensors: {non_tensors}")

    if not any(k.startswith("encoder_q.") for k in state):
        config = infer_unet_config(state, encoder_name, **config_overrides)
        model = CAiDModel(config)
        _load_exactly(model, state, path)
        if verify:
            _verify_reconstruction(model, state, path)
        _save_backbone(model, out_dir)
        return out_dir

    mapped, dropped, unknown = map_moco_state_dict(state)
    if unknown:
        raise ValueError(f"{path} has keys no rule maps to CAiDForPreTraining: {', '.join(unknown)}")
    if dropped:
        logger.info("dropped %d key-branch decoder/head tensors of %s (our momentum branch is "
                    "encoder + projection head only)", len(dropped), path)
    backbone_state = {k[len("caid."):]: v for k, v in mapped.items() if k.startswith("caid.")}
    queue = mapped.get("objective.queue")
    fields = {}
    if queue is not None and queue.ndim == 2:
        fields.update(projection_dim=queue.shape[0], queue_size=queue.shape[1])
    fields["projection_head"] = "mlp" if "objective.projection_head.0.weight" in mapped else "linear"
    arch = checkpoint.get("arch")
    fields.update(_moco_hyperparameters(checkpoint))  # the run's own --moco-t / --moco-m
    fields.update(config_overrides)
    config = infer_unet_config(backbone_state, encoder_name, **fields)
    if isinstance(arch, str) and arch.startswith("resnet") and arch != config.encoder_name:
        logger.warning("%s says arch=%r but its weights are a %s", path, arch, config.encoder_name)

    model = CAiDForPreTraining(config)
    _load_exactly(model, mapped, path)
    model.freeze_unused()
    if verify:
        _verify_reconstruction(model.caid, backbone_state, path)
    model.save_pretrained(out_dir)
    CAiDImageProcessor.from_caid_config(config).save_pretrained(out_dir)
    _save_backbone(model.caid, out_dir / "backbone")
    return out_dir
