"""The PNG paths of ``decode_grey``: libpng (through OpenCV) for grey 8- and 16-bit PNGs, PIL
for every other kind, and what each does with a damaged file.

Every PNG here is built byte by byte, so each test knows the exact pixels a file holds. The
damaged ones are decoded in a child process: a decoder that dies (torchvision's libpng
decoder did, with SIGSEGV, on short image data) would otherwise take pytest with it.
"""

import hashlib
import io
import json
import struct
import subprocess
import sys
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from caid_hf import decoding
from caid_hf.decoding import decode_grey, libpng_available, scale_high_bit_depth

from helpers import bomb_png, short_data_png

SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEIGHT, WIDTH = 40, 48  # not square: a swapped width and height shows
GREY = np.random.default_rng(7).integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
DEEP = (GREY.astype(np.uint16) * 16 + np.arange(WIDTH, dtype=np.uint16) % 16)  # 12-bit
DEEP_AS_UINT8 = np.rint(DEEP.astype(np.float64) * 255 / 4095).astype(np.uint8)
# EXIF orientation 6 ("rotate 90 degrees to display"): decode_grey returns pixels as stored
EXIF_ROTATE_90 = (b"MM\x00\x2a" + struct.pack(">IH", 8, 1)
                  + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + struct.pack(">I", 0))


def chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def header(width: int = WIDTH, height: int = HEIGHT, depth: int = 8, colour: int = 0,
           interlace: int = 0) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace))


def filtered(image: np.ndarray, kinds=(0, 1, 2, 3, 4)) -> bytes:
    """PNG scanlines of a grey image (uint8 or uint16, big-endian), row ``r`` filtered with
    ``kinds[r % len(kinds)]``: None, Sub, Up, Average, Paeth (PNG spec, section 9)."""
    rows = image.astype(">u2").view(np.uint8) if image.dtype == np.uint16 else image
    step = image.dtype.itemsize  # bytes per pixel: the filters' "left" neighbour
    previous = np.zeros(rows.shape[1], np.int16)
    lines = []
    for index, row in enumerate(rows.astype(np.int16)):
        kind = kinds[index % len(kinds)]
        left = np.concatenate([np.zeros(step, np.int16), row[:-step]])
        corner = np.concatenate([np.zeros(step, np.int16), previous[:-step]])
        if kind == 4:
            guess = left + previous - corner
            near_left, near_up = abs(guess - left), abs(guess - previous)
            near_corner = abs(guess - corner)
            predictor = np.where((near_left <= near_up) & (near_left <= near_corner), left,
                                 np.where(near_up <= near_corner, previous, corner))
        else:
            predictor = [0, left, previous, (left + previous) // 2][kind]
        lines.append(bytes([kind]) + ((row - predictor) % 256).astype(np.uint8).tobytes())
        previous = row
    return b"".join(lines)


def png(scanlines: bytes, depth: int = 8, *, before: bytes = b"", after: bytes = b"",
        width: int = WIDTH, height: int = HEIGHT, chunk_size: int | None = None) -> bytes:
    """A grey PNG: ``before`` chunks, the zlib-compressed ``scanlines`` in IDAT chunks of
    ``chunk_size`` bytes (one chunk by default), ``after`` chunks, IEND."""
    data = zlib.compress(scanlines, 9)
    size = chunk_size or len(data)
    idat = b"".join(chunk(b"IDAT", data[i:i + size]) for i in range(0, len(data), size))
    return (SIGNATURE + header(width, height, depth) + before + idat + after
            + chunk(b"IEND", b""))


def _pil_png(array: np.ndarray, mode: str | None = None) -> bytes:
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# Valid files: the same pixels on both paths, and the pixels the file holds


def _valid_files() -> dict[str, tuple[bytes, np.ndarray]]:
    """name: (PNG bytes, the grey uint8 decode_grey must return)."""
    comment = chunk(b"tEXt", b"Comment\x00made by hand")
    files = {
        "grey8_all_filters": (png(filtered(GREY)), GREY),
        "grey8_paeth_only": (png(filtered(GREY, (4,))), GREY),
        "grey8_many_idat_chunks": (png(filtered(GREY), chunk_size=37), GREY),
        "grey8_ancillary_chunks": (png(filtered(GREY), before=comment + chunk(
            b"gAMA", struct.pack(">I", 45455)) + chunk(b"pHYs", bytes(9)), after=comment), GREY),
        "grey8_transparent_colour": (png(filtered(GREY), before=chunk(b"tRNS", b"\x00\x07")),
                                     GREY),
        "grey8_written_by_pil": (_pil_png(GREY), GREY),
        "grey8_exif_rotated": (png(filtered(GREY), before=chunk(b"eXIf", EXIF_ROTATE_90)), GREY),
        "grey16_sbit12": (png(filtered(DEEP), 16, before=chunk(b"sBIT", b"\x0c")),
                          DEEP_AS_UINT8),
        "grey16_no_sbit": (png(filtered(DEEP), 16), DEEP_AS_UINT8),  # depth guessed: 12
        "grey16_sbit_zero": (png(filtered(DEEP), 16, before=chunk(b"sBIT", b"\x00")),
                             DEEP_AS_UINT8),  # an invalid sBIT is ignored, as libpng does
        "grey16_transparent_colour": (png(filtered(DEEP), 16, before=chunk(b"tRNS", b"\x00\x07")),
                                      DEEP_AS_UINT8),
        "grey16_written_by_pil": (_pil_png(DEEP), DEEP_AS_UINT8),
        "grey16_full_range": (png(filtered(DEEP * 16 + 15), 16, before=chunk(b"sBIT", b"\x10")),
                              np.rint((DEEP * 16 + 15) * (255 / 65535)).astype(np.uint8)),
        # the kinds PIL decodes
        "rgb": (_pil_png(np.stack([GREY] * 3, axis=-1)), GREY),
        "rgba": (_pil_png(np.dstack([GREY] * 3 + [GREY[::-1]])), GREY),
        "grey_alpha": (_pil_png(GREY, "LA"), GREY),
        "palette": (_pil_png(np.tile(np.arange(256, dtype=np.uint8), (4, 1)), "P"),
                    np.tile(np.arange(256, dtype=np.uint8), (4, 1))),
    }
    for bits in (1, 2, 4):
        levels = GREY >> (8 - bits)
        packed = np.packbits(np.unpackbits(levels[..., None], axis=-1)[..., 8 - bits:]
                             .reshape(HEIGHT, -1), axis=-1)
        files[f"grey{bits}bit"] = (
            SIGNATURE + header(depth=bits) + chunk(b"IDAT", zlib.compress(filtered(packed, (0,))))
            + chunk(b"IEND", b""),
            (levels.astype(np.uint16) * 255 // (2**bits - 1)).astype(np.uint8))
    return files


VALID = _valid_files()


def test_libpng_is_installed_and_takes_grey_8_and_16_bit_pngs_only(tmp_path, monkeypatch):
    assert libpng_available()  # OpenCV is a dependency of caid-hf
    cv2 = decoding._libpng()
    decoded = []

    def counting(buffer, flags):
        decoded.append(flags)
        return cv2.imdecode(buffer, flags)

    monkeypatch.setattr(decoding, "_libpng", lambda: SimpleNamespace(
        imdecode=counting, IMREAD_UNCHANGED=cv2.IMREAD_UNCHANGED, error=cv2.error))
    for name, (data, _) in VALID.items():
        path = tmp_path / f"{name}.png"
        path.write_bytes(data)
        before = len(decoded)
        decode_grey(path)
        assert (len(decoded) > before) == name.startswith(("grey8", "grey16")), name
    decode_grey(tmp_path / "grey8_all_filters.png", libpng=False)
    assert len(decoded) == sum(name.startswith(("grey8", "grey16")) for name in VALID)


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_pngs_decode_to_their_pixels_on_both_paths(tmp_path, name):
    data, expected = VALID[name]
    path = tmp_path / f"{name}.png"
    path.write_bytes(data)
    fast, pil = decode_grey(path), decode_grey(path, libpng=False)
    np.testing.assert_array_equal(fast, expected)
    np.testing.assert_array_equal(pil, expected)
    assert fast.dtype == np.uint8 and fast.flags.writeable and fast.flags.c_contiguous


def test_a_phantom_radiograph_decodes_the_same_on_both_paths(tmp_path):
    from caid_hf.data.phantoms import generate_phantom

    phantom = generate_phantom(3, 256)[0]
    path = tmp_path / "phantom.png"
    Image.fromarray(phantom).save(path)  # rows filtered by PIL's adaptive choice
    deep = tmp_path / "phantom16.png"
    Image.fromarray(phantom.astype(np.uint16) * 257).save(deep)
    np.testing.assert_array_equal(decode_grey(path), phantom)
    np.testing.assert_array_equal(decode_grey(deep), phantom)  # 257 * v * 255 / 65535 = v
    np.testing.assert_array_equal(decode_grey(deep), decode_grey(deep, libpng=False))


def test_sixteen_bit_table_equals_the_arithmetic_for_every_value():
    values = np.arange(2**16, dtype=np.uint16)
    for bits in [*range(1, 17), None]:
        table = scale_high_bit_depth(values, bits)  # uint16: the table
        arithmetic = scale_high_bit_depth(values.astype(np.int32), bits)  # per pixel
        np.testing.assert_array_equal(table, arithmetic)
    assert scale_high_bit_depth(np.array([[0, 2048, 4095, 4096]], np.uint16)).tolist() == [
        [0, 32, 64, 64]]  # 4096 needs 14 bits: x * 255 / 16383
    assert scale_high_bit_depth(np.array([[0, 2048, 4095, 9999]], np.uint16), 12).tolist() == [
        [0, 128, 255, 255]]


# Damaged files: an error naming the file, or (where PIL also decodes it) PIL's pixels


def _damaged_files() -> dict[str, bytes]:
    scanlines = filtered(GREY)
    data = zlib.compress(scanlines, 9)
    good = png(scanlines)
    head = SIGNATURE + header()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    deep_scanlines = filtered(DEEP)
    deep = png(deep_scanlines, 16)
    deep_data = zlib.compress(deep_scanlines)
    return {
        "truncated_in_image_data": good[:len(good) // 2],
        "truncated_after_header": head,
        "short_image_data": png(scanlines[:len(scanlines) // 2]),
        "one_row_missing": png(scanlines[:-(WIDTH + 1)]),
        "one_byte_missing": png(scanlines[:-1]),
        "short_data_grey_phantom": short_data_png(),
        "zero_length_idat": head + chunk(b"IDAT", b"") + chunk(b"IEND", b""),
        "no_idat": head + chunk(b"IEND", b""),
        "idat_crc_wrong": head + chunk(b"IDAT", data, crc=zlib.crc32(b"IDAT" + data) ^ 1)
        + chunk(b"IEND", b""),
        "bit_flipped_in_idat": head + chunk(b"IDAT", bytes(flipped),
                                            crc=zlib.crc32(b"IDAT" + data)) + chunk(b"IEND", b""),
        "bit_flipped_crc_recomputed": head + chunk(b"IDAT", bytes(flipped)) + chunk(b"IEND", b""),
        "zlib_checksum_wrong": head + chunk(b"IDAT", data[:-4] + bytes(4)) + chunk(b"IEND", b""),
        "zlib_checksum_missing": head + chunk(b"IDAT", data[:-4]) + chunk(b"IEND", b""),
        "header_one_row_taller": png(scanlines, height=HEIGHT + 1),
        "header_one_pixel_narrower": png(scanlines, width=WIDTH - 1),
        "header_one_pixel_wider": png(scanlines, width=WIDTH + 1),
        "header_zero_width": png(scanlines, width=0),
        "header_crc_wrong": SIGNATURE + chunk(b"IHDR", header()[8:-4], crc=0)
        + chunk(b"IDAT", data) + chunk(b"IEND", b""),
        "header_bit_depth_7": png(scanlines, 7),
        "unknown_row_filter": png(b"\x05" + scanlines[1:]),
        "chunk_length_past_the_end": head + struct.pack(">I", 0x7FFFFFF0) + b"IDAT" + data
        + chunk(b"IEND", b""),
        "chunk_between_idat_chunks": head + chunk(b"IDAT", data[:100]) + chunk(b"tEXt", b"a\x00b")
        + chunk(b"IDAT", data[100:]) + chunk(b"IEND", b""),
        "grey8_bomb_30000_squared": SIGNATURE + header(30000, 30000)
        + chunk(b"IDAT", zlib.compress(bytes(30001) * 8)) + chunk(b"IEND", b""),
        "grey1_bomb_20000_squared": bomb_png(),
        "grey16_truncated": deep[:len(deep) // 2],
        "grey16_short_image_data": png(deep_scanlines[:len(deep_scanlines) // 3], 16),
        "grey16_idat_crc_wrong": SIGNATURE + header(depth=16)
        + chunk(b"IDAT", deep_data, crc=zlib.crc32(b"IDAT" + deep_data) ^ 1)
        + chunk(b"IEND", b""),
        "interlaced_short_image_data": SIGNATURE + header(8, 8, interlace=1)
        + chunk(b"IDAT", zlib.compress(bytes(43))) + chunk(b"IEND", b""),
        "empty": b"",
        "signature_only": SIGNATURE,
        "text": b"this is not an image\n",
        "no_iend": png(scanlines)[:-12],  # all pixels there, but the file is cut short
    }


def _tolerated_files() -> dict[str, bytes]:
    """Damage PIL reads past and so may libpng: the pixels must then be PIL's."""
    scanlines = filtered(GREY)
    return {
        "header_one_row_shorter": png(scanlines, height=HEIGHT - 1),
        "zeros_far_past_the_image": png(bytes(20_000_000)),  # 20 MB of rows for 40 x 48
    }


_CHILD = """
import hashlib, json, sys
from caid_hf.decoding import decode_grey
for path in sys.argv[1:]:
    print(json.dumps({"start": path}), flush=True)
    try:
        grey = decode_grey(path)
        result = {"shape": list(grey.shape), "sha256": hashlib.sha256(grey.tobytes()).hexdigest()}
    except ValueError as error:
        result = {"error": str(error)}
    print(json.dumps({"path": path, **result}), flush=True)
"""


def _decode_in_a_child(paths) -> dict[str, dict]:
    result = subprocess.run([sys.executable, "-c", _CHILD, *map(str, paths)],
                            capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    started = [line["start"] for line in lines if "start" in line]
    # a signal (SIGSEGV, SIGABRT) gives a negative exit status: name the file it died on
    assert result.returncode == 0, (result.returncode, started[-1:], result.stderr[-2000:])
    return {line["path"]: line for line in lines if "path" in line}


def test_damaged_pngs_are_errors_naming_the_file_and_never_kill_the_process(tmp_path):
    files = {**_damaged_files(), **_tolerated_files()}
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.png"
        paths[name].write_bytes(data)
    results = _decode_in_a_child(paths.values())
    assert len(results) == len(files)
    for name in _damaged_files():
        result = results[str(paths[name])]
        assert "error" in result, (name, result)
        assert result["error"].startswith(f"cannot decode image {str(paths[name])!r}: "), result
    for name in _tolerated_files():
        expected = decode_grey(paths[name], libpng=False)  # PIL: lenient, never a crash
        assert results[str(paths[name])] == {
            "path": str(paths[name]), "shape": list(expected.shape),
            "sha256": hashlib.sha256(expected.tobytes()).hexdigest()}, name
    assert "more than" in results[str(paths["grey8_bomb_30000_squared"])]["error"]
    assert "decompression bomb" in results[str(paths["grey8_bomb_30000_squared"])]["error"]


def test_libpng_refuses_what_pil_decodes_into_unchecked_pixels(tmp_path):
    damaged = _damaged_files()
    for name in ("idat_crc_wrong", "zlib_checksum_missing", "chunk_length_past_the_end"):
        path = tmp_path / f"{name}.png"
        path.write_bytes(damaged[name])
        decode_grey(path, libpng=False)  # PIL returns pixels (here the right ones, by luck)
        with pytest.raises(ValueError, match=rf"{name}\.png"):
            decode_grey(path)
    path = tmp_path / "short.png"
    path.write_bytes(damaged["short_image_data"])
    with pytest.raises(ValueError, match=r"short\.png.*libpng refused it: a damaged PNG"):
        decode_grey(path)


_LEAK_CHILD = """
import resource, sys
from caid_hf.decoding import decode_grey
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
for attempt in range(301):
    if attempt == 50:
        start = peak_mb()  # after the first refusals: buffers and caches in place
    try:
        decode_grey(sys.argv[1])
    except ValueError:
        pass
    else:
        sys.exit("decoded a damaged file")
print(peak_mb() - start)
"""


def test_refused_files_leave_no_memory_behind(tmp_path):
    # 250 refusals of a 1024 x 1024 PNG: a decoder that kept its 1 MB output array on each
    # refusal (imagecodecs' libpng wrapper does) would grow by 250 MB
    rows = np.random.default_rng(1).integers(0, 256, (1024, 1024), dtype=np.uint8)
    path = tmp_path / "short1024.png"
    path.write_bytes(png(filtered(rows, (0,))[:-5000], width=1024, height=1024))
    result = subprocess.run([sys.executable, "-c", _LEAK_CHILD, str(path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split()[-1]) < 25, result.stdout
