"""Unreadable images: skipped with a stand-in, reported, listed, and a limit on how many."""

import csv
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from caid_hf.data.bad_files import BadFileLog, TooManyBadFiles
from caid_hf.data.crops import SkipBadImages, TwoCropDataset, collate_crops
from caid_hf.data.phantoms import write_phantoms
from caid_hf.data.sources import ImageFolderSource
from caid_hf.training.pretrain import main

from helpers import TINY


def _write_bad_files(folder, kinds=("zero", "text", "truncated", "missing")):
    """Bad files of each kind next to good ones; returns {file name: kind}."""
    good = sorted(folder.glob("*.png"))[0].read_bytes()
    names = {}
    for kind in kinds:
        path = folder / f"bad_{kind}.png"
        if kind == "zero":
            path.write_bytes(b"")
        elif kind == "text":
            path.write_text("this is not an image\n")
        elif kind == "truncated":
            path.write_bytes(good[: len(good) // 3])
        names[path.name] = kind
    return names


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    write_phantoms(root, 6, size=64, seed=0)
    return root


def test_every_kind_of_bad_file_is_skipped_reported_and_replaced(folder):
    names = _write_bad_files(folder, ("zero", "text", "truncated"))
    source = ImageFolderSource(folder)
    missing = source.relative_paths.index("phantom_00000.png")
    (folder / "phantom_00000.png").unlink()  # listed, then deleted: a missing file
    dataset = SkipBadImages(TwoCropDataset(source, 32, seed=1, per_epoch=True))
    ids = [source.image_id(i) for i in range(len(source))]
    reports = {}
    for i in range(len(dataset)):
        crops, bad = dataset[i]
        assert crops.shape == (2, 32, 32) and crops.dtype == torch.uint8
        reports.update(bad)
        if ids[i] in names or i == missing:
            # the stand-in is the next readable image, cut with image i's boxes
            j = next(j for j in range(i + 1, 2 * len(ids)) if ids[j % len(ids)] not in names
                     and j % len(ids) != missing) % len(ids)
            expected = dataset.dataset.crops(j, boxes_of=i)
            assert torch.equal(crops, expected)
            assert ids[i] in dict(bad)
        else:
            assert bad == [] and torch.equal(crops, dataset.dataset.crops(i))
    assert set(reports) == {*names, "phantom_00000.png"}
    assert "FileNotFoundError" in reports["phantom_00000.png"]
    for name in names:
        assert name in reports[name]  # each reason names its file
    batch = next(iter(DataLoader(dataset, batch_size=len(dataset), collate_fn=collate_crops,
                                 num_workers=2)))
    assert batch["crops"].shape == (len(dataset), 2, 32, 32)
    assert {image_id for image_id, _ in batch["bad_files"]} == set(reports)


def test_a_source_with_nothing_readable_stops_with_a_message(tmp_path):
    root = tmp_path / "broken"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(b"")
    dataset = SkipBadImages(TwoCropDataset(ImageFolderSource(root), 16))
    with pytest.raises(RuntimeError, match="3 images in a row could not be read"):
        dataset[0]


def test_bad_file_log_counts_each_image_once_and_resumes(tmp_path):
    path = tmp_path / "bad_files.tsv"
    log = BadFileLog(path, total_images=200, max_fraction=0.01)
    assert log.add([("a.png", "empty"), ("b.png", "truncated")]) == [("a.png", "empty"),
                                                                   ("b.png", "truncated")]
    assert log.add([("a.png", "empty")]) == [] and len(log) == 2
    log.check()  # 1 % is allowed
    with path.open(newline="") as handle:
        assert list(csv.reader(handle, delimiter="\t")) == [
            ["image_id", "reason"], ["a.png", "empty"], ["b.png", "truncated"]]
    resumed = BadFileLog(path, total_images=200, max_fraction=0.01)
    assert resumed.reasons == {"a.png": "empty", "b.png": "truncated"}
    resumed.add([("c.png", "not an image")])
    with pytest.raises(TooManyBadFiles, match=r"3 of 200 images \(1\.5%\).*max_bad_fraction=0\.01"):
        resumed.check()
    assert len(path.read_text().splitlines()) == 4
    with pytest.raises(ValueError, match="max_bad_fraction"):
        BadFileLog(None, 10, max_fraction=2.0)


def _folder_run(tmp_path, num_good, kinds):
    root = tmp_path / "images"
    write_phantoms(root, num_good, size=80, seed=0)
    names = _write_bad_files(root, kinds)
    out = tmp_path / "run"
    args = TINY + ["--train_source", str(root), "--output_dir", str(out),
                   "--num_train_epochs", "1", "--logging_steps", "1"]
    return out, names, args


@pytest.mark.slow
def test_run_with_five_percent_bad_files_stops_with_the_message(tmp_path):
    out, names, args = _folder_run(tmp_path, 76, ("zero", "text", "truncated", "missing"))
    (tmp_path / "images" / "bad_missing.png").unlink(missing_ok=True)
    for name in ("bad_zero.png", "bad_text.png", "bad_truncated.png"):
        shutil.copy(tmp_path / "images" / name, tmp_path / "images" / f"x{name}")
    # 6 bad of 82 images: 7 %
    with pytest.raises(TooManyBadFiles, match=r"could not be read, more than max_bad_fraction=0\.01"):
        main(args)
    listed = (out / "bad_files.tsv").read_text().splitlines()
    assert listed[0] == "image_id\treason" and len(listed) - 1 >= 2
    assert not (out / "final").exists()


@pytest.mark.slow
def test_run_with_half_a_percent_bad_files_finishes_and_lists_them(tmp_path):
    out, names, args = _folder_run(tmp_path, 199, ("truncated",))
    result = main(args)
    assert (out / "final" / "model.safetensors").is_file()
    rows = (out / "bad_files.tsv").read_text().splitlines()
    assert rows[0] == "image_id\treason" and len(rows) == 2
    assert rows[1].startswith("bad_truncated.png\t") and "bad_truncated.png" in rows[1].split("\t")[1]
    epochs = [h for h in result.history if "data/bad_files" in h]
    assert epochs and epochs[-1]["data/bad_files"] == 1


def test_phantom_folder_pngs_decode(folder):
    image = np.asarray(Image.open(folder / "phantom_00001.png"))
    assert image.dtype == np.uint8 and image.shape == (64, 64)
