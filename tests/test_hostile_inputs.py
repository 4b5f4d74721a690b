"""Hostile image files and lists: they are listed as bad with a reason, never crash or hang.

Every hostile file is built here: a grey PNG whose compressed image data ends early (it
killed the process in torchvision's libpng decoder), a decompression bomb (a 20000 x 20000
1-bit PNG of about 60 KB), split lists with a byte-order mark or in Latin-1, and folder
entries that are not files (dangling links, link loops, folders named ``x.png``).
"""

import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from caid_hf.cli import main as cli_main
from caid_hf.data.cache import CachedSource
from caid_hf.data.crops import SkipBadImages, TwoCropDataset
from caid_hf.data.phantoms import generate_phantom, write_phantoms
from caid_hf.data.sources import ImageFolderSource, SplitListSource, decode_grey

from helpers import TINY, bomb_png, png_chunk, short_data_png


def _decode_in_subprocess(path) -> subprocess.CompletedProcess:
    # a decoder crash would kill pytest itself: decode in a child and look at its exit status
    code = ("import sys\nfrom caid_hf.data.sources import decode_grey\n"
            "try:\n    decode_grey(sys.argv[1])\nexcept ValueError as e:\n    print(e)\n"
            "    sys.exit(3)\n")
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, timeout=120)


def test_a_grey_png_with_too_little_image_data_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "short.png"
    path.write_bytes(short_data_png())
    result = _decode_in_subprocess(path)
    assert result.returncode == 3, (result.returncode, result.stderr[-500:])  # not -11
    assert "short.png" in result.stdout and "cannot decode image" in result.stdout


@pytest.mark.parametrize("mode", ["L", "I;16", "RGB", "RGBA", "LA", "P", "1"])
def test_complete_pngs_with_a_black_last_row_decode_as_saved(tmp_path, mode):
    # a black last row makes decode_grey check the data length: no false alarm on any kind
    grey = generate_phantom(1, 48)[0].copy()
    grey[-3:] = 0
    if mode == "I;16":
        image = Image.fromarray(grey.astype(np.uint16) * 257)  # 16-bit, same picture
    else:
        image = Image.fromarray(grey).convert(mode)
    path = tmp_path / f"{mode.replace(';', '')}.png"
    image.save(path)
    decoded = decode_grey(path)
    assert decoded.shape == (48, 48) and not decoded[-3:].any()
    if mode in ("L", "I;16"):
        np.testing.assert_array_equal(decoded, grey)


def test_interlaced_png_data_length_is_checked_per_pass(tmp_path):
    # Adam7: 8 x 8 grey has 15 pass rows, so 64 + 15 bytes of data; all black
    header = struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 1)
    signature = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
    complete = tmp_path / "adam7.png"
    complete.write_bytes(signature + png_chunk(b"IDAT", zlib.compress(bytes(79)))
                         + png_chunk(b"IEND", b""))
    np.testing.assert_array_equal(decode_grey(complete), np.zeros((8, 8), np.uint8))
    short = tmp_path / "adam7_short.png"
    short.write_bytes(signature + png_chunk(b"IDAT", zlib.compress(bytes(43)))
                      + png_chunk(b"IEND", b""))
    with pytest.raises(ValueError, match="adam7_short.png.*image data ends early"):
        decode_grey(short)


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png())
    assert path.stat().st_size < 200_000
    with pytest.raises(ValueError, match=r"bomb\.png.*(decompression bomb|exceeds limit)"):
        decode_grey(path)


def test_a_dicom_declaring_gigapixels_is_refused(tmp_path):
    from caid_hf.decoding import check_pixel_count

    check_pixel_count("ok.dcm", 4096, 4096)
    with pytest.raises(ValueError, match=r"huge\.dcm.*30000 x 30000 px.*decompression bomb"):
        check_pixel_count("huge.dcm", 30000, 30000)


@pytest.fixture
def hostile_folder(tmp_path):
    root = tmp_path / "images"
    write_phantoms(root, 40, size=64, seed=0)
    (root / "short.png").write_bytes(short_data_png())
    (root / "bomb.png").write_bytes(bomb_png())
    return root


def test_folder_entries_that_are_not_files_are_listed_with_a_reason(tmp_path):
    root = tmp_path / "images"
    write_phantoms(root, 2, size=64, seed=0)
    (root / "dangling.png").symlink_to(root / "nowhere.png")
    (root / "loop.png").symlink_to(root / "loop.png")
    (root / "folder.png").mkdir()
    (root / "sub").mkdir()
    (root / "sub" / "back").symlink_to(root)  # a folder link loop: walked once, no hang
    linked = tmp_path / "elsewhere"
    write_phantoms(linked, 1, size=64, seed=3)
    (root / "linked").symlink_to(linked)  # a linked folder of images is read
    source = ImageFolderSource(root)
    assert source.relative_paths == ["dangling.png", "folder.png", "linked/phantom_00000.png",
                                     "loop.png", "phantom_00000.png", "phantom_00001.png"]
    dataset = SkipBadImages(TwoCropDataset(source, 32, seed=0))
    reasons = {}
    for i in range(len(dataset)):
        reasons.update(dataset[i][1])
    assert set(reasons) == {"dangling.png", "folder.png", "loop.png"}
    assert "broken symbolic link" in reasons["dangling.png"]
    assert "broken symbolic link" in reasons["loop.png"]
    assert "it is a folder" in reasons["folder.png"]
    np.testing.assert_array_equal(source.load(2), generate_phantom(0, 64, seed=3)[0])


def test_split_list_with_a_byte_order_mark_reads_its_first_path(tmp_path):
    write_phantoms(tmp_path, 2, size=64)
    split = tmp_path / "train.txt"
    split.write_bytes("\ufeffphantom_00000.png 0\r\nphantom_00001.png 1\r\n".encode())
    source = SplitListSource(split, tmp_path)
    assert source.relative_paths == ["phantom_00000.png", "phantom_00001.png"]
    np.testing.assert_array_equal(source.load(0), generate_phantom(0, 64)[0])


def test_split_list_in_latin1_names_file_and_line(tmp_path):
    split = tmp_path / "train.txt"
    split.write_bytes("a.png 0\nb.png 0\nr\xe9sum\xe9.png 1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"train\.txt:3: not UTF-8 text \(byte 0xe9 at column 2\)"):
        SplitListSource(split, tmp_path)


def test_csv_in_latin1_names_file_and_line(tmp_path):
    from caid_hf.finetuning.data import CSVLabelledSource

    table = tmp_path / "labels.csv"
    table.write_bytes("path,label\n\xe9.png,1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"labels\.csv:2: not UTF-8"):
        CSVLabelledSource(table)


@pytest.mark.slow
def test_pretraining_on_a_folder_with_hostile_files_finishes_and_lists_them(hostile_folder,
                                                                           tmp_path):

    from caid_hf.training.pretrain import main as pretrain

    out = tmp_path / "run"
    result = pretrain(TINY + ["--train_source", str(hostile_folder), "--output_dir", str(out),
                              "--validation_fraction", "0.1", "--max_bad_fraction", "0.1",
                              "--num_train_epochs", "1", "--dataloader_num_workers", "1"])
    assert (out / "final" / "model.safetensors").is_file() and result.global_step >= 4
    rows = dict(line.split("\t") for line in (out / "bad_files.tsv").read_text().splitlines()[1:])
    assert set(rows) <= {"short.png", "bomb.png"} and rows  # those the run met, no good image
    for name, reason in rows.items():
        assert name in reason


def test_prepare_data_with_two_processes_finishes_on_hostile_files(hostile_folder, tmp_path):
    out = tmp_path / "cache"
    cli_main(["prepare-data", str(hostile_folder), "--out", str(out), "--size", "48",
              "--chunk-size", "8", "--num-proc", "2"])
    cache = CachedSource(out)
    assert len(cache) == 40  # every good image, none lost
    bad = {record["image_id"]: record["reason"] for record in cache.metadata["bad_files"]}
    assert set(bad) == {"short.png", "bomb.png"}
    assert "bomb.png" in bad["bomb.png"] and "short.png" in bad["short.png"]
