"""Fine-tuning on a label file whose images are partly missing or undecodable: looked up when
the table is read, listed with file:line in bad_files.tsv, skipped within max_bad_fraction,
one clear message beyond it."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from caid_hf.data.bad_files import TooManyBadFiles
from caid_hf.finetuning.arguments import parse_finetuning_args
from caid_hf.finetuning.data import CHESTXRAY14_LABELS, CSVLabelledSource
from caid_hf.finetuning.finetune import finetune

from helpers import write_nih


def _data(root: Path) -> tuple[Path, Path]:
    """A ChestX-ray14 Data_Entry layout: train (40 films of 20 patients) and validation (12
    films of 6 others); 12 of the 14 findings occur, Hernia and Fibrosis do not."""
    present = [n for n in CHESTXRAY14_LABELS if n not in ("Hernia", "Fibrosis")]
    train = write_nih(root, [present[k % 12] if k % 3 else "No Finding" for k in range(40)],
                      name="train.csv")
    validation = write_nih(root, [present[k % 12] if k % 2 else "No Finding" for k in range(12)],
                           name="val.csv", first_patient=100)
    return train, validation


def _run(tmp_path: Path, train: Path, validation: Path, *extra: str):
    return finetune(*parse_finetuning_args([
        "--train_source", str(train), "--validation_source", str(validation),
        "--images_root", str(train.parent / "images"), "--label_names", *CHESTXRAY14_LABELS,
        "--init_from", "random", "--encoder_name", "resnet18", "--image_size", "32",
        "--max_steps", "2", "--per_device_train_batch_size", "8", "--bootstrap_resamples", "5",
        "--report_to", "none", "--use_cpu", "--mixed_precision", "no",
        "--output_dir", str(tmp_path / "out"), *extra]))


def _bad_files(tmp_path: Path) -> list[list[str]]:
    with (tmp_path / "out" / "bad_files.tsv").open(newline="") as f:
        return list(csv.reader(f, delimiter="\t"))


@pytest.mark.filterwarnings("ignore:.*occur in none of the")
def test_missing_and_undecodable_images_are_listed_with_their_lines_and_skipped(tmp_path):
    train, validation = _data(tmp_path)
    images = train.parent / "images"
    (images / "00000005_001.png").unlink()  # train.csv line 11
    (images / "00000102_001.png").write_bytes(b"not a png")  # val.csv line 7
    source = CSVLabelledSource(train, images_root=images)
    assert len(source) == 39 and source.rows_read == 40
    assert source.bad_images == [("00000005_001.png", f"{train}:11: image not found: "
                                                      f"{images / '00000005_001.png'}")]
    result = _run(tmp_path, train, validation, "--max_bad_fraction", "0.05",
                  "--dataloader_num_workers", "1")
    rows = _bad_files(tmp_path)
    assert rows[0] == ["image_id", "reason"]
    assert rows[1] == ["00000005_001.png", f"{train}:11: image not found: "
                                           f"{images / '00000005_001.png'}"]
    assert rows[2][0] == "00000102_001.png" and rows[2][1].startswith(
        f"{validation}:7: cannot decode") and len(rows) == 3
    report = result.test_report
    assert report["num_samples"] == 11  # the undecodable validation film is left out
    assert math.isnan(report["metrics"]["auc/Hernia"]) and math.isnan(
        report["metrics"]["auc/Fibrosis"])  # listed, absent from the data: undefined
    assert math.isfinite(report["metrics"]["mean_auc"])
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["num_train_images"] == 39 and state["bad_files"] == 2


@pytest.mark.filterwarnings("ignore:.*occur in none of the")
def test_beyond_max_bad_fraction_one_clear_message(tmp_path):
    train, validation = _data(tmp_path)
    images = train.parent / "images"
    (images / "00000005_001.png").unlink()  # 1 of 52 listed images: 1.9 %
    with pytest.raises(TooManyBadFiles) as error:
        _run(tmp_path, train, validation)  # max_bad_fraction 0.01
    message = str(error.value)
    assert message.startswith("1 of 52 images (1.9%) could not be read, more than "
                              f"max_bad_fraction=0.01: 00000005_001.png ({train}:11: image not "
                              "found")
    assert "bad_files.tsv" in message and "raise max_bad_fraction" in message
    # an undecodable image met by a DataLoader worker stops the run from the main process
    # with the same one message, never a worker traceback
    (images / "00000005_001.png").write_bytes(b"")
    (tmp_path / "out").rename(tmp_path / "first")
    with pytest.raises(TooManyBadFiles) as error:
        _run(tmp_path, train, validation, "--dataloader_num_workers", "1",
             "--per_device_train_batch_size", "40", "--validation_fraction", "0.1")
    message = str(error.value)
    assert message.startswith("1 of 52 images (1.9%) could not be read")
    assert f"00000005_001.png ({train}:11: " in message and "DataLoader" not in message
    assert _bad_files(tmp_path)[1][1].startswith(f"{train}:11: ")
