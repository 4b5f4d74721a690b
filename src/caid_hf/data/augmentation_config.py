"""Every setting of the view augmentation, written once with its default, help and range.

:class:`AugmentationConfig` is what :class:`~caid_hf.data.augment.ViewAugmenter` reads, and
its fields are ``caid-hf pretrain``'s augmentation flags and YAML keys as they are
(:class:`caid_hf.training.arguments.DataArguments` inherits them). Standard library only,
so that a command's arguments are checked before torch is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..model_settings import DEFAULT_IMAGE_SIZE

_PROBABILITIES = ("color_jitter_p", "blur_p", "flip_p", "cutout_p", "outpaint_p", "shuffle_p",
                  "box_stop_p")
_RANGES = ("blur_sigma", "cutout_size", "outpaint_shrink", "shuffle_block")
_WHOLE = (("max_boxes", 1), ("shuffle_swaps", 0), ("margin", 0), ("reference_size", 1))


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class AugmentationConfig:
    """How the two views of an image are made; the defaults are the original's.

    Pixel sizes (``blur_sigma``, ``cutout_size``, ``outpaint_shrink``, ``shuffle_block``,
    ``margin``) are for a ``reference_size`` view and are scaled by ``S / reference_size``
    for an S-px view (see :meth:`geometry`), unless ``reference_compat`` is set.

    ``saturation`` and ``hue`` are kept for parity with the original's ``ColorJitter`` but
    change nothing on grey images: saturation blends the image with its own grey version
    (itself), and a hue rotation moves no colour of a pixel whose saturation is zero.
    Creating one checks every field and raises one ``ValueError`` naming every invalid one.
    """

    brightness: float = _setting(0.4, "Brightness jitter strength (ColorJitter's brightness).")
    contrast: float = _setting(0.4, "Contrast jitter strength.")
    saturation: float = _setting(
        0.4, "Saturation jitter strength (no effect on grey images; kept for parity).")
    hue: float = _setting(0.1, "Hue jitter strength, in [0, 0.5] (no effect on grey images).")
    color_jitter_p: float = _setting(
        0.8, "Probability of the brightness/contrast jitter of each view (0.8 as the "
             "original). Lower it when images differ mainly in global brightness.")
    blur_p: float = _setting(0.5, "Probability of the Gaussian blur of each view.")
    blur_sigma: tuple[float, float] = _setting(
        (0.1, 2.0), "Gaussian blur sigma range, two numbers (px of a reference_size view).")
    flip_p: float = _setting(0.5, "Probability of the horizontal flip of each view.")
    cutout_p: float = _setting(0.30, "CAiD distortion: probability of cut-out (boxes set to 0).")
    outpaint_p: float = _setting(
        0.05, "CAiD distortion: probability of out-painting (all but windows set to 0).")
    shuffle_p: float = _setting(
        0.30, "CAiD distortion: probability of local shuffling (block swaps).")
    max_boxes: int = _setting(10, "CAiD distortion: most cut-out boxes / out-painting windows.")
    box_stop_p: float = _setting(
        0.1, "CAiD distortion: chance to stop after each box or window.")
    cutout_size: tuple[int, int] = _setting(
        (10, 70), "CAiD distortion: cut-out box side range, two integers (px at reference_size).")
    outpaint_shrink: tuple[int, int] = _setting(
        (50, 70), "CAiD distortion: out-painting window shrink range, two integers (px).")
    shuffle_block: tuple[int, int] = _setting(
        (10, 15), "CAiD distortion: shuffled block side range, two integers (px).")
    shuffle_swaps: int = _setting(10, "CAiD distortion: block swaps of local shuffling.")
    margin: int = _setting(3, "CAiD distortion: margin kept from the border (px).")
    reference_size: int = _setting(
        DEFAULT_IMAGE_SIZE, "View side the pixel sizes above refer to; scaled for other views.")
    distort_key_view: bool = _setting(
        True, "Distort the second (key) view as well as the first, as the original does.")
    reference_compat: bool = _setting(
        False, "Two quirks of the original's augmentation: the reconstruction target is not "
               "flipped with the view, and distortion sizes are in absolute pixels (for 224 px "
               "views) instead of scaled to the view size.")

    def __post_init__(self) -> None:
        mistakes = self.mistakes()
        if mistakes:
            raise ValueError("\n".join(mistakes))

    def mistakes(self) -> list[str]:
        """A message per invalid field, each starting with the field's name (pairs given as
        lists, from YAML or flags, become tuples first)."""
        mistakes = []
        for name in _RANGES:
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                mistakes.append(f"{name} must be a (low, high) pair, got {value!r}")
                continue
            low, high = value
            setattr(self, name, (low, high))
            positive = name == "blur_sigma"  # sigma may be fractional, pixel sizes are >= 1
            if (low <= 0 if positive else low < 1) or low > high:
                mistakes.append(f"{name} must be a (low, high) pair with "
                                f"{'0 <' if positive else '1 <='} low <= high, got {(low, high)}")
        for name in _PROBABILITIES:
            if not 0.0 <= getattr(self, name) <= 1.0:
                mistakes.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        total = self.cutout_p + self.outpaint_p + self.shuffle_p
        if total > 1.0 + 1e-9:
            mistakes.append(f"cutout_p + outpaint_p + shuffle_p must be <= 1, got {self.cutout_p} "
                            f"+ {self.outpaint_p} + {self.shuffle_p} = {total:g}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                mistakes.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            mistakes.append(f"hue must be in [0, 0.5], got {self.hue}")
        for name, low in _WHOLE:
            value = getattr(self, name)
            if not math.isfinite(value) or int(value) != value or value < low:
                mistakes.append(f"{name} must be an integer >= {low}, got {value}")
        return mistakes

    def augmentation_config(self) -> AugmentationConfig:
        """These settings alone, as an :class:`AugmentationConfig` (for the arguments classes
        that inherit them)."""
        return AugmentationConfig(**{name: getattr(self, name)
                                     for name in AugmentationConfig.__dataclass_fields__})

    def geometry(self, size: int) -> PixelGeometry:
        """Pixel sizes for an ``size``-px view.

        Integer sizes are ``round(v * size / reference_size)`` (at least 1; the
        margin at least 1 when the reference margin is positive), sigma is
        scaled without rounding. With ``reference_compat`` nothing is scaled.
        """
        scale = 1.0 if self.reference_compat else size / self.reference_size

        def pixels(value: int) -> int:
            return max(1, math.floor(value * scale + 0.5))

        def pair(values: tuple[int, int]) -> tuple[int, int]:
            return pixels(values[0]), pixels(values[1])

        return PixelGeometry(
            size=size,
            blur_sigma=(self.blur_sigma[0] * scale, self.blur_sigma[1] * scale),
            cutout_size=pair(self.cutout_size),
            outpaint_shrink=pair(self.outpaint_shrink),
            shuffle_block=pair(self.shuffle_block),
            margin=pixels(self.margin) if self.margin > 0 else 0,
            reference_compat=self.reference_compat,
        )


@dataclass(frozen=True)
class PixelGeometry:
    """The config's pixel sizes resolved for one view size (see ``AugmentationConfig.geometry``)."""

    size: int
    blur_sigma: tuple[float, float]
    cutout_size: tuple[int, int]
    outpaint_shrink: tuple[int, int]
    shuffle_block: tuple[int, int]
    margin: int
    reference_compat: bool = False

    def check_fits(self) -> None:
        """Raise ``ValueError`` when boxes, windows or blocks cannot be placed inside the margin."""
        size, margin = self.size, self.margin
        problems = []
        if self.cutout_size[1] + 2 * margin > size:
            problems.append(f"cut-out boxes up to {self.cutout_size[1]} px")
        if self.outpaint_shrink[1] >= size or self.outpaint_shrink[0] < 2 * margin:
            problems.append(f"out-painting windows of {size} - {self.outpaint_shrink} px")
        if self.shuffle_block[1] + 2 * margin > size:
            problems.append(f"shuffle blocks up to {self.shuffle_block[1]} px")
        if not problems:
            return
        message = f"{', '.join(problems)} with a {margin}-px margin do not fit a {size}-px view"
        if self.reference_compat:
            needed = max(
                self.cutout_size[1] + 2 * margin,
                self.shuffle_block[1] + 2 * margin,
                self.outpaint_shrink[1] + 1,
            )
            message += (
                "; reference_compat=True keeps the reference's absolute pixel sizes (made for "
                f"224-px views): use views of at least {needed} px, or reference_compat=False "
                "to scale the sizes with the view"
            )
        raise ValueError(message)
