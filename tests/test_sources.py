import numpy as np
import pytest
from PIL import Image

from caid_hf.data.phantoms import generate_phantom
from caid_hf.data.source_spec import source_from_spec
from caid_hf.data.sources import (
    ImageFolderSource,
    ImageSource,
    PhantomSource,
    SplitListSource,
    decode_grey,
)


def _grey(seed: int, shape=(12, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


# decode_grey


def test_decode_grey_8bit_is_unchanged(tmp_path):
    grey = _grey(0)
    decoded = decode_grey(_save(tmp_path / "x.png", grey))
    assert decoded.dtype == np.uint8 and decoded.shape == (12, 16)
    np.testing.assert_array_equal(decoded, grey)
    assert decoded.flags.writeable


def test_decode_grey_rgb_and_rgba(tmp_path):
    grey = _grey(1)
    rgb = np.stack([grey] * 3, axis=-1)
    np.testing.assert_array_equal(decode_grey(_save(tmp_path / "rgb.png", rgb)), grey)
    alpha = _grey(2)  # ChestX-ray14 has a few RGBA files; alpha must not leak in
    rgba = np.concatenate([rgb, alpha[..., None]], axis=-1)
    np.testing.assert_array_equal(decode_grey(_save(tmp_path / "rgba.png", rgba)), grey)
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    assert (decode_grey(_save(tmp_path / "red.png", red)) == 76).all()  # ITU-R 601 luma


def test_decode_grey_palette(tmp_path):
    ramp = np.arange(256, dtype=np.uint8)[None].repeat(3, axis=0)
    path = tmp_path / "palette.png"
    Image.fromarray(ramp).convert("P").save(path)
    with Image.open(path) as stored:
        assert stored.mode == "P"
    np.testing.assert_array_equal(decode_grey(path), ramp)


@pytest.mark.parametrize(
    ("value", "peak", "expected"),
    [
        (2048, 4095, [128, 255]),  # 12-bit data in a 16-bit PNG: 2048 * 255 / 4095 = 127.5
        (512, 1023, [128, 255]),  # 10 bits
        (32768, 65535, [128, 255]),  # full 16 bits
        (100, 200, [100, 200]),  # fits in 8 bits: unchanged
        (4095, 5000, [64, 78]),  # 5000 needs 14 bits: x * 255 / 16383, a dark image stays dark
    ],
)
def test_decode_grey_16bit_png_scales_by_bit_depth(tmp_path, value, peak, expected):
    path = _save(tmp_path / "deep.png", np.array([[0, value, peak]], dtype=np.uint16))
    with Image.open(path) as stored:
        assert stored.mode in ("I;16", "I")
    decoded = decode_grey(path)
    assert decoded.dtype == np.uint8
    assert decoded.tolist() == [[0, *expected]]


def test_decode_grey_16bit_big_endian_and_32bit_tiff(tmp_path):
    big_endian = _save(tmp_path / "be.tif", np.array([[0, 1023]], dtype=">u2"))
    with Image.open(big_endian) as stored:
        assert stored.mode == "I;16B"
    assert decode_grey(big_endian).tolist() == [[0, 255]]
    wide = _save(tmp_path / "wide.tif", np.array([[0, 4095, 16383]], dtype=np.int32))
    with Image.open(wide) as stored:
        assert stored.mode == "I"
    assert decode_grey(wide).tolist() == [[0, 64, 255]]


def test_decode_grey_rejects_non_images(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        decode_grey(text)
    truncated = tmp_path / "truncated.png"
    _save(tmp_path / "full.png", _grey(3, (64, 64)))
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.png"):
        decode_grey(truncated)
    with pytest.raises(FileNotFoundError):
        decode_grey(tmp_path / "missing.png")


# SplitListSource


@pytest.fixture
def images_root(tmp_path):
    root = tmp_path / "images"
    _save(root / "00000001_000.png", _grey(10))
    _save(root / "sub" / "00000002_001.png", _grey(11))
    return root


def test_split_list_parses_paths_and_ignores_labels(tmp_path, images_root):
    split = tmp_path / "train_official.txt"
    split.write_text(
        "# ChestX-ray14 training split\n"
        "\n"
        "00000001_000.png 0 1 0 0 0 0 0 0 0 0 0 0 0 0\n"
        "   sub/00000002_001.png\t1 0 0 0 0 0 0 0 0 0 0 0 0 0  \r\n"
        "a/../00000001_000.png 0\n"
    )
    source = SplitListSource(split, images_root)
    assert isinstance(source, ImageSource)
    assert len(source) == 3
    assert [source.image_id(i) for i in range(3)] == [
        "00000001_000.png",
        "sub/00000002_001.png",
        "a/../00000001_000.png",
    ]
    np.testing.assert_array_equal(source.load(1), _grey(11))
    with pytest.raises(IndexError):
        source.load(3)


@pytest.mark.parametrize(
    "bad", ["../outside.png", "sub/../../outside.png", "/etc/passwd", "C:\\x.png", "..\\x.png"]
)
def test_split_list_rejects_paths_outside_root(tmp_path, images_root, bad):
    split = tmp_path / "split.txt"
    split.write_text(f"# header\n00000001_000.png 0\n{bad} 0 1\n")
    with pytest.raises(ValueError, match=r"split\.txt:3"):
        SplitListSource(split, images_root)


@pytest.mark.parametrize(
    "line", ["00000002_000.png,0,1,0", "00000002_000.png 0 1 Effusion", "labels.csv 0 1"]
)
def test_split_list_malformed_lines_are_named_with_their_number(tmp_path, images_root, line):
    split = tmp_path / "split.txt"
    split.write_text(f"00000001_000.png 0\n\n# comment\n{line}\n")
    with pytest.raises(ValueError, match=r"split\.txt:4: malformed line"):
        SplitListSource(split, images_root)


def test_split_list_accepts_dicom_names_without_suffix(tmp_path, images_root):
    split = tmp_path / "split.txt"
    split.write_text("00000001_000.png 0 1\nstudy1/IM0001 -1 0.5\n")
    assert SplitListSource(split, images_root).image_id(1) == "study1/IM0001"


def test_split_list_missing_or_empty(tmp_path, images_root):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        SplitListSource(tmp_path / "nope.txt", images_root)
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="empty.txt"):
        SplitListSource(empty, images_root)
    empty.write_text("00000001_000.png\n")
    with pytest.raises(FileNotFoundError, match="no_images"):
        SplitListSource(empty, tmp_path / "no_images")


# ImageFolderSource


def test_image_folder_recurses_and_filters_extensions(tmp_path):
    root = tmp_path / "cxr"
    _save(root / "a.png", _grey(20))
    _save(root / "B.JPG", _grey(21), quality=95)
    _save(root / "sub" / "c.jpeg", _grey(22))
    _save(root / "sub" / "deeper" / "d.PNG", _grey(23))
    _save(root / "e.bmp", _grey(24))
    _save(root / ".cache" / "f.png", _grey(25))
    (root / "._g.png").write_bytes(b"macOS resource fork")
    (root / "notes.txt").write_text("labels")
    source = ImageFolderSource(root)
    assert isinstance(source, ImageSource)
    ids = [source.image_id(i) for i in range(len(source))]
    assert ids == ["B.JPG", "a.png", "sub/c.jpeg", "sub/deeper/d.PNG"]
    np.testing.assert_array_equal(source.load(3), _grey(23))
    jpeg = source.load(0)
    assert jpeg.shape == (12, 16) and jpeg.dtype == np.uint8
    with pytest.raises(IndexError):
        source.image_id(4)


def test_image_folder_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent"):
        ImageFolderSource(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty"):
        ImageFolderSource(tmp_path / "empty")


# PhantomSource


def test_phantom_source():
    source = PhantomSource(5, size=64, seed=3)
    assert isinstance(source, ImageSource)
    assert len(source) == 5
    image, mask = generate_phantom(4, 64, seed=3)
    np.testing.assert_array_equal(source.load(4), image)
    np.testing.assert_array_equal(source.load_mask(4), mask)
    assert source.image_id(4) == "phantom_00004"
    for bad in (5, -1):
        with pytest.raises(IndexError):
            source.load(bad)
    plain = PhantomSource(40, size=64, nodules=False)
    assert not any(plain.load_mask(i).any() for i in range(40))


def _png_with_sbit(path, pixels: np.ndarray, bits: int | None) -> None:
    """A 16-bit grey PNG, with an sBIT chunk of ``bits`` significant bits when given."""
    import struct
    import zlib

    Image.fromarray(pixels.astype(np.uint16)).save(path)
    if bits is None:
        return
    data = path.read_bytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(data[:33] + chunk(b"sBIT", bytes([bits])) + data[33:])  # after IHDR


def test_16_bit_png_depth_from_sbit_then_override_then_guess(tmp_path):
    from caid_hf.data.hf_sources import decode_image_value
    from caid_hf.decoding import png_significant_bits

    dark = np.array([[0, 100], [500, 1000]])  # a 12-bit film whose maximum fits 10 bits
    _png_with_sbit(tmp_path / "sbit.png", dark, 12)
    _png_with_sbit(tmp_path / "plain.png", dark, None)
    assert png_significant_bits(tmp_path / "sbit.png") == 12
    assert png_significant_bits(tmp_path / "plain.png") is None
    twelve = np.rint(np.minimum(dark, 4095) / 4095 * 255)
    np.testing.assert_array_equal(decode_grey(tmp_path / "sbit.png"), twelve)  # the header
    guessed = np.rint(dark / 1023 * 255)  # 10 bits: the smallest depth holding 1000
    np.testing.assert_array_equal(decode_grey(tmp_path / "plain.png"), guessed)
    np.testing.assert_array_equal(decode_grey(tmp_path / "plain.png", bits_stored=12), twelve)
    # values above the declared depth saturate instead of wrapping
    assert decode_grey(tmp_path / "plain.png", bits_stored=8).tolist() == [[0, 100], [255, 255]]
    # the same rules for Hugging Face image bytes
    stored = {"bytes": (tmp_path / "sbit.png").read_bytes(), "path": None}
    np.testing.assert_array_equal(decode_image_value(stored, "row 0"), twelve)
    plain = {"bytes": (tmp_path / "plain.png").read_bytes(), "path": None}
    np.testing.assert_array_equal(decode_image_value(plain, "row 0", bits_stored=12), twelve)
    # a split list's source decodes every file with the run's --bits_stored
    split = tmp_path / "list.txt"
    split.write_text("plain.png\nsbit.png\n")
    source = source_from_spec(str(split), bits_stored=12)
    np.testing.assert_array_equal(source.load(0), twelve)
