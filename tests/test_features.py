"""Frozen-feature evaluation: probe scores, the t-SNE map and the command."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from caid_hf import CAiDConfig, CAiDModel
from caid_hf.finetuning.data import PhantomLabelledSource
from caid_hf.finetuning.features import (
    evaluate_features,
    extract_embeddings,
    plot_embedding_map,
    point_categories,
    probe_scores,
    recalibrate_batch_norm,
)


def clusters(n: int, separation: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian clusters in 32-D, ``separation`` standard deviations apart along one axis."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.float32)[:, None]
    x = rng.normal(size=(n, 32))
    x[:, 3] += separation * y[:, 0]
    return x, y


def test_separable_features_score_high_and_noise_scores_chance():
    x, y = clusters(200, separation=6.0, seed=0)
    test_x, test_y = clusters(200, separation=6.0, seed=1)
    held_out = probe_scores(x, y, ["finding"], test_x, test_y, k=10)
    cross_validated = probe_scores(x, y, ["finding"], k=10, folds=5)
    for scores in (held_out, cross_validated):
        assert scores["linear_probe"]["mean_auc"] > 0.99
        assert scores["knn"]["mean_auc"] > 0.9
        assert scores["linear_probe"]["accuracy/finding"] > 0.95
    noise = probe_scores(*clusters(200, separation=0.0, seed=2), ["finding"], k=10)
    assert 0.35 < noise["linear_probe"]["mean_auc"] < 0.65
    assert 0.35 < noise["knn"]["mean_auc"] < 0.65


def test_multi_label_scores_per_label_and_undefined_labels():
    x, y = clusters(120, separation=6.0, seed=3)
    labels = np.concatenate([y, 1 - y, np.zeros_like(y)], axis=1)  # the last never positive
    scores = probe_scores(x, labels, ["a", "not a", "never"], k=5, folds=3)
    assert scores["linear_probe"]["auc/a"] > 0.99 and scores["linear_probe"]["auc/not a"] > 0.99
    assert math.isnan(scores["linear_probe"]["auc/never"])
    assert scores["linear_probe"]["mean_auc"] == pytest.approx(
        np.mean([scores["linear_probe"]["auc/a"], scores["linear_probe"]["auc/not a"]]))
    assert list(scores["knn"])[:2] == ["mean_auc", "mean_accuracy"]  # summary first


def test_point_categories():
    multi = np.array([[1, 0], [0, 0], [1, 1], [0, 1]], dtype=np.float32)
    assert point_categories(multi, ["mass", "effusion"]) == [
        "mass", "no finding", "several findings", "effusion"]
    assert point_categories(multi, ["mass", "effusion"], color_label="effusion") == [
        "no effusion", "no effusion", "effusion", "effusion"]
    assert point_categories(np.eye(3)[[2, 0]], ["a", "b", "c"]) == ["c", "a"]
    with pytest.raises(ValueError, match="color_label 'x' is not a label"):
        point_categories(multi, ["mass", "effusion"], color_label="x")


def test_map_is_a_png_with_legend_and_title(tmp_path):
    points = np.random.default_rng(0).normal(size=(50, 2))
    path = plot_embedding_map(points, ["nodule", "no nodule"] * 25, tmp_path / "map.png",
                              title="t-SNE of test embeddings", subtitle="probe AUC 0.5")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 800 and image.size[1] >= 700


def test_embeddings_are_the_pooler_output():
    torch.manual_seed(0)
    backbone = CAiDModel(CAiDConfig(encoder_name="resnet18", image_size=64), add_decoder=False)
    source = PhantomLabelledSource(5, size=64, seed=1)
    x, y = extract_embeddings(backbone, source, 64, batch_size=2)
    assert x.shape == (5, 512) and x.dtype == np.float32 and y.shape == (5, 1)
    pixels = torch.from_numpy(np.stack([source.load(i) for i in range(5)])).float().div(255)
    with torch.no_grad():
        expected = backbone(pixels[:, None].expand(-1, 3, -1, -1)).pooler_output
    assert np.allclose(x, expected.numpy(), atol=1e-5)
    assert np.array_equal(y, source.targets)


def test_stage_embeddings_are_every_stage_averaged_side_by_side(tmp_path):
    torch.manual_seed(0)
    backbone = CAiDModel(CAiDConfig(encoder_name="resnet18", image_size=64), add_decoder=False)
    source = PhantomLabelledSource(5, size=64, seed=1)
    x, y = extract_embeddings(backbone, source, 64, batch_size=2, embedding="stages")
    assert x.shape == (5, 64 + 64 + 128 + 256 + 512) and np.array_equal(y, source.targets)
    pooled, _ = extract_embeddings(backbone, source, 64, batch_size=4)
    assert np.allclose(x[:, -512:], pooled, atol=1e-5)  # the last stage is pooler_output
    pixels = torch.from_numpy(np.stack([source.load(i) for i in range(5)])).float().div(255)
    with torch.no_grad():
        stem = backbone.encoder.relu(backbone.encoder.bn1(backbone.encoder.conv1(
            pixels[:, None].expand(-1, 3, -1, -1))))
    assert np.allclose(x[:, :64], stem.mean(dim=(2, 3)).numpy(), atol=1e-5)  # stem first
    with pytest.raises(ValueError, match="embedding must be one of"):
        extract_embeddings(backbone, source, 64, embedding="spatial")
    with pytest.raises(ValueError, match="embedding must be one of"):
        evaluate_features(backbone, source, tmp_path / "out", 64, embedding="spatial")
    assert not (tmp_path / "out").exists()  # nothing written for a bad argument


def test_recalibrated_statistics_are_the_set_averages_of_batch_statistics():
    torch.manual_seed(0)
    backbone = CAiDModel(CAiDConfig(encoder_name="resnet18", image_size=64), add_decoder=False)
    source = PhantomLabelledSource(12, size=64, seed=1)
    stem = backbone.encoder.bn1
    assert torch.equal(stem.running_mean, torch.zeros(64))  # never saw an image
    pixels = torch.from_numpy(np.stack([source.load(i) for i in range(12)])).float().div(255)
    pixels = pixels[:, None].expand(-1, 3, -1, -1)
    with torch.no_grad():
        conv = backbone.encoder.conv1(pixels)  # what the stem BatchNorm sees
    means = [conv[i:i + 4].mean(dim=(0, 2, 3)) for i in (0, 4, 8)]
    variances = [conv[i:i + 4].var(dim=(0, 2, 3)) for i in (0, 4, 8)]  # unbiased, as BatchNorm
    recalibrate_batch_norm(backbone, source, 64, batch_size=4)
    assert not backbone.training and stem.momentum == 0.1  # eval mode, momentum restored
    assert int(stem.num_batches_tracked) == 3
    torch.testing.assert_close(stem.running_mean, torch.stack(means).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stem.running_var, torch.stack(variances).mean(0), rtol=1e-4, atol=1e-5)
    # the embeddings are then normalised: the stem's output is centred on these images
    with torch.no_grad():
        normalised = stem(conv)
    torch.testing.assert_close(normalised.mean(dim=(0, 2, 3)), stem.bias.detach(), atol=1e-4, rtol=0)


def test_evaluate_features_writes_scores_map_and_embeddings(tmp_path):
    torch.manual_seed(0)
    backbone = CAiDModel(CAiDConfig(encoder_name="resnet18", image_size=64), add_decoder=False)
    result = evaluate_features(backbone, PhantomLabelledSource(40, size=64, seed=5), tmp_path,
                               image_size=64, model_name="random ResNet-18", k=5, folds=3)
    summary = json.loads((tmp_path / "scores.json").read_text())
    assert summary["num_images"] == 40 and summary["evaluation"] == "3-fold cross-validation"
    assert 0 <= summary["linear_probe"]["mean_auc"] <= 1 and 0 <= summary["knn"]["mean_auc"] <= 1
    assert summary["label_names"] == ["nodule"] and summary["embedding_dim"] == 512
    with Image.open(result.png) as image:
        assert image.format == "PNG"
    saved = np.load(tmp_path / "embeddings.npz")
    assert saved["embeddings"].shape == (40, 512) and saved["label_names"].tolist() == ["nodule"]


def test_evaluate_features_command(tmp_path, capsys):
    from caid_hf.cli import main

    main(["evaluate-features", "random", "--encoder-name", "resnet18", "--image-size", "64",
          "--num-phantoms", "30", "--test-source", "phantoms", "--num-test-phantoms", "20",
          "--phantom-size", "64", "--k", "5", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "linear_probe: mean AUC" in printed and "knn: mean AUC" in printed
    summary = json.loads((tmp_path / "scores.json").read_text())
    assert summary["evaluation"] == "test set of 20 images" and summary["num_test_images"] == 20
    assert summary["batch_norm_statistics"] == "data"  # the default for 'random'
    main(["evaluate-features", "random", "--encoder-name", "resnet18", "--image-size", "64",
          "--num-phantoms", "30", "--phantom-size", "64", "--k", "5", "--folds", "3",
          "--out", str(tmp_path / "saved"), "--batch-norm-statistics", "model"])
    saved = json.loads((tmp_path / "saved" / "scores.json").read_text())
    assert saved["batch_norm_statistics"] == "model"
    assert saved["embedding"] == "pooled" and saved["embedding_dim"] == 512
    main(["evaluate-features", "random", "--encoder-name", "resnet18", "--image-size", "64",
          "--num-phantoms", "30", "--phantom-size", "64", "--k", "5", "--folds", "3",
          "--out", str(tmp_path / "stages"), "--embedding", "stages"])
    stages = json.loads((tmp_path / "stages" / "scores.json").read_text())
    assert stages["embedding"] == "stages" and stages["embedding_dim"] == 1024
    assert (tmp_path / "stages" / "tsne.png").is_file()
    assert (tmp_path / "tsne.png").is_file()


def _patients_with_films(seed: int = 0):
    """30 patients × 4 films whose embeddings are the patient's (plus a little noise), and a
    finding drawn per patient, unrelated to the embedding: the figures a probe gets here
    come from recognising patients, nothing else."""
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(30), 4)
    x = rng.normal(size=(30, 32))[patients] + 0.05 * rng.normal(size=(120, 32))
    y = (rng.permutation(30) % 2)[patients].astype(np.float32)[:, None]
    return x, y, [f"patient{p:02d}" for p in patients]


def test_cross_validation_folds_keep_every_patient_on_one_side():
    from caid_hf.finetuning.features import cross_validation_folds

    _, y, groups = _patients_with_films()
    groups = np.asarray(groups)
    for seed in range(5):
        split = cross_validation_folds(y[:, 0].astype(int), 5, seed, groups)
        assert len(split) == 5
        assert sorted(np.concatenate([scored for _, scored in split]).tolist()) == list(range(120))
        for fit, scored in split:
            assert not set(groups[fit]) & set(groups[scored])
            assert 0 < y[fit, 0].sum() < len(fit)  # both outcomes to fit on
    # two patients with the finding: at most two folds
    labels = np.zeros(120, dtype=int)
    labels[:8] = 1  # patient00 and patient01
    assert len(cross_validation_folds(labels, 5, 0, groups)) == 2
    labels[4:8] = 0
    assert cross_validation_folds(labels, 5, 0, groups) is None  # one patient: no folds


def test_patient_grouped_folds_do_not_score_recognised_patients():
    x, y, groups = _patients_with_films()
    by_image = probe_scores(x, y, ["finding"], k=3, folds=5)
    by_patient = probe_scores(x, y, ["finding"], k=3, folds=5, groups=groups)
    # image-level folds put a patient's other films in the fit: perfect, and meaningless
    assert by_image["knn"]["mean_auc"] == 1.0 and by_image["linear_probe"]["mean_auc"] == 1.0
    assert by_patient["knn"]["mean_auc"] < 0.7 and by_patient["linear_probe"]["mean_auc"] < 0.7


def test_evaluate_features_groups_the_folds_by_patient_as_fine_tuning_does(tmp_path):
    from caid_hf.cli import main
    from caid_hf.finetuning.data import CSVLabelledSource
    from caid_hf.finetuning.features import cross_validation_folds

    from helpers import write_chexpert

    table = write_chexpert(tmp_path / "data")  # 12 patients, 4 films each
    source = CSVLabelledSource(table, uncertain_labels="zeros")
    groups = np.asarray(source.patient_ids)
    for j in range(len(source.label_names)):
        for fit, scored in cross_validation_folds(source.targets[:, j].astype(int), 3, 0,
                                                  groups):
            assert not set(groups[fit]) & set(groups[scored])
    common = ["evaluate-features", "random", "--encoder-name", "resnet18", "--image-size", "32",
              "--source", str(table), "--uncertain-labels", "zeros", "--k", "3", "--folds", "3"]
    main([*common, "--out", str(tmp_path / "grouped")])
    grouped = json.loads((tmp_path / "grouped" / "scores.json").read_text())
    assert grouped["evaluation"] == "3-fold cross-validation grouped by patient (12 patients)"
    assert grouped["num_patients"] == 12 and grouped["patient_id_from"] == "auto"
    main([*common, "--patient-id-from", "none", "--out", str(tmp_path / "images")])
    by_image = json.loads((tmp_path / "images" / "scores.json").read_text())
    assert by_image["evaluation"] == "3-fold cross-validation" and by_image["num_patients"] is None


def test_evaluate_features_lists_missing_and_undecodable_images(tmp_path, capsys):
    from caid_hf.cli import main

    from helpers import write_nih

    table = write_nih(tmp_path, ["Mass", "No Finding", "Effusion", "Mass|Effusion"] * 6)
    (tmp_path / "images" / "00000003_000.png").unlink()  # line 6
    (tmp_path / "images" / "00000007_001.png").write_bytes(b"\x89PNG")  # line 15
    command = ["evaluate-features", "random", "--encoder-name", "resnet18", "--image-size", "32",
               "--source", str(table), "--images-root", str(tmp_path / "images"), "--k", "3",
               "--folds", "2"]
    main([*command, "--max-bad-fraction", "0.1", "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert summary["num_images"] == 22 and summary["bad_files"] == 2
    rows = (tmp_path / "out" / "bad_files.tsv").read_text().splitlines()
    assert rows[1].startswith(f"00000003_000.png\t{table}:6: image not found: ")
    assert rows[2].startswith(f"00000007_001.png\t{table}:15: cannot decode")
    with pytest.raises(SystemExit):
        main([*command, "--out", str(tmp_path / "strict")])
    assert ("error: 1 of 24 images (4.2%) could not be read, more than max_bad_fraction=0.01: "
            f"00000003_000.png ({table}:6: image not found") in capsys.readouterr().err
