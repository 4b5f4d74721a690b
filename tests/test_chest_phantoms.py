import csv
import math

import numpy as np
import pytest
from PIL import Image

from caid_hf.data.chest_phantoms import (
    FINDINGS,
    LOCALISED_FINDINGS,
    PREVALENCES,
    SCALE_GROUPS,
    chest_phantom_labels,
    generate_chest_phantom,
    write_chest_phantoms,
)
from caid_hf.data.source_spec import source_from_spec
from caid_hf.data.sources import PhantomSource

N_LABELS = 4000  # label draws for the prevalence tests (no images: fast)


@pytest.fixture(scope="module")
def label_table():
    return np.stack([chest_phantom_labels(i, seed=5) for i in range(N_LABELS)]).astype(bool)


def _first_with(finding: str, seed: int = 0, alone: bool = False) -> int:
    k = FINDINGS.index(finding)
    for index in range(5000):
        labels = chest_phantom_labels(index, seed)
        if labels[k] and (not alone or labels.sum() == 1):
            return index
    raise AssertionError(f"no phantom with {finding}")


def test_constants_are_consistent():
    assert len(FINDINGS) == 8 and len(set(FINDINGS)) == 8
    assert sum(SCALE_GROUPS.values(), []) == list(FINDINGS)
    assert set(LOCALISED_FINDINGS) == set(FINDINGS) - set(SCALE_GROUPS["global"])
    assert set(PREVALENCES) == set(FINDINGS)


@pytest.mark.parametrize("size", [64, 128, 256])
def test_shapes_dtypes_and_range(size):
    phantom = generate_chest_phantom(2, size)
    assert phantom.image.shape == (size, size) and phantom.image.dtype == np.uint8
    assert phantom.labels.shape == (8,) and phantom.labels.dtype == np.uint8
    assert phantom.masks.shape == (6, size, size) and phantom.masks.dtype == np.uint8
    assert set(np.unique(phantom.masks)) <= {0, 1}
    assert phantom.spacing_mm == pytest.approx(320 / size)
    assert phantom.projection in ("AP", "PA")
    assert int(phantom.image.max()) - int(phantom.image.min()) > 120


def test_deterministic_and_every_index_its_own_patient():
    a, b = generate_chest_phantom(7, 128, seed=3), generate_chest_phantom(7, 128, seed=3)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)
    other = generate_chest_phantom(8, 128, seed=3).image
    assert np.abs(a.image.astype(int) - other).mean() > 5
    assert np.abs(a.image.astype(int) - generate_chest_phantom(7, 128, seed=4).image).mean() > 5


def test_sizes_show_the_same_patient():
    for index in range(3):
        small = generate_chest_phantom(index, 64)
        large = generate_chest_phantom(index, 256)
        np.testing.assert_array_equal(small.labels, large.labels)
        assert small.ctr == large.ctr and small.projection == large.projection
        pooled = large.image.astype(np.float64).reshape(64, 4, 64, 4).mean(axis=(1, 3))
        assert np.corrcoef(small.image.ravel(), pooled.ravel())[0, 1] > 0.9
        # masks agree where the small one is sure (its pixels' centres)
        for k in range(6):
            small_area = small.masks[k].sum() * 16
            large_area = large.masks[k].sum()
            assert abs(int(small_area) - int(large_area)) <= 0.3 * max(large_area, 200)


def test_labels_without_drawing_match_the_phantom():
    for index in range(10):
        np.testing.assert_array_equal(chest_phantom_labels(index, 2),
                                      generate_chest_phantom(index, 64, seed=2).labels)


@pytest.mark.parametrize("size", [64, 256])
def test_masks_match_labels(size):
    for index in range(40):
        phantom = generate_chest_phantom(index, size, seed=1)
        for k, name in enumerate(LOCALISED_FINDINGS):
            present = phantom.labels[FINDINGS.index(name)]
            assert bool(phantom.masks[k].any()) == bool(present), (index, name)


def test_prevalences_within_binomial_spread(label_table):
    for k, name in enumerate(FINDINGS):
        expected = PREVALENCES[name]
        spread = 3.5 * math.sqrt(expected * (1 - expected) / N_LABELS)
        assert abs(label_table[:, k].mean() - expected) < spread, name
    no_finding = (~label_table.any(axis=1)).mean()
    assert abs(no_finding - 0.5) < 3.5 * math.sqrt(0.25 / N_LABELS)


def test_co_occurrence_from_latent_causes(label_table):
    def conditional(given: str, finding: str) -> tuple[float, float]:
        g, f = label_table[:, FINDINGS.index(given)], label_table[:, FINDINGS.index(finding)]
        return f[g].mean(), f[~g].mean()

    for given, finding in [("Cardiomegaly", "Effusion"), ("Consolidation", "Effusion"),
                           ("Effusion", "Atelectasis"), ("Emphysema", "Pneumothorax"),
                           ("Mass", "Nodule")]:
        with_it, without = conditional(given, finding)
        assert with_it > 2 * without, (given, finding, with_it, without)


@pytest.mark.parametrize("size", [64, 256])
def test_nodule_and_mass_masks_have_their_millimetre_sizes(size):
    checked = 0
    for index in range(400):
        labels = chest_phantom_labels(index)
        if not (labels[FINDINGS.index("Nodule")] or labels[FINDINGS.index("Mass")]):
            continue
        phantom = generate_chest_phantom(index, size)
        for name in ("Nodule", "Mass"):
            lesions = [lesion for lesion in phantom.lesions if lesion.finding == name]
            if len(lesions) != 1:
                continue
            area = phantom.masks[LOCALISED_FINDINGS.index(name)].sum()
            radius_px = math.sqrt(area / math.pi)
            expected = lesions[0].diameter_mm / 2 / phantom.spacing_mm
            assert abs(radius_px - expected) < 0.12 * expected + 0.5, (index, name)
            checked += 1
        if checked >= 12:
            break
    assert checked >= 8


def test_nodules_resolvable_at_64_px():
    for index in range(300):
        if chest_phantom_labels(index)[FINDINGS.index("Nodule")]:
            for lesion in generate_chest_phantom(index, 64).lesions:
                if lesion.finding == "Nodule":
                    assert lesion.diameter_mm / 2 / 5.0 >= 2.0  # >= 2 px radius at 5 mm/px
                    assert lesion.diameter_mm <= 30.0


def test_cardiothoracic_ratio_separates_the_label():
    for index in range(200):
        labels = chest_phantom_labels(index)
        ctr = generate_chest_phantom(index, 32).ctr
        if labels[FINDINGS.index("Cardiomegaly")]:
            assert 0.52 <= ctr <= 0.65
        else:
            assert ctr <= 0.48


def test_findings_are_visible_against_their_surroundings():
    """At 64 px each opacity is brighter than a 2-px ring around its mask (the lung it
    replaces), on average over five phantoms where it is the only finding."""
    from scipy.ndimage import binary_dilation

    for name in ("Effusion", "Consolidation", "Atelectasis", "Nodule", "Mass"):
        contrasts = []
        k = FINDINGS.index(name)
        indices = [i for i in range(3000)
                   if chest_phantom_labels(i)[k] and chest_phantom_labels(i).sum() == 1][:5]
        for index in indices:
            phantom = generate_chest_phantom(index, 64)
            mask = phantom.masks[LOCALISED_FINDINGS.index(name)].astype(bool)
            ring = binary_dilation(mask, iterations=2) & ~mask
            contrasts.append(np.median(phantom.image[mask]) - np.median(phantom.image[ring]))
        assert len(contrasts) == 5 and np.mean(contrasts) > 8, (name, contrasts)
    # a pneumothorax is darker than the lung it borders (no markings, no lung tissue)
    phantom = generate_chest_phantom(_first_with("Pneumothorax", alone=True), 256)
    rim = phantom.masks[LOCALISED_FINDINGS.index("Pneumothorax")].astype(bool)
    assert rim.sum() > 100


def test_variation_between_patients():
    phantoms = [generate_chest_phantom(i, 32) for i in range(300)]
    ap = np.mean([p.projection == "AP" for p in phantoms])
    assert 0.22 < ap < 0.38
    devices = [d for p in phantoms for d in p.devices]
    assert 0.5 < sum(d.startswith("marker") for d in devices) / 300 < 0.7
    assert 0.08 < sum(d == "ECG leads" for d in devices) / 300 < 0.22
    ctrs = np.array([p.ctr for p in phantoms])
    assert ctrs.min() < 0.4 and ctrs.max() > 0.55


def test_invalid_arguments():
    with pytest.raises(ValueError, match="size"):
        generate_chest_phantom(0, 16)
    with pytest.raises(ValueError, match="non-negative"):
        generate_chest_phantom(-1)


def test_write_chest_phantoms_nih_layout(tmp_path):
    paths = write_chest_phantoms(tmp_path / "set", 6, size=64, seed=1, masks=True)
    with open(tmp_path / "set" / "Data_Entry.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:4] == ["Image Index", "Finding Labels", "Follow-up #", "Patient ID"]
    assert len(rows) == 7
    for index, (path, row) in enumerate(zip(paths, rows[1:], strict=True)):
        phantom = generate_chest_phantom(index, 64, seed=1)
        assert row[0] == path.name and row[3] == str(index + 1)
        assert row[1] == ("|".join(phantom.finding_names) or "No Finding")
        assert row[6] == phantom.projection
        np.testing.assert_array_equal(np.asarray(Image.open(path)), phantom.image)
        for k, name in enumerate(LOCALISED_FINDINGS):
            stored = np.asarray(Image.open(tmp_path / "set" / "masks" / name / path.name))
            np.testing.assert_array_equal(stored, phantom.masks[k] * 255)


def test_nih_file_reads_as_chestxray14(tmp_path):
    from caid_hf.finetuning.label_formats import detect_label_format

    write_chest_phantoms(tmp_path, 3, size=64)
    with open(tmp_path / "Data_Entry.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert detect_label_format(header) == "names"


def test_phantom_source_versions():
    v1 = source_from_spec("phantoms", num_phantoms=3, phantom_size=64)
    assert v1.version == "v1" and v1.load(0).shape == (64, 64)
    source = source_from_spec("phantoms:cxr14", num_phantoms=5, phantom_size=64,
                              phantom_seed=2)
    assert isinstance(source, PhantomSource) and source.label_names == list(FINDINGS)
    phantom = generate_chest_phantom(4, 64, seed=2)
    np.testing.assert_array_equal(source.load(4), phantom.image)
    np.testing.assert_array_equal(source.load_masks(4), phantom.masks)
    np.testing.assert_array_equal(source.labels(4), phantom.labels)
    assert source.targets.shape == (5, 8) and source.targets.dtype == np.float32
    with pytest.raises(ValueError, match="version"):
        PhantomSource(3, version="v3")


def test_cli_writes_cxr14_set_and_keeps_v1(tmp_path):
    from caid_hf.cli import _phantoms

    _phantoms(["--version", "cxr14", "--out", str(tmp_path / "c"), "--num", "2", "--size", "64",
               "--masks"], "caid-hf phantoms")
    assert (tmp_path / "c" / "Data_Entry.csv").is_file()
    assert sorted(p.name for p in (tmp_path / "c" / "masks").iterdir()) == sorted(
        LOCALISED_FINDINGS)
    _phantoms(["--out", str(tmp_path / "v1"), "--num", "1", "--size", "64"], "caid-hf phantoms")
    from caid_hf.data.phantoms import generate_phantom

    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "v1" / "phantom_00000.png")),
                                  generate_phantom(0, 64)[0])
    assert not (tmp_path / "v1" / "Data_Entry.csv").exists()
    with pytest.raises(SystemExit):
        _phantoms(["--version", "cxr14", "--out", str(tmp_path / "x"), "--no-nodules"], "p")


def test_labelled_cxr14_phantoms_carry_the_eight_findings_and_the_union_mask():
    from caid_hf.finetuning.data import LabelledSourceOptions, labelled_source_from_spec

    options = LabelledSourceOptions(num_phantoms=6, phantom_size=64, phantom_seed=3)
    source = labelled_source_from_spec("phantoms:cxr14", options, phantom_seed_offset=2)
    assert source.label_names == list(FINDINGS) and source.targets.shape == (6, 8)
    for i in range(6):
        phantom = generate_chest_phantom(i, 64, seed=5)  # seed 3 + offset 2
        np.testing.assert_array_equal(source.targets[i], phantom.labels)
        np.testing.assert_array_equal(source.load(i), phantom.image)
        np.testing.assert_array_equal(source.load_mask(i), phantom.masks.max(axis=0))
    v1 = labelled_source_from_spec("phantoms", options)
    assert v1.label_names == ["nodule"] and v1.targets.shape == (6, 1)


def test_online_probe_on_cxr14_logs_the_mean_and_every_finding(tiny_config):
    from caid_hf import CAiDModel
    from caid_hf.training.online_probe import OnlineProbe

    probe = OnlineProbe("phantoms:cxr14", image_size=64, num_images=60, phantom_size=64,
                        folds=2)
    assert probe.description == "60 + 60 held-out phantoms"
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    logs = probe(CAiDModel(tiny_config)).logs()
    per_label = {k.rpartition("/")[2]: v for k, v in logs.items()
                 if k.startswith("probe/linear_probe_auc/")}
    assert sorted(per_label) == sorted(FINDINGS)
    defined = [v for v in per_label.values() if not math.isnan(v)]
    assert len(defined) >= 6 and all(0 <= v <= 1 for v in defined)
    assert logs["probe/linear_probe_auc"] == pytest.approx(float(np.mean(defined)), abs=1e-12)


@pytest.mark.slow
def test_finetuning_on_cxr14_phantoms_scores_every_finding(tmp_path):
    from caid_hf.finetuning.arguments import (
        FinetuneDataArguments,
        FinetuneModelArguments,
        FinetuningArguments,
    )
    from caid_hf.finetuning.finetune import finetune

    result = finetune(
        FinetuneModelArguments(task="classification", init_from="random",
                               encoder_name="resnet18", image_size=64),
        FinetuneDataArguments(train_source="phantoms:cxr14", num_train_phantoms=32,
                              num_validation_phantoms=24, num_test_phantoms=40,
                              phantom_size=64),
        FinetuningArguments(output_dir=str(tmp_path / "clf"), max_steps=2, eval_steps=2,
                            per_device_train_batch_size=8, bootstrap_resamples=0,
                            dataloader_num_workers=0, report_to="none"))
    assert result.model.config.id2label == dict(enumerate(FINDINGS))
    metrics = result.test_report["metrics"]
    assert result.test_report["num_samples"] == 40
    assert {f"auc/{name}" for name in FINDINGS} <= set(metrics)
