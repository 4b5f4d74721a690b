"""Synthetic chest radiograph phantoms: the package's embedded default data set.

Each phantom is a posteroanterior chest film drawn from a few analytic shapes
(body, lungs, heart, spine, ribs, clavicles, diaphragm), so demo training and
tests need no download. Anatomy is modelled as an additive radiodensity map
(air 0, soft tissue at 1, bone above 1) that is mapped linearly to grey values,
which keeps the ordering of a real film: air dark, lungs dark, mediastinum and
abdomen bright, bone brightest. Radiological convention: the patient's left is
on the image's right, so the heart sits in the image's lower right lung.

All geometry is in units of the image side, so phantoms of any size (64..1024
px) show the same anatomy. Hand-written because no library draws chest
phantoms; it is the package's own test fixture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["generate_phantom", "write_phantoms"]

_MAX_NODULES = 3


def _inside(distance: np.ndarray, edge: float) -> np.ndarray:
    """Soft indicator of ``distance > 0`` with a linear ramp ``edge`` wide, in [0, 1]."""
    return np.clip(distance / edge + 0.5, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Unit-variance smooth noise, float32 [size, size], with features about ``size / cells`` px.

    White noise on a ``cells x cells`` grid, interpolated with Gaussian
    weights by two small matrix products (cheaper than an FFT at any size).
    """
    pixels = (np.arange(size, dtype=np.float32) + 0.5) / size
    knots = (np.arange(cells, dtype=np.float32) + 0.5) / cells
    weights = np.exp(-0.5 * ((pixels[:, None] - knots[None, :]) * (cells / 0.7)) ** 2)
    weights /= weights.sum(axis=1, keepdims=True)
    noise = weights @ rng.standard_normal((cells, cells), dtype=np.float32) @ weights.T
    return noise / (noise.std() + 1e-6)


def generate_phantom(
    index: int, size: int = 256, seed: int = 0, nodules: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic chest radiograph and its nodule mask.

    Args:
        index: which phantom of the set (>= 0); each index has its own anatomy
            (lung size and position, heart, ribs, exposure, noise).
        size: side length in pixels (>= 32); all features scale with it.
        seed: seed of the whole set (>= 0); ``(seed, index)`` fixes the output.
        nodules: draw 0-3 nodules (at least one in about half the phantoms).
            With ``False`` the mask is all zero and the image is the same
            phantom without its nodules.

    Returns:
        ``(image, mask)``: image uint8 [size, size] in 0..255 (air dark, bone
        bright); mask uint8 [size, size] with values {0, 1}, 1 on nodules.
    """
    if size < 32:
        raise ValueError(f"phantom size must be at least 32 px, got {size}")
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}")
    rng = np.random.default_rng([seed, index])
    # each part draws its random numbers in turn: the order fixes every phantom
    frame = _Frame(rng, size)
    body, lungs, core, diaphragm = _body_and_lungs(rng, frame)
    hidden, lung_field, bubble = _mediastinum(rng, frame, lungs, diaphragm)
    bones = _bones(rng, frame, diaphragm, lung_field)
    # Vascular markings: thin bright ridges of smooth noise, denser near the hila.
    hilum = np.exp(-(((frame.lateral - 0.08) / 0.2) ** 2) - ((frame.y - 0.49) / 0.22) ** 2)
    vessels = np.clip(1.0 - np.abs(_smooth_noise(rng, size, 32)) / 0.5, 0.0, 1.0)
    density = (
        body
        - 0.62 * lung_field
        + 0.1 * lung_field * vessels * (0.3 + 0.7 * hilum)
        - 0.2 * bubble
        + bones * body
    )
    mask = _add_nodules(rng, density, core & (hidden < 0.05), size, nodules)
    return _expose(rng, density, frame), mask


def _draw(rng: np.random.Generator, low: float, high: float) -> float:
    # Python floats keep every array float32 (NumPy scalars would promote to float64).
    return float(rng.uniform(low, high))


class _Frame:
    """Patient positioning (a small shift and rotation of the whole anatomy) and the image
    grid in units of the side: ``x``, ``y`` (0..1 across the patient), ``lateral``
    (distance from the midline), ``edge`` (a soft edge about 1.5 px wide, like a real
    film's blur)."""

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        angle = np.deg2rad(_draw(rng, -2.5, 2.5))
        shift_x, shift_y = _draw(rng, -0.02, 0.02), _draw(rng, -0.02, 0.02)
        grid = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        gy, gx = grid[:, None], grid[None, :]
        cos, sin = float(np.cos(angle)), float(np.sin(angle))
        self.size = size
        self.edge = 1.5 / size
        self.x = 0.5 + cos * gx - sin * gy - shift_x
        self.y = 0.5 + sin * gx + cos * gy - shift_y
        self.lateral = np.abs(self.x - 0.5)


def _body_and_lungs(rng: np.random.Generator, frame: _Frame):
    """Body (rounded shoulders widening from the neck into the chest and abdomen) and the
    lungs: ellipses widening towards the base, cut below by the diaphragm domes, darkest
    where they are thickest. Side -1 is the patient's right lung (image left), +1 the left.
    Returns (body, lungs, lung core where nodules may sit, diaphragm height)."""
    x, y, edge, size = frame.x, frame.y, frame.edge, frame.size
    half_width = _draw(rng, 0.44, 0.48) * np.sqrt(np.clip((y - 0.01) / 0.3, 0.0, 1.0))
    body = _inside(np.maximum(half_width, 0.1) - frame.lateral, edge)
    lungs = np.zeros((size, size), dtype=np.float32)
    core = np.zeros((size, size), dtype=bool)
    diaphragm = np.zeros((size, size), dtype=np.float32)
    for side in (-1, 1):
        cx = 0.5 + side * 0.21 * _draw(rng, 0.96, 1.04)
        cy = 0.48 + _draw(rng, -0.02, 0.02)
        ax = (0.165 if side < 0 else 0.155) * _draw(rng, 0.92, 1.08)
        ay = 0.32 * _draw(rng, 0.94, 1.06)
        dome_top = cy + (0.21 if side < 0 else 0.23) + _draw(rng, -0.02, 0.02)
        ty = (y - cy) / ay
        dx = (x - cx) / (ax * (0.86 + 0.14 * np.clip(ty, -1.0, 1.0)))
        r2 = dx * dx + ty * ty
        dome = dome_top + 0.07 * dx * dx
        depth = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
        lungs += (
            _inside(1.0 - np.sqrt(r2), edge / ax) * _inside(dome - y, edge) * (0.7 + 0.3 * depth)
        )
        core |= (r2 < 0.64) & (y < dome - 0.03)
        diaphragm += np.where((x < 0.5) == (side < 0), dome, 0.0)
    return body, lungs, core, diaphragm


def _mediastinum(rng: np.random.Generator, frame: _Frame, lungs, diaphragm):
    """Heart (a tilted ellipse over the lower medial left lung) and aortic knob, which hide
    the lung behind them, and a gastric air bubble under the left dome. Returns (hidden,
    the visible lung field, bubble)."""
    x, y, edge = frame.x, frame.y, frame.edge
    heart_cx, heart_cy = 0.59 + _draw(rng, -0.015, 0.015), 0.65 + _draw(rng, -0.02, 0.02)
    heart_ax, heart_ay = 0.16 * _draw(rng, 0.9, 1.1), 0.125 * _draw(rng, 0.9, 1.1)
    tilt_cos, tilt_sin = float(np.cos(np.deg2rad(25.0))), float(np.sin(np.deg2rad(25.0)))
    hu = ((x - heart_cx) * tilt_cos + (y - heart_cy) * tilt_sin) / heart_ax
    hv = ((y - heart_cy) * tilt_cos - (x - heart_cx) * tilt_sin) / heart_ay
    heart = _inside(1.0 - np.sqrt(hu * hu + hv * hv), 2 * edge / heart_ay)
    ku, kv = (x - 0.555) / 0.045, (y - 0.34) / 0.04
    aorta = _inside(1.0 - np.sqrt(ku * ku + kv * kv), 2 * edge / 0.04)
    hidden = np.maximum(heart, aorta)
    lung_field = lungs * (1.0 - 0.9 * hidden)
    bu, bv = (x - 0.64) / 0.04, (y - diaphragm - 0.05) / 0.025
    bubble = _inside(1.0 - np.sqrt(bu * bu + bv * bv), 2 * edge / 0.025)
    return hidden, lung_field, bubble


def _bones(rng: np.random.Generator, frame: _Frame, diaphragm, lung_field) -> np.ndarray:
    """Spine (vertebral bodies and darker discs, seen through the mediastinum), ribs and
    clavicles, as their added density (before the body mask)."""
    y, lateral, edge = frame.y, frame.lateral, frame.edge
    vertebrae = 0.75 + 0.25 * np.cos(np.pi * (y - _draw(rng, 0.0, 0.06)) / 0.055) ** 2
    spine = _inside(0.032 - lateral, 2 * edge) * vertebrae

    # Ribs: a family of arcs per side, spaced wider towards the base. Posterior
    # ribs rise from the spine and curve down laterally; the fainter anterior
    # ribs run down towards the sternum. Mostly seen over the lungs.
    reach = lateral / 0.42
    ribs = np.zeros_like(lung_field)
    rib_top = 0.12 + _draw(rng, -0.015, 0.015)
    for curve, count, weight, width, start in (
        (0.5 * (reach - 0.45) ** 2, 10, 1.0, 0.4, 0.05),
        (0.24 * (1.0 - reach) + 0.04, 7, 0.45, 0.3, 0.35),
    ):
        level = np.clip((y - rib_top - curve) / 0.66, 0.0, None) ** 0.85 * count
        phase = level - np.floor(level)
        profile = np.sqrt(np.clip(np.sin(np.pi / width * phase), 0.0, None)) * (phase < width)
        ribs += weight * profile * _inside(reach - start, edge / 0.42)
    ribs *= _inside(1.02 - reach, edge / 0.42) * _inside(diaphragm + 0.04 - y, 4 * edge)
    ribs *= 0.35 + 0.65 * lung_field

    # Clavicles: from the sternum out and up to the shoulders.
    out = lateral - 0.05
    clavicle_y = 0.2 - 0.45 * out + 0.4 * out * out
    clavicles = _inside(0.011 - np.abs(y - clavicle_y), edge) * _inside(
        0.16 - np.abs(out - 0.17), edge
    )
    return 0.2 * spine + 0.2 * ribs + 0.22 * clavicles


def _add_nodules(rng: np.random.Generator, density: np.ndarray, allowed: np.ndarray, size: int,
                 nodules: bool) -> np.ndarray:
    """Add 0-3 nodules (soft blobs) to ``density`` in place, where ``allowed``; returns the
    mask (1 where a blob reaches half its peak). The parameters are always drawn, so a
    phantom differs from its ``nodules=False`` twin only by the nodules themselves."""
    num_nodules = int(rng.random() >= 0.5) * int(rng.integers(1, _MAX_NODULES + 1))
    candidates = np.flatnonzero(allowed)
    picks = rng.integers(0, max(len(candidates), 1), size=_MAX_NODULES)
    radii = np.maximum(rng.uniform(0.012, 0.03, size=_MAX_NODULES) * size, 1.5)
    contrasts = rng.uniform(0.25, 0.45, size=_MAX_NODULES)
    mask = np.zeros((size, size), dtype=np.uint8)
    if not nodules or not len(candidates):
        return mask
    drawn = slice(0, num_nodules)
    for pick, radius, contrast in zip(picks[drawn], radii[drawn], contrasts[drawn], strict=True):
        row, col = divmod(int(candidates[pick]), size)
        reach_px = int(np.ceil(5 * radius))  # the blob's tail is < 0.2 % of its peak there
        top, left = max(row - reach_px, 0), max(col - reach_px, 0)
        rows = np.arange(top, min(row + reach_px + 1, size), dtype=np.float32)[:, None]
        cols = np.arange(left, min(col + reach_px + 1, size), dtype=np.float32)[None, :]
        r2 = ((rows - row) ** 2 + (cols - col) ** 2) / float(radius * radius)
        blob = 1.0 / (1.0 + r2 * r2)  # 0.5 at the radius, soft tail outside
        window = (slice(top, top + rows.shape[0]), slice(left, left + cols.shape[1]))
        density[window] += float(contrast) * blob
        mask[window] |= blob >= 0.5
    return mask


def _expose(rng: np.random.Generator, density: np.ndarray, frame: _Frame) -> np.ndarray:
    """Exposure: gain, offset and a smooth field (uneven beam, patient build), then noise;
    grey uint8."""
    size = frame.size
    field = 1.0 + 0.05 * _smooth_noise(rng, size, 3) + _draw(rng, -0.1, 0.1) * (frame.y - 0.5)
    image = _draw(rng, 8.0, 20.0) + _draw(rng, 150.0, 175.0) * density * field
    image += rng.standard_normal((size, size), dtype=np.float32) * 2.5
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def write_phantoms(
    folder: str | Path,
    num_images: int,
    size: int = 256,
    seed: int = 0,
    nodules: bool = True,
    write_masks: bool = False,
) -> list[Path]:
    """Write phantoms ``0..num_images-1`` as 8-bit grey PNGs.

    Files are ``folder/phantom_00000.png`` …; with ``write_masks`` the nodule
    masks go to ``folder/masks/phantom_00000.png`` with values {0, 255}.
    Creates ``folder`` (and ``masks/``) as needed.

    Returns:
        The image paths, in index order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if write_masks:
        (folder / "masks").mkdir(exist_ok=True)
    paths = []
    for index in range(num_images):
        image, mask = generate_phantom(index, size=size, seed=seed, nodules=nodules)
        path = folder / f"phantom_{index:05d}.png"
        Image.fromarray(image).save(path)
        if write_masks:
            Image.fromarray(mask * np.uint8(255)).save(folder / "masks" / path.name)
        paths.append(path)
    return paths
