"""DICOM radiographs decoded to grey uint8, the way a viewer would show them.

pydicom reads the file and does the DICOM arithmetic (modality rescale and
LUT, VOI window and LUT, compressed transfer syntaxes through its decoder
plugins); this module only chooses which of those steps apply to a chest
radiograph and maps the result onto 0..255.
"""

from __future__ import annotations

import importlib.util
import os
import struct

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder

__all__ = [
    "DICOM_EXTRA_HINT",
    "check_pixel_count",
    "decode_dicom",
    "dicom_to_grey",
    "has_dicom_magic",
]

DICOM_EXTRA_HINT = 'pip install "caid-hf[dicom]"'
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# pydicom converts these to RGB when it decodes them (``pixel_array``).
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT")
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's convert("L")
# What pydicom raises for a malformed file varies by element and version: a
# truncated file may read "fine" and fail later with AttributeError, ValueError
# or struct.error. All of them mean "this file cannot be decoded".
_MALFORMED = (
    InvalidDicomError,
    OSError,
    EOFError,
    ValueError,
    LookupError,
    AttributeError,
    TypeError,
    ArithmeticError,
    RuntimeError,
    struct.error,
)


def _pixel_limit() -> int | None:
    """The most pixels an image may have: twice PIL's ``Image.MAX_IMAGE_PIXELS``, the size at
    which PIL refuses a file as a decompression bomb (None: no limit, as in PIL)."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def check_pixel_count(name: str, height: int, width: int, frames: int = 1) -> None:
    """Refuse an image larger than :func:`_pixel_limit` before decoding it: a small file can
    declare gigapixels (a decompression bomb). Raises ValueError naming ``name``."""
    limit = _pixel_limit()
    if limit is not None and height * width * frames > limit:
        raise ValueError(
            f"cannot decode image {name!r}: {width} x {height} px"
            f"{f' x {frames} frames' if frames > 1 else ''} is more than {limit:,} pixels, "
            "a possible decompression bomb (raise PIL.Image.MAX_IMAGE_PIXELS to allow it)"
        )


def has_dicom_magic(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM Part 10 file: ``DICM`` at byte offset 128.

    Anything that cannot be read (missing, a folder) is not DICOM; the reader
    the caller falls back to reports why.
    """
    try:
        with open(path, "rb") as file:
            header = file.read(132)
    except OSError:
        return False
    return header[128:132] == b"DICM"


def decode_dicom(path: str | os.PathLike) -> np.ndarray:
    """Read a single-frame DICOM image as grey uint8 [H, W] in 0..255.

    The pixel values go through the DICOM display pipeline, pydicom doing the
    arithmetic:

    1. Modality: *Modality LUT Sequence* or *Rescale Slope/Intercept*
       (``apply_modality_lut``).
    2. VOI, when the file has one, its first view when there are several:
       the *VOI LUT Sequence* if present (it wins over a window, as in
       pydicom's ``apply_voi_lut``), otherwise *Window Center/Width* with
       its *VOI LUT Function* (LINEAR, LINEAR_EXACT, SIGMOID). The VOI's
       output range maps to 0..255: for a window, the range pydicom assigns
       to values below and above it (the stored bit range after rescale, see
       ``apply_windowing``); for a VOI LUT, its smallest to largest entry,
       because the entry bit depth in *LUT Descriptor* is often larger than
       the data (16 declared, 12 used).
    3. Without a VOI, the image's own minimum..maximum of modality values maps
       to 0..255 (a full-contrast stretch, like a viewer's default window); a
       constant image gives zeros.
    4. MONOCHROME1 is inverted after the VOI, so air is dark and bone bright
       as in MONOCHROME2.

    Values are rounded to the nearest integer (``np.rint``), not truncated.
    RGB (and YBR, which pydicom converts to RGB) images skip steps 1-4 and
    become grey by ITU-R 601 luminance, scaled by *Bits Stored* when deeper
    than 8 bits. Only DICOM Part 10 files (preamble and ``DICM``) are read.

    Args:
        path: A DICOM file.

    Returns:
        Grey uint8 [H, W] in 0..255.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be decoded; the message names ``path``. This
            covers non-DICOM and truncated files, multi-frame files (pre-training
            expects single-frame radiographs), photometric interpretations other
            than MONOCHROME1/2, RGB and YBR, and compressed transfer syntaxes
            without an installed decoder (the message names the transfer syntax
            and the extra to install, ``pip install "caid-hf[dicom]"``).
    """
    name = os.fspath(path)
    try:
        dataset = pydicom.dcmread(name)
    except FileNotFoundError:
        raise
    except _MALFORMED as error:
        raise _cannot_decode(name, error) from error
    return dicom_to_grey(dataset, name)


def dicom_to_grey(dataset: Dataset, name: str = "DICOM dataset") -> np.ndarray:
    """A read DICOM dataset as grey uint8 [H, W], by the rules of :func:`decode_dicom`: the
    one DICOM decoder of caid-hf, used by training, the cache and ``CAiDImageProcessor``.

    Raises:
        ValueError: the dataset cannot be decoded; the message names ``name``.
    """
    _check_decodable(name, dataset)
    check_pixel_count(name, int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0),
                      int(dataset.get("NumberOfFrames", 1) or 1))
    try:
        pixels = dataset.pixel_array
        if dataset.PhotometricInterpretation in _MONOCHROME:
            return _monochrome_to_grey(pixels, dataset)
        return _colour_to_grey(pixels, dataset)
    except _MALFORMED as error:
        transfer_syntax = _transfer_syntax(dataset)
        if transfer_syntax is not None and transfer_syntax.is_compressed:
            reason = f"{transfer_syntax.name} pixel data: {error}"
            if importlib.util.find_spec("pylibjpeg") is None:
                reason += f" (the pylibjpeg decoders may help: {DICOM_EXTRA_HINT}, or python-gdcm)"
            raise _cannot_decode(name, reason) from error
        raise _cannot_decode(name, error) from error


def _transfer_syntax(dataset: Dataset):
    meta = getattr(dataset, "file_meta", None)
    return meta.get("TransferSyntaxUID") if meta is not None else None


def _cannot_decode(name: str, reason: object) -> ValueError:
    return ValueError(f"cannot decode image {name!r}: {reason}")


def _has_value(dataset: Dataset, keyword: str) -> bool:
    """Whether element ``keyword`` is present and not empty."""
    return dataset.get(keyword) not in (None, "")


def _check_decodable(name: str, dataset: Dataset) -> None:
    """Refuse, before decoding any pixels, what :func:`decode_dicom` does not handle."""
    if "PixelData" not in dataset:
        raise _cannot_decode(name, "no Pixel Data element (truncated file or not an image)")
    frames = dataset.get("NumberOfFrames")
    if frames not in (None, "", 1, "1"):
        raise _cannot_decode(
            name, f"multi-frame DICOM ({frames} frames): single-frame radiographs are "
                  "expected; pass the frames as separate images"
        )
    photometric = dataset.get("PhotometricInterpretation")
    if photometric not in _MONOCHROME + _COLOUR:
        raise _cannot_decode(
            name,
            f"photometric interpretation {photometric!r} is not supported "
            f"(expected {', '.join(_MONOCHROME + _COLOUR)})",
        )
    transfer_syntax = _transfer_syntax(dataset)
    if transfer_syntax is None:
        return  # pydicom's own error, raised when decoding, says it best
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError as error:
        raise _cannot_decode(name, f"unsupported transfer syntax: {error}") from error
    if not decoder.is_available:
        raise _cannot_decode(
            name,
            f"no decoder installed for its transfer syntax {transfer_syntax.name} "
            f"({transfer_syntax}); install the pylibjpeg decoders with {DICOM_EXTRA_HINT} "
            "(or python-gdcm)",
        )


def _monochrome_to_grey(pixels: np.ndarray, dataset: Dataset) -> np.ndarray:
    """Stored grey values [H, W] through modality, VOI and inversion to uint8."""
    values = apply_modality_lut(pixels, dataset)
    voi = _apply_voi(values, dataset)
    if voi is None:
        shown, low, high = values, values.min(), values.max()
    else:
        shown, low, high = voi
    if high == low:
        return np.zeros(pixels.shape, dtype=np.uint8)
    # Division by the signed span also covers a negative rescale slope, where
    # pydicom's window maps "below" to the larger value.
    fraction = np.clip((shown.astype(np.float64) - low) / (float(high) - float(low)), 0.0, 1.0)
    if dataset.PhotometricInterpretation == "MONOCHROME1":
        fraction = 1.0 - fraction
    return np.rint(fraction * 255.0).astype(np.uint8)


def _apply_voi(values: np.ndarray, dataset: Dataset) -> tuple[np.ndarray, float, float] | None:
    """The first VOI view applied to modality ``values``, with its output range.

    Returns ``(shown, low, high)``, where ``low`` and ``high`` are the outputs
    for the darkest and brightest inputs; ``None`` when the file has no VOI.
    """
    lut_items = dataset.get("VOILUTSequence")
    if lut_items and "LUTDescriptor" in lut_items[0] and "LUTData" in lut_items[0]:
        entries, first_input = lut_items[0].LUTDescriptor[:2]
        entries = entries or 2**16  # 0 means 65536 entries (PS3.3 C.11.2.1.1)
        # LUT inputs are integers; rounding keeps pydicom from truncating floats.
        inputs = np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values
        table = apply_voi(np.arange(first_input, first_input + entries), dataset)
        return apply_voi(inputs, dataset), table.min(), table.max()
    if _has_value(dataset, "WindowCenter") and _has_value(dataset, "WindowWidth"):
        # Values far outside the window land on pydicom's output bounds, which
        # depend on Bits Stored, Pixel Representation and the modality step.
        low, high = apply_windowing(np.array([-np.inf, np.inf]), dataset)
        return apply_windowing(values, dataset), low, high
    return None


def _colour_to_grey(pixels: np.ndarray, dataset: Dataset) -> np.ndarray:
    """RGB [H, W, 3] (pydicom's conversion of RGB/YBR data) to grey uint8 by luminance."""
    luma = pixels.astype(np.float64) @ _LUMA_WEIGHTS
    peak = 2 ** int(dataset.BitsStored) - 1
    return np.rint(np.clip(luma * (255.0 / peak), 0.0, 255.0)).astype(np.uint8)
