"""CAiDImageProcessor: any chest X-ray input → ``pixel_values`` as in pre-training.

Pre-training sees grey images in [0, 1] (decoded to uint8 by
``caid_hf.decoding.decode_grey``, divided by 255), replicated to 3 channels,
without mean/std normalisation. This processor produces exactly that from
PIL images, numpy arrays, torch tensors, pydicom datasets and paths to image
or DICOM files, so a published backbone is fed the way it was trained.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature, get_size_dict
from transformers.image_utils import PILImageResampling
from transformers.utils import logging

from .decoding import decode_grey, pil_to_grey, scale_high_bit_depth
from .decoding import dicom_to_grey as decode_dicom_dataset
from .model_settings import DEFAULT_IMAGE_SIZE

try:  # DICOM datasets as input need pydicom (a caid-hf dependency, optional for remote code)
    from pydicom.dataset import Dataset as DicomDataset
except ImportError:  # pragma: no cover - exercised only without pydicom

    class DicomDataset:  # noqa: D101 - no instance can exist without pydicom
        pass

__all__ = ["CAiDImageProcessor"]

logger = logging.get_logger(__name__)

CAiDImageInput = Image.Image | np.ndarray | torch.Tensor | DicomDataset | str | os.PathLike
CAiDSize = int | dict[str, int]

# Output sides must divide by 2**encoder_depth to pass through the U-Net; CAiDConfig allows
# only encoder_depth 5, and the processor does not see the model's config.
SIZE_MULTIPLE = 32
_SIZE_KEY_SETS = ({"height", "width"}, {"shortest_edge"})

_CHANNELS = (1, 3, 4)
# ITU-R 601 luma, the weights PIL's convert("L") uses (and so decode_grey).
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_TORCH_MODES = {
    PILImageResampling.NEAREST: "nearest-exact",
    PILImageResampling.BILINEAR: "bilinear",
    PILImageResampling.BICUBIC: "bicubic",
}


class CAiDImageProcessorKwargs(TypedDict, total=False):
    """Settings of ``CAiDImageProcessor`` (what ``from_pretrained(..., **kwargs)`` may override)."""

    size: CAiDSize
    resample: int
    do_resize: bool
    bits_stored: int | None


class CAiDImageProcessor(BaseImageProcessor):
    """Turn chest X-rays in any common form into CAiD ``pixel_values``.

    Each image becomes grey in [0, 1], is resized to the size ``size`` asks for
    (bilinear with antialiasing, as the pre-training crops) and replicated to
    3 channels. There is no mean/std normalisation: the model was pre-trained
    on [0, 1] inputs.

    ``size``, as an int or a transformers size dict (every side a positive
    multiple of 32, the CAiD U-Net downsampling 5 times, so the output feeds
    the model as is):

    - ``S`` or ``{"height": S, "width": S}``: S × S, as pre-training's square
      views; an int stays an int in ``to_dict``/``save_pretrained``.
    - ``{"height": H, "width": W}``: exactly H × W (the aspect ratio is not kept).
    - ``{"shortest_edge": S}``: the short side becomes S and the long side is
      scaled by the same factor, then rounded to the nearest multiple of 32 (so
      the aspect ratio is kept up to at most 16 px on the long side); nothing
      is cropped. Images of different aspect ratios then get different sizes
      (a batch stacks only with ``return_tensors=None``).

    Grey conversion, by input:

    - 8-bit integers (uint8 arrays/tensors, PIL ``L``): ``value / 255``.
    - Other integers (uint16, int16, int32 …, PIL ``I;16``/``I``): scaled by
      bit depth like ``decode_grey``: ``bits_stored`` when set, else (for a PNG
      path) the file's sBIT chunk, else the smallest of 8/10/12/14/16 bits that
      holds the image's maximum, so 12-bit data maps 4095 to 1.0; negative
      values clip to 0. The result is quantised to 8 bits, as in pre-training.
    - Floats (arrays, tensors, PIL ``F``): **assumed to be in [0, 1] already**
      and clipped to it (a warning is logged when values lie well outside);
      non-finite values are refused.
    - RGB/RGBA: luminance (ITU-R 601, PIL's ``convert("L")``), alpha dropped.
    - DICOM (``pydicom.Dataset`` or a path, by suffix or the ``DICM`` preamble):
      pre-training's own decoder (``caid_hf.decoding.dicom_to_grey``): the modality
      LUT or RescaleSlope/Intercept, then the VOI LUT or WindowCenter/Width, mapped to
      0..255 over the displayed range (the VOI output range when there is one, else the
      stored bit range of Bits Stored or ``bits_stored``), MONOCHROME1 inverted so that air is dark,
      quantised to 8 bits as in pre-training and divided by 255. Multi-frame datasets
      are refused.

    Arrays and tensors may be [H, W], [H, W, C] or [C, H, W] with C in 1, 3, 4
    (channels-last wins for numpy when both fit, channels-first for torch);
    a 4-D array or tensor is a batch along its first axis.

    Args:
        size: output size (see above): an int, ``{"height", "width"}`` or
            ``{"shortest_edge"}``; by default 224, the model's ``image_size``.
        resample: ``PILImageResampling`` filter: BILINEAR (default), BICUBIC or
            NEAREST.
        do_resize: resize to ``size``; without it, images keep their size (a
            batch then needs equal sizes to be stacked, and the model accepts
            only sides that are multiples of 32).
        bits_stored: the bit depth of integer pixels deeper than 8 bits (16-bit
            PNG, uint16 arrays, DICOM), as the model's training data was read with
            ``--bits_stored``; None: the file's header (PNG sBIT, DICOM Bits
            Stored), else the per-image guess above.

    Raises:
        ValueError: ``size`` is not such an int or dict; the message names the
            offending key.
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = CAiDImageProcessorKwargs

    def __init__(
        self,
        size: CAiDSize = DEFAULT_IMAGE_SIZE,
        resample: int = PILImageResampling.BILINEAR,
        do_resize: bool = True,
        bits_stored: int | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("image_processor_type", None)  # written by to_dict, not a setting
        super().__init__(**kwargs)
        if bits_stored is not None and not 1 <= int(bits_stored) <= 32:
            raise ValueError(f"bits_stored must be in [1, 32] or None, got {bits_stored!r}")
        self.bits_stored = None if bits_stored is None else int(bits_stored)
        self.size = _check_size(size)
        self.resample = int(resample)
        if self.resample not in _TORCH_MODES:
            raise ValueError(
                f"resample must be one of NEAREST, BILINEAR, BICUBIC (PILImageResampling), "
                f"got {resample!r}"
            )
        self.do_resize = bool(do_resize)

    @classmethod
    def from_caid_config(cls, config: Any, **kwargs: Any) -> CAiDImageProcessor:
        """The processor matching a ``CAiDConfig``: ``size = config.image_size``."""
        return cls(size=config.image_size, **kwargs)

    def __call__(
        self, images: CAiDImageInput | Sequence[CAiDImageInput], **kwargs: Any
    ) -> BatchFeature:
        """Same as ``preprocess``."""
        return self.preprocess(images, **kwargs)

    def preprocess(
        self,
        images: CAiDImageInput | Sequence[CAiDImageInput],
        return_tensors: str | None = None,
        size: CAiDSize | None = None,
        do_resize: bool | None = None,
        resample: int | None = None,
    ) -> BatchFeature:
        """Convert one image or a list of images to ``pixel_values``.

        Args:
            images: a PIL image, numpy array, torch tensor, ``pydicom.Dataset``,
                or path (str/Path) to an image or ``.dcm`` file; or a list of
                these, types mixed freely.
            return_tensors: ``"pt"`` (torch), ``"np"`` (numpy) or ``None`` (a
                list of numpy arrays, one per image).
            size, do_resize, resample: override the processor's settings for this call.

        Returns:
            ``BatchFeature`` with ``pixel_values``: float32 [B, 3, H, W] in
            [0, 1], the 3 channels identical; H × W as ``size`` says (the
            input's own size without resizing).

        Raises:
            FileNotFoundError: a path does not exist.
            ValueError: an input of unsupported type, shape or content; the
                message names the input (its position, or its path). A bad
                ``size``; the message names the key.
        """
        size = self.size if size is None else _check_size(size)
        if not isinstance(size, dict):
            size = {"height": size, "width": size}
        do_resize = self.do_resize if do_resize is None else do_resize
        mode = _TORCH_MODES.get(self.resample if resample is None else int(resample))
        if mode is None:
            raise ValueError(f"resample must be NEAREST, BILINEAR or BICUBIC, got {resample!r}")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")

        pixel_values = []
        for name, item in _flatten(images):
            grey = torch.from_numpy(np.ascontiguousarray(
                to_grey(item, name, self.bits_stored)))[None, None]
            target = _output_size(tuple(grey.shape[-2:]), size)
            if do_resize and tuple(grey.shape[-2:]) != target:
                grey = F.interpolate(
                    grey, size=target, mode=mode, antialias=mode != "nearest-exact"
                ).clamp_(0.0, 1.0)  # bicubic overshoots
            pixel_values.append(grey[0].expand(3, -1, -1).contiguous())

        if return_tensors is None:
            return BatchFeature({"pixel_values": [p.numpy() for p in pixel_values]})
        if len({tuple(p.shape) for p in pixel_values}) > 1:
            raise ValueError(
                "images of different sizes cannot be stacked (do_resize=False, or size "
                "{'shortest_edge': ...} on images of different aspect ratios); resize them to "
                "one size, e.g. size={'height': H, 'width': W}, or use return_tensors=None"
            )
        return BatchFeature({"pixel_values": torch.stack(pixel_values)}, tensor_type=return_tensors)


    def post_process_semantic_segmentation(
        self, outputs: Any, target_sizes: Sequence[tuple[int, int]] | None = None,
        threshold: float = 0.5,
    ) -> list[torch.Tensor]:
        """Label maps [H, W] (long) of a segmentation model's output, one per image.

        Several classes (``logits`` [B, C, h, w], C > 1): each pixel gets its most likely
        class. One class (C = 1, a binary U-Net): 1 where the sigmoid probability reaches
        ``threshold``, else 0. ``target_sizes`` ((height, width) per image, e.g. the
        original images' sizes) resizes the logits (bilinear) first; without it the maps
        keep the model's output size.
        """
        return [label_map for label_map, _ in self._label_maps(outputs, target_sizes, threshold)]

    def post_process_instance_segmentation(
        self, outputs: Any, threshold: float = 0.5, mask_threshold: float = 0.5,
        target_sizes: Sequence[tuple[int, int]] | None = None, **kwargs: Any,
    ) -> list[dict[str, Any]]:
        """One segment per class present, in the format of ``pipeline("image-segmentation")``:
        per image ``{"segmentation": [H, W] segment ids (0: none), "segments_info": [{"id",
        "label_id", "score"}]}``. The pixels of a segment are those of
        :meth:`post_process_semantic_segmentation` (``mask_threshold`` is the binary
        threshold); a binary model's only segment is its foreground (label 0). A segment's
        ``score`` is the highest probability of its class among its pixels; segments scoring
        below ``threshold`` are left out.
        """
        results = []
        for label_map, probabilities in self._label_maps(outputs, target_sizes, mask_threshold):
            binary = probabilities.shape[0] == 1
            segmentation = torch.zeros_like(label_map)
            segments = []
            classes = [0] if binary else label_map.unique().tolist()
            for label in classes:
                pixels = label_map == (1 if binary else label)
                if not pixels.any():
                    continue
                score = float(probabilities[label][pixels].max())
                if score < threshold:
                    continue
                segment_id = len(segments) + 1
                segmentation[pixels] = segment_id
                segments.append({"id": segment_id, "label_id": int(label), "score": score})
            results.append({"segmentation": segmentation, "segments_info": segments})
        return results

    def _label_maps(self, outputs: Any, target_sizes, threshold: float):
        """(label map [H, W], class probabilities [C, H, W]) per image."""
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits
        logits = logits.detach().float()
        if target_sizes is not None and len(target_sizes) != logits.shape[0]:
            raise ValueError(f"target_sizes has {len(target_sizes)} sizes for "
                             f"{logits.shape[0]} images")
        for i, image_logits in enumerate(logits):
            if target_sizes is not None:
                size = tuple(int(v) for v in target_sizes[i])
                image_logits = F.interpolate(image_logits[None], size=size, mode="bilinear",
                                             align_corners=False)[0]
            if image_logits.shape[0] == 1:
                probabilities = image_logits.sigmoid()
                yield (probabilities[0] >= threshold).long(), probabilities
            else:
                probabilities = image_logits.softmax(dim=0)
                yield probabilities.argmax(dim=0), probabilities


def _check_size(size: Any) -> CAiDSize:
    """``size`` validated: an int stays an int, a dict becomes a plain dict of ints.

    Raises:
        ValueError: not an int or a dict; an unknown or missing key, or a side that is not a
            positive multiple of ``SIZE_MULTIPLE``, named in the message.
    """
    if not isinstance(size, Mapping):
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool):
            raise ValueError(
                f"size must be an int or a dict {{'height': H, 'width': W}} or "
                f"{{'shortest_edge': S}}, got {size!r}"
            )
        return _check_side("size", size)
    keys = set(size)
    # a precise message first: get_size_dict's names the valid key sets, not the wrong key
    unknown = sorted(str(k) for k in keys - set().union(*_SIZE_KEY_SETS))
    if unknown:
        raise ValueError(
            f"size has unsupported key {unknown[0]!r}; CAiDImageProcessor takes "
            f"{{'height': H, 'width': W}} or {{'shortest_edge': S}}, got {dict(size)!r}"
        )
    if "shortest_edge" in keys and len(keys) > 1:
        raise ValueError(
            f"size takes either 'height' and 'width' or 'shortest_edge', not both; "
            f"got {dict(size)!r}"
        )
    if keys not in _SIZE_KEY_SETS:
        missing = "height" if "height" not in keys else "width"
        problem = "is an empty dict" if not keys else f"has no {missing!r} key"
        raise ValueError(
            f"size {problem}: give 'height' and 'width' together, or 'shortest_edge'; "
            f"got {dict(size)!r}"
        )
    # transformers' own check of the key sets, so the dict is one its processors accept
    return get_size_dict({key: _check_side(f"size[{key!r}]", size[key]) for key in size})


def _check_side(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if value % SIZE_MULTIPLE:
        raise ValueError(
            f"{name} must be a multiple of {SIZE_MULTIPLE} (the CAiD U-Net downsamples 5 times, "
            f"so the model refuses other sides), got {value}"
        )
    return int(value)


def _output_size(shape: tuple[int, int], size: dict[str, int]) -> tuple[int, int]:
    """(height, width) an image of ``shape`` (height, width) is resized to, by ``size``."""
    if "shortest_edge" in size:
        edge = size["shortest_edge"]
        scale = edge / min(shape)
        # the long side only approximately keeps the aspect ratio: it must divide by 32 too
        long = max(SIZE_MULTIPLE, SIZE_MULTIPLE * int(max(shape) * scale / SIZE_MULTIPLE + 0.5))
        return (edge, long) if shape[0] <= shape[1] else (long, edge)
    return size["height"], size["width"]


def _flatten(images: Any) -> list[tuple[str, Any]]:
    """(name, item) pairs: a list/tuple or 4-D array/tensor is a batch, anything else one image."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given (empty list)")
        items = list(images)
    elif isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        items = list(images)
    else:
        return [(f"image ({_describe(images)})", images)]
    return [(f"image {i} ({_describe(item)})", item) for i, item in enumerate(items)]


def _describe(item: Any) -> str:
    if isinstance(item, (str, os.PathLike)):
        return repr(os.fspath(item))
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return f"{type(item).__name__} {tuple(item.shape)} {item.dtype}"
    return type(item).__name__


def to_grey(image: CAiDImageInput, name: str = "image", bits_stored: int | None = None
            ) -> np.ndarray:
    """One image as grey float32 [H, W] in [0, 1] (see ``CAiDImageProcessor`` for the rules).

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: unsupported type, shape or content; the message starts with ``name``.
    """
    if isinstance(image, (str, os.PathLike)):
        return _path_to_grey(Path(image), bits_stored)
    if isinstance(image, DicomDataset):
        return dicom_to_grey(image, name, bits_stored)
    if isinstance(image, Image.Image):
        return _pil_to_grey(image, name, bits_stored)
    if isinstance(image, torch.Tensor):
        return _array_to_grey(_tensor_to_numpy(image), name, channels_first=True,
                              bits_stored=bits_stored)
    if isinstance(image, np.ndarray):
        return _array_to_grey(image, name, channels_first=False, bits_stored=bits_stored)
    raise ValueError(
        f"{name}: unsupported input type {type(image).__name__}; expected a PIL image, numpy "
        f"array, torch tensor, pydicom Dataset or a path to an image or DICOM file"
    )


def _path_to_grey(path: Path, bits_stored: int | None = None) -> np.ndarray:
    """A file (image or DICOM, by suffix or the DICM preamble) through pre-training's
    decoder, :func:`caid_hf.decoding.decode_grey`."""
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    return decode_grey(path, bits_stored).astype(np.float32) / 255.0


def _pil_to_grey(image: Image.Image, name: str, bits_stored: int | None = None) -> np.ndarray:
    if image.mode == "F":
        return _array_to_grey(np.asarray(image), name, channels_first=False)
    grey = pil_to_grey(image, bits_stored)
    if grey.size == 0:
        raise ValueError(f"{name}: empty image")
    return grey.astype(np.float32) / 255.0


def _tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        return tensor.float().numpy()
    if tensor.dtype in (torch.uint8, torch.bool):
        return tensor.numpy()
    if tensor.is_complex():
        raise ValueError(f"complex tensor {tuple(tensor.shape)} is not an image")
    return tensor.to(torch.int64).numpy()  # numpy lacks some torch integer types (uint16/32)


def _array_to_grey(array: np.ndarray, name: str, channels_first: bool,
                   bits_stored: int | None = None) -> np.ndarray:
    """[H, W], [H, W, C] or [C, H, W] → [H, W] float32 in [0, 1]."""
    if array.size == 0:
        raise ValueError(f"{name}: empty array of shape {array.shape}")
    if array.ndim == 3:
        last, first = array.shape[-1] in _CHANNELS, array.shape[0] in _CHANNELS
        if first and (channels_first or not last):
            array = np.moveaxis(array, 0, -1)
        elif not last:
            raise ValueError(
                f"{name}: shape {array.shape} has no channel axis of size 1, 3 or 4 "
                f"(expected [H, W], [H, W, C] or [C, H, W])"
            )
    elif array.ndim != 2:
        raise ValueError(
            f"{name}: shape {array.shape} is not an image (expected [H, W], [H, W, C] or [C, H, W])"
        )

    if array.dtype == np.bool_:
        values = array.astype(np.float32)
    elif array.dtype == np.uint8:
        values = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.integer):
        values = scale_high_bit_depth(array, bits_stored).astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float32)
        if not np.isfinite(values).all():
            raise ValueError(f"{name}: float image holds NaN or infinite values")
        low, high = float(values.min()), float(values.max())
        if low < -0.01 or high > 1.01:
            logger.warning_once(
                f"float images are taken to be in [0, 1]; got values in [{low:g}, {high:g}], "
                f"clipped. Pass integer arrays to have them scaled by bit depth."
            )
        values = np.clip(values, 0.0, 1.0)
    else:
        raise ValueError(f"{name}: unsupported dtype {array.dtype}")

    if values.ndim == 3:
        channels = values.shape[-1]
        values = values[..., 0] if channels == 1 else values[..., :3] @ _LUMA  # alpha dropped
    return np.clip(values, 0.0, 1.0).astype(np.float32, copy=False)


def dicom_to_grey(dataset: DicomDataset, name: str = "DICOM dataset",
                  bits_stored: int | None = None) -> np.ndarray:
    """One DICOM image as grey float32 [H, W] in [0, 1]: pre-training's decoder
    (:func:`caid_hf.decoding.dicom_to_grey`: modality LUT / rescale, VOI LUT / window,
    MONOCHROME1 inverted, quantised to 8 bits) divided by 255, so the processor feeds a
    model exactly the pixels it was trained on.

    Raises:
        ValueError: no pixel data, multi-frame, or compressed pixel data whose decoder is
            not installed (the message names the pip extra).
    """
    return decode_dicom_dataset(dataset, name, bits_stored).astype(np.float32) / 255.0


# save_pretrained writes this file (and decoding.py) beside preprocessor_config.json and names
# the class in its auto_map
CAiDImageProcessor.register_for_auto_class("AutoImageProcessor")
