"""CheXpert, MIMIC-CXR and PadChest label files as they come, patient-level splits, and
metrics that leave ignored labels out (checked against scikit-learn)."""

from __future__ import annotations

import csv
import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from caid_hf.data.patients import (
    check_patient_rule,
    grouped_hold_out,
    patient_ids_from_names,
    take_patients,
)
from caid_hf.finetuning.arguments import parse_finetuning_args
from caid_hf.finetuning.data import (
    CHESTXRAY14_LABELS,
    ClassificationDataset,
    CSVLabelledSource,
    labelled_source_from_spec,
)
from caid_hf.finetuning.finetune import build_splits, finetune
from caid_hf.finetuning.label_formats import CHEXPERT_LABELS, detect_label_format
from caid_hf.finetuning.metrics import classification_metrics, per_class_auc

from helpers import RNG_SEED, label_cells, write_chexpert, write_nih, write_phantom_png


def write_mimic(root: Path, subjects: int = 10, seed: int = RNG_SEED) -> Path:
    """MIMIC-CXR-JPG: per-study chexpert labels (.csv.gz) and per-image metadata."""
    rng = np.random.default_rng(seed)
    studies, images, k = [], [], 0
    for s in range(subjects):
        subject = f"1{s:07d}"
        for t in range(2):
            study = f"5{s:04d}{t:03d}"
            studies.append([subject, study])
            for view in ("PA", "LATERAL") if t == 0 else ("AP",):
                dicom = f"{k:08x}-dicom"
                write_phantom_png(root / f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg", k)
                images.append([dicom, subject, study, view])
                k += 1
    labels = label_cells(rng, len(studies), len(CHEXPERT_LABELS))
    labels_csv = root / "mimic-cxr-2.0.0-chexpert.csv.gz"
    lines = [",".join(["subject_id", "study_id", *CHEXPERT_LABELS])]
    lines += [",".join(r + c) for r, c in zip(studies, labels)]
    labels_csv.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with (root / "mimic-cxr-2.0.0-metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dicom_id", "subject_id", "study_id", "ViewPosition"])
        writer.writerows(images)
    return labels_csv


PADCHEST_FINDINGS = ["pneumonia", "nodule", "cardiomegaly"]


def write_padchest(root: Path, patients: int = 10) -> Path:
    """PADCHEST_...csv: ImageDir/ImageID, PatientID, Projection, Labels as list literals."""
    rows, k = [], 0
    for p in range(patients):
        for projection in ("PA", "L", "AP_horizontal"):
            image_id = f"{p:03d}_{projection}.png"
            write_phantom_png(root / str(p % 3) / image_id, k)
            found = [PADCHEST_FINDINGS[j] for j in range(3) if (k + j) % 3 == 0]
            labels = repr([f" {n}" for n in found] or ["normal"])
            rows.append([image_id, str(p % 3), f"study{p}", f"patient{p}", projection, labels])
            k += 1
    table = root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageID", "ImageDir", "StudyID", "PatientID", "Projection", "Labels"])
        writer.writerows(rows)
    return table


def _raw_cells(table: Path, column: str) -> list[str]:
    opener = gzip.open if table.suffix == ".gz" else open
    with opener(table, "rt", newline="") as f:
        return [r[column] for r in csv.DictReader(f)]


def test_chexpert_layout_is_detected_and_policies_apply(tmp_path):
    table = write_chexpert(tmp_path)
    raw = np.array([[{"1.0": 1.0, "0.0": 0.0, "-1.0": -1.0, "": -2.0}[c]
                     for c in _raw_cells(table, name)] for name in CHEXPERT_LABELS]).T
    source = CSVLabelledSource(table)  # images_root: the folder above, where paths start
    assert source.label_format == "chexpert" and source.label_names == CHEXPERT_LABELS
    assert len(source) == 48 and source.load(0).shape == (32, 32)
    targets = source.targets
    assert np.isnan(targets[raw == -1.0]).all()  # uncertain: ignored by default
    assert (targets[raw == -2.0] == 0).all()  # blank: negative by default
    assert (targets[raw == 1.0] == 1).all() and (targets[raw == 0.0] == 0).all()
    ones = CSVLabelledSource(table, uncertain_labels="ones", blank_labels="ignore").targets
    assert (ones[raw == -1.0] == 1).all() and np.isnan(ones[raw == -2.0]).all()
    zeros = CSVLabelledSource(table, uncertain_labels="zeros").targets
    assert (zeros[raw == -1.0] == 0).all() and not np.isnan(zeros).any()
    frontal = CSVLabelledSource(table, views=["frontal"])
    assert len(frontal) == 24 and frontal.dropped_views == 24
    assert all("frontal" in frontal.image_id(i) for i in range(len(frontal)))
    assert len(CSVLabelledSource(table, views=["PA"])) == 12  # even patients are PA
    # patients from the path: patientNNNNN, 4 films each
    ids = source.patient_ids
    assert len(set(ids)) == 12 and all(ids.count(p) == 4 for p in ids)
    assert ids[0] == "patient00001"


def test_chexpert_bad_cells_name_file_row_and_column(tmp_path):
    table = write_chexpert(tmp_path, patients=2)
    text = table.read_text().splitlines()
    fields = text[3].split(",")
    fields[-1] = "2.0"
    text[3] = ",".join(fields)
    table.write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match=r"train.csv:4 column 'Support Devices': label must be "
                                         r"1, 0, -1 \(uncertain\) or blank"):
        CSVLabelledSource(table)
    with pytest.raises(ValueError, match=r"uncertain_labels must be one of"):
        CSVLabelledSource(table, uncertain_labels="u-ones")


def test_mimic_labels_join_the_metadata_and_views(tmp_path):
    labels_csv = write_mimic(tmp_path)
    source = labelled_source_from_spec(str(labels_csv), _options())
    assert source.label_format == "mimic" and len(source) == 30  # 3 images per subject
    assert source.image_id(0).startswith("files/p10/p10000000/s50000000/")
    assert source.load(0).shape == (32, 32)
    # a study's label row is repeated for each of its images
    assert np.array_equal(source.targets[0], source.targets[1], equal_nan=True)
    assert len(set(source.patient_ids)) == 10  # subject_id
    frontal = CSVLabelledSource(labels_csv, views=["frontal"])
    assert len(frontal) == 20 and frontal.dropped_views == 10
    (tmp_path / "mimic-cxr-2.0.0-metadata.csv").unlink()
    with pytest.raises(ValueError, match=r"mimic-cxr-2.0.0-metadata.csv.*metadata_csv"):
        CSVLabelledSource(labels_csv)


def test_padchest_list_literals_and_projection(tmp_path):
    table = write_padchest(tmp_path)
    source = CSVLabelledSource(table)
    assert source.label_format == "padchest"
    assert source.label_names == sorted(PADCHEST_FINDINGS)  # 'normal' is no finding
    k = 4
    expected = {PADCHEST_FINDINGS[j] for j in range(3) if (k + j) % 3 == 0}
    assert {n for n, v in zip(source.label_names, source.targets[k]) if v} == expected
    chosen = CSVLabelledSource(table, label_names=["nodule", "pneumonia"])
    assert chosen.targets.shape == (30, 2)
    with pytest.raises(ValueError, match=r"label_names 'pnemonia' is not among PadChest's 193 "
                                         r"labels \(did you mean 'pneumonia'\?\)"):
        CSVLabelledSource(table, label_names=["pnemonia"])
    assert len(CSVLabelledSource(table, views=["frontal"])) == 20  # PA and AP_horizontal
    assert len(CSVLabelledSource(table, views=["lateral"])) == 10
    assert source.patient_ids[:3] == ["patient0"] * 3
    text = table.read_text().replace("]", "", 1)  # an unclosed list
    table.write_text(text)
    with pytest.raises(ValueError, match=r"PADCHEST.*\.csv:\d+ column 'Labels': Labels must be "
                                         r"a list"):
        CSVLabelledSource(table)


def test_detect_label_format():
    assert detect_label_format(["Path", "Frontal/Lateral", *CHEXPERT_LABELS]) == "chexpert"
    assert detect_label_format(["subject_id", "study_id", *CHEXPERT_LABELS]) == "mimic"
    assert detect_label_format(["ImageID", "ImageDir", "Labels"]) == "padchest"
    assert detect_label_format(["Image Index", "Finding Labels"]) == "names"
    assert detect_label_format(["path", "effusion"]) == "binary"


def test_patient_rules():
    names = ["images/00000001_000.png", "images/00000001_001.png", "images/00000002_000.png"]
    assert patient_ids_from_names(names, "auto", "x") == ["00000001", "00000001", "00000002"]
    assert patient_ids_from_names(["a/b.png"], "auto", "x") is None  # not ChestX-ray14 names
    assert patient_ids_from_names(names, "regex:(\\d{8})_", "x")[2] == "00000002"
    assert patient_ids_from_names(names, "none", "x") is None
    with pytest.raises(ValueError, match=r"x: patient_id_from filename_prefix needs a '_'.*'a/b.png' has none"):
        patient_ids_from_names(["a/b.png"], "filename_prefix", "x")
    with pytest.raises(ValueError, match=r"does not match image 'a/b.png'"):
        patient_ids_from_names(["a/b.png"], "regex:patient(\\d+)", "x")
    with pytest.raises(ValueError, match=r"patient_id_from must be"):
        check_patient_rule("column:")
    with pytest.raises(ValueError, match=r"not a regular expression"):
        check_patient_rule("regex:(")


def test_grouped_splits_keep_every_patient_on_one_side():
    rng = np.random.default_rng(0)
    groups = [f"p{g}" for g in rng.integers(0, 40, size=300)]
    for seed in range(20):
        train, held = grouped_hold_out(300, 0.2, seed, groups)
        assert sorted(train + held) == list(range(300))
        assert not {groups[i] for i in train} & {groups[i] for i in held}
        assert abs(len(held) - 60) <= max(groups.count(g) for g in set(groups))
        few = take_patients(sorted(train), 0.1, seed, groups)
        picked = {groups[i] for i in few}
        assert all(i in few for i in train if groups[i] in picked)  # whole patients
    # image-level when there are no patients: the seeded permutation, as before
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    assert grouped_hold_out(10, 0.3, 3, None) == (order[3:], order[:3])
    with pytest.raises(ValueError, match=r"all 5 images belong to one patient"):
        grouped_hold_out(5, 0.2, 0, ["a"] * 5)


def test_metrics_skip_ignored_labels_as_scikit_learn_does_on_the_kept_entries():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=(200, 4)).astype(np.float32)
    labels[rng.random((200, 4)) < 0.3] = np.nan
    scores = rng.random((200, 4)) + 0.3 * np.nan_to_num(labels)
    auc = per_class_auc(labels, scores)
    for k in range(4):
        kept = np.isfinite(labels[:, k])
        assert auc[k] == pytest.approx(roc_auc_score(labels[kept, k], scores[kept, k]), abs=1e-12)
    metrics = classification_metrics(labels, scores, list("abcd"))
    assert metrics["mean_auc"] == pytest.approx(np.mean(auc), abs=1e-12)


def test_the_model_loss_leaves_ignored_entries_out(tiny_config):
    from caid_hf import CAiDForImageClassification

    config = tiny_config.__class__(**{**tiny_config.to_dict(), "num_labels": 3,
                                      "problem_type": "multi_label_classification"})
    model = CAiDForImageClassification(config).eval()
    pixels = torch.rand(4, 3, 64, 64)
    labels = torch.tensor([[1, 0, float("nan")], [0, 1, 1], [float("nan")] * 3, [1, -100, 0]])
    out = model(pixel_values=pixels, labels=labels)
    known = ~(labels.isnan() | (labels == -100))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        out.logits[known], labels[known])
    assert torch.allclose(out.loss, expected, atol=1e-6)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _options():
    from caid_hf.finetuning.data import LabelledSourceOptions

    return LabelledSourceOptions()


def _args(tmp_path: Path, train_source: Path, *extra: str):
    return parse_finetuning_args([
        "--train_source", str(train_source), "--init_from", "random",
        "--encoder_name", "resnet18", "--image_size", "64", "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--bootstrap_resamples", "20",
        "--report_to", "none", "--dataloader_num_workers", "0", "--use_cpu",
        "--mixed_precision", "no",
        "--validation_fraction", "0.3", "--output_dir", str(tmp_path / "out"), *extra])


@pytest.mark.parametrize("layout", ["chexpert", "mimic", "padchest"])
def test_finetune_a_tiny_model_on_each_layout(tmp_path, layout):
    writer = {"chexpert": write_chexpert, "mimic": write_mimic, "padchest": write_padchest}
    table = writer[layout](tmp_path / "data")
    model_args, data_args, args = _args(tmp_path, table, "--views", "frontal")
    splits = build_splits(model_args, data_args, args.seed)
    patients = splits.train.patient_ids
    train = {patients[i] for i in splits.train_indices}
    validation = {patients[i] for i in splits.validation_indices}
    assert train and validation and not train & validation  # no patient on both sides
    result = finetune(model_args, data_args, args)
    assert result.global_step == 3
    report = result.test_report
    # the reported AUCs are scikit-learn's over each label's known entries
    names = splits.label_names
    assert report["num_samples"] == len(splits.validation_indices)
    dataset = ClassificationDataset(splits.validation, 64, indices=splits.validation_indices)
    with torch.no_grad():
        scores = result.model(torch.stack([dataset[i]["pixel_values"]
                                           for i in range(len(dataset))])).logits.sigmoid()
    truth = dataset.targets
    checked = 0
    for k, name in enumerate(names):
        kept = np.isfinite(truth[:, k])
        value = report["metrics"][f"auc/{name}"]
        if 0 < truth[kept, k].sum() < kept.sum():
            assert value == pytest.approx(roc_auc_score(truth[kept, k], scores[kept, k]),
                                          abs=1e-6)
            checked += 1
        else:
            assert math.isnan(value)
    assert checked >= 1
    if layout != "padchest":  # uncertain entries were there, and were left out
        assert np.isnan(truth).any()
    assert (tmp_path / "out" / "model.safetensors").is_file()


def _chestxray14_list(tmp_path: Path, patients: int = 15) -> tuple[Path, list[str]]:
    names = [f"{p:08d}_{f:03d}.png" for p in range(1, patients + 1) for f in range(p % 3 + 1)]
    for k, name in enumerate(names):
        write_phantom_png(tmp_path / "images" / name, k)
    split = tmp_path / "train_val_list.txt"
    split.write_text("".join(f"{n}\n" for n in names))
    return split, names


def test_pretraining_holds_out_chestxray14_patients(tmp_path):
    from accelerate import Accelerator

    from caid_hf.data.pipeline import LoaderSettings, PretrainingData
    from caid_hf.training.arguments import parse_pretraining_args

    split, names = _chestxray14_list(tmp_path)

    def held_out_patients(*extra):
        _, data_args, _ = parse_pretraining_args([
            "--train_source", str(split), "--images_root", str(tmp_path / "images"),
            "--validation_fraction", "0.3", "--image_size", "32", *extra])
        data = PretrainingData(data_args, 32, 0, LoaderSettings(4, None, 0, 2, False, 0),
                               Accelerator(cpu=True), tmp_path)
        train = {names[i][:8] for i in data.train_set.indices}
        held = {names[i][:8] for i in data.val_set.indices}
        return train, held, len(data.val_set)

    train, held, n_val = held_out_patients()
    assert train and held and not train & held and n_val >= round(0.3 * len(names))
    # image-level on request: with this seed some patient lands on both sides
    train, held, _ = held_out_patients("--patient_id_from", "none")
    assert train & held
    with pytest.raises(ValueError, match=r"patient_id_from must be"):
        held_out_patients("--patient_id_from", "subject")


def test_finetuning_label_fraction_takes_whole_chestxray14_patients(tmp_path):
    split, names = _chestxray14_list(tmp_path, patients=30)
    lines = [f"{n} {k % 2} {(k // 2) % 2}\n" for k, n in enumerate(names)]
    split.write_text("".join(lines))
    model_args, data_args, args = _args(tmp_path, split, "--images_root",
                                        str(tmp_path / "images"), "--label_fraction", "0.25")
    splits = build_splits(model_args, data_args, args.seed)
    train = [names[i][:8] for i in splits.train_indices]
    held = {names[i][:8] for i in splits.validation_indices}
    assert not set(train) & held
    for patient in set(train):  # every film of a chosen patient comes along
        assert train.count(patient) == sum(n.startswith(patient) for n in names)


def test_hugging_face_labels_follow_the_same_policies_and_patient_column(tmp_path):
    import datasets

    images = []
    for k in range(6):
        write_phantom_png(tmp_path / f"{k}.png", k)
        images.append(str(tmp_path / f"{k}.png"))
    table = datasets.Dataset.from_dict({
        "image": images, "Edema": [1.0, 0.0, -1.0, None, 1.0, 0.0],
        "Effusion": [0.0, -1.0, 1.0, 1.0, None, 0.0],
        "subject": ["a", "a", "b", "b", "c", "c"]}).cast_column("image", datasets.Image())
    table.save_to_disk(str(tmp_path / "ds"))
    from caid_hf.finetuning.data import HFLabelledSource

    source = HFLabelledSource(datasets.load_from_disk(str(tmp_path / "ds")), "ds",
                              label_columns=["Edema", "Effusion"],
                              patient_id_from="column:subject")
    expected = np.array([[1, 0], [0, np.nan], [np.nan, 1], [0, 1], [1, 0], [0, 0]])
    np.testing.assert_array_equal(source.targets, expected)
    assert source.patient_ids == ["a", "a", "b", "b", "c", "c"]
    ones = HFLabelledSource(datasets.load_from_disk(str(tmp_path / "ds")), "ds",
                            label_columns=["Edema", "Effusion"], uncertain_labels="ones",
                            blank_labels="ignore")
    assert ones.targets[2, 0] == 1 and np.isnan(ones.targets[3, 0])


def test_views_of_dicom_files_come_from_their_view_position_header(tmp_path):
    from helpers import write_dicom

    views = ["PA", "LL", "AP", "LATERAL", ""]
    for k, view in enumerate(views):
        extra = {"ViewPosition": view} if view else {}
        write_dicom(tmp_path / f"{k:08d}_000.dcm", np.full((4, 4), 100 * k, np.uint16), **extra)
    table = tmp_path / "labels.csv"
    table.write_text("path,Edema\n" + "".join(f"{k:08d}_000.dcm,{k % 2}\n" for k in range(5)))
    frontal = CSVLabelledSource(table, views=["frontal"])
    assert [frontal.image_id(i) for i in range(len(frontal))] == ["00000000_000.dcm",
                                                                    "00000002_000.dcm"]
    assert frontal.targets[:, 0].tolist() == [0, 0] and frontal.dropped_views == 3
    assert len(CSVLabelledSource(table, views=["lateral"])) == 2
    assert frontal.patient_ids == ["00000000", "00000002"]  # ChestX-ray14-style names


# --- the real files' layouts: header, quoting, multi-line cells, view quirks -------------

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
# (patient, study, view file, Frontal/Lateral, AP/PA) as CheXpert-v1.0-small/train.csv has
# them: laterals carry no AP/PA; two frontal films say LL and RL there, as 17 of the real
# file do (e.g. line 32627, patient07958/study5/view2_frontal.jpg, Frontal, LL).
CHEXPERT_FILMS = [
    (1, 1, "view1_frontal", "Frontal", "AP"), (1, 1, "view2_lateral", "Lateral", ""),
    (2, 1, "view1_frontal", "Frontal", "PA"), (2, 1, "view2_lateral", "Lateral", ""),
    (3, 1, "view1_frontal", "Frontal", "AP"), (3, 1, "view2_lateral", "Lateral", ""),
    (3, 2, "view2_frontal", "Frontal", "LL"),
    (4, 1, "view1_frontal", "Frontal", "PA"), (4, 1, "view2_lateral", "Lateral", ""),
    (5, 1, "view1_frontal", "Frontal", "AP"), (5, 1, "view2_lateral", "Lateral", ""),
    (5, 2, "view2_frontal", "Frontal", "RL"),
    (6, 1, "view1_frontal", "Frontal", "PA"), (6, 1, "view2_lateral", "Lateral", ""),
]  # lines 2-15 of train.csv


def write_chexpert_quirks(root: Path, films=CHEXPERT_FILMS, drop: str | None = None,
                          cells: dict | None = None) -> Path:
    """CheXpert-v1.0-small/train.csv in the real layout ('\\n' line ends, 1.0/0.0/-1.0/blank
    cells), with its images; ``drop`` leaves a column out, ``cells`` {(line, column):
    text} overrides cells."""
    rows = []
    for k, (patient, study, view, side, appa) in enumerate(films):
        path = f"CheXpert-v1.0-small/train/patient{patient:05d}/study{study}/{view}.jpg"
        write_phantom_png(root / path, k)
        labels = [("1.0", "0.0", "-1.0", "")[(k + j) % 4] for j in range(len(CHEXPERT_LABELS))]
        rows.append([path, "Female" if patient % 2 else "Male", str(50 + patient), side, appa,
                     *labels])
    for (line, column), text in (cells or {}).items():
        rows[line - 2][CHEXPERT_HEADER.index(column)] = text
    keep = [j for j, c in enumerate(CHEXPERT_HEADER) if c != drop]
    table = root / "CheXpert-v1.0-small" / "train.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerows([[row[j] for j in keep] for row in [CHEXPERT_HEADER, *rows]])
    return table


PADCHEST_HEADER = [
    "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
    "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric",
    "Modality_DICOM", "PixelRepresentation_DICOM", "BitsStored_DICOM", "ReportID", "Report",
    "MethodLabel", "Labels", "Localizations", "LabelsLocalizationsBySentence", "labelCUIS",
    "LocalizationsCUIS"]


def write_padchest_real(root: Path, records: list[tuple[str, str, str]],
                        drop: str | None = None) -> Path:
    """PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv in its layout: ``records`` are
    (Projection, Report, Labels); a Report with line breaks spans several physical lines
    (quoted), as 5,214 records of the real file do."""
    rows = []
    for k, (projection, report, labels) in enumerate(records):
        image = f"2168401113669640128192070611120{k:05d}_04-024-184.png"
        write_phantom_png(root / str(k % 2) / image, k)
        rows.append([image, str(k % 2), "20100315", f"study{k // 2}", f"patient{k // 2}",
                     "1948.0", "MF"[k % 2], "POSTEROANTERIOR" if projection == "PA" else
                     "LATERAL", projection, "Manual review of DICOM fields", "No", "CR", "0",
                     "12", str(4765777 + k), report, "Physician", labels, "[]",
                     "[" + labels + "]", "[]", "[]"])
    keep = [j for j, c in enumerate(PADCHEST_HEADER) if c != drop]
    table = root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerows([[row[j] for j in keep] for row in [PADCHEST_HEADER, *rows]])
    return table


def test_chexpert_frontal_lateral_decides_and_ap_pa_only_refines_frontal_films(tmp_path):
    table = write_chexpert_quirks(tmp_path)
    lateral = CSVLabelledSource(table, views=["lateral"])
    frontal = CSVLabelledSource(table, views=["frontal"])
    lateral_ids = [lateral.image_id(i) for i in range(len(lateral))]
    frontal_ids = [frontal.image_id(i) for i in range(len(frontal))]
    assert len(lateral_ids) == 6 and all(i.endswith("view2_lateral.jpg") for i in lateral_ids)
    assert len(frontal_ids) == 8 and all("frontal" in i for i in frontal_ids)
    assert "CheXpert-v1.0-small/train/patient00003/study2/view2_frontal.jpg" in frontal_ids  # LL
    assert "CheXpert-v1.0-small/train/patient00005/study2/view2_frontal.jpg" in frontal_ids  # RL
    assert not set(lateral_ids) & set(frontal_ids) and len(lateral_ids) + len(frontal_ids) == 14
    assert lateral.dropped_views == 8 and frontal.dropped_views == 6
    pa = CSVLabelledSource(table, views=["PA"])
    assert [pa.image_id(i).split("/")[2] for i in range(len(pa))] == [
        "patient00002", "patient00004", "patient00006"]
    with pytest.raises(ValueError, match=r"views \['ll'\]: CheXpert's Frontal/Lateral column "
                                         r"decides which films are lateral"):
        CSVLabelledSource(table, views=["LL"])
    table = write_chexpert_quirks(tmp_path, cells={(9, "Frontal/Lateral"): "frontal view"})
    with pytest.raises(ValueError, match=r"train.csv:9 column 'Frontal/Lateral': must be "
                                         r"'Frontal' or 'Lateral', got 'frontal view'"):
        CSVLabelledSource(table, views=["lateral"])


def test_finetune_and_evaluate_features_keep_chexpert_frontal_and_lateral_apart(tmp_path):
    import json

    from caid_hf.cli import main

    table = write_chexpert_quirks(tmp_path / "data")
    seen = {}
    for view in ("frontal", "lateral"):
        model_args, data_args, args = _args(tmp_path, table, "--views", view)
        splits = build_splits(model_args, data_args, args.seed)
        seen[view] = {splits.train.image_id(i) for i in range(len(splits.train))}
    assert len(seen["frontal"]) == 8 and len(seen["lateral"]) == 6
    assert not seen["frontal"] & seen["lateral"]
    counts = {}
    for view in ("frontal", "lateral"):
        out = tmp_path / f"features_{view}"
        main(["evaluate-features", "random", "--encoder-name", "resnet18", "--image-size", "32",
              "--source", str(table), "--views", view, "--k", "3", "--folds", "2",
              "--label-columns", "Edema", "--uncertain-labels", "zeros", "--out", str(out)])
        counts[view] = json.loads((out / "scores.json").read_text())["num_images"]
    assert counts == {"frontal": 8, "lateral": 6}


def test_messages_name_the_physical_line_after_a_view_filter(tmp_path):
    # CheXpert: line 13 is the RL frontal film; five laterals come before it
    table = write_chexpert_quirks(tmp_path / "chexpert", cells={(13, "Edema"): "2.0"})
    for views in (None, ["frontal"]):
        with pytest.raises(ValueError, match=r"train.csv:13 column 'Edema': label must be 1, 0, "
                                             r"-1 \(uncertain\) or blank .*got '2.0'"):
            CSVLabelledSource(table, views=views)
    # ChestX-ray14 with --views PA: line 7 is the second PA film (an AP film's cells are
    # not read at all)
    findings = ["No Finding", "Mass", "Effusion", "Hernia", "Effusion|maybe", "Nodule"]
    table = write_nih(tmp_path / "nih", findings, views=["AP", "AP", "PA", "AP", "AP", "PA"])
    pa = CSVLabelledSource(table, views=["PA"], images_root=tmp_path / "nih" / "images")
    assert pa.label_names == ["Effusion", "Nodule"] and pa.dropped_views == 4
    table = write_nih(tmp_path / "nih", findings[:4] + ["Nodule", "Effusion|maybe"],
                      views=["AP", "AP", "PA", "AP", "AP", "PA"])
    with pytest.raises(ValueError, match=r"Data_Entry_2017_v2020.csv:7 column 'Finding Labels': "
                                         r"'maybe'"):
        CSVLabelledSource(table, views=["PA"], images_root=tmp_path / "nih" / "images")
    # PadChest: quoted reports spanning lines 2-4 and 5-6; the record on line 9 is bad
    records = [("PA", "cardiomegalia.\nderrame pleural\nbilateral", "['cardiomegaly']"),
               ("L", "sin hallazgos\npatologicos", "['normal']"),
               ("PA", "nodulo", "['nodule']"),
               ("L", "sin cambios", "['unchanged']"),
               ("PA", "neumonia", "['pneumonia'")]
    table = write_padchest_real(tmp_path / "padchest", records)
    assert table.read_text().count("\n") == 9  # header + 5 records on 8 lines
    for views in (None, ["frontal"]):
        with pytest.raises(ValueError, match=r"PADCHEST_.*\.csv:9 column 'Labels': Labels must "
                                             r"be a list of names"):
            CSVLabelledSource(table, views=views)
    records[-1] = ("PA", "neumonia", "['pneumonia']")
    table = write_padchest_real(tmp_path / "padchest", records)
    source = CSVLabelledSource(table, views=["frontal"])
    assert [source.row_place(i).rsplit(":", 1)[1] for i in range(len(source))] == ["2", "7", "9"]
    assert source.label_names == ["cardiomegaly", "nodule", "pneumonia"]
    assert source.targets.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


def test_a_row_with_more_or_fewer_cells_than_the_header_is_refused(tmp_path):
    table = write_nih(tmp_path, ["Mass", "Nodule", "Edema"])
    lines = table.read_text().splitlines()
    lines[2] = lines[2].replace("Nodule", "Nodule,Mass")  # an unquoted comma
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"Data_Entry_2017_v2020.csv:3: 12 cells, but the header "
                                         r"\(line 1\) has 11 columns"):
        CSVLabelledSource(table, images_root=tmp_path / "images")


@pytest.mark.parametrize("layout,drop,label_format,message", [
    ("chexpert", "Path", "auto", r"train.csv:1: no column 'Path' \(the image paths\): its header "
                                 r"has the signature columns of CheXpert's"),
    ("chexpert", "Path", "chexpert", r"train.csv:1: no column 'Path' \(the image paths\): "
                                     r"label_format 'chexpert' reads CheXpert's"),
    ("chexpert", "Edema", "auto", r"train.csv:1: no column 'Edema' \(the 14 observations are the "
                                  r"labels; label_columns picks some\)"),
    ("nih", "Image Index", "auto", r"Data_Entry_2017_v2020.csv:1: no column 'Image Index' \(the "
                                   r"image file names\)"),
    ("nih", "Finding Labels", "auto", r"Data_Entry_2017_v2020.csv:1: no column 'Finding Labels'"),
    ("padchest", "Labels", "auto", r"PADCHEST_.*\.csv:1: no column 'Labels' \(the findings\)"),
    ("padchest", "ImageID", "auto", r"PADCHEST_.*\.csv:1: no column 'ImageID' \(the image file "
                                    r"names\)"),
    ("padchest", "ImageID", "padchest", r"PADCHEST_.*\.csv:1: no column 'ImageID'"),
])
def test_a_known_layout_missing_a_column_is_refused_naming_it(tmp_path, layout, drop,
                                                              label_format, message):
    if layout == "chexpert":
        table = write_chexpert_quirks(tmp_path, drop=drop)
    elif layout == "nih":
        table = write_nih(tmp_path, ["Mass", "Nodule|Effusion", "No Finding"], drop=drop)
    else:
        table = write_padchest_real(tmp_path, [("PA", "nodulo", "['nodule']"),
                                               ("L", "normal", "['normal']")], drop=drop)
    with pytest.raises(ValueError, match=message):
        CSVLabelledSource(table, label_format=label_format)


def test_a_subset_of_chexpert_observations_is_read_when_named(tmp_path):
    table = write_chexpert_quirks(tmp_path, drop="Edema")
    source = CSVLabelledSource(table, label_columns=["Atelectasis", "Cardiomegaly"],
                               uncertain_labels="ones")
    value = {"1.0": 1, "0.0": 0, "-1.0": 1, "": 0}
    assert source.targets.tolist() == [
        [value[a], value[c]] for a, c in zip(_raw_cells(table, "Atelectasis"),
                                             _raw_cells(table, "Cardiomegaly"))]


def test_an_image_column_without_image_file_names_is_refused(tmp_path):
    for k in range(3):
        write_phantom_png(tmp_path / f"{k}.png", k)
    table = tmp_path / "labels.csv"
    table.write_text("sex,effusion,film\nFemale,1,0.png\nMale,0,1.png\nFemale,1,2.png\n")
    with pytest.raises(ValueError, match=r"labels.csv:2 column 'sex': 'Female' is not an image "
                                         r"file name, and neither is any other cell of the "
                                         r"column .*the first was taken; name the image column"):
        CSVLabelledSource(table)
    assert CSVLabelledSource(table, image_column="film").targets.tolist() == [[1], [0], [1]]


def test_unknown_finding_names_are_refused_with_their_lines_or_accepted(tmp_path):
    findings = ["Effusion", "Effusion|maybe", "No Finding", "2.0", "Efusion", "Mass"]
    table = write_nih(tmp_path, findings)
    root = tmp_path / "images"
    with pytest.raises(ValueError) as error:
        CSVLabelledSource(table, images_root=root)
    message = str(error.value)
    assert "3 finding name(s) ['2.0', 'Efusion', 'maybe'] are not among ChestX-ray14's" in message
    assert f"{table}:3 column 'Finding Labels': 'maybe'" in message
    assert f"{table}:5 column 'Finding Labels': '2.0'" in message
    assert f"{table}:6 column 'Finding Labels': 'Efusion' (did you mean 'Effusion'?)" in message
    assert "accept_unknown_findings" in message
    accepted = CSVLabelledSource(table, images_root=root, accept_unknown_findings=True)
    assert accepted.label_names == ["2.0", "Effusion", "Efusion", "Mass", "maybe"]
    assert accepted.targets[:, [1, 4]].tolist() == [[1, 0], [1, 1], [0, 0], [0, 0], [0, 0],
                                                    [0, 0]]
    # under label_names too: an unknown name is not silently dropped
    with pytest.raises(ValueError, match=r":3 column 'Finding Labels': 'maybe'"):
        CSVLabelledSource(table, images_root=root, label_names=["Effusion"])
    chosen = CSVLabelledSource(table, images_root=root, label_names=["Effusion"],
                               accept_unknown_findings=True)
    assert chosen.targets[:, 0].tolist() == [1, 1, 0, 0, 0, 0]
    # PadChest: against its 193 labels, case aside; the physical line counts the report's
    records = [("PA", "derrame\npleural", "['pleural effusion', 'Chilaiditi sign']"),
               ("PA", "neumonia", "['pneumonnia']")]
    table = write_padchest_real(tmp_path / "padchest", records)
    with pytest.raises(ValueError, match=r"\.csv:4 column 'Labels': 'pneumonnia' \(did you mean "
                                         r"'pneumonia'\?\)"):
        CSVLabelledSource(table)
    records[1] = ("PA", "neumonia", "[' pneumonia', 'chilaiditi sign']")
    source = CSVLabelledSource(write_padchest_real(tmp_path / "padchest", records))
    assert source.label_names == ["Chilaiditi sign", "pleural effusion", "pneumonia"]
    assert source.targets.tolist() == [[1, 1, 0], [1, 0, 1]]


def test_listed_findings_absent_from_a_small_file_warn_and_are_all_zero(tmp_path):
    import json

    from caid_hf.cli import main

    # a 60-film validation subset: 12 of the 14 findings occur, Hernia and Fibrosis do not
    present = [n for n in CHESTXRAY14_LABELS if n not in ("Hernia", "Fibrosis")]
    findings = [present[k % 12] if k % 5 else "No Finding" for k in range(60)]
    table = write_nih(tmp_path, findings)
    with pytest.warns(UserWarning, match=r"column 'Finding Labels': label_names \['Fibrosis', "
                                         r"'Hernia'\] occur in none of the 60 rows read; their "
                                         r"columns are all 0 and their AUC is undefined"):
        source = CSVLabelledSource(table, images_root=tmp_path / "images",
                                   label_names=CHESTXRAY14_LABELS)
    assert source.label_names == CHESTXRAY14_LABELS and source.targets.shape == (60, 14)
    absent = [CHESTXRAY14_LABELS.index(n) for n in ("Fibrosis", "Hernia")]
    assert not source.targets[:, absent].any()
    assert source.targets.sum() == 48  # one finding on each of the 48 films with one
    metrics = classification_metrics(source.targets, np.random.default_rng(0).random((60, 14)),
                                      CHESTXRAY14_LABELS)
    assert math.isnan(metrics["auc/Hernia"]) and math.isfinite(metrics["mean_auc"])
    with pytest.raises(ValueError, match=r"label_names 'Hernai' is not among ChestX-ray14's 14 "
                                         r"findings \(and 'No Finding'\) \(did you mean "
                                         r"'Hernia'\?\)"):
        CSVLabelledSource(table, images_root=tmp_path / "images", label_names=["Hernai"])
    out = tmp_path / "features"
    with pytest.warns(UserWarning, match="occur in none of the 60 rows"):
        main(["evaluate-features", "random", "--encoder-name", "resnet18", "--image-size", "32",
              "--source", str(table), "--images-root", str(tmp_path / "images"), "--k", "3",
              "--folds", "2", "--label-names", *CHESTXRAY14_LABELS, "--out", str(out)])
    scores = json.loads((out / "scores.json").read_text())
    assert math.isnan(scores["linear_probe"]["auc/Hernia"])
    assert math.isnan(scores["knn"]["auc/Fibrosis"])
    assert math.isfinite(scores["linear_probe"]["mean_auc"])
