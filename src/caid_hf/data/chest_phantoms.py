"""ChestX-ray14-like chest phantoms: varied patients with multi-label findings and masks.

The second version of the package's synthetic chest films (the first, :mod:`.phantoms`,
stays as it is). Each phantom is its own patient: body habitus, inspiration, heart,
mediastinum, diaphragm, rotation, tilt, scoliosis, AP or PA projection, collimation,
exposure, noise and devices are drawn per film, and so are eight of ChestX-ray14's
findings at three scales (global, regional, local), with masks for the six localised
ones. ``docs/phantoms.md`` gives the radiological reason for every choice.

Geometry is in film-equivalent millimetres: the image is a 320 mm square field of view,
so the pixel spacing is ``320 / size`` mm and every size shows the same patient; the
random draws never depend on the size (only the quantum noise does). Anatomy is an
additive radiodensity map (1 = soft tissue through the whole chest, lungs subtract their
air, bone and metal add) mapped to grey values, air dark and bone bright. Radiological
convention: the patient's left is on the image's right.

Hand-written because no library draws chest phantoms.
"""

from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "CHEST_PHANTOM_VERSION",
    "FIELD_OF_VIEW_MM",
    "FINDINGS",
    "LOCALISED_FINDINGS",
    "PREVALENCES",
    "SCALE_GROUPS",
    "ChestPhantom",
    "Lesion",
    "chest_phantom_labels",
    "generate_chest_phantom",
    "write_chest_phantoms",
]

CHEST_PHANTOM_VERSION = "cxr14"
FIELD_OF_VIEW_MM = 320.0
# ChestX-ray14's names, global findings first, then regional, then local.
FINDINGS = ("Cardiomegaly", "Emphysema", "Effusion", "Consolidation", "Pneumothorax",
            "Atelectasis", "Nodule", "Mass")
SCALE_GROUPS = {"global": ["Cardiomegaly", "Emphysema"],
                "regional": ["Effusion", "Consolidation", "Pneumothorax", "Atelectasis"],
                "local": ["Nodule", "Mass"]}
LOCALISED_FINDINGS = ("Effusion", "Consolidation", "Pneumothorax", "Atelectasis", "Nodule",
                      "Mass")
# The designed share of phantoms with each finding (docs/phantoms.md; tested).
PREVALENCES = {"Cardiomegaly": 0.12, "Emphysema": 0.08, "Effusion": 0.20,
               "Consolidation": 0.10, "Pneumothorax": 0.08, "Atelectasis": 0.15,
               "Nodule": 0.15, "Mass": 0.10}
NO_FINDING_SHARE = 0.5

_F = {name: k for k, name in enumerate(FINDINGS)}
_STREAM_LABELS, _STREAM_PATIENT, _STREAM_NOISE = 1, 2, 3
_VERSION_TAG = 14  # keeps these streams apart from the first version's


# --------------------------------------------------------------------------- labels
# A film is abnormal with probability NO_FINDING_SHARE's complement; an abnormal film
# draws latent causes and findings until it has at least one. Rates are conditional on
# being abnormal, tuned (by drawing a million label sets) so that the marginals meet
# PREVALENCES.
_HEART_FAILURE, _PNEUMONIA, _MALIGNANCY = 0.14, 0.10, 0.10
_BASE_RATES = {"Cardiomegaly": 0.065, "Emphysema": 0.117, "Effusion": 0.1755,
               "Consolidation": 0.051, "Pneumothorax": 0.083, "Atelectasis": 0.113,
               "Nodule": 0.157, "Mass": 0.083}


@dataclass(frozen=True)
class _Causes:
    heart_failure: bool = False
    pneumonia: bool = False
    malignancy: bool = False
    compressive: bool = False  # atelectasis caused by the effusion


def _draw_labels(rng: np.random.Generator) -> tuple[np.ndarray, _Causes]:
    labels = np.zeros(len(FINDINGS), dtype=np.uint8)
    if rng.random() < NO_FINDING_SHARE:
        return labels, _Causes()
    while not labels.any():
        u = rng.random(16)
        failure, pneumonia, malignancy = (u[0] < _HEART_FAILURE, u[1] < _PNEUMONIA,
                                          u[2] < _MALIGNANCY)
        base = {name: u[3 + k] < rate for k, (name, rate) in enumerate(_BASE_RATES.items())}
        cardiomegaly = base["Cardiomegaly"] or (failure and u[11] < 0.85)
        emphysema = base["Emphysema"]
        effusion = (base["Effusion"] or (failure and u[12] < 0.75)
                    or (pneumonia and u[13] < 0.4))
        consolidation = base["Consolidation"] or pneumonia
        pneumothorax = base["Pneumothorax"] or (emphysema and u[14] < 0.3)
        compressive = effusion and u[15] < 0.4
        atelectasis = base["Atelectasis"] or compressive
        mass = base["Mass"] or (malignancy and u[14] < 0.7)
        nodule = base["Nodule"] or (malignancy and (u[11] < 0.6 or not mass))
        labels[:] = (cardiomegaly, emphysema, effusion, consolidation, pneumothorax,
                     atelectasis, nodule, mass)
    return labels, _Causes(bool(failure), bool(pneumonia), bool(malignancy),
                           bool(compressive and not base["Atelectasis"]))


def _streams(seed: int, index: int) -> tuple[np.random.Generator, ...]:
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}")
    return tuple(np.random.default_rng([seed, index, _VERSION_TAG, s])
                 for s in (_STREAM_LABELS, _STREAM_PATIENT, _STREAM_NOISE))


def chest_phantom_labels(index: int, seed: int = 0) -> np.ndarray:
    """The findings of phantom ``index`` without drawing it: uint8 [8] in {0, 1}, in
    :data:`FINDINGS` order (the same as ``generate_chest_phantom(index, seed=seed).labels``
    at every size)."""
    return _draw_labels(_streams(seed, index)[0])[0]


# --------------------------------------------------------------------------- patient
def _u(rng: np.random.Generator, low: float, high: float) -> float:
    # Python floats keep the arrays float32 (NumPy scalars would promote to float64).
    return float(rng.uniform(low, high))


@dataclass
class _Lung:
    side: int  # -1 the patient's right (image left), +1 the left
    cx: float
    cy: float
    ax: float
    ay: float
    dome_top: float
    dome_peak: float
    dome_height: float

    def inside(self, x, y, margin: float = 0.0):
        """Signed distance-like measure in mm, > 0 inside the lung (ellipse above the dome)."""
        ellipse = (1.0 - np.sqrt(((x - self.cx) / self.ax) ** 2 + ((y - self.cy) / self.ay) ** 2)
                   ) * self.ax
        return np.minimum(ellipse, self.dome(x) - y) - margin

    def dome(self, x):
        return self.dome_top + self.dome_height * ((x - self.dome_peak) / self.ax) ** 2

    @property
    def apex(self) -> float:
        return self.cy - self.ay

    def costophrenic(self) -> tuple[float, float]:
        """The lateral costophrenic angle: where the dome meets the lateral wall."""
        x = self.cx + self.side * self.ax * 0.97
        return x, float(self.dome(x))

    def shrunk(self, rim: float) -> _Lung:
        """The lung pulled ``rim`` mm away from the apex and the lateral chest wall."""
        ax = max(self.ax - rim / 2, 10.0)
        return _Lung(self.side, self.cx - self.side * rim / 2, self.cy + rim / 2, ax,
                     max(self.ay - rim / 2, 10.0), self.dome_top, self.dome_peak,
                     self.dome_height * ax / self.ax)


@dataclass
class _Patient:
    projection: str
    tilt: float
    shift: tuple[float, float]
    half_width: float  # outer half-width of the thorax
    inner: float  # inner half-width (the ribs' inner margin), where the lungs reach
    soft: float  # soft-tissue build: density of the body
    neck: float
    lungs: tuple[_Lung, _Lung]
    shift_mediastinum: float
    mediastinum: float  # half-width of the superior mediastinum
    heart: tuple[float, float, float, float, float]  # cx, cy, a, b, tilt (rad)
    ctr: float
    rotation: float
    scoliosis: float
    spine_top: float
    clavicle: tuple[float, float]  # height of the medial end, lateral rise
    scapula_over_lungs: bool
    breasts: float | None  # height of the inframammary folds, None: no breast shadows
    bubble: bool
    hyperlucency: float
    airways: float  # share of the peripheral vessel branches kept (emphysema prunes)
    ribs: tuple[float, float]
    age: int
    sex: str


def _draw_patient(rng: np.random.Generator, labels: np.ndarray, atelectasis) -> _Patient:
    emphysema = bool(labels[_F["Emphysema"]])
    projection = "AP" if rng.random() < 0.3 else "PA"
    half_width = _u(rng, 130.0, 170.0)
    soft = _u(rng, 0.85, 1.2) + (half_width - 150.0) / 200.0
    inner = half_width - _u(rng, 12.0, 22.0) - 20.0 * (soft - 1.0)
    apex = _u(rng, -132.0, -116.0)
    dome_right = _u(rng, 45.0, 85.0) + (12.0 if projection == "AP" else 0.0)
    dome_height = _u(rng, 15.0, 30.0)
    left_lower = _u(rng, 10.0, 30.0)
    if emphysema:
        dome_right, dome_height, left_lower = (_u(rng, 100.0, 125.0), _u(rng, 3.0, 9.0),
                                               _u(rng, 0.0, 10.0))
    mediastinum = _u(rng, 22.0, 36.0) * (1.1 if projection == "AP" else 1.0)
    shift_mediastinum = 0.0
    lift = [0.0, 0.0]
    if atelectasis is not None:  # volume loss pulls the diaphragm up, the mediastinum over
        side = atelectasis[0]
        lift[(side + 1) // 2] = _u(rng, 10.0, 25.0) if rng.random() < 0.8 else 0.0
        shift_mediastinum = side * _u(rng, 5.0, 15.0) if rng.random() < 0.7 or not max(lift) \
            else 0.0
    lungs = []
    for side, dome_top in ((-1, dome_right), (1, dome_right + left_lower)):
        dome_top -= lift[(side + 1) // 2]
        medial = shift_mediastinum + side * _u(rng, 6.0, 14.0)  # behind the heart
        lateral = side * inner
        ax = abs(lateral - medial) / 2
        cx = (lateral + medial) / 2
        cy = dome_top + dome_height
        lungs.append(_Lung(side, cx, cy, ax, cy - apex, dome_top, cx - side * 0.1 * ax,
                           dome_height))
    # Heart: a tilted ellipse whose width on the film is the cardiothoracic ratio times the
    # inner thoracic width; a third of it lies right of the midline.
    if labels[_F["Cardiomegaly"]]:
        ctr, roundness, tilt = _u(rng, 0.52, 0.65), _u(rng, 0.82, 0.95), _u(rng, 18.0, 32.0)
    elif emphysema:
        ctr, roundness, tilt = _u(rng, 0.35, 0.42), _u(rng, 0.6, 0.72), _u(rng, 55.0, 65.0)
    else:
        low = 0.43 if projection == "AP" else 0.38  # AP magnifies the heart by about 15 %
        ctr, roundness, tilt = _u(rng, low, 0.48), _u(rng, 0.68, 0.85), _u(rng, 30.0, 45.0)
    width = ctr * 2 * inner
    phi = math.radians(tilt)
    a = width / 2 / math.sqrt(math.cos(phi) ** 2 + (roundness * math.sin(phi)) ** 2)
    b = roundness * a
    half_height = math.sqrt((a * math.sin(phi)) ** 2 + (b * math.cos(phi)) ** 2)
    right_share = _u(rng, 0.28, 0.36)
    heart_cx = shift_mediastinum + width / 2 - right_share * width
    heart_cy = dome_right + left_lower * 0.5 + 12.0 - half_height
    female = rng.random() < 0.5
    breasts = _u(rng, 20.0, 70.0) if female and rng.random() < 0.65 else None
    clavicle = (_u(rng, -108.0, -92.0), _u(rng, 22.0, 40.0))
    if projection == "AP":  # the beam's angle projects the clavicles high and horizontal
        clavicle = (clavicle[0] - 14.0, _u(rng, -4.0, 6.0))
    rotation = _u(rng, -12.0, 12.0)
    scoliosis = _u(rng, -12.0, 12.0) if rng.random() < 0.3 else _u(rng, -3.0, 3.0)
    return _Patient(
        projection=projection, tilt=math.radians(_u(rng, -5.0, 5.0)),
        shift=(_u(rng, -10.0, 10.0), _u(rng, -10.0, 10.0)), half_width=half_width,
        inner=inner, soft=soft, neck=_u(rng, 45.0, 60.0), lungs=(lungs[0], lungs[1]),
        shift_mediastinum=shift_mediastinum, mediastinum=mediastinum,
        heart=(heart_cx, heart_cy, a, b, phi), ctr=ctr, rotation=rotation,
        scoliosis=scoliosis, spine_top=_u(rng, 0.0, 30.0), clavicle=clavicle,
        scapula_over_lungs=projection == "AP", breasts=breasts, bubble=rng.random() < 0.75,
        hyperlucency=_u(rng, 1.12, 1.22) if emphysema else 1.0,
        airways=0.35 if emphysema else 1.0,
        ribs=(_u(rng, -10.0, 10.0), _u(rng, 0.93, 1.07)),
        age=int(rng.integers(18, 90)), sex="F" if female else "M")


# --------------------------------------------------------------------------- canvas
@functools.lru_cache(maxsize=32)
def _blur_matrix(size: int, sigma_px: float) -> np.ndarray:
    offsets = np.arange(size, dtype=np.float32)
    weights = np.exp(-0.5 * ((offsets[:, None] - offsets[None, :]) / sigma_px) ** 2)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


class _Canvas:
    """The film's pixel grid in patient millimetres (after the patient's tilt and shift),
    and accumulators for thin structures (vessels, wires, letters) drawn as points along
    their centre lines and blurred, which keeps their line density at every size."""

    def __init__(self, size: int, patient: _Patient) -> None:
        self.size = size
        self.spacing = FIELD_OF_VIEW_MM / size
        self.edge = max(0.75 * self.spacing, 1.0)  # soft edges: about one pixel, >= 1 mm
        film = (np.arange(size, dtype=np.float32) + 0.5) * self.spacing - FIELD_OF_VIEW_MM / 2
        self.film_x, self.film_y = film[None, :], film[:, None]
        cos, sin = math.cos(patient.tilt), math.sin(patient.tilt)
        u, v = self.film_x - patient.shift[0], self.film_y - patient.shift[1]
        self.x = cos * u + sin * v
        self.y = cos * v - sin * u
        self._cos, self._sin, self._shift = cos, sin, patient.shift
        self._layers: dict[float, list] = {}

    def ramp(self, distance, edge: float | None = None):
        """Soft indicator of ``distance > 0`` (mm), rising over about one pixel."""
        return np.clip(distance / (edge or self.edge) + 0.5, 0.0, 1.0)

    def to_pixels(self, x: np.ndarray, y: np.ndarray, on_film: bool = False):
        if not on_film:
            x, y = (self._cos * x - self._sin * y + self._shift[0],
                    self._sin * x + self._cos * y + self._shift[1])
        return ((x + FIELD_OF_VIEW_MM / 2) / self.spacing - 0.5,
                (y + FIELD_OF_VIEW_MM / 2) / self.spacing - 0.5)

    def line(self, x0, y0, x1, y1, density, sigma: float, on_film: bool = False) -> None:
        """Add straight segments (arrays of ends, mm) with cross-section ``density``
        (density x mm, per segment), blurred by ``sigma`` mm."""
        x0, y0, x1, y1, density = (np.atleast_1d(np.asarray(v, dtype=np.float64))
                                   for v in (x0, y0, x1, y1, density))
        length = np.hypot(x1 - x0, y1 - y0)
        steps = np.maximum(np.ceil(length / (0.5 * self.spacing)), 1).astype(np.int64)
        segment = np.repeat(np.arange(len(steps)), steps)
        start = np.cumsum(steps) - steps
        t = (np.arange(steps.sum()) - np.repeat(start, steps) + 0.5) / steps[segment]
        x = x0[segment] + t * (x1 - x0)[segment]
        y = y0[segment] + t * (y1 - y0)[segment]
        weight = np.broadcast_to(density, length.shape)[segment] * (length / steps)[segment]
        self.dots(x, y, weight, sigma, on_film)

    def dots(self, x, y, mass, sigma: float, on_film: bool = False) -> None:
        """Add point masses (density x mm^2 each) at (x, y) mm, blurred by ``sigma`` mm."""
        col, row = self.to_pixels(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                  on_film)
        key = round(max(sigma / self.spacing, 0.6), 2)
        weight = np.broadcast_to(np.asarray(mass, np.float64), col.shape) / self.spacing**2
        self._layers.setdefault(key, []).append((col, row, weight))

    def render(self) -> np.ndarray:
        """Everything drawn with ``line``/``dots`` so far, splatted bilinearly and blurred;
        float32 [size, size]."""
        size = self.size
        out = np.zeros((size, size), np.float32)
        for sigma_px, parts in self._layers.items():
            col, row, weight = (np.concatenate(v) for v in zip(*parts, strict=True))
            c0, r0 = np.floor(col), np.floor(row)
            fc, fr = col - c0, row - r0
            cols = np.concatenate([c0, c0 + 1, c0, c0 + 1])
            rows = np.concatenate([r0, r0, r0 + 1, r0 + 1])
            shares = np.concatenate([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc),
                                     fr * fc]) * np.tile(weight, 4)
            keep = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
            layer = np.bincount((rows[keep] * size + cols[keep]).astype(np.int64),
                                shares[keep], minlength=size * size)
            blur = _blur_matrix(size, sigma_px)
            out += blur @ layer.reshape(size, size).astype(np.float32) @ blur.T
        self._layers = {}
        return out


def _smooth_field(rng: np.random.Generator, canvas: _Canvas, cells: int) -> np.ndarray:
    """Unit-variance smooth noise over the film, float32 [size, size], with features about
    ``320 / cells`` mm; the random draws do not depend on the size."""
    pixels = (np.arange(canvas.size, dtype=np.float32) + 0.5) / canvas.size
    knots = (np.arange(cells, dtype=np.float32) + 0.5) / cells
    weights = np.exp(-0.5 * ((pixels[:, None] - knots[None, :]) * (cells / 0.7)) ** 2)
    weights /= weights.sum(axis=1, keepdims=True)
    noise = weights @ rng.standard_normal((cells, cells), dtype=np.float32) @ weights.T
    return noise / (noise.std() + 1e-6)


# --------------------------------------------------------------------------- anatomy
def _body(p: _Patient, c: _Canvas) -> np.ndarray:
    """Soft tissue: neck widening into the shoulders and chest, thickest in the middle."""
    x, y = c.x, c.y
    shoulders = p.lungs[0].apex - 10.0
    rise = np.clip((y - shoulders + 25.0) / 45.0, 0.0, 1.0)
    half = p.neck + (p.half_width + 8.0 - p.neck) * (rise * rise * (3 - 2 * rise))
    half = np.minimum(half, p.half_width + 8.0 - np.clip(y - 60.0, 0, None) * 0.12)
    depth = np.sqrt(np.clip(1.0 - (x / half) ** 2, 0.0, 1.0))
    return p.soft * c.ramp(half - np.abs(x)) * (0.55 + 0.45 * np.sqrt(depth))


def _lung_air(p: _Patient, c: _Canvas, lungs=None) -> np.ndarray:
    """Air of the lungs, thickest in their middle, as a positive density to subtract."""
    air = np.zeros((c.size, c.size), np.float32)
    for lung in lungs or p.lungs:
        inside = lung.inside(c.x, c.y)
        depth = np.sqrt(np.clip(inside / (0.6 * lung.ax), 0.0, 1.0))
        air += c.ramp(inside) * (0.72 + 0.28 * depth)
    return 0.6 * p.hyperlucency * air


def _heart(p: _Patient, c: _Canvas):
    """The cardiac silhouette and aortic knob (hiding the lung behind them) and the hila."""
    cx, cy, a, b, phi = p.heart
    cos, sin = math.cos(phi), math.sin(phi)
    u = ((c.x - cx) * cos + (c.y - cy) * sin) / a
    v = ((c.y - cy) * cos - (c.x - cx) * sin) / b
    heart = c.ramp((1.0 - np.sqrt(u * u + v * v)) * b)
    top = cy - math.sqrt((a * sin) ** 2 + (b * cos) ** 2) + 25.0
    knob_x, knob_y = p.shift_mediastinum + p.mediastinum - 4.0, top - 40.0
    knob = c.ramp(14.0 - np.hypot((c.x - knob_x) / 1.1, c.y - knob_y))
    # the superior mediastinum (great vessels) between the lungs down to the heart, a
    # little wider on the right (the superior vena cava)
    half = p.mediastinum * (1.0 + 0.15 * (c.x < p.shift_mediastinum))
    superior = c.ramp(half - np.abs(c.x - p.shift_mediastinum), 3.0) * c.ramp(top - c.y, 10.0)
    hidden = np.maximum(np.maximum(heart, knob), superior)
    hila = np.zeros_like(heart)
    for lung in p.lungs:
        hx = p.shift_mediastinum + lung.side * (p.mediastinum + 14.0)
        hila += np.exp(-(((c.x - hx) / 16.0) ** 2 + ((c.y - knob_y - 45.0) / 26.0) ** 2))
    return hidden, hila, knob_y + 45.0


def _vessel_tree(rng: np.random.Generator, p: _Patient, c: _Canvas, hilum_y: float,
                 collapsed) -> None:
    """Pulmonary vessels: branches from each hilum, tapering and halving outwards, drawn
    into the canvas (stopping at the lung's edge, or at a collapsed lung's edge). Both
    lungs' branches of one generation are handled as one array."""
    fields = ("cx", "cy", "ax", "ay", "dome_top", "dome_peak", "dome_height")
    params = {name: np.array([getattr(lung, name) for lung in collapsed]) for name in fields}
    which = np.repeat([0, 1], 5)
    side = np.where(which == 0, -1.0, 1.0)
    x = p.shift_mediastinum + side * (p.mediastinum + 12.0)
    angles = np.radians(rng.uniform([60, 20, -15, -50, -80] * 2, [80, 35, 0, -35, -65] * 2))
    y = hilum_y + np.tile([-10.0, -4.0, 0.0, 6.0, 12.0], 2)
    length = rng.uniform(26.0, 34.0, 10)
    diameter = rng.uniform(6.5, 8.5, 10)
    segments: dict[bool, list] = {True: [], False: []}
    for generation in range(7):
        x1 = x + side * length * np.cos(angles)
        y1 = y - length * np.sin(angles)
        q = {name: values[which] for name, values in params.items()}
        ellipse = (1.0 - np.sqrt(((x1 - q["cx"]) / q["ax"]) ** 2
                                 + ((y1 - q["cy"]) / q["ay"]) ** 2)) * q["ax"]
        dome = q["dome_top"] + q["dome_height"] * ((x1 - q["dome_peak"]) / q["ax"]) ** 2
        inside = np.minimum(ellipse, dome - y1) > 2.0
        # a branch that would leave the lung ends half way
        x1 = np.where(inside, x1, (x + x1) / 2)
        y1 = np.where(inside, y1, (y + y1) / 2)
        segments[generation < 2].append((x, y, x1, y1, 0.03 * np.pi / 4 * diameter**2))
        n = len(x)
        keep = inside & (rng.random(n) < (p.airways if generation >= 2 else 1.0))
        spread = np.radians(rng.uniform(14.0, 32.0, n))
        twist = np.radians(rng.normal(0.0, 6.0, n))
        x, y = np.repeat(x1[keep], 2), np.repeat(y1[keep], 2)
        which, side = np.repeat(which[keep], 2), np.repeat(side[keep], 2)
        angles = np.stack([angles + twist - spread, angles + twist + spread], 1)[keep].ravel()
        length = np.repeat(length[keep], 2) * rng.uniform(0.7, 0.9, 2 * keep.sum())
        diameter = np.repeat(diameter[keep], 2) * 0.7
        if not len(x):
            break
    for thick, parts in segments.items():
        if parts:
            x0, y0, x1, y1, area = (np.concatenate(v) for v in zip(*parts, strict=True))
            c.line(x0, y0, x1, y1, area, sigma=2.0 if thick else 0.8)


def _bones(p: _Patient, c: _Canvas, lungs_soft: np.ndarray) -> np.ndarray:
    """Spine, ribs, clavicles and scapulae as added density."""
    x, y = c.x, c.y
    top, bottom = -160.0, 160.0
    spine_x = -p.rotation / 2 + p.scoliosis * np.sin(np.pi * (y - top) / (bottom - top))
    off = x - spine_x
    level = (y - p.spine_top) / 27.0
    discs = 0.55 + 0.45 * np.cos(np.pi * level) ** 2
    spine = c.ramp(20.0 - np.abs(off), 3.0) * discs
    pedicles = np.exp(-((np.abs(off) - 13.0) / 3.5) ** 2 - ((level - np.round(level)) / 0.22)
                      ** 2)
    spinous = np.exp(-(off / 2.5) ** 2 - ((level - np.round(level) - 0.25) / 0.2) ** 2)
    column = 0.13 * spine + 0.08 * pedicles + 0.07 * spinous

    # Ribs: posterior ribs run from the spine laterally and downwards; the fainter anterior
    # ribs from the lateral wall down towards the sternum; spacing widens downwards.
    lateral = np.abs(off)
    reach = lateral / p.inner
    rib_top = p.lungs[0].apex + 8.0 + p.ribs[0]
    ribs = np.zeros_like(x)
    for curve, count, weight, width in (
        (0.0032 * (lateral - 25.0) ** 2, 10, 1.0, 0.42),
        (55.0 * (1.0 - reach) + 15.0, 7, 0.5, 0.34),
    ):
        level = np.clip((y - rib_top - curve) / (230.0 * p.ribs[1]), 0.0, None) ** 0.85 * count
        phase = level - np.floor(level)
        profile = np.sqrt(np.clip(np.sin(np.pi / width * phase), 0.0, None)) * (phase < width)
        ribs += weight * profile
    ribs *= c.ramp(p.inner + 10.0 - lateral, 4.0) * c.ramp(lateral - 18.0, 4.0)
    ribs *= (0.2 + 0.8 * lungs_soft) * c.ramp(p.lungs[1].dome_top + 25.0 - y, 20.0)

    # Clavicles from the manubrium (their medial ends straddle the spinous processes
    # evenly only without rotation) out and up to the shoulders.
    ant = x - p.rotation / 2
    out = np.abs(ant) - 20.0
    height, rise = p.clavicle
    clavicle_y = height - rise * np.clip(out / 120.0, 0, 1) + 8.0 * np.sin(
        np.pi * np.clip(out / 120.0, 0, 1)) ** 2
    clavicles = c.ramp(6.0 - np.abs(y - clavicle_y)) * c.ramp(out) * c.ramp(125.0 - out)

    # Scapulae: a plate at the upper lateral chest wall; in an AP film (arms not rotated
    # forward) its medial border lies over the lung.
    medial = (p.inner - (38.0 if p.scapula_over_lungs else 8.0)) - 0.15 * (y + 120.0)
    scapulae = (c.ramp(lateral - medial, 3.0) * c.ramp(y + 125.0, 6.0)
                * c.ramp(-10.0 - y + 0.5 * (lateral - medial), 6.0))
    return column + 0.12 * ribs + 0.18 * clavicles + 0.08 * scapulae


# --------------------------------------------------------------------------- findings
@dataclass(frozen=True)
class Lesion:
    """One drawn local finding: ``finding`` (``Nodule`` / ``Mass``), its centre in
    patient millimetres (``x_mm`` right of the image centre, ``y_mm`` below it) and its
    diameter in mm (a mass's mean diameter)."""

    finding: str
    x_mm: float
    y_mm: float
    diameter_mm: float


def _free_spot(rng, p: _Patient, radius: float, taken: list[Lesion], avoid_y: float) -> tuple:
    """A lesion centre inside a lung, clear of its edges, the heart and other lesions."""
    cx, cy, a, b, phi = p.heart
    for _ in range(60):
        lung = p.lungs[int(rng.random() < 0.5)]
        x = _u(rng, lung.cx - lung.ax, lung.cx + lung.ax)
        y = _u(rng, lung.apex, lung.dome_top + lung.dome_height)
        u = ((x - cx) * math.cos(phi) + (y - cy) * math.sin(phi)) / (a + radius)
        v = ((y - cy) * math.cos(phi) - (x - cx) * math.sin(phi)) / (b + radius)
        if (lung.inside(x, y, margin=radius + 4.0) > 0 and u * u + v * v > 1.0
                and y < avoid_y - radius - 5.0
                and all(math.hypot(x - t.x_mm, y - t.y_mm) > radius + t.diameter_mm / 2 + 8.0
                        for t in taken)):
            return x, y
    return None


def _findings(rng: np.random.Generator, p: _Patient, c: _Canvas, labels: np.ndarray,
              causes: _Causes, details: dict, masks: np.ndarray, air: np.ndarray):
    """Draw the localised findings; returns the density to add, the lung air to remove
    (as a factor map) and the lesions. Fills ``masks`` in place."""
    add = np.zeros_like(air)
    keep_air = np.ones_like(air)
    lesions: list[Lesion] = []
    effusion_top = 1e9  # the highest fluid level: other findings stay above it
    if labels[_F["Effusion"]]:
        effusion_top = _effusion(rng, p, c, details, masks, add, keep_air)
    if labels[_F["Consolidation"]]:
        _consolidation(rng, p, c, details, masks, add, keep_air, effusion_top)
    if labels[_F["Atelectasis"]]:
        _atelectasis(rng, p, c, details, masks, add, keep_air, effusion_top)
    if labels[_F["Mass"]]:
        _mass(rng, p, c, masks, add, keep_air, effusion_top, lesions)
    if labels[_F["Nodule"]]:
        _nodules(rng, p, c, masks, add, effusion_top, lesions)
    return add, keep_air, lesions


# Each finding below adds its density to ``add``, multiplies the air it removes into
# ``keep_air`` and marks its mask, in place, in the order _findings calls them.

def _effusion(rng, p: _Patient, c: _Canvas, details: dict, masks: np.ndarray,
              add: np.ndarray, keep_air: np.ndarray) -> float:
    """Fluid in the costophrenic angle with a meniscus; returns the highest fluid level."""
    x, y = c.x, c.y
    effusion_top = 1e9
    for side in details["effusion_sides"]:
        lung = p.lungs[(side + 1) // 2]
        height = _u(rng, 20.0, 110.0)
        rise = _u(rng, 35.0, 60.0)
        cp_y = lung.costophrenic()[1]
        medial_edge = lung.cx - side * lung.ax
        t = np.clip((x - medial_edge) * side / (2 * lung.ax), 0.0, 1.0)
        top = cp_y - height - rise * t * t
        effusion_top = min(effusion_top, cp_y - height - rise)
        inside = lung.inside(x, y, margin=-2.0)
        depth = np.clip((y - top) / 20.0, 0.0, 1.0)  # the meniscus thins upwards
        fluid = c.ramp(inside) * c.ramp(y - top) * (0.35 + 0.65 * depth)
        keep_air *= 1.0 - fluid
        add += 0.1 * fluid
        masks[LOCALISED_FINDINGS.index("Effusion")] |= (fluid >= 0.5).astype(np.uint8)
    return effusion_top


def _consolidation(rng, p: _Patient, c: _Canvas, details: dict, masks: np.ndarray,
                   add: np.ndarray, keep_air: np.ndarray, effusion_top: float) -> None:
    """An airless region with a soft edge (and sometimes a fissure's sharp one)."""
    x, y = c.x, c.y
    side = details["consolidation_side"]
    lung = p.lungs[(side + 1) // 2]
    radius = _u(rng, 20.0, 50.0)
    zone = _u(rng, 0.2, 0.85)
    ccx = lung.cx + side * _u(rng, -0.2, 0.45) * lung.ax
    ccy = lung.apex + zone * (lung.dome_top - lung.apex) + 10.0
    ccy = min(ccy, effusion_top - 0.3 * radius)
    wobble = _smooth_field(rng, c, 14)
    r = np.hypot(x - ccx, y - ccy) / radius + 0.3 * wobble
    region = c.ramp((1.0 - r) * radius, 16.0) * c.ramp(lung.inside(x, y))
    if rng.random() < 0.5:  # a lobe's fissure gives one sharp, straight margin
        fissure = ccy + _u(rng, -0.6, -0.2) * radius
        region *= c.ramp(y - fissure)
    keep_air *= 1.0 - _u(rng, 0.8, 0.92) * region
    add += 0.05 * region
    details["air_bronchograms"] = (region, ccx, ccy, radius)
    masks[LOCALISED_FINDINGS.index("Consolidation")] |= (region >= 0.5).astype(np.uint8)


def _atelectasis(rng, p: _Patient, c: _Canvas, details: dict, masks: np.ndarray,
                 add: np.ndarray, keep_air: np.ndarray, effusion_top: float) -> None:
    """A plate-like band or a collapsed lobe's wedge against the mediastinum."""
    x, y = c.x, c.y
    side, kind = details["atelectasis"]
    lung = p.lungs[(side + 1) // 2]
    if kind == "band":  # plate-like (or compressive, above an effusion) atelectasis
        length, thick = _u(rng, 45.0, 85.0), _u(rng, 8.0, 14.0)
        bx = lung.cx + side * _u(rng, 0.05, 0.35) * lung.ax  # clear of the heart
        by = min(lung.dome_top - _u(rng, 18.0, 45.0), effusion_top - 12.0)
        angle = math.radians(_u(rng, -15.0, 15.0))
        along = (x - bx) * math.cos(angle) + (y - by) * math.sin(angle)
        across = (y - by) * math.cos(angle) - (x - bx) * math.sin(angle)
        region = c.ramp(thick / 2 - np.abs(across), 5.0) * c.ramp(length / 2 - np.abs(along),
                                                                    10.0)
    else:  # a collapsed lobe: a wedge against the mediastinum
        medial = lung.cx - side * lung.ax
        if kind == "lower":
            tip_y, base_y = lung.dome_top - _u(rng, 70.0, 110.0), lung.dome_top + 10.0
            reach = _u(rng, 65.0, 90.0)  # out past the heart's border
            slope = (x - medial) * side / reach
            region = c.ramp(y - tip_y - (base_y - tip_y) * np.clip(slope, 0, None), 3.0)
        else:
            base_y = lung.apex + _u(rng, 50.0, 80.0)
            reach = _u(rng, 45.0, 70.0)
            slope = np.clip((x - medial) * side / reach, 0, None)
            region = c.ramp(base_y - (base_y - lung.apex) * slope ** 1.5 - y, 3.0)
        region = region * c.ramp((x - medial) * side + 2.0)
    region = region * c.ramp(lung.inside(x, y))
    keep_air *= 1.0 - 0.85 * region
    # a collapsed lobe is denser than the heart it lies behind (the retrocardiac
    # triangle): its density adds even where no air is left to replace
    add += (0.06 if kind == "band" else 0.12) * region
    masks[LOCALISED_FINDINGS.index("Atelectasis")] |= (region >= 0.5).astype(np.uint8)


def _mass(rng, p: _Patient, c: _Canvas, masks: np.ndarray, add: np.ndarray,
          keep_air: np.ndarray, effusion_top: float, lesions: list) -> None:
    """One lobulated opacity over 3 cm."""
    x, y = c.x, c.y
    diameter = _u(rng, 30.0, 60.0)
    spot = _free_spot(rng, p, diameter / 2 + 6.0, lesions, effusion_top)
    if spot is None:
        spot = (p.lungs[1].cx, p.lungs[1].apex + 0.35 * p.lungs[1].ay)
    harmonics = (_u(rng, 0.06, 0.12), _u(rng, 0, 6.3), _u(rng, 0.03, 0.07), _u(rng, 0, 6.3))
    theta = np.arctan2(y - spot[1], x - spot[0])
    edge = diameter / 2 * (1.0 + harmonics[0] * np.cos(3 * theta + harmonics[1])
                           + harmonics[2] * np.cos(5 * theta + harmonics[3]))
    r = np.hypot(x - spot[0], y - spot[1])
    add += _u(rng, 0.3, 0.42) * np.sqrt(np.clip(1.0 - (r / edge) ** 2, 0.0, 1.0))
    keep_air *= 1.0 - 0.3 * c.ramp(edge - r)
    masks[LOCALISED_FINDINGS.index("Mass")] |= (r <= edge).astype(np.uint8)
    lesions.append(Lesion("Mass", spot[0], spot[1], diameter))


def _nodules(rng, p: _Patient, c: _Canvas, masks: np.ndarray, add: np.ndarray,
             effusion_top: float, lesions: list) -> None:
    """One to three round opacities of 2-3 cm, clear of the other lesions."""
    x, y = c.x, c.y
    count = 1 + int(rng.choice(3, p=[0.6, 0.25, 0.15]))
    for _ in range(count):
        diameter = _u(rng, 20.0, 30.0)
        spot = _free_spot(rng, p, diameter / 2, lesions, effusion_top)
        contrast = _u(rng, 0.26, 0.36)
        if spot is None:
            continue
        r = np.hypot(x - spot[0], y - spot[1])
        profile = np.sqrt(np.clip(1.0 - (r / (diameter / 2)) ** 2, 0.0, 1.0))
        add += contrast * c.ramp(diameter / 2 - r) * (0.45 + 0.55 * profile)
        masks[LOCALISED_FINDINGS.index("Nodule")] |= (r <= diameter / 2).astype(np.uint8)
        lesions.append(Lesion("Nodule", spot[0], spot[1], diameter))
    if not any(lesion.finding == "Nodule" for lesion in lesions):  # no room: a small one
        lung = p.lungs[0]
        spot = (lung.cx, lung.apex + 0.3 * lung.ay)
        r = np.hypot(x - spot[0], y - spot[1])
        add += 0.3 * c.ramp(10.0 - r)
        masks[LOCALISED_FINDINGS.index("Nodule")] |= (r <= 10.0).astype(np.uint8)
        lesions.append(Lesion("Nodule", spot[0], spot[1], 20.0))


# --------------------------------------------------------------------------- devices
_LETTERS = {"L": ((0, 0, 0, 1), (0, 1, 0.65, 1)),
            "R": ((0, 0, 0, 1), (0, 0, 0.55, 0), (0.55, 0, 0.65, 0.15), (0.65, 0.15, 0.65, 0.35),
                  (0.65, 0.35, 0.55, 0.5), (0.55, 0.5, 0, 0.5), (0.3, 0.5, 0.7, 1))}


def _devices(rng: np.random.Generator, p: _Patient, c: _Canvas, hilum_y: float) -> list[str]:
    """ECG electrodes with their wires, central lines and tubes, and the side marker, drawn
    into the canvas as metal (much denser than bone)."""
    drawn = []
    if rng.random() < 0.15:
        drawn.append("ECG leads")
        for _ in range(int(rng.integers(3, 6))):
            ex = _u(rng, -1.0, 1.0) * p.half_width * 0.85
            ey = _u(rng, -140.0, 60.0)
            angle = np.linspace(0, 2 * np.pi, 25)
            c.line(ex + 7 * np.cos(angle[:-1]), ey + 7 * np.sin(angle[:-1]),
                   ex + 7 * np.cos(angle[1:]), ey + 7 * np.sin(angle[1:]), 0.5, sigma=0.7)
            c.dots([ex], [ey], [40.0], sigma=1.5)
            # the wire sags in a smooth curve off the film
            t = np.linspace(0, 1, 12)
            end_x = np.sign(ex or 1.0) * _u(rng, 170.0, 220.0)
            end_y = _u(rng, -200.0, 200.0)
            sag = _u(rng, -40.0, 40.0)
            wx = ex + (end_x - ex) * t
            wy = ey + (end_y - ey) * t + sag * np.sin(np.pi * t)
            c.line(wx[:-1], wy[:-1], wx[1:], wy[1:], 0.6, sigma=0.6)
    if rng.random() < 0.1:
        if rng.random() < 0.65:  # central venous catheter: right internal jugular into the SVC
            drawn.append("central line")
            t = np.linspace(0, 1, 16)
            tip_y = hilum_y + _u(rng, -10.0, 15.0)
            lx = p.shift_mediastinum - 45.0 + 30.0 * t ** 0.7 + _u(rng, -5, 5)
            ly = -175.0 + (tip_y + 175.0) * t
            c.line(lx[:-1], ly[:-1], lx[1:], ly[1:], 0.9, sigma=0.8)
        if rng.random() < 0.5 or not drawn or drawn[-1] != "central line":
            drawn.append("endotracheal tube")
            tip = hilum_y - _u(rng, 50.0, 75.0)
            for offset, density in ((-4.5, 0.3), (4.5, 0.3), (-3.0, 1.0)):
                tx = p.shift_mediastinum * 0.5 + offset
                c.line(tx, -175.0, tx, tip, density, sigma=0.7)
    if rng.random() < 0.6:
        letter = "L" if rng.random() < 0.5 else "R"
        drawn.append(f"marker {letter}")
        corner_x = (-1.0 if rng.random() < 0.5 else 1.0) * _u(rng, 110.0, 140.0)
        corner_y = (-1.0 if rng.random() < 0.7 else 1.0) * _u(rng, 115.0, 140.0)
        strokes = np.array(_LETTERS[letter], dtype=np.float64) * 16.0
        c.line(corner_x + strokes[:, 0] - 5, corner_y + strokes[:, 1] - 8,
               corner_x + strokes[:, 2] - 5, corner_y + strokes[:, 3] - 8, 8.0, sigma=1.2,
               on_film=True)
    return drawn


# --------------------------------------------------------------------------- phantom
@dataclass(frozen=True)
class ChestPhantom:
    """One ChestX-ray14-like phantom.

    Attributes:
        image: uint8 [size, size], grey 0..255 (air dark, bone bright).
        labels: uint8 [8] in {0, 1}, in :data:`FINDINGS` order.
        masks: uint8 [6, size, size] in {0, 1}, one channel per
            :data:`LOCALISED_FINDINGS` entry (all zero where the finding is absent).
        ctr: the cardiothoracic ratio on the film.
        projection: ``"PA"`` or ``"AP"``.
        spacing_mm: pixel spacing, ``320 / size``.
        lesions: the nodules and masses drawn (centres and diameters in mm).
        devices: the devices on the film (``"ECG leads"``, ``"central line"``,
            ``"endotracheal tube"``, ``"marker L"`` …).
        age, sex: the patient's (metadata for the label file only).
    """

    image: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    ctr: float
    projection: str
    spacing_mm: float
    lesions: tuple[Lesion, ...] = ()
    devices: tuple[str, ...] = ()
    age: int = 50
    sex: str = "M"

    @property
    def finding_names(self) -> list[str]:
        """The findings present, in :data:`FINDINGS` order."""
        return [name for name, on in zip(FINDINGS, self.labels, strict=True) if on]


def _finding_details(rng: np.random.Generator, labels: np.ndarray, causes: _Causes) -> dict:
    """Sides and kinds of the regional findings (drawn before the anatomy, since
    atelectasis changes it)."""
    consolidation_side = -1 if rng.random() < 0.55 else 1
    if causes.heart_failure and rng.random() < 0.6:
        effusion_sides = (-1, 1)
    elif causes.pneumonia:
        effusion_sides = (consolidation_side,)
    else:
        effusion_sides = (-1, 1) if rng.random() < 0.2 else ((-1 if rng.random() < 0.55 else 1),)
    if causes.compressive:
        atelectasis = (effusion_sides[int(rng.random() < 0.5) % len(effusion_sides)], "band")
    else:
        kind = ("band", "lower", "upper")[int(rng.choice(3, p=[0.4, 0.35, 0.25]))]
        atelectasis = (-1 if rng.random() < 0.5 else 1, kind)
    return {"consolidation_side": consolidation_side, "effusion_sides": effusion_sides,
            "atelectasis": atelectasis if labels[_F["Atelectasis"]] else None}


def generate_chest_phantom(index: int, size: int = 256, seed: int = 0) -> ChestPhantom:
    """Draw one ChestX-ray14-like chest film, its findings and their masks.

    Args:
        index: which phantom of the set (>= 0); every index is its own patient.
        size: side length in pixels (>= 32); the field of view is always 320 mm, so the
            pixel spacing is ``320 / size`` mm and every size shows the same patient.
        seed: seed of the set (>= 0); ``(seed, index, size)`` fixes the output.

    Returns:
        A :class:`ChestPhantom` (image uint8 [size, size], labels uint8 [8], masks uint8
        [6, size, size] and the drawn ground truth).
    """
    if size < 32:
        raise ValueError(f"phantom size must be at least 32 px, got {size}")
    label_rng, rng, noise_rng = _streams(seed, index)
    labels, causes = _draw_labels(label_rng)
    details = _finding_details(rng, labels, causes)
    p = _draw_patient(rng, labels, details["atelectasis"])
    c = _Canvas(size, p)
    masks = np.zeros((len(LOCALISED_FINDINGS), size, size), np.uint8)

    body = _body(p, c)
    hidden, hila, hilum_y = _heart(p, c)
    collapsed = list(p.lungs)
    pneumothorax = None
    if labels[_F["Pneumothorax"]]:
        side = -1 if rng.random() < 0.5 else 1
        rim = _u(rng, 10.0, 50.0)
        k = (side + 1) // 2
        collapsed[k] = p.lungs[k].shrunk(rim)
        pneumothorax = (k, rim)
    air = _lung_air(p, c) * (1.0 - 0.88 * hidden)
    lungs_soft = np.clip(air / 0.45, 0.0, 1.0)
    _vessel_tree(rng, p, c, hilum_y, collapsed)
    vessels = c.render() * (0.3 + 0.7 * lungs_soft)
    add, keep_air, lesions = _findings(rng, p, c, labels, causes, details, masks, air)
    vessels *= keep_air  # airless lung hides its vessels (the silhouette sign)
    # the trachea: an air column down the superior mediastinum to the carina
    trachea_x = p.shift_mediastinum * 0.7 - p.rotation / 4
    trachea = c.ramp(8.0 - np.abs(c.x - trachea_x), 2.0) * c.ramp(hilum_y - 35.0 - c.y, 6.0)
    air = air + 0.13 * trachea
    density = body - air * keep_air + vessels + 0.07 * hila + _bones(
        p, c, lungs_soft * keep_air) * (body > 0.05)
    if pneumothorax is not None:
        k, rim = pneumothorax
        lung, visible = p.lungs[k], collapsed[k]
        outside = c.ramp(-visible.inside(c.x, c.y)) * c.ramp(lung.inside(c.x, c.y))
        density -= outside * (vessels + 0.12)  # no markings, no lung tissue: only air
        density += 0.05 * c.ramp(visible.inside(c.x, c.y))  # the collapsed lung is denser
        boundary = visible.inside(c.x, c.y)
        width = max(0.9, 0.5 * c.spacing)  # the visceral pleura: a hairline
        line = np.exp(-(boundary / width) ** 2) * (0.9 / width) * c.ramp(lung.inside(c.x, c.y))
        density += 0.2 * line
        masks[LOCALISED_FINDINGS.index("Pneumothorax")] |= (outside >= 0.5).astype(np.uint8)
    if "air_bronchograms" in details:
        region, bx, by, radius = details.pop("air_bronchograms")
        side = details["consolidation_side"]
        hx = p.shift_mediastinum + side * (p.mediastinum + 12.0)
        angle0 = math.atan2(hilum_y - by, (bx - hx) * side)
        for _ in range(3):
            angle = -angle0 + _u(rng, -0.35, 0.35)
            x0 = bx - side * math.cos(angle) * radius
            y0 = by - math.sin(angle) * radius
            x1 = bx + side * math.cos(angle) * (radius * 0.8)
            y1 = by + math.sin(angle) * (radius * 0.8)
            c.line(x0, y0, x1, y1, 3.5, sigma=2.0)
        density -= 0.06 * c.render() * region
    density = density + add * (body > 0.05)
    if p.breasts is not None:
        for side in (-1, 1):
            bx, by = side * 0.55 * p.inner, p.breasts
            r = np.hypot((c.x - bx) / 85.0, (c.y - by) / 60.0)
            density += 0.1 * c.ramp((1.0 - r) * 60.0, 3.0) * np.clip((c.y - by + 60.0) / 60.0,
                                                                     0, 1)
    if p.bubble:
        left = p.lungs[1]
        bubble_y = float(left.dome(left.cx)) + 22.0
        r = np.hypot((c.x - left.cx + 0.2 * left.ax) / 28.0, (c.y - bubble_y) / 17.0)
        density -= 0.28 * c.ramp((1.0 - r) * 17.0)
    devices = _devices(rng, p, c, hilum_y)
    metal = c.render()
    image = _expose(rng, noise_rng, p, c, density + metal)
    return ChestPhantom(
        image=image, labels=labels, masks=masks, ctr=p.ctr, projection=p.projection,
        spacing_mm=c.spacing, lesions=tuple(lesions), devices=tuple(devices), age=p.age,
        sex=p.sex)


def _expose(rng: np.random.Generator, noise_rng: np.random.Generator, p: _Patient,
            c: _Canvas, density: np.ndarray) -> np.ndarray:
    """Film response (gain, offset, gamma and an uneven field), collimation and quantum
    noise (stronger where fewer photons arrive, in big patients); grey uint8."""
    field = 1.0 + 0.06 * _smooth_field(rng, c, 3) + _u(rng, -0.08, 0.08) * (c.film_y / 160.0)
    gamma, gain, offset = _u(rng, 0.9, 1.4), _u(rng, 175.0, 215.0), _u(rng, 4.0, 22.0)
    scatter = 0.06 * (p.soft - 0.85)  # a big patient scatters more: lower contrast
    level = np.clip(density / 1.45 + scatter, 0.0, 1.2) ** gamma
    image = offset + gain * level * field
    sides = rng.random(4) < 0.35
    widths = rng.uniform(5.0, 30.0, 4)
    bright = rng.random() < 0.5
    shutter_grey = _u(rng, 225.0, 250.0) if bright else _u(rng, 0.0, 15.0)
    noise_level = _u(rng, 1.5, 4.5) * (0.8 + 0.4 * (p.soft - 0.85))
    image += noise_level * (0.6 + 0.6 * level) * noise_rng.standard_normal(
        image.shape, dtype=np.float32)
    half = FIELD_OF_VIEW_MM / 2
    for on, width, coordinate, sign in zip(sides, widths, (c.film_x, c.film_x, c.film_y,
                                                           c.film_y), (-1, 1, -1, 1),
                                           strict=True):
        if on:
            outside = c.ramp(sign * coordinate - (half - width), c.spacing)
            image = image * (1.0 - outside) + shutter_grey * outside
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- files
NIH_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
               "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
               "OriginalImagePixelSpacing[x", "y]")


def write_chest_phantoms(
    folder: str | Path, num_images: int, size: int = 256, seed: int = 0, masks: bool = False,
    labels_file: str = "Data_Entry.csv",
) -> list[Path]:
    """Write phantoms ``0..num_images-1`` as 8-bit grey PNGs with a label file.

    Files are ``folder/phantom_00000.png`` …; ``folder/Data_Entry.csv`` lists them in
    ChestX-ray14's ``Data_Entry_2017.csv`` layout (``Image Index``, ``Finding Labels``
    ``|``-joined or ``No Finding``, ``Follow-up #`` 0, ``Patient ID`` index + 1 (every
    phantom its own patient), age, sex, ``View Position`` AP/PA, size and spacing). With
    ``masks``, each localised finding's mask goes to ``folder/masks/<Finding>/<name>.png``
    with values {0, 255} (an empty one where it is absent).

    Returns:
        The image paths, in index order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if masks:
        for name in LOCALISED_FINDINGS:
            (folder / "masks" / name).mkdir(parents=True, exist_ok=True)
    paths = []
    with open(folder / labels_file, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(NIH_COLUMNS)
        for index in range(num_images):
            phantom = generate_chest_phantom(index, size=size, seed=seed)
            path = folder / f"phantom_{index:05d}.png"
            Image.fromarray(phantom.image).save(path)
            if masks:
                for name, mask in zip(LOCALISED_FINDINGS, phantom.masks, strict=True):
                    Image.fromarray(mask * np.uint8(255)).save(folder / "masks" / name
                                                               / path.name)
            spacing = f"{phantom.spacing_mm:.4f}"
            writer.writerow([path.name, "|".join(phantom.finding_names) or "No Finding", 0,
                             index + 1, phantom.age, phantom.sex, phantom.projection, size,
                             size, spacing, spacing])
            paths.append(path)
    return paths
