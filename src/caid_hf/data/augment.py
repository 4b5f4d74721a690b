"""Batched, on-device view augmentation of CAiD (the paper's views and distortions).

The CPU loader only decodes and crops: a batch arrives as uint8 ``[B, 2, S, S]``
(view 0 = query, view 1 = key, one grey channel) on the training device. Here,
per view and in one batch of ``2B`` images: colour jitter (p 0.8), Gaussian
blur (p 0.5), horizontal flip (p 0.5) and, in CAiD mode, one of cut-out (30 %),
out-painting (5 %), local shuffle (30 %) or nothing (35 %). The
reconstruction target is the query view's crop before all of that, flipped
with the query view.

Every random number comes from one ``torch.Generator`` on the batch's device,
drawn in a fixed order and with shapes that do not depend on the data, so a
seed fixes the output and the generator state can be checkpointed.

Hand-written rather than taken from a library: torchvision's v2 transforms
draw one parameter set per call (the whole batch shares it) from the global
RNG, and kornia's per-sample augmentations also draw from the global RNG; none
of them has CAiD's three distortions (boxes with a stopping rule,
out-painting windows, block swaps).

Sizes are in pixels of a ``reference_size`` (224) view and scale with the
view, so a 448-px view gets the same relative distortion;
``reference_compat=True`` keeps the reference's absolute pixels.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any

import torch
import torch.nn.functional as F

from .augmentation_config import AugmentationConfig, PixelGeometry

__all__ = [
    "AugmentationConfig",
    "AugmentedViews",
    "Boxes",
    "Distortion",
    "PixelGeometry",
    "Swaps",
    "ViewAugmenter",
    "color_jitter",
    "cutout_mask",
    "distort",
    "gaussian_blur",
    "local_shuffle",
    "outpaint_mask",
    "random_gaussian_blur",
    "random_horizontal_flip",
    "sample_boxes",
    "sample_distortion_codes",
    "sample_swaps",
]


class Distortion(IntEnum):
    """Codes of the context-prediction distortion applied to a view."""

    NONE = 0
    CUTOUT = 1
    OUTPAINT = 2
    SHUFFLE = 3


@dataclass
class AugmentedViews:
    """Output of :class:`ViewAugmenter`.

    Attributes:
        query: float32 [B, 3, S, S] in [0, 1], the query view (3 equal channels, an ``expand``).
        key: float32 [B, 3, S, S] in [0, 1], the key view.
        target: float32 [B, 1, S, S] in [0, 1], the query view's crop before appearance
            changes and distortion (flipped with it), or None without context prediction.
        distortion: int64 [B], the query view's :class:`Distortion` code.
        key_target: float32 [B, 1, S, S], the same for the key view, made only when the
            augmenter was asked for it (``key_target=True``, for ``reconstruct_views="both"``).
    """

    query: torch.Tensor
    key: torch.Tensor
    target: torch.Tensor | None
    distortion: torch.Tensor
    key_target: torch.Tensor | None = None


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _process_index() -> int:
    """Rank of this process in the default process group (0 without one)."""
    return torch.distributed.get_rank() if _distributed() else 0


def _world_size() -> int:
    return torch.distributed.get_world_size() if _distributed() else 1


def _rand(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device)


def _randint(generator: torch.Generator, low: int, high: int, *shape: int) -> torch.Tensor:
    """Integers uniform in ``low..high`` inclusive, int64."""
    return torch.randint(low, high + 1, shape, generator=generator, device=generator.device)


def _randint_below(generator: torch.Generator, count: torch.Tensor) -> torch.Tensor:
    """Per-element integers uniform in ``0..count-1`` (``count`` int64 >= 1, any shape)."""
    draw = (_rand(generator, *count.shape) * count).long()
    return torch.minimum(draw, count - 1)  # float rounding can reach ``count``


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def color_jitter(
    x: torch.Tensor,
    generator: torch.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    p: float = 0.8,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's ``ColorJitter`` on grey images, per sample, with probability ``p``.

    Brightness ``b ~ U(1 - brightness, 1 + brightness)``: ``clamp(b x)``; contrast
    ``c ~ U(1 - contrast, 1 + contrast)``: ``clamp(c x + (1 - c) mean(x))``, the
    mean taken per image over the input of that step. torchvision applies its
    four operations in a random order; saturation and hue are no-ops on grey
    images, so only whether brightness comes before contrast matters (p 1/2).

    Draws four uniforms per sample, in this order: applied (``< p``), ``b``,
    ``c``, brightness first (``< 0.5``).

    Args:
        x: float [B, C, H, W] in [0, 1].
        inplace: write the result into ``x`` (saves a copy of the batch).
        generator: the random stream, on ``x``'s device.

    Returns:
        ``(out, applied)``: out like ``x`` in [0, 1] (``x`` exactly where not
        applied); applied bool [B].
    """
    n = x.shape[0]
    applied = _rand(generator, n) < p
    b = 1.0 - brightness + 2.0 * brightness * _rand(generator, n)
    b = b.clamp_min(0.0)
    c = 1.0 - contrast + 2.0 * contrast * _rand(generator, n)
    c = c.clamp_min(0.0)
    brightness_first = _rand(generator, n) < 0.5
    one = torch.ones_like(b)
    # Both steps are clamp(alpha * x + (1 - alpha) * anchor), anchor 0 for brightness and
    # the mean for contrast; alpha = 1 leaves a sample exactly as it is. One fused
    # multiply-add and one in-place clamp per step.
    for step_is_brightness in (brightness_first, ~brightness_first):
        alpha = torch.where(applied, torch.where(step_is_brightness, b, c), one)
        use_mean = applied & ~step_is_brightness
        anchor = torch.where(use_mean, x.mean(dim=(1, 2, 3)), torch.zeros_like(b))
        beta = _per_sample((1.0 - alpha) * anchor)
        if inplace:
            x = torch.addcmul(beta, _per_sample(alpha), x, out=x)
        else:
            x = torch.addcmul(beta, _per_sample(alpha), x)
            inplace = True  # the second step may reuse the first step's new tensor
        x.clamp_(0.0, 1.0)
    return x, applied


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample, reflect padding.

    Args:
        x: float [B, C, H, W].
        sigma: float [B] (> 0), in pixels.
        radius: kernel half-width; default ``ceil(3 * max(sigma))`` (reads
            ``sigma`` back to the host, so pass it on an accelerator). Clipped
            to ``min(H, W) - 1``.

    Returns:
        float [B, C, H, W]; for x in [0, 1] the result is in [0, 1] up to float
        rounding (the kernel sums to 1 and is non-negative).
    """
    n, channels, height, width = x.shape
    if radius is None:
        radius = math.ceil(3.0 * float(sigma.max()))
    radius = max(0, min(radius, height - 1, width - 1))
    if radius == 0 or n == 0:
        return x.clone()
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma.to(x.dtype).view(-1, 1)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [B, 2 radius + 1]
    # Each pass is a sum of shifted copies weighted per sample: 2 radius + 1 fused
    # multiply-adds over the batch, about 3x faster on a CPU than a grouped convolution
    # with one kernel per image, and the same sums in the same order.
    rows = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    out = rows[..., :width] * _per_sample(kernel[:, 0])
    for tap in range(1, 2 * radius + 1):
        out.addcmul_(rows[..., tap : tap + width], _per_sample(kernel[:, tap]))
    cols = F.pad(out, (0, 0, radius, radius), mode="reflect")
    out = cols[..., :height, :] * _per_sample(kernel[:, 0])
    for tap in range(1, 2 * radius + 1):
        out.addcmul_(cols[..., tap : tap + height, :], _per_sample(kernel[:, tap]))
    return out


def _on_rows(x: torch.Tensor, rows: torch.Tensor, work, inplace: bool = False) -> torch.Tensor:
    """``x`` with samples ``rows`` (bool [B]) replaced by ``work(x[rows], rows)``.

    On a CPU only the selected samples are computed (index, compute, copy back), into ``x``
    itself when ``inplace``; on an accelerator everything is computed and selected with
    ``torch.where``, which avoids a host synchronisation. Both give the same values.
    """
    if x.device.type != "cpu":
        return torch.where(_per_sample(rows), work(x, None), x)
    index = rows.nonzero().squeeze(1)
    if index.numel() == 0:
        return x if inplace else x.clone()
    part = work(x.index_select(0, index), index)
    return x.index_copy_(0, index, part) if inplace else x.index_copy(0, index, part)


def random_gaussian_blur(
    x: torch.Tensor,
    generator: torch.Generator,
    p: float = 0.5,
    sigma_range: tuple[float, float] = (0.1, 2.0),
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blur each sample with probability ``p``, sigma ~ U(sigma_range) pixels.

    Args:
        x: float [B, C, H, W] in [0, 1].
        inplace: write the result into ``x`` (saves a copy of the batch).

    Returns:
        ``(out, applied)``: out float [B, C, H, W] in [0, 1], ``x`` exactly where
        not applied; applied bool [B].
    """
    n = x.shape[0]
    applied = _rand(generator, n) < p
    low, high = sigma_range
    sigma = low + (high - low) * _rand(generator, n)
    radius = math.ceil(3.0 * high)

    def blur(part: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        part_sigma = sigma if index is None else sigma.index_select(0, index)
        return gaussian_blur(part, part_sigma, radius).clamp_(0.0, 1.0)

    return _on_rows(x, applied, blur, inplace), applied


def random_horizontal_flip(
    x: torch.Tensor, generator: torch.Generator, p: float = 0.5, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror each sample left-right with probability ``p``.

    Args:
        x: [B, C, H, W], any dtype.
        inplace: write the result into ``x`` (saves a copy of the batch).

    Returns:
        ``(out, flipped)``: out like ``x``; flipped bool [B].
    """
    flipped = _rand(generator, x.shape[0]) < p
    return _on_rows(x, flipped, lambda part, _: part.flip(-1), inplace), flipped


@dataclass
class Boxes:
    """Up to K axis-aligned boxes per sample; all int64/bool [B, K].

    A box covers rows ``top .. top + height - 1`` and columns ``left .. left + width - 1``;
    only boxes with ``active`` count.
    """

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    active: torch.Tensor

    def select(self, index: torch.Tensor) -> Boxes:
        """The boxes of samples ``index`` (int64 [N])."""
        return Boxes(*(t.index_select(0, index) for t in
                       (self.top, self.left, self.height, self.width, self.active)))

    @property
    def count(self) -> torch.Tensor:
        """int64 [B]: number of active boxes per sample."""
        return self.active.sum(dim=1)

    def mask(self, size: int) -> torch.Tensor:
        """bool [B, 1, size, size]: True on pixels covered by at least one active box."""
        coords = torch.arange(size, device=self.top.device)

        def inside(start: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
            start = start.unsqueeze(-1)
            return (
                (coords >= start)
                & (coords < start + extent.unsqueeze(-1))
                & self.active.unsqueeze(-1)
            )

        rows = inside(self.top, self.height).float()  # [B, K, S]
        cols = inside(self.left, self.width).float()
        # rows^T @ cols counts, per pixel, the boxes covering it (small exact integers).
        return (torch.bmm(rows.transpose(1, 2), cols) > 0.5).unsqueeze(1)


def sample_boxes(
    generator: torch.Generator,
    batch_size: int,
    size: int,
    side_range: tuple[int, int],
    max_boxes: int = 10,
    stop_p: float = 0.1,
    margin: int = 3,
) -> Boxes:
    """Draw up to ``max_boxes`` boxes per sample inside a ``margin``-px border.

    The first box is always active; after each box the sequence stops with
    probability ``stop_p``, so ``P(n = k) = (1 - stop_p)^(k-1) stop_p`` for
    ``k < max_boxes``. Height and width are independent, uniform in
    ``side_range`` (inclusive); the top-left corner is uniform in
    ``margin .. size - side - margin`` (inclusive). ``max_boxes`` boxes are
    drawn for every sample, so the stream consumed does not depend on the data.
    """
    shape = (batch_size, max_boxes)
    height = _randint(generator, *side_range, *shape)
    width = _randint(generator, *side_range, *shape)
    top = margin + _randint_below(generator, size - height - 2 * margin + 1)
    left = margin + _randint_below(generator, size - width - 2 * margin + 1)
    go_on = _rand(generator, *shape) >= stop_p
    active = torch.cat([torch.ones_like(go_on[:, :1]), go_on[:, :-1].cumprod(dim=1).bool()], dim=1)
    return Boxes(top, left, height, width, active)


def cutout_mask(
    generator: torch.Generator,
    batch_size: int,
    size: int,
    box_size: tuple[int, int] = (10, 70),
    max_boxes: int = 10,
    stop_p: float = 0.1,
    margin: int = 3,
) -> torch.Tensor:
    """bool [B, 1, size, size]: True on the pixels a cut-out sets to 0 (union of the boxes)."""
    return sample_boxes(generator, batch_size, size, box_size, max_boxes, stop_p, margin).mask(size)


def outpaint_mask(
    generator: torch.Generator,
    batch_size: int,
    size: int,
    shrink: tuple[int, int] = (50, 70),
    max_boxes: int = 10,
    stop_p: float = 0.1,
    margin: int = 3,
) -> torch.Tensor:
    """bool [B, 1, size, size]: True on the pixels an out-painting keeps.

    Windows have sides ``size - U{shrink}`` (height and width independent);
    everything outside their union is set to 0.
    """
    sides = (size - shrink[1], size - shrink[0])
    return sample_boxes(generator, batch_size, size, sides, max_boxes, stop_p, margin).mask(size)


def _apply_swaps(x: torch.Tensor, swaps: Swaps) -> torch.Tensor:
    batch, channels, size, _ = x.shape
    index = swaps.index(size)
    flat = x.reshape(batch, channels, size * size)
    return flat.gather(2, index.unsqueeze(1).expand(-1, channels, -1)).view_as(x)


@dataclass
class Swaps:
    """Block swaps of a local shuffle, applied in order; int64 [B, T] each.

    Swap t exchanges the ``height x width`` blocks at ``(top_a, left_a)`` and
    ``(top_b, left_b)``. ``max_side`` bounds height and width.
    """

    height: torch.Tensor
    width: torch.Tensor
    top_a: torch.Tensor
    left_a: torch.Tensor
    top_b: torch.Tensor
    left_b: torch.Tensor
    max_side: int

    def select(self, index: torch.Tensor) -> Swaps:
        """The swaps of samples ``index`` (int64 [N])."""
        fields_ = (self.height, self.width, self.top_a, self.left_a, self.top_b, self.left_b)
        return Swaps(*(t.index_select(0, index) for t in fields_), max_side=self.max_side)

    def index(self, size: int) -> torch.Tensor:
        """int64 [B, size*size]: flat source pixel of each output pixel (``out = x.flat[index]``).

        Swaps apply in order, each ``a = x[A].copy(); b = x[B].copy(); x[A] = b;
        x[B] = a``. A swap whose two blocks overlap is skipped: copying overlapping
        blocks would duplicate part of the overlap and drop other pixels, and a
        local shuffle must only move pixels (the map is always a permutation).
        About 1.3 % of swaps overlap at the default sizes.
        """
        n_pixels = size * size
        batch, n_swaps = self.height.shape
        side = self.max_side
        device = self.height.device
        offset = torch.arange(side, device=device)
        dy, dx = offset.view(1, 1, side, 1), offset.view(1, 1, 1, side)
        overlap = ((self.top_a - self.top_b).abs() < self.height) & (
            (self.left_a - self.left_b).abs() < self.width
        )
        valid = (
            (dy < self.height[..., None, None])
            & (dx < self.width[..., None, None])
            & ~overlap[..., None, None]
        )
        # Blocks are padded to side x side; padded cells read and write private dummy
        # slots past the image, so no scatter ever has two writers on one target.
        dummy = n_pixels + dy * side + dx

        def cells(top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
            flat = (top[..., None, None] + dy) * size + left[..., None, None] + dx
            return torch.where(valid, flat, dummy).reshape(batch, n_swaps, side * side)

        cells_a, cells_b = cells(self.top_a, self.left_a), cells(self.top_b, self.left_b)
        index = torch.arange(n_pixels + side * side, device=device).repeat(batch, 1)
        for t in range(n_swaps):
            source_a = index.gather(1, cells_a[:, t])
            source_b = index.gather(1, cells_b[:, t])
            index.scatter_(1, cells_a[:, t], source_b)
            index.scatter_(1, cells_b[:, t], source_a)
        return index[:, :n_pixels]


def sample_swaps(
    generator: torch.Generator,
    batch_size: int,
    size: int,
    block_size: tuple[int, int] = (10, 15),
    swaps: int = 10,
    margin: int = 3,
) -> Swaps:
    """Draw ``swaps`` block swaps per sample: sides ~ U{block_size} (shared by both
    blocks of a swap, height and width independent), each block's top-left uniform in
    ``margin .. size - side - margin`` independently."""
    shape = (batch_size, swaps)
    height = _randint(generator, *block_size, *shape)
    width = _randint(generator, *block_size, *shape)
    free_rows = size - height - 2 * margin + 1
    free_cols = size - width - 2 * margin + 1
    top_a = margin + _randint_below(generator, free_rows)
    left_a = margin + _randint_below(generator, free_cols)
    top_b = margin + _randint_below(generator, free_rows)
    left_b = margin + _randint_below(generator, free_cols)
    return Swaps(height, width, top_a, left_a, top_b, left_b, max_side=block_size[1])


def local_shuffle(
    x: torch.Tensor,
    generator: torch.Generator,
    block_size: tuple[int, int] = (10, 15),
    swaps: int = 10,
    margin: int = 3,
) -> torch.Tensor:
    """Swap ``swaps`` pairs of random blocks, in sequence, in every sample.

    Sizes are in pixels of ``x`` (no scaling). The swaps are composed into one
    index map and applied with a single gather; the result is always a permutation
    of the pixels (swaps of overlapping blocks are skipped, see :meth:`Swaps.index`).

    Args:
        x: [B, C, S, S], any dtype.

    Returns:
        like ``x``; nothing changes within ``margin`` px of the border.
    """
    batch, _, size, _ = x.shape
    return _apply_swaps(x, sample_swaps(generator, batch, size, block_size, swaps, margin))


def sample_distortion_codes(
    generator: torch.Generator, batch_size: int, config: AugmentationConfig
) -> torch.Tensor:
    """int64 [B] :class:`Distortion` codes: r ~ U(0, 1); r <= cutout_p: cut-out; next
    outpaint_p: out-painting; next shuffle_p: local shuffle; else none."""
    r = _rand(generator, batch_size)
    cut = config.cutout_p
    out = cut + config.outpaint_p
    shuf = out + config.shuffle_p
    band = (r > cut).long() + (r > out).long() + (r > shuf).long()  # 0 cut-out .. 3 none
    return (band + 1) % 4


def distort(
    x: torch.Tensor, generator: torch.Generator, config: AugmentationConfig,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply CAiD's context-prediction distortion to each sample.

    Draws, in this order and for every sample whatever its code: the codes
    (:func:`sample_distortion_codes`), the cut-out boxes, the out-painting
    windows and the shuffle swaps (:func:`sample_boxes`, :func:`sample_swaps`),
    with the config's sizes scaled to the view (``config.geometry``).

    Args:
        x: float [B, C, S, S] in [0, 1].
        inplace: write the result into ``x`` (saves a copy of the batch).

    Returns:
        ``(out, codes)``: out like ``x``; codes int64 [B] (:class:`Distortion`).

    Raises:
        ValueError: the boxes do not fit an S-px view (only tiny views, or
            ``reference_compat`` with S < 76).
    """
    batch, _, size, _ = x.shape
    geo = config.geometry(size)
    geo.check_fits()
    common = {"max_boxes": config.max_boxes, "stop_p": config.box_stop_p, "margin": geo.margin}
    codes = sample_distortion_codes(generator, batch, config)
    cut = sample_boxes(generator, batch, size, geo.cutout_size, **common)
    shrink = geo.outpaint_shrink
    keep = sample_boxes(generator, batch, size, (size - shrink[1], size - shrink[0]), **common)
    swaps = sample_swaps(generator, batch, size, geo.shuffle_block, config.shuffle_swaps,
                         geo.margin)

    # Every sample's parameters were drawn above (the stream does not depend on the
    # data); the masks and the shuffle are built only for the samples that use them.
    def pick(params, index):
        return params if index is None else params.select(index)

    def cutout(part, index):
        return part.masked_fill(pick(cut, index).mask(size), 0.0)

    def outpaint(part, index):
        return part.masked_fill(~pick(keep, index).mask(size), 0.0)

    def shuffle(part, index):
        return _apply_swaps(part, pick(swaps, index))

    out = x
    for code, work in ((Distortion.CUTOUT, cutout), (Distortion.OUTPAINT, outpaint),
                       (Distortion.SHUFFLE, shuffle)):
        out = _on_rows(out, codes == code, work, inplace or out is not x)
    return out, codes


class ViewAugmenter:
    """Turns a batch of crop pairs into CAiD's query view, key view and target.

    Args:
        config: augmentation hyperparameters (reference defaults when None).
        context_prediction: CAiD mode (distortion + target); False is the
            instance-discrimination baseline (no distortion, target None).
        seed: seed of the generator, created on the first batch's device. In
            multi-process training give each process its own seed.
        key_target: also return the key view's reconstruction target (CAiD mode with
            ``reconstruct_views="both"``); the key view is then always distorted, whatever
            ``config.distort_key_view`` says. Draws nothing extra from the generator.

    Call with ``crops`` uint8 [B, 2, S, S] (view 0 query, view 1 key); returns
    :class:`AugmentedViews`. ``state_dict`` / ``load_state_dict`` save and
    restore the random stream, so the object can be handed to Accelerate's
    ``register_for_checkpointing``; the state holds every process's stream.
    """

    def __init__(
        self,
        config: AugmentationConfig | None = None,
        context_prediction: bool = True,
        seed: int = 0,
        key_target: bool = False,
    ):
        self.config = config if config is not None else AugmentationConfig()
        self.context_prediction = context_prediction
        self.key_target = key_target
        self.seed = int(seed)
        self._generator: torch.Generator | None = None
        self._pending: tuple[str, torch.Tensor] | None = None

    @property
    def generator(self) -> torch.Generator | None:
        """The random stream; None until the first batch (or after loading a state)."""
        return self._generator

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self._generator is not None:
            if torch.device(self._generator.device) != device:
                raise ValueError(
                    f"crops are on {device} but this ViewAugmenter's generator lives on "
                    f"{self._generator.device}; use one augmenter per device"
                )
            return self._generator
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        if self._pending is not None:
            saved_device, state = self._pending
            if torch.device(saved_device).type == device.type:
                generator.set_state(state)
            else:
                warnings.warn(
                    f"the saved augmentation stream belongs to a {saved_device} generator and cannot "
                    f"continue on {device}; starting a fresh stream from seed {self.seed}",
                    stacklevel=3,
                )
            self._pending = None
        self._generator = generator
        return generator

    def _own_state(self) -> dict[str, Any]:
        device, generator_state = None, None
        if self._generator is not None:
            device, generator_state = str(self._generator.device), self._generator.get_state()
        elif self._pending is not None:
            device, generator_state = self._pending[0], self._pending[1].clone()
        return {"seed": self.seed, "device": device, "generator_state": generator_state}

    def state_dict(self) -> dict[str, Any]:
        """``{"streams": [per process: {"seed", "device", "generator_state"}]}``.

        Accelerate writes registered objects from the main process only, so every
        process's stream is gathered here (a collective: all processes call it, as
        ``Accelerator.save_state`` does); device and state are None before the first batch.
        """
        own = self._own_state()
        if not _distributed():
            return {"streams": [own]}
        streams: list[Any] = [None] * _world_size()
        torch.distributed.all_gather_object(streams, own)
        return {"streams": streams}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore this process's stream from a :meth:`state_dict`; it continues exactly
        where it was saved. Saved by a different number of processes: raises."""
        streams, rank, world = state["streams"], _process_index(), _world_size()
        if len(streams) != world:
            raise ValueError(
                f"the augmentation state was saved by {len(streams)} process(es) but this run has "
                f"{world}; resume with the same number of processes"
            )
        own = streams[rank]
        self.seed = int(own["seed"])
        self._generator = None
        self._pending = None
        if own.get("generator_state") is not None:
            self._pending = (str(own["device"]), own["generator_state"].detach().cpu().to(torch.uint8))

    def __call__(self, crops: torch.Tensor) -> AugmentedViews:
        if not isinstance(crops, torch.Tensor):
            raise TypeError(f"crops must be a torch.Tensor, got {type(crops).__name__}")
        if crops.dtype != torch.uint8:
            raise TypeError(f"crops must be uint8 (grey 0..255), got {crops.dtype}")
        if crops.dim() != 4 or crops.shape[1] != 2 or crops.shape[2] != crops.shape[3]:
            raise ValueError(
                f"crops must have shape [B, 2, S, S] (two square grey views per image), got {list(crops.shape)}"
            )
        config = self.config
        batch, _, size, _ = crops.shape
        geo = config.geometry(size)
        generator = self._generator_for(crops.device)

        # Both views of every image form one batch of 2B: sample 2i is image i's query.
        # Each step writes into this batch (no copies of it).
        x = crops.reshape(2 * batch, 1, size, size).float().div_(255.0)
        x, _ = color_jitter(x, generator, config.brightness, config.contrast, config.color_jitter_p,
                            inplace=True)
        x, _ = random_gaussian_blur(x, generator, config.blur_p, geo.blur_sigma, inplace=True)
        x, flipped = random_horizontal_flip(x, generator, config.flip_p, inplace=True)
        x = x.view(batch, 2, size, size)
        query, key = x[:, :1], x[:, 1:]

        target = key_target = None
        codes = torch.zeros(batch, dtype=torch.long, device=crops.device)
        if self.context_prediction:
            if config.distort_key_view or self.key_target:
                both, all_codes = distort(x.reshape(2 * batch, 1, size, size), generator, config,
                                          inplace=True)
                both = both.view(batch, 2, size, size)
                query, key, codes = both[:, :1], both[:, 1:], all_codes[0::2]
            else:
                query, codes = distort(query.contiguous(), generator, config, inplace=True)
            target = crops[:, :1].float().div_(255.0)  # the query's crop before everything
            if not config.reference_compat:  # the reference forgets to flip the target
                target = _on_rows(target, flipped[0::2], lambda part, _: part.flip(-1),
                                  inplace=True)
            if self.key_target:
                key_target = crops[:, 1:].float().div_(255.0)
                if not config.reference_compat:
                    key_target = _on_rows(key_target, flipped[1::2],
                                          lambda part, _: part.flip(-1), inplace=True)

        def rgb(view: torch.Tensor) -> torch.Tensor:
            return view.contiguous().expand(batch, 3, size, size)

        return AugmentedViews(query=rgb(query), key=rgb(key), target=target, distortion=codes,
                              key_target=key_target)

    def __repr__(self) -> str:
        changed = {
            f.name: getattr(self.config, f.name)
            for f in fields(self.config)
            if getattr(self.config, f.name) != f.default
        }
        return (
            f"{type(self).__name__}(context_prediction={self.context_prediction}, seed={self.seed}, "
            f"config changes={changed})"
        )
