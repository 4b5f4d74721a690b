import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    JPEGLSLossless,
)

from caid_hf.data.sources import ImageFolderSource, decode_grey
from caid_hf.decoding import decode_dicom, has_dicom_magic

from helpers import write_dicom


def _stored_12bit():
    return np.array(
        [[0, 400, 500, 800], [1000, 1200, 1499, 1500], [2000, 4095, 10, 3000]], dtype=np.uint16
    )


# modality rescale, window, MONOCHROME1


def test_window_with_rescale_and_monochrome1(tmp_path):
    stored = _stored_12bit()
    path = write_dicom(
        tmp_path / "m1.dcm",
        stored,
        photometric="MONOCHROME1",
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=1000,
        WindowWidth=2001,
    )
    decoded = decode_dicom(path)
    assert decoded.dtype == np.uint8 and decoded.shape == (3, 4)

    # PS3.3 C.11.2.1.2.1 LINEAR window: the window spans -0.5 .. 1999.5 here.
    value = stored * 2.0 - 1000.0
    center, width = 1000.0, 2001.0
    brightness = np.clip((value - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    expected = np.rint(255 * (1.0 - brightness))  # MONOCHROME1: low values shown bright
    np.testing.assert_array_equal(decoded, expected)

    assert decoded[0, 1] == 255  # stored 400 -> -200, below the window: white
    assert decoded[0, 3] == 178  # 600: (600 - 999.5) / 2000 + 0.5 = 0.30025, inverted
    assert decoded[1, 0] == 127  # 1000: 0.50025 -> 0.49975 * 255 = 127.4
    assert decoded[1, 1] == 76  # 1400: 0.70025 -> 76.4
    assert decoded[1, 3] == 0  # 2000, above the window: black
    assert decoded[2, 1] == 0  # 7190, the stored maximum


def test_first_of_several_windows_and_sigmoid(tmp_path):
    stored = _stored_12bit()
    several = write_dicom(
        tmp_path / "two.dcm", stored, WindowCenter=[2000, 500], WindowWidth=[1000, 100]
    )
    brightness = np.clip((stored - 1999.5) / 999.0 + 0.5, 0.0, 1.0)
    np.testing.assert_array_equal(decode_dicom(several), np.rint(255 * brightness))

    sigmoid = write_dicom(
        tmp_path / "sigmoid.dcm",
        stored,
        WindowCenter=1500,
        WindowWidth=1000,
        VOILUTFunction="SIGMOID",
    )
    expected = np.rint(255 / (1 + np.exp(-4 * (stored - 1500.0) / 1000.0)))
    np.testing.assert_array_equal(decode_dicom(sigmoid), expected)


# no window: the stored bit range (Bits Stored) through the rescale


def test_no_window_16bit_stored_range_monochrome2(tmp_path):
    stored = np.array([[1000, 2000, 31000], [40000, 61000, 5000]], dtype=np.uint16)
    path = write_dicom(
        tmp_path / "deep.dcm", stored, bits_stored=16, RescaleSlope=0.5, RescaleIntercept=100
    )
    decoded = decode_dicom(path)
    value = stored * 0.5 + 100
    low, high = 0 * 0.5 + 100, 65535 * 0.5 + 100
    expected = np.rint(255 * (value - low) / (high - low))
    np.testing.assert_array_equal(decoded, expected)
    assert decoded.tolist() == [[4, 8, 121], [156, 237, 19]]


def test_two_films_of_one_scanner_share_one_scale_and_bits_stored_overrides(tmp_path):
    bright = np.array([[0, 1000], [2000, 4095]], dtype=np.uint16)
    dark = bright // 4  # the same 12-bit detector, a thinner patient
    a = decode_dicom(write_dicom(tmp_path / "a.dcm", bright))
    b = decode_dicom(write_dicom(tmp_path / "b.dcm", dark))
    np.testing.assert_array_equal(a, np.rint(bright / 4095 * 255))
    np.testing.assert_array_equal(b, np.rint(dark / 4095 * 255))  # not stretched to 255
    # a header that declares 16 bits of 12-bit data: the override puts it right
    wrong = write_dicom(tmp_path / "wrong.dcm", bright, bits_stored=16)
    assert decode_dicom(wrong).max() == round(4095 / 65535 * 255)
    np.testing.assert_array_equal(decode_dicom(wrong, bits_stored=12), a)
    assert decode_grey(wrong, bits_stored=12).tolist() == a.tolist()


def test_no_window_monochrome1_signed_and_constant(tmp_path):
    stored = np.array([[-2048, -1000, 0], [500, 1023, 2047]], dtype=np.int16)
    path = write_dicom(tmp_path / "signed.dcm", stored, photometric="MONOCHROME1")
    expected = np.rint(255 * (1 - (stored + 2048.0) / 4095.0))  # the signed 12-bit range
    np.testing.assert_array_equal(decode_dicom(path), expected)
    assert decode_dicom(path)[0].tolist() == [255, 190, 127]  # 0: 255 * 2047 / 4095 = 127.5 - 0.03

    flat = write_dicom(tmp_path / "flat.dcm", np.full((3, 3), 700, np.uint16))
    np.testing.assert_array_equal(decode_dicom(flat), np.full((3, 3), round(700 / 4095 * 255)))


# VOI LUT Sequence


def test_voi_lut_sequence_wins_over_window(tmp_path):
    lut = Dataset()
    lut.LUTDescriptor = [4, 100, 16]  # 4 entries from input 100, declared 16 bits
    entries = np.array([0, 1000, 3000, 4095])  # … but holding 12-bit values
    lut.LUTData = entries.astype("<u2").tobytes()  # OW, as most files store it
    stored = np.array([[0, 100, 101], [102, 103, 4000]], dtype=np.uint16)
    path = write_dicom(
        tmp_path / "lut.dcm", stored, VOILUTSequence=[lut], WindowCenter=10, WindowWidth=5
    )
    expected = np.rint(255 * entries[np.clip(stored.astype(int) - 100, 0, 3)] / 4095)
    decoded = decode_dicom(path)
    np.testing.assert_array_equal(decoded, expected)
    assert decoded.tolist() == [[0, 0, 62], [187, 255, 255]]


# colour


def test_rgb_becomes_itu601_luminance(tmp_path):
    rgb = np.zeros((1, 4, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (255, 255, 255)
    rgb[0, 3] = (10, 20, 30)
    path = write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB", bits_stored=8)
    # 0.299 * 255 = 76.2, 0.587 * 255 = 149.7, 2.99 + 11.74 + 3.42 = 18.15
    assert decode_dicom(path).tolist() == [[76, 150, 255, 18]]


# refusals


def test_multi_frame_is_refused(tmp_path):
    path = write_dicom(
        tmp_path / "cine.dcm", np.zeros((2, 3, 4), np.uint16).reshape(6, 4), NumberOfFrames=2
    )
    with pytest.raises(ValueError, match="single-frame radiographs are expected") as error:
        decode_dicom(path)
    assert str(path) in str(error.value)


def test_compressed_without_decoder_names_the_extra(tmp_path):
    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed")
    path = write_dicom(tmp_path / "ls.dcm", np.zeros((2, 2), np.uint16))
    from pydicom import dcmread

    dataset = dcmread(path)
    dataset.file_meta.TransferSyntaxUID = JPEGLSLossless
    dataset.PixelData = encapsulate([b"\xff\xd8\xff\xf7not a real codestream"])
    dataset.save_as(path, enforce_file_format=True)
    with pytest.raises(ValueError) as error:
        decode_dicom(path)
    message = str(error.value)
    assert str(path) in message
    assert "JPEG-LS Lossless" in message
    assert 'pip install "caid-hf[dicom]"' in message


@pytest.mark.parametrize("keep", [-5, 200, 100])
def test_truncated_file_names_the_path(tmp_path, keep):
    whole = write_dicom(tmp_path / "whole.dcm", _stored_12bit()).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(whole[:keep])
    with pytest.raises(ValueError, match="cannot decode image") as error:
        decode_dicom(path)
    assert str(path) in str(error.value)


def test_not_dicom_and_missing(tmp_path):
    text = tmp_path / "notes.dcm"
    text.write_text("hello, not a radiograph\n" * 20)
    for decode in (decode_dicom, decode_grey):
        with pytest.raises(ValueError, match="cannot decode image") as error:
            decode(text)
        assert str(text) in str(error.value)
        with pytest.raises(FileNotFoundError):
            decode(tmp_path / "absent.dcm")
    with pytest.raises(FileNotFoundError):
        decode_grey(tmp_path / "absent")


# dispatch from the image sources


def test_decode_grey_dispatches_by_suffix_and_magic(tmp_path):
    stored = _stored_12bit()
    reference = decode_dicom(write_dicom(tmp_path / "ref.dcm", stored))
    assert reference.tolist()[0] == [0, 25, 31, 50]  # min..max: 400 * 255 / 4095 = 24.9
    for name in ("upper.DCM", "long.dicom", "IM0001", "1.2.840.113619.2.5"):
        path = write_dicom(tmp_path / name, stored)
        assert has_dicom_magic(path)
        np.testing.assert_array_equal(decode_grey(path), reference)

    png = tmp_path / "picture"  # no suffix, no DICM: still read by PIL
    Image.fromarray(np.full((2, 3), 9, np.uint8)).save(png, format="PNG")
    assert not has_dicom_magic(png)
    assert decode_grey(png).tolist() == [[9, 9, 9], [9, 9, 9]]


def test_image_folder_finds_dicom(tmp_path):
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "a.png")
    write_dicom(tmp_path / "scans" / "b.DCM", _stored_12bit())
    write_dicom(tmp_path / "scans" / "c.dicom", _stored_12bit())
    (tmp_path / "scans" / "notes.txt").write_text("not an image")
    source = ImageFolderSource(tmp_path)
    assert source.relative_paths == ["a.png", "scans/b.DCM", "scans/c.dicom"]
    assert source.load(1).shape == (3, 4) and source.load(1).dtype == np.uint8
    np.testing.assert_array_equal(source.load(1), source.load(2))


def test_presentation_lut_shape_inverse_is_shown_inverted_once(tmp_path):
    stored = np.array([[0, 1000], [2000, 4095]], dtype=np.uint16)
    plain = decode_dicom(write_dicom(tmp_path / "plain.dcm", stored))
    inverse = decode_dicom(write_dicom(tmp_path / "inverse.dcm", stored,
                                        PresentationLUTShape="INVERSE"))
    np.testing.assert_array_equal(inverse, 255 - plain)
    # MONOCHROME1 with INVERSE (what DX requires for MONOCHROME1) is one inversion, not two
    m1 = decode_dicom(write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1",
                                   PresentationLUTShape="INVERSE"))
    np.testing.assert_array_equal(m1, 255 - plain)
    identity = decode_dicom(write_dicom(tmp_path / "id.dcm", stored,
                                         PresentationLUTShape="IDENTITY"))
    np.testing.assert_array_equal(identity, plain)


def test_pixel_padding_is_shown_black(tmp_path):
    # a 12-bit image inside a padding frame of 4095 (bright stored value outside the body)
    stored = np.full((4, 4), 4095, dtype=np.uint16)
    stored[1:3, 1:3] = [[100, 200], [300, 500]]
    padded = decode_dicom(write_dicom(tmp_path / "pad.dcm", stored, PixelPaddingValue=4095))
    inside = padded[1:3, 1:3]
    np.testing.assert_array_equal(inside, np.rint(stored[1:3, 1:3] / 4095 * 255))
    assert (padded[0] == 0).all() and (padded[:, 0] == 0).all()  # padding shown as air
    ranged = decode_dicom(write_dicom(tmp_path / "range.dcm", stored.clip(max=4000) // 1,
                                       PixelPaddingValue=3000, PixelPaddingRangeLimit=4095))
    np.testing.assert_array_equal(ranged[1:3, 1:3], inside)
    without = decode_dicom(write_dicom(tmp_path / "none.dcm", stored))
    assert (without[0] == 255).all()  # without the padding value the frame shows white
