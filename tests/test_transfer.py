"""``caid-hf evaluate-transfer``: label efficiency of several backbones on phantoms and on a
CheXpert-layout CSV: the files it writes, the labelled subsets (the same images for every
backbone, whole patients, both classes of every label where the pool has them), and the
messages for bad input."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from caid_hf import CAiDConfig, CAiDModel
from caid_hf.cli import main as cli
from caid_hf.data.phantoms import generate_phantom
from caid_hf.finetuning import finetune as finetune_module
from caid_hf.finetuning.label_formats import CHEXPERT_LABELS
from caid_hf.finetuning.transfer import (
    draw_labelled_subset,
    linear_probe_aucs,
    parse_label_groups,
)

FAST = ["--max_steps", "1", "--per_device_train_batch_size", "8", "--dataloader_num_workers",
        "0", "--use_cpu", "true", "--mixed_precision", "no"]


@pytest.fixture
def tiny_backbone(tmp_path) -> Path:
    """A saved CAiD backbone (ResNet-18 at 32 px; random weights stand in for pre-trained)."""
    torch.manual_seed(0)
    folder = tmp_path / "pretrained"
    CAiDModel(CAiDConfig(encoder_name="resnet18", image_size=32)).save_pretrained(folder)
    return folder


@pytest.fixture
def finetuned_images(monkeypatch) -> dict[tuple[float, int], dict[str, list[int]]]:
    """{(label fraction, seed): {initialisation: training image indices}} of every
    fine-tuning run, as finetune() itself set the run up."""
    seen: dict[tuple[float, int], dict[str, list[int]]] = {}
    setup_finetune = finetune_module.setup_finetune

    def spy(model_args, data_args, args, *rest, **kwargs):
        run = setup_finetune(model_args, data_args, args, *rest, **kwargs)
        runs = seen.setdefault((data_args.label_fraction, args.seed), {})
        runs[model_args.init_from] = list(run.splits.train_indices)
        assert len(run.train_loader.dataset) == len(run.splits.train_indices)
        return run

    monkeypatch.setattr(finetune_module, "setup_finetune", spy)
    return seen


def _table(markdown: str, title: str) -> list[list[str]]:
    """The rows (cells) of the table under the heading ``title``, header row first."""
    lines = markdown.splitlines()
    start = lines.index(title)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows


def _check_outputs(out: Path, backbones: list[str], fractions: list[float], seeds: list[int],
                   modes: list[str]) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert results["seeds_done"] == seeds
    assert "cpu" in results["hardware"] and results["hardware"]["device"] == "cpu"
    for mode in modes:
        runs = [r for r in results["runs"] if r["mode"] == mode]
        keys = sorted((r["backbone"], r["fraction"], r["seed"]) for r in runs)
        assert keys == sorted((b, f, s) for b in backbones for f in fractions for s in seeds)
        for r in runs:
            for name, value in r["per_label"].items():
                assert (0 <= value <= 1) or (math.isnan(value) and name in r["undefined_labels"])
            assert 0 <= r["value"] <= 1  # the mean skips undefined labels
    image = Image.open(out / "label_efficiency.png")
    assert image.format == "PNG" and image.width > 400 and image.height > 200
    assert (out / "label_efficiency.png").stat().st_size > 10_000
    return results


def _subsets(results: dict) -> dict[tuple[float, int], dict]:
    return {(s["fraction"], s["seed"]): s for s in results["subsets"]}


def test_phantoms_two_backbones(tmp_path, tiny_backbone, finetuned_images):
    out = tmp_path / "out"
    cli(["evaluate-transfer", "--backbones", str(tiny_backbone), "random",
         "--train_source", "phantoms", "--num_train_phantoms", "20",
         "--num_validation_phantoms", "8", "--num_test_phantoms", "16", "--phantom_size", "32",
         "--label_fractions", "1", "0.25", "--seeds", "2", "--probe_stages", "true",
         "--output_dir", str(out), *FAST])
    backbones, fractions, seeds = [str(tiny_backbone), "random"], [0.25, 1.0], [0, 1]
    stages = [f"probe:stage{k}" for k in range(1, 6)]
    results = _check_outputs(out, backbones, fractions, seeds, ["probe", "finetune", *stages])
    # 'random' is a network of the first backbone's encoder, at its image size
    settings = results["settings"]
    assert settings["encoder_name_of_random"] == "resnet18" and settings["image_size"] == 32
    assert results["data"]["stage_channels"] == [64, 64, 128, 256, 512]
    assert results["data"]["pool_images"] == 20 and not results["data"]["patient_level"]

    # every subset: ceil(n * fraction) images, nodules present and absent
    subsets = _subsets(results)
    assert sorted(subsets) == [(f, s) for f in fractions for s in seeds]
    targets = np.array([[float(generate_phantom(i, size=32, seed=1000)[1].any())]
                        for i in range(20)])
    for (fraction, _), s in subsets.items():
        assert len(s["indices"]) == math.ceil(20 * fraction)
        assert 0 < targets[s["indices"], 0].sum() < len(s["indices"])
        assert s["positives"]["nodule"] == targets[s["indices"], 0].sum()
    assert subsets[(0.25, 0)]["indices"] != subsets[(0.25, 1)]["indices"]
    # fine-tuning trained every backbone on the very images the subset names
    assert sorted(finetuned_images) == sorted(subsets)
    for key, s in subsets.items():
        assert finetuned_images[key] == {b: s["indices"] for b in backbones}, key

    markdown = (out / "results.md").read_text()
    for title in ("## Test mean AUC, frozen linear probe (every encoder stage)",
                  "## Test mean AUC, fine-tuned classifier",
                  "## Linear probe of encoder stage 3 alone (test mean AUC, 128 channels)"):
        table = _table(markdown, title)
        assert table[0] == ["backbone", "25 % (5 labelled)", "100 % (20 labelled)"]
        assert [row[0] for row in table[1:]] == backbones
        for row in table[1:]:
            assert all(re.fullmatch(r"\d\.\d{3} ± \d\.\d{3}", cell) for cell in row[1:]), row
    # a cell is the mean over the seeds of results.json's numbers
    probe = [r["value"] for r in results["runs"] if r["mode"] == "probe"
             and r["backbone"] == "random" and r["fraction"] == 1.0]
    row = _table(markdown, "## Test mean AUC, frozen linear probe (every encoder stage)")[2]
    assert row[2].startswith(f"{np.mean(probe):.3f} ± {np.std(probe, ddof=1):.3f}")
    # fine-tuned models are not kept, their numbers are
    kept = [p.name for p in (out / "runs").rglob("*") if p.is_file()]
    assert kept.count("test_results.json") == kept.count("trainer_state.json") == 8
    assert "model.safetensors" not in kept and "config.json" not in kept


def test_segmentation_dice_on_phantoms(tmp_path):
    out = tmp_path / "out"
    cli(["evaluate-transfer", "--backbones", "random", "--encoder_name", "resnet18",
         "--image_size", "32", "--train_source", "phantoms", "--num_train_phantoms", "12",
         "--num_validation_phantoms", "6", "--num_test_phantoms", "8", "--phantom_size", "32",
         "--label_fractions", "0.5", "--seeds", "1", "--modes", "segment",
         "--segmentation_batch_size", "4", "--segmentation_steps", "3",
         "--output_dir", str(out), *FAST])
    results = _check_outputs(out, ["random"], [0.5], [0], ["segment"])
    (run,) = results["runs"]
    assert run["global_step"] == 3  # --segmentation_steps, not --max_steps 1
    assert run["metric"] == "dice" and set(run["per_label"]) == {"nodule"}
    assert run["value"] == pytest.approx(run["per_label"]["nodule"])
    test = json.loads((out / "runs" / "random" / "segment" / "fraction0.5_seed0" /
                       "test_results.json").read_text())
    assert test["metrics"]["dice"] == pytest.approx(run["value"]) and test["num_samples"] == 8
    assert "## Test Dice, fine-tuned U-Net" in (out / "results.md").read_text()


def _write_chexpert(root: Path, patients: int = 16) -> Path:
    """A CheXpert-layout train.csv of 32-px PNG films, two studies per patient; every label
    random (1, 0, -1, blank) except Fracture, which no film has."""
    rng = np.random.default_rng(3)
    rows = []
    for p in range(1, patients + 1):
        for study in (1, 2):
            path = f"CheXpert-v1.0-small/train/patient{p:05d}/study{study}/view1_frontal.png"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(generate_phantom(len(rows), size=32)[0]).save(root / path)
            cells = rng.choice(["1.0", "0.0", "-1.0", ""], size=len(CHEXPERT_LABELS),
                               p=[0.4, 0.4, 0.1, 0.1])
            cells[CHEXPERT_LABELS.index("Fracture")] = "0.0"
            rows.append([path, "Female", "50", "Frontal", "AP", *cells])
    table = root / "CheXpert-v1.0-small" / "train.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS])
        writer.writerows(rows)
    return table


def test_chexpert_csv_patient_level_subsets(tmp_path, tiny_backbone, finetuned_images):
    table = _write_chexpert(tmp_path / "data")
    out = tmp_path / "out"
    cli(["evaluate-transfer", "--backbones", "random", str(tiny_backbone),
         "--train_source", str(table), "--validation_fraction", "0.15",
         "--test_fraction", "0.25", "--label_fractions", "0.3", "1", "--seeds", "2",
         "--label_groups", "cardiac=Cardiomegaly,Enlarged Cardiomediastinum",
         "pleural=Pleural Effusion,Pneumothorax,Pleural Other",
         "--output_dir", str(out), *FAST])
    backbones, fractions, seeds = ["random", str(tiny_backbone)], [0.3, 1.0], [0, 1]
    results = _check_outputs(out, backbones, fractions, seeds, ["probe", "finetune"])
    data = results["data"]
    assert data["patient_level"] and data["label_names"] == CHEXPERT_LABELS
    with table.open() as f:
        paths = [row["Path"] for row in csv.DictReader(f)]
    patient = [re.search(r"patient(\d+)", p).group(1) for p in paths]
    test = {patient[i] for i in data["test_indices"]}
    validation = {patient[i] for i in data["validation_indices"]}
    assert test and validation and not test & validation
    assert data["pool_images"] + len(data["test_indices"]) + len(data["validation_indices"]) \
        == len(paths)
    pool = [i for i in range(len(paths)) if patient[i] not in test | validation]
    assert len(pool) == data["pool_images"]
    assert data["pool_patients"] == len({patient[i] for i in pool})

    for (fraction, seed), s in _subsets(results).items():
        chosen = {patient[i] for i in s["indices"]}
        assert not chosen & (test | validation)  # no patient on both sides
        assert sorted(s["indices"]) == sorted(i for i in pool if patient[i] in chosen)  # whole
        assert len(s["indices"]) >= math.ceil(len(pool) * fraction)
        assert s["patients"] == len(chosen)
        # Fracture has no positive anywhere: it lacks a class; every other label has both
        assert s["labels_without_both_classes"] == ["Fracture"]
        assert all(s["positives"][n] > 0 and s["negatives"][n] > 0
                   for n in CHEXPERT_LABELS if n != "Fracture")
        assert finetuned_images[(fraction, seed)] == {b: s["indices"] for b in backbones}
    for r in results["runs"]:
        assert math.isnan(r["per_label"]["Fracture"]) and "Fracture" in r["undefined_labels"]
        cardiac = [r["per_label"][m] for m in ("Cardiomegaly", "Enlarged Cardiomediastinum")
                   if not math.isnan(r["per_label"][m])]
        assert r["groups"]["cardiac"] == pytest.approx(np.mean(cardiac) if cardiac else math.nan,
                                                       nan_ok=True)

    markdown = (out / "results.md").read_text()
    table_rows = _table(markdown, "### finetune, group pleural (Pleural Effusion, "
                                  "Pneumothorax, Pleural Other)")
    assert table_rows[0][0] == "backbone" and [r[0] for r in table_rows[1:]] == backbones
    assert "Fracture" in markdown.split("## Undefined scores")[1]


def test_draw_redraws_until_every_label_has_both_classes():
    # 100 images; label 0 has 3 positives, label 1 none; 5 % draws 5 images
    targets = np.zeros((100, 2), dtype=np.float32)
    targets[[10, 50, 90], 0] = 1
    first = draw_labelled_subset(list(range(100)), targets, ["rare", "never"], 0.05, seed=0,
                                 max_draws=1)
    drawn = draw_labelled_subset(list(range(100)), targets, ["rare", "never"], 0.05, seed=0)
    assert len(drawn.indices) == 5 and drawn.positives["rare"] >= 1
    assert drawn.labels_without_both_classes == ["never"]  # impossible: no redraw helps
    if first.positives["rare"] == 0:
        assert drawn.draws > 1 and drawn.indices != first.indices
    # the same (fraction, seed) gives the same images; another seed other images
    again = draw_labelled_subset(list(range(100)), targets, ["rare", "never"], 0.05, seed=0)
    assert again.indices == drawn.indices
    assert draw_labelled_subset(list(range(100)), targets, ["rare", "never"], 0.5,
                                seed=1).indices != \
        draw_labelled_subset(list(range(100)), targets, ["rare", "never"], 0.5, seed=2).indices


def test_linear_probe_aucs_with_one_example_of_a_class():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4))
    y = np.stack([(x[:, 0] > 0), np.zeros(40)], axis=1).astype(np.float32)
    train_y = y[:20].copy()
    train_y[:20, 0] = 0
    train_y[3, 0] = 1  # a single positive still fits a probe
    auc = linear_probe_aucs(x[:20], y[:20], x[20:], y[20:])
    assert auc[0] > 0.9 and math.isnan(auc[1])  # label 1 has no positive: undefined
    single = linear_probe_aucs(x[:20], train_y, x[20:], y[20:])
    assert 0 <= single[0] <= 1


def test_label_groups_are_parsed():
    assert parse_label_groups(["global=Cardiomegaly, Emphysema", "local=Nodule"]) == \
        {"global": ["Cardiomegaly", "Emphysema"], "local": ["Nodule"]}
    with pytest.raises(ValueError, match="label_groups entries are NAME=LABEL"):
        parse_label_groups(["Cardiomegaly"])


def _user_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        cli(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--backbones", "no/such/folder"], "backbones: no folder no/such/folder"),
    (["--backbones", "random", "--label_fractions", "0", "0.5"],
     "label_fractions must each be in (0, 1], got [0.0, 0.5]"),
    (["--backbones", "random", "--label_fractions", "1.5"], "label_fractions must each be in"),
    (["--backbones", "random", "--seeds", "0"], "seeds must be 1 or more, got 0"),
    (["--backbones", "random", "--modes", "probe", "classify"],
     "modes must be some of ['probe', 'finetune', 'segment']"),
    (["--backbones", "random", "random"], "backbones names ['random'] more than once"),
    (["--backbones", "random", "--label_groups", "global=Cardiomegaly", "--modes", "probe"],
     "label_groups: group 'global' names ['Cardiomegaly'], not labels of phantoms"),
    (["--backbones", "random", "--label_fraction", "0.5"],
     "the command draws its own labelled subsets"),
])
def test_bad_input_is_one_message(extra, message, tmp_path, capsys):
    err = _user_error(["evaluate-transfer", *extra, "--num_train_phantoms", "8",
                       "--phantom_size", "32", "--output_dir", str(tmp_path / "out")], capsys)
    assert message in err


def test_folder_that_is_not_a_backbone(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _user_error(["evaluate-transfer", "--backbones", str(tmp_path / "empty"),
                       "--output_dir", str(tmp_path / "out")], capsys)
    assert f"backbones: {tmp_path / 'empty'} is not a CAiD backbone folder" in err


def test_a_stopped_run_keeps_what_it_has(tmp_path, monkeypatch):
    from caid_hf.finetuning import transfer

    probe = transfer.TransferEvaluation.probe

    def probe_until_seed_1(self, name, spec, seed):
        if seed == 1:
            raise KeyboardInterrupt
        return probe(self, name, spec, seed)

    monkeypatch.setattr(transfer.TransferEvaluation, "probe", probe_until_seed_1)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        cli(["evaluate-transfer", "--backbones", "random", "--encoder_name", "resnet18",
             "--image_size", "32", "--train_source", "phantoms", "--num_train_phantoms", "12",
             "--num_test_phantoms", "12", "--phantom_size", "32", "--label_fractions", "0.5",
             "1", "--seeds", "3", "--modes", "probe", "--output_dir", str(out), *FAST])
    results = json.loads((out / "results.json").read_text())
    assert results["seeds_done"] == [0] and len(results["runs"]) == 2
    assert "Seeds done: 1 of 3" in (out / "results.md").read_text()
    assert (out / "label_efficiency.png").stat().st_size > 0
    # a second run into the same folder refuses, naming the way out
    with pytest.raises(SystemExit):
        cli(["evaluate-transfer", "--backbones", "random", "--output_dir", str(out)])


@pytest.mark.slow
def test_label_efficiency_benchmark_quick_run(tmp_path):
    """``benchmarks/phantom_transfer.py --quick`` on the ChestX-ray14-like phantoms: four
    starts (random, ID, CAiD, supervised), three modes, the scale groups and the
    per-stage probes in its results, and ``--resume``."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "phantom_transfer.py"
    spec = importlib.util.spec_from_file_location("phantom_transfer", path)
    benchmark = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = benchmark  # its dataclass looks its module up
    try:
        spec.loader.exec_module(benchmark)
    finally:
        del sys.modules[spec.name]
    out = tmp_path / "bench"
    results = benchmark.main(["--quick", "--device", "cpu", "--out", str(out)])
    starts = ["random init", "ID only (MoCo-v2)", "CAiD", "supervised (other pool)"]
    assert sorted(results["settings"]["backbones"]) == sorted(starts)
    assert results["data"]["label_names"] == ["Cardiomegaly", "Emphysema", "Effusion",
                                              "Consolidation", "Pneumothorax", "Atelectasis",
                                              "Nodule", "Mass"]
    assert results["data"]["pool_images"] == 100 and results["data"]["test_images"] == 40
    assert all(r["num_labelled"] == 50 for r in results["runs"])  # half of the 100
    runs = results["runs"]
    for mode in ("probe", "finetune", "segment"):
        for start in starts:
            got = sorted(r["fraction"] for r in runs if r["mode"] == mode
                         and r["backbone"] == start)
            assert got == [0.5], (mode, start)
    finetuned = [r for r in runs if r["mode"] == "finetune"]
    assert all(set(r["groups"]) == {"global", "regional", "local"} for r in finetuned)
    assert all(0.0 <= r["value"] <= 1.0 for r in runs if not math.isnan(r["value"]))
    stages = sorted({r["mode"] for r in runs if r["mode"].startswith("probe:stage")})
    assert stages == [f"probe:stage{k}" for k in range(1, 6)]  # ResNet-18's five stages
    for name in ("results.json", "results.md", "label_efficiency.png"):
        assert (out / name).stat().st_size > 0
    assert {r["global_step"] for r in runs if r["mode"] in ("finetune", "segment")} == {4}
    backbone = tmp_path / "bench" / "supervised" / "backbone" / "config.json"  # one for all seeds
    assert json.loads(backbone.read_text())["model_type"] == "caid"
    # --resume keeps the finished seed and runs nothing again
    again = benchmark.main(["--quick", "--device", "cpu", "--out", str(out), "--resume"])
    assert again["seeds_done"] == [0] and len(again["runs"]) == len(runs)
