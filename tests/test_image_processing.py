import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000Lossless,
)
from transformers import AutoImageProcessor
from transformers.image_utils import PILImageResampling

from caid_hf import CAiDConfig
from caid_hf.image_processing_caid import CAiDImageProcessor

from helpers import SIDE, STORED, grey_dicom, twelve_bit_monochrome1


def _grey(features, index: int = 0) -> np.ndarray:
    """Channel 0 of image ``index`` after checking the 3 channels are identical."""
    image = np.asarray(features["pixel_values"][index])
    assert image.shape[0] == 3
    np.testing.assert_array_equal(image[0], image[1])
    np.testing.assert_array_equal(image[0], image[2])
    return image[0]


@pytest.fixture
def native():
    """A processor that keeps the 8 × 8 test images at their size, so pixels can be compared
    (``size`` itself must be a multiple of 32)."""
    return CAiDImageProcessor(do_resize=False)


def test_twelve_bit_monochrome1_dicom_is_rescaled_windowed_and_inverted(tmp_path, native):
    path = tmp_path / "chest.dcm"
    twelve_bit_monochrome1().save_as(path, enforce_file_format=True)

    grey = _grey(native(path, return_tensors="np")).reshape(-1)[: len(STORED)]

    displayed = 2.0 * STORED - 1000.0
    # pydicom's LINEAR window (PS3.3 C.11.2.1.2.1) over 0..255, inverted, quantised to 8 bits
    # as pre-training quantises it
    linear = np.clip(((displayed - 1999.5) / 1999 + 0.5), 0.0, 1.0)
    expected = np.rint((1.0 - linear) * 255) / 255
    np.testing.assert_allclose(grey, expected, atol=1e-6)
    assert grey[-1] == 0.0  # brightest stored value (4095) is the darkest output
    assert grey[4] == 0.0  # stored 2100 → 3200, above the window: clipped dark as well
    assert grey[0] == 1.0  # below the window: white (MONOCHROME1 → air dark)
    assert abs(grey[3] - 0.5) <= 0.5 / 255  # window centre: the middle grey level


def test_dicom_dataset_and_file_without_extension_give_the_same(tmp_path, native):
    ds = twelve_bit_monochrome1()
    path = tmp_path / "IM0001"  # PACS exports often have no extension
    ds.save_as(path, enforce_file_format=True)
    np.testing.assert_array_equal(
        _grey(native(ds, return_tensors="np")), _grey(native(str(path), return_tensors="np"))
    )


def test_dicom_without_window_uses_the_stored_bit_range(native):
    pixels = np.linspace(100, 900, SIDE * SIDE).reshape(SIDE, SIDE).astype(np.uint16)
    grey = _grey(native(grey_dicom(pixels, BitsStored=12), return_tensors="np"))
    np.testing.assert_allclose(grey, np.rint(pixels / 4095.0 * 255) / 255, atol=1e-6)


def test_multi_frame_dicom_is_refused(native):
    ds = grey_dicom(np.zeros((2, SIDE, SIDE), np.uint16))
    with pytest.raises(ValueError, match="multi-frame DICOM \\(2 frames\\)"):
        native(ds)


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) for m in ("pylibjpeg", "gdcm")),
    reason="a JPEG 2000 decoder is installed",
)
def test_compressed_dicom_without_decoder_names_the_extra(native):
    ds = grey_dicom(np.zeros((SIDE, SIDE), np.uint16))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\x00" * 16])
    ds["PixelData"].VR = "OB"
    with pytest.raises(ValueError, match="pylibjpeg") as error:
        native(ds)
    assert "gdcm" in str(error.value) and "JPEG 2000" in str(error.value)


def test_sixteen_bit_png_of_twelve_bit_data_is_scaled_by_bit_depth(tmp_path, native):
    values = np.resize(np.array([0, 1024, 2048, 4095], np.uint16), (SIDE, SIDE))
    path = tmp_path / "twelve_bit.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as written:
        assert written.mode == "I;16"

    grey = _grey(native(path, return_tensors="np"))
    np.testing.assert_allclose(grey, np.rint(values * 255.0 / 4095.0) / 255.0, atol=1e-6)
    assert grey.max() == 1.0


def test_rgba_png_becomes_luminance_without_alpha(tmp_path, native):
    rgba = np.zeros((SIDE, SIDE, 4), np.uint8)
    rgba[:4] = (255, 0, 0, 128)  # red, half transparent
    rgba[4:] = (255, 255, 255, 0)  # white, fully transparent
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)

    grey = _grey(native(path, return_tensors="np"))
    np.testing.assert_allclose(grey[:4], 0.299, atol=1 / 255)
    np.testing.assert_allclose(grey[4:], 1.0)


def test_eight_bit_grey_jpeg(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    path = tmp_path / "grey.jpg"
    Image.fromarray(ramp, mode="L").save(path, quality=95)

    grey = _grey(CAiDImageProcessor(size=64)(path, return_tensors="np"))
    np.testing.assert_allclose(grey, ramp / 255.0, atol=0.03)  # JPEG loss


def test_numpy_uint8_and_float_arrays(native):
    uint8 = np.full((SIDE, SIDE), 51, np.uint8)
    np.testing.assert_allclose(_grey(native(uint8, return_tensors="np")), 0.2, atol=1e-6)

    rgb = np.zeros((SIDE, SIDE, 3), np.float32)
    rgb[..., 1] = 1.0
    np.testing.assert_allclose(_grey(native(rgb, return_tensors="np")), 0.587, atol=1e-6)

    out_of_range = np.full((SIDE, SIDE), 1.7, np.float64)
    np.testing.assert_allclose(_grey(native(out_of_range, return_tensors="np")), 1.0)


def test_torch_tensors_channels_first(native):
    grey = torch.full((1, SIDE, SIDE), 0.25)
    np.testing.assert_allclose(_grey(native(grey, return_tensors="np")), 0.25)

    uint16 = torch.full((SIDE, SIDE, 1), 4095, dtype=torch.int32)  # 12-bit data, channels last
    np.testing.assert_allclose(_grey(native(uint16, return_tensors="np")), 1.0)

    batch = torch.rand(2, 3, SIDE, SIDE)
    out = native(batch, return_tensors="pt")["pixel_values"]
    assert out.shape == (2, 3, SIDE, SIDE)


def test_mixed_list_gives_one_resized_float_batch(tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray(np.full((40, 30), 200, np.uint8)).save(png)
    images = [
        png,
        str(png),
        Image.new("RGB", (50, 20), (10, 200, 30)),
        Image.fromarray(np.full((33, 33), 3000, np.int32), mode="I"),
        np.random.default_rng(0).random((17, 25, 4)),
        torch.randint(0, 256, (3, 64, 48), dtype=torch.uint8),
        twelve_bit_monochrome1(),
    ]
    out = CAiDImageProcessor(size=32)(images, return_tensors="pt")["pixel_values"]

    assert out.shape == (len(images), 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    torch.testing.assert_close(out[0], torch.full((3, 32, 32), 200 / 255))  # constant stays


def test_resize_is_antialiased():
    stripes = np.zeros((128, 128), np.float32)
    stripes[:, ::4] = 1.0  # every 4th column: plain bilinear 4× down samples only the 0 columns
    grey = _grey(CAiDImageProcessor(size=32)(stripes, return_tensors="np"))
    assert grey.shape == (32, 32)
    np.testing.assert_allclose(grey[:, 1:-1], 0.25, atol=1e-5)  # the mean; edges see the border


@pytest.mark.parametrize(
    "bad, match",
    [
        (object(), "unsupported input type object"),
        (np.zeros((0, 5), np.uint8), "empty array"),
        (np.zeros((7, 7, 5), np.uint8), "no channel axis"),
        (np.zeros((2, 2, 2, 2, 2), np.uint8), "is not an image"),
        (np.full((4, 4), np.nan), "NaN"),
        ([], "no images"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(bad, match, native):
    with pytest.raises(ValueError, match=match):
        native(bad)


def test_bad_item_in_a_list_is_named(native):
    with pytest.raises(ValueError, match=r"image 1 \(ndarray \(5, 5, 9\) uint8\)"):
        native([np.zeros((4, 4)), np.zeros((5, 5, 9), np.uint8)])


def test_missing_file_names_the_path(tmp_path, native):
    missing = tmp_path / "nowhere.dcm"
    with pytest.raises(FileNotFoundError, match="nowhere.dcm"):
        native(missing)


def test_save_load_round_trip_and_auto_image_processor(tmp_path, tiny_config):
    AutoImageProcessor.register(
        CAiDConfig,
        image_processor_classes={"torchvision": CAiDImageProcessor, "pil": CAiDImageProcessor},
        exist_ok=True,  # caid_hf may have registered it already
    )
    processor = CAiDImageProcessor.from_caid_config(
        tiny_config, resample=PILImageResampling.BICUBIC
    )
    assert processor.size == tiny_config.image_size == 64
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()

    for loaded in (
        CAiDImageProcessor.from_pretrained(tmp_path),
        AutoImageProcessor.from_pretrained(tmp_path),
    ):
        assert type(loaded) is CAiDImageProcessor
        assert loaded.to_dict() == processor.to_dict()
        assert loaded.to_dict()["image_processor_type"] == "CAiDImageProcessor"
    assert CAiDImageProcessor.from_pretrained(tmp_path, size=128).size == 128


# --- size: an int or a transformers size dict ---

def _ramp(height: int, width: int) -> np.ndarray:
    """uint8 [height, width]: a horizontal ramp 0 … 255, so a resize that distorts shows."""
    return np.tile(np.linspace(0, 255, width).round().astype(np.uint8), (height, 1))


def test_height_width_dict_resizes_to_exactly_that_size():
    image = _ramp(100, 150)
    out = CAiDImageProcessor(size={"height": 64, "width": 96})(image, return_tensors="pt")
    pixels = out["pixel_values"]
    assert pixels.shape == (1, 3, 64, 96)
    # the horizontal ramp stays one over the new width: rows equal, rising, mirror-symmetric
    row = pixels[0, 0, 0]
    torch.testing.assert_close(pixels[0, 0], row.expand(64, -1), rtol=0, atol=1e-6)
    assert (row.diff() > 0).all()
    torch.testing.assert_close(row + row.flip(0), torch.ones(96), rtol=0, atol=1 / 255)
    assert row.mean().item() == pytest.approx(0.5, abs=1e-3)
    square = CAiDImageProcessor(size={"height": 64, "width": 64})(image, return_tensors="pt")
    assert torch.equal(square["pixel_values"], CAiDImageProcessor(size=64)(image, return_tensors="pt")
                       ["pixel_values"])  # an int S is {"height": S, "width": S}


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((150, 100), (96, 64)),  # portrait: 150 × 0.64 = 96 exactly
        ((100, 330), (64, 224)),  # landscape: 330 × 0.64 = 211.2 → nearest multiple of 32
        ((100, 100), (64, 64)),
        ((400, 40), (320, 32)),  # 400 × 0.8 = 320 exactly: upsizing the short side works too
    ],
)
def test_shortest_edge_keeps_the_aspect_ratio_on_a_32_px_grid(shape, expected):
    edge = min(expected)
    processor = CAiDImageProcessor(size={"shortest_edge": edge})
    pixels = processor(np.full(shape, 102, np.uint8), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, *expected)
    torch.testing.assert_close(pixels, torch.full_like(pixels, 0.4))


def test_shortest_edge_batch_of_different_aspect_ratios():
    processor = CAiDImageProcessor(size={"shortest_edge": 64})
    images = [np.zeros((150, 100), np.uint8), np.zeros((100, 100), np.uint8)]
    shapes = [p.shape for p in processor(images)["pixel_values"]]
    assert shapes == [(3, 96, 64), (3, 64, 64)]
    with pytest.raises(ValueError, match="cannot be stacked.*shortest_edge"):
        processor(images, return_tensors="pt")


def test_size_given_per_call_overrides_the_setting():
    processor = CAiDImageProcessor(size=64)
    image = _ramp(100, 150)
    assert processor(image, size={"height": 32, "width": 96}, return_tensors="pt")[
        "pixel_values"].shape == (1, 3, 32, 96)
    assert processor(_ramp(100, 170), size={"shortest_edge": 32}, return_tensors="pt")[
        "pixel_values"].shape == (1, 3, 32, 64)  # 170 × 0.32 = 54.4 → nearest multiple of 32
    assert processor.size == 64


@pytest.mark.parametrize("size", [{"height": 64, "width": 96}, {"shortest_edge": 64}, 96])
def test_size_round_trips_through_save_pretrained(size, tmp_path):
    AutoImageProcessor.register(
        CAiDConfig,
        image_processor_classes={"torchvision": CAiDImageProcessor, "pil": CAiDImageProcessor},
        exist_ok=True,
    )
    processor = CAiDImageProcessor(size=size)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["size"] == size
    image = _ramp(100, 150)
    expected = processor(image, return_tensors="pt")["pixel_values"]
    for loaded in (CAiDImageProcessor.from_pretrained(tmp_path),
                   AutoImageProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is CAiDImageProcessor
        assert loaded.size == size and type(loaded.size) is type(size)
        assert loaded.to_dict() == processor.to_dict()
        assert torch.equal(loaded(image, return_tensors="pt")["pixel_values"], expected)
    overridden = CAiDImageProcessor.from_pretrained(tmp_path, size={"height": 32, "width": 32})
    assert overridden.size == {"height": 32, "width": 32}


@pytest.mark.parametrize(
    "size, match",
    [
        ({"heigth": 64, "width": 64}, "unsupported key 'heigth'"),
        ({"longest_edge": 64}, "unsupported key 'longest_edge'"),
        ({"height": 64}, "no 'width' key"),
        ({"width": 64}, "no 'height' key"),
        ({}, "empty dict"),
        ({"shortest_edge": 64, "height": 64}, "not both"),
        ({"height": 0, "width": 64}, r"size\['height'\] must be a positive int, got 0"),
        ({"height": 64, "width": -32}, r"size\['width'\] must be a positive int, got -32"),
        ({"shortest_edge": 64.0}, r"size\['shortest_edge'\] must be a positive int, got 64.0"),
        ({"height": 70, "width": 64}, r"size\['height'\] must be a multiple of 32.*got 70"),
        ({"shortest_edge": 100}, r"size\['shortest_edge'\] must be a multiple of 32.*got 100"),
        (70, "size must be a multiple of 32.*got 70"),
        (0, "size must be a positive int, got 0"),
        ("224", "size must be an int or a dict"),
    ],
)
def test_bad_size_is_refused_naming_the_key(size, match):
    with pytest.raises(ValueError, match=match):
        CAiDImageProcessor(size=size)
    with pytest.raises(ValueError, match=match):
        CAiDImageProcessor()(np.zeros((SIDE, SIDE), np.uint8), size=size)


def test_processor_and_training_decode_give_equal_pixels(tmp_path, native):
    """One decoder: every file reaches the model as pre-training read it (decode_grey / 255)."""
    from caid_hf.data.sources import decode_grey

    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)
    files = {"grey8.png": Image.fromarray(grey8),
             "twelve_bit.png": Image.fromarray(rng.integers(0, 4096, (SIDE, SIDE)).astype(np.uint16)),
             "rgba.png": Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 4), dtype=np.uint8))}
    for name, image in files.items():
        image.save(tmp_path / name)
    twelve_bit_monochrome1().save_as(tmp_path / "window_m1.dcm", enforce_file_format=True)
    lut = Dataset()
    lut.LUTDescriptor = [4, 100, 16]
    lut.LUTData = np.array([0, 1000, 3000, 4095]).astype("<u2").tobytes()
    voi = grey_dicom(np.resize(np.array([0, 100, 101, 102, 103, 4000], np.uint16), (SIDE, SIDE)),
                 BitsStored=12, VOILUTSequence=[lut])
    voi.save_as(tmp_path / "voi_lut.dcm", enforce_file_format=True)
    for path in sorted(tmp_path.iterdir()):
        trained = decode_grey(path).astype(np.float32) / 255
        np.testing.assert_array_equal(_grey(native(path, return_tensors="np")), trained,
                                      err_msg=path.name)
    np.testing.assert_array_equal(_grey(native(voi, return_tensors="np")),
                                  decode_grey(tmp_path / "voi_lut.dcm") / np.float32(255))
    assert len(set(np.unique(decode_grey(tmp_path / "voi_lut.dcm")))) == 4  # the LUT's levels


def test_bits_stored_is_a_saved_setting_applied_to_deep_integers(tmp_path, native):
    pixels = np.linspace(0, 1000, SIDE * SIDE).reshape(SIDE, SIDE).astype(np.uint16)
    guessed = _grey(native(pixels, return_tensors="np"))  # 10 bits hold 1000
    np.testing.assert_allclose(guessed, np.rint(pixels / 1023.0 * 255) / 255, atol=1e-6)
    processor = CAiDImageProcessor(do_resize=False, bits_stored=12)
    processor.save_pretrained(tmp_path)
    reloaded = CAiDImageProcessor.from_pretrained(tmp_path)
    assert reloaded.bits_stored == 12
    twelve = _grey(reloaded(pixels, return_tensors="np"))
    np.testing.assert_allclose(twelve, np.rint(pixels / 4095.0 * 255) / 255, atol=1e-6)
    with pytest.raises(ValueError, match=r"bits_stored must be in \[1, 32\]"):
        CAiDImageProcessor(bits_stored=0)
