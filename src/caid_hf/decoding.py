"""The one image decoder of caid-hf: any file pre-training reads, and every file or DICOM
dataset ``CAiDImageProcessor`` is given, becomes grey uint8 [H, W] here.

- PNG, JPEG and other PIL formats (:func:`decode_grey`, :func:`pil_to_grey`): 8-bit grey as
  stored; colour by ITU-R 601 luminance; 16-bit grey scaled by its bit depth. Grey 8- and
  16-bit PNGs (the radiograph data sets' format) go to libpng through OpenCV when it is
  installed: faster than PIL, and stricter (it checks the chunks' CRCs and the image data's
  length and zlib checksum, where PIL fills missing rows with zeros); the pixels are PIL's.
- DICOM (:func:`decode_dicom`, :func:`dicom_to_grey`): pydicom reads the file and does the
  DICOM arithmetic (modality rescale and LUT, VOI window and LUT, compressed transfer
  syntaxes through its decoder plugins); this module chooses which of those steps apply to
  a chest radiograph and maps the result onto 0..255.

Standard library, NumPy, PIL, (for DICOM) pydicom and (optional, for speed) OpenCV only, and no import from the rest of caid-hf: a model repository on the Hub ships this file
with the image processor, so the processor runs where caid-hf is not installed.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

try:  # DICOM needs pydicom (a caid-hf dependency; optional for the Hub's remote code)
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder
except ImportError:  # pragma: no cover - exercised only without pydicom
    pydicom = None
    Dataset = object

    class InvalidDicomError(Exception):
        """Stands in for pydicom's when it is not installed."""

__all__ = [
    "DICOM_EXTRA_HINT",
    "IMAGE_EXTENSIONS",
    "check_pixel_count",
    "decode_dicom",
    "decode_grey",
    "dicom_to_grey",
    "has_dicom_magic",
    "libpng_available",
    "pil_to_grey",
    "png_significant_bits",
    "scale_high_bit_depth",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

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


def decode_dicom(path: str | os.PathLike, bits_stored: int | None = None) -> np.ndarray:
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
    3. Without a VOI, the stored bit range (*Bits Stored*, or ``bits_stored``
       when given: 0..4095 for 12 bits, signed when *Pixel Representation* is 1)
       through the rescale maps to 0..255, so every film of a scanner gets the same
       intensity scale. Only with a *Modality LUT Sequence* (no linear rescale to
       carry the range through) does the image's own minimum..maximum map to
       0..255; a constant image then gives zeros.
    4. MONOCHROME1 (or *Presentation LUT Shape* INVERSE, the same inversion) is
       inverted after the VOI, so air is dark and bone bright as in MONOCHROME2.
    5. *Pixel Padding Value* pixels (up to *Pixel Padding Range Limit*) are left out
       of step 3's minimum..maximum and shown black.

    ``bits_stored`` overrides the header's *Bits Stored* (for files whose header
    declares 16 bits of 12-bit data, say).

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
    return dicom_to_grey(dataset, name, bits_stored)


def dicom_to_grey(dataset: Dataset, name: str = "DICOM dataset",
                  bits_stored: int | None = None) -> np.ndarray:
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
            return _monochrome_to_grey(pixels, dataset, bits_stored)
        return _colour_to_grey(pixels, dataset, bits_stored)
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


def _padding_mask(pixels: np.ndarray, dataset: Dataset) -> np.ndarray | None:
    """Pixels outside the patient (*Pixel Padding Value*, up to *Pixel Padding Range
    Limit* when given; stored values), or None when the file declares no padding."""
    if not _has_value(dataset, "PixelPaddingValue"):
        return None
    pad = int(dataset.PixelPaddingValue)
    if _has_value(dataset, "PixelPaddingRangeLimit"):
        limit = int(dataset.PixelPaddingRangeLimit)
        low, high = min(pad, limit), max(pad, limit)
        mask = (pixels >= low) & (pixels <= high)
    else:
        mask = pixels == pad
    return mask if mask.any() else None


def _inverted(dataset: Dataset) -> bool:
    """Whether the displayed image is inverted: MONOCHROME1, or *Presentation LUT Shape*
    INVERSE (the same inversion, never applied twice; PS3.3 C.11.6)."""
    shape = str(dataset.get("PresentationLUTShape", "") or "").upper()
    return dataset.PhotometricInterpretation == "MONOCHROME1" or shape == "INVERSE"


def _stored_range(dataset: Dataset, bits_stored: int | None) -> tuple[float, float] | None:
    """The modality values of the smallest and largest storable pixel (by *Bits Stored* or
    ``bits_stored``, and *Pixel Representation*), in increasing order; None when a
    Modality LUT Sequence (not a linear rescale) maps the pixels."""
    if dataset.get("ModalityLUTSequence"):
        return None
    bits = int(bits_stored or dataset.get("BitsStored", 0) or dataset.get("BitsAllocated", 16))
    signed = int(dataset.get("PixelRepresentation", 0) or 0) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return ends[0], ends[1]


def _monochrome_to_grey(pixels: np.ndarray, dataset: Dataset,
                        bits_stored: int | None = None) -> np.ndarray:
    """Stored grey values [H, W] through modality, VOI and inversion to uint8. Padding
    pixels are left out of the image's own range and shown black (air)."""
    values = apply_modality_lut(pixels, dataset)
    padding = _padding_mask(pixels, dataset)
    voi = _apply_voi(values, dataset)
    stored = _stored_range(dataset, bits_stored) if voi is None else None
    if voi is None and stored is not None:
        shown, (low, high) = values, stored
    elif voi is None:
        inside = values if padding is None else values[~padding]
        shown = values
        low, high = (inside.min(), inside.max()) if inside.size else (0, 0)
    else:
        shown, low, high = voi
    if high == low:
        return np.zeros(pixels.shape, dtype=np.uint8)
    # Division by the signed span also covers a negative rescale slope, where
    # pydicom's window maps "below" to the larger value.
    fraction = np.clip((shown.astype(np.float64) - low) / (float(high) - float(low)), 0.0, 1.0)
    if _inverted(dataset):
        fraction = 1.0 - fraction
    if padding is not None:
        fraction[padding] = 0.0
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


def _colour_to_grey(pixels: np.ndarray, dataset: Dataset,
                    bits_stored: int | None = None) -> np.ndarray:
    """RGB [H, W, 3] (pydicom's conversion of RGB/YBR data) to grey uint8 by luminance."""
    luma = pixels.astype(np.float64) @ _LUMA_WEIGHTS
    peak = 2 ** int(bits_stored or dataset.BitsStored) - 1
    return np.rint(np.clip(luma * (255.0 / peak), 0.0, 255.0)).astype(np.uint8)


def scale_high_bit_depth(values: np.ndarray, bits: int | None = None) -> np.ndarray:
    """Map integer pixels stored in 16 (or 32) bits to uint8 by their bit depth.

    ``bits`` is the stored bit depth (10, 12, 14 … bits inside a 16-bit container), from
    the file's header (PNG *sBIT*) or the user (``--bits_stored``): ``0..2**bits - 1`` maps
    to 0..255, values above it to 255. Without it, the depth is guessed per image as the
    smallest of 8/10/12/14/16 bits that holds the image's maximum: a 12-bit image maps
    4095 to 255, and a dark 16-bit image stays dark instead of being stretched (but two
    films of one scanner can get different scales, so give ``bits_stored`` when the files
    carry no sBIT).

    uint16 pixels (16-bit PNGs) are looked up in a table of this arithmetic over all 65,536
    values: bit for bit the same, several times faster than computing it per pixel.
    """
    if values.dtype == np.uint16:
        if bits is None:
            bits = _guessed_depth(int(values.max(initial=0)))
        return np.take(_depth_table(int(bits)), values)
    values = np.clip(values, 0, None).astype(np.float32)
    if bits is None:
        bits = _guessed_depth(int(values.max(initial=0)))
    return _scale_float_by_depth(values, int(bits))


def _guessed_depth(peak: int) -> int:
    """The smallest of 8/10/12/14/16 bits that holds ``peak`` (its own bit length beyond)."""
    return next((b for b in (8, 10, 12, 14, 16) if peak < 2**b), peak.bit_length())


def _scale_float_by_depth(values: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative float32 pixels stored in ``bits`` bits to uint8, rounded to nearest."""
    top = float(2**bits - 1)
    return np.rint(np.minimum(values, top) * (255.0 / top)).astype(np.uint8)


@functools.cache
def _depth_table(bits: int) -> np.ndarray:
    """uint8 [65536]: every uint16 value through :func:`_scale_float_by_depth` at ``bits``."""
    return _scale_float_by_depth(np.arange(2**16, dtype=np.float32), bits)


def png_significant_bits(source: str | os.PathLike | bytes | None) -> int | None:
    """The significant bits of a PNG's grey channel (its *sBIT* chunk), or None when the
    file has none, or an invalid one (outside 1..16 bits, as libpng ignores it), or is no
    PNG. Reads only the chunks before the image data."""
    if source is None:
        return None
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            stream = io.BytesIO(source)
        else:
            stream = open(source, "rb")  # noqa: SIM115 - closed below
    except OSError:
        return None
    with stream:
        if stream.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        colour = None
        while True:
            head = stream.read(8)
            if len(head) < 8:
                return None
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind in (b"IDAT", b"IEND"):
                return None
            if kind == b"IHDR":
                colour = stream.read(length)[9] if length >= 10 else None
                stream.seek(4, io.SEEK_CUR)
            elif kind == b"sBIT":
                data = stream.read(length)
                if not data:
                    return None
                # grey: one byte; grey+alpha: grey, alpha; colour: R, G, B (the largest)
                bits = int(data[0]) if colour in (0, 4) else int(max(data[:3]))
                return bits if 1 <= bits <= 16 else None
            else:
                stream.seek(length + 4, io.SEEK_CUR)


def pil_to_grey(image: Image.Image, bits_stored: int | None = None) -> np.ndarray:
    """An open PIL image as grey uint8 [H, W] in 0..255 (the rules of :func:`decode_grey`);
    ``bits_stored``: the bit depth of 16-bit pixels (None: guessed per image)."""
    if image.mode == "L":
        return np.array(image, dtype=np.uint8)
    if image.mode in _SIXTEEN_BIT_MODES:
        return scale_high_bit_depth(np.asarray(image), bits_stored)
    return np.array(image.convert("L"), dtype=np.uint8)


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type


def _png_expected_bytes(width: int, height: int, bits: int, colour: int, interlaced: bool) -> int:
    """Length of a PNG's inflated image data: a filter byte plus the packed pixels per row,
    summed over the seven Adam7 passes when interlaced."""
    def rows(w: int, h: int) -> int:
        return 0 if w == 0 or h == 0 else h * (1 + (w * bits * _PNG_CHANNELS[colour] + 7) // 8)

    if not interlaced:
        return rows(width, height)
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
              (1, 0, 2, 2), (0, 1, 1, 2))
    return sum(rows((width - x + dx - 1) // dx, (height - y + dy - 1) // dy)
               for x, y, dx, dy in passes)


def _check_png_complete(path: str | os.PathLike, image: Image.Image) -> None:
    """PIL fills the rows of a PNG whose compressed image data ends early with zeros and
    reports nothing (libpng stops with "Not enough image data"). So when a decoded PNG's
    last row is all zero, the image data is inflated once more and its length checked;
    images with a non-black last row (nearly all) cost nothing. Raises OSError."""
    last = np.asarray(image.crop((0, image.height - 1, image.width, image.height)))
    if last.any():
        return
    data = Path(path).read_bytes()
    header = data[16:29]
    width, height, bits, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if colour not in _PNG_CHANNELS:
        return
    inflate = zlib.decompressobj()
    produced, position = 0, 8
    while position + 8 <= len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        if data[position + 4:position + 8] == b"IDAT":
            produced += len(inflate.decompress(data[position + 8:position + 8 + length]))
        position += 12 + length
    expected = _png_expected_bytes(width, height, bits, colour, bool(interlace))
    if produced < expected:
        complete_rows = produced * height // max(expected, 1)
        raise OSError(f"the image data ends early (about {complete_rows} of {height} rows): a "
                      "truncated or damaged PNG")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@functools.cache
def _libpng():
    """OpenCV (``cv2``), whose ``imdecode`` reads PNGs with libpng, or None without it.
    Imported on first use, not with this module.

    Why OpenCV: of the PNG decoders measured it is as fast as any (torchvision's and
    imagecodecs' libpng, pyspng's libspng) and the only one safe on damaged files:
    torchvision's kills the process, pyspng returns pixels whose CRC and zlib checksum
    failed, and imagecodecs leaks its output array (1 MB for a 1024 x 1024 image) on every
    file libpng refuses."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def libpng_available() -> bool:
    """Whether :func:`decode_grey` decodes grey PNGs with libpng (OpenCV installed)."""
    return _libpng() is not None


def _libpng_grey_header(head: bytes) -> tuple[int, int, int] | None:
    """``(width, height, bit depth)`` when ``head``, the first 33 bytes of a file, opens a PNG
    that :func:`_decode_grey_png` takes: grey (colour type 0), 8 or 16 bits, not interlaced;
    otherwise None (PIL decodes it)."""
    if len(head) < 33 or head[:8] != _PNG_SIGNATURE or head[8:16] != b"\x00\x00\x00\x0dIHDR":
        return None
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", head[16:29])
    if colour != 0 or depth not in (8, 16) or interlace != 0:
        return None
    return width, height, depth


def _decode_grey_png(name: str, data: bytes, width: int, height: int, depth: int,
                     bits_stored: int | None) -> np.ndarray:
    """A grey 8- or 16-bit PNG (the whole file, ``data``) decoded by libpng, as grey uint8
    [H, W] by :func:`decode_grey`'s rules.

    libpng is strict where PIL is lenient: a file cut short (even after its image data), a
    bad CRC in a critical chunk, image data that ends early or whose zlib checksum fails, or
    an unknown row filter make OpenCV return nothing (PIL returns rows of zeros, or pixels
    nobody checked; libpng prints its reason on stderr). Image data beyond the rows the header declares is ignored, as PIL does.
    OpenCV catches libpng's errors (``setjmp``), so a damaged file never ends the process.
    Raises ValueError naming ``name``."""
    check_pixel_count(name, height, width)
    cv2 = _libpng()
    try:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as error:
        raise _cannot_decode(name, f"OpenCV: {error}") from error
    if pixels is None:
        raise _cannot_decode(name, "libpng refused it: a damaged PNG (cut short, a bad CRC, "
                                   "image data that ends early or fails its zlib checksum, or "
                                   "an unknown row filter)")
    dtype = np.uint8 if depth == 8 else np.uint16
    if pixels.shape != (height, width) or pixels.dtype != dtype:
        raise _cannot_decode(name, f"libpng gave {pixels.dtype} {list(pixels.shape)}, its "
                                   f"header says {np.dtype(dtype)} [{height}, {width}]")
    if depth == 8:
        return pixels
    if bits_stored is None:
        bits_stored = png_significant_bits(data)
    return scale_high_bit_depth(pixels, bits_stored)


def decode_grey(path: str | os.PathLike, bits_stored: int | None = None, *,
                libpng: bool = True) -> np.ndarray:
    """Read an image file as grey uint8 [H, W] in 0..255.

    DICOM files go to :func:`decode_dicom` (rescale, window,
    MONOCHROME1 inversion; see there): those named ``.dcm`` or ``.dicom`` (any
    case), and files whose suffix is not an image format PIL knows (``IM0001``,
    ``1.2.840.113619.2.1``) but that carry ``DICM`` at byte offset 128.

    Everything else is read by PIL. 8-bit grey is returned as stored; RGB, RGBA
    (alpha dropped), grey+alpha and palette images are converted with PIL's
    luminance (ITU-R 601). 16-bit (and 32-bit integer) grey is scaled by its
    bit depth: ``round(value * 255 / (2**bits - 1))``, so 12-bit data maps 4095 to
    255. The depth is ``bits_stored`` when given (the whole data set's, e.g.
    ``--bits_stored 12``), else the PNG's *sBIT* chunk when it has one, else
    guessed per image as the smallest of 8/10/12/14/16 bits that holds the
    image's maximum (see :func:`scale_high_bit_depth`). DICOM files take their
    *Bits Stored* (or ``bits_stored``) the same way.

    Grey 8- and 16-bit PNGs that are not interlaced go to libpng (through OpenCV), when
    OpenCV is installed and ``libpng`` is True: the same pixels as PIL, faster, and a
    file with damaged or missing image data an error, never partly decoded (see
    :func:`_decode_grey_png`).
    ``libpng=False`` decodes them with PIL, as everything else. torchvision's libpng
    decoder is not used: it kills the process (SIGSEGV) on a PNG whose compressed image
    data ends early.

    Images of more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels are refused before
    their pixels are decoded (PIL's decompression-bomb limit, DICOM included).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable image, or too large; the message names
            ``path``.
    """
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".dcm", ".dicom") or (
        suffix not in Image.registered_extensions() and has_dicom_magic(path)
    ):
        return decode_dicom(path, bits_stored)
    try:
        if libpng and _libpng() is not None:
            with open(path, "rb") as file:
                head = file.read(33)
                header = _libpng_grey_header(head)
                if header is not None:
                    return _decode_grey_png(os.fspath(path), head + file.read(), *header,
                                            bits_stored)
        with Image.open(path) as image:
            image.load()
            if image.format == "PNG":
                _check_png_complete(path, image)
                if bits_stored is None and image.mode in _SIXTEEN_BIT_MODES:
                    bits_stored = png_significant_bits(path)
            return pil_to_grey(image, bits_stored)
    except FileNotFoundError:
        raise
    except IsADirectoryError as error:
        raise ValueError(f"cannot decode image {os.fspath(path)!r}: it is a folder") from error
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as error:
        # PIL raises SyntaxError for some malformed headers.
        raise ValueError(f"cannot decode image {os.fspath(path)!r}: {error}") from error


class _DicomImageFile(ImageFile.ImageFile):
    """DICOM as a PIL image (mode ``L``, the grey uint8 of :func:`dicom_to_grey`), so that
    code which opens images with PIL (transformers' pipelines, ``load_image``) reads DICOM
    files the way pre-training does. Registered by :func:`register_dicom_with_pil`."""

    format = "DICOM"
    format_description = "DICOM radiograph (caid-hf decoder)"

    def _open(self) -> None:
        header = self.fp.read(132)
        self.fp.seek(0)
        if pydicom is None or header[128:132] != b"DICM":
            raise SyntaxError("not a DICOM Part 10 file")
        name = getattr(self.fp, "name", "DICOM file")
        try:
            dataset = pydicom.dcmread(self.fp)
        except _MALFORMED as error:
            raise SyntaxError(f"cannot read DICOM file {name!r}: {error}") from error
        self._grey = dicom_to_grey(dataset, os.fspath(name) if isinstance(name, str) else "DICOM")
        self._mode = "L"
        self._size = (self._grey.shape[1], self._grey.shape[0])
        self.tile = []

    def load(self):
        if getattr(self, "_grey", None) is not None:
            self.im = Image.frombuffer("L", self.size, self._grey.tobytes(), "raw", "L", 0, 1).im
            self._grey = None
        return super().load()


def register_dicom_with_pil() -> None:
    """Let ``PIL.Image.open`` read DICOM Part 10 files through :func:`dicom_to_grey` (tried
    after PIL's own formats, so nothing else changes)."""
    if _DicomImageFile.format not in Image.OPEN:
        Image.register_open(_DicomImageFile.format, _DicomImageFile)
        Image.register_extensions(_DicomImageFile.format, [".dcm", ".dicom"])
