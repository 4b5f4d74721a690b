"""Downstream metrics against scikit-learn, and their bootstrap intervals."""

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, jaccard_score, roc_auc_score

from caid_hf.finetuning.metrics import (
    binary_auc,
    bootstrap_interval,
    classification_metrics,
    classification_report,
    confusion_counts,
    per_class_auc,
    segmentation_metrics,
    segmentation_report,
)


@pytest.fixture
def multilabel():
    """300 images, 4 labels: informative scores for three, one label never positive."""
    rng = np.random.default_rng(0)
    labels = (rng.random((300, 4)) < [0.3, 0.1, 0.5, 0.0]).astype(np.float32)
    scores = labels * [1.0, 0.5, 2.0, 0.0] + rng.normal(size=(300, 4))
    return labels, scores


def test_auc_of_a_hand_computed_case():
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered right
    auc = per_class_auc(np.array([[0], [0], [1], [1]]), np.array([[0.1], [0.4], [0.35], [0.8]]))
    assert auc.tolist() == [0.75]


def test_auc_matches_scikit_learn_with_ties_repeats_and_infinite_scores():
    """Coarse scores (many ties), bootstrap-style repeated rows, and ±inf logits."""
    rng = np.random.default_rng(3)
    for trial in range(200):
        n = int(rng.integers(2, 60))
        truth = (rng.random(n) < rng.uniform(0.05, 0.95)).astype(np.float64)
        truth[:2] = [0, 1]  # both outcomes present
        scores = np.round(truth * rng.uniform(0, 2) + rng.normal(size=n), int(rng.integers(0, 3)))
        if trial % 10 == 0:
            scores[rng.integers(0, n, 2)] = [np.inf, -np.inf]
        rows = rng.integers(0, n, n) if trial % 2 else np.arange(n)
        rows = np.r_[0, 1, rows]
        finite = np.clip(scores, -1e300, 1e300)  # scikit-learn refuses infinities: same order
        assert binary_auc(truth[rows], scores[rows]) == pytest.approx(
            roc_auc_score(truth[rows], finite[rows]), abs=1e-12), trial
    assert math.isnan(binary_auc(np.array([0.0, 1.0]), np.array([0.3, np.nan])))


def test_per_class_and_mean_auc_match_scikit_learn(multilabel):
    labels, scores = multilabel
    metrics = classification_metrics(labels, scores, ["a", "b", "c", "never"])
    expected = [roc_auc_score(labels[:, k], scores[:, k]) for k in range(3)]
    assert [metrics[f"auc/{n}"] for n in "abc"] == pytest.approx(expected, abs=1e-12)
    assert math.isnan(metrics["auc/never"])  # one outcome only: undefined, left out of the mean
    assert metrics["mean_auc"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert 0.6 < expected[1] < expected[0] < expected[2]
    assert "accuracy" not in metrics  # multi-label rows


def test_single_label_accuracy_and_one_vs_rest_auc():
    rng = np.random.default_rng(1)
    classes = rng.integers(0, 3, 200)
    labels = np.eye(3, dtype=np.float32)[classes]
    logits = labels * 1.5 + rng.normal(size=(200, 3))
    scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # softmax, as fine-tuning
    metrics = classification_metrics(labels, scores, ["x", "y", "z"])
    assert metrics["accuracy"] == pytest.approx((scores.argmax(1) == classes).mean())
    assert metrics["mean_auc"] == pytest.approx(
        roc_auc_score(classes, scores, multi_class="ovr", average="macro"), abs=1e-12)


def test_binary_dice_and_iou_match_scikit_learn_on_the_pooled_pixels():
    rng = np.random.default_rng(2)
    target = torch.from_numpy((rng.random((6, 32, 32)) < 0.2).astype(np.int64))
    target[0] = 0  # an image without foreground: pooled metrics stay defined
    flip = torch.from_numpy(rng.random((6, 32, 32)) < 0.15)
    prediction = torch.where(flip, 1 - target, target)
    counts = confusion_counts(prediction, target, num_classes=2)
    assert counts.shape == (6, 2, 3) and counts.dtype == torch.int64
    metrics = segmentation_metrics(counts.numpy(), ["nodule"])
    y, p = target.flatten().numpy(), prediction.flatten().numpy()
    assert metrics["dice"] == pytest.approx(f1_score(y, p), abs=1e-12)
    assert metrics["iou"] == pytest.approx(jaccard_score(y, p), abs=1e-12)
    assert metrics["dice/nodule"] == metrics["dice"]
    assert set(metrics) == {"dice", "iou", "dice/nodule", "iou/nodule"}


def test_multiclass_dice_per_class_ignores_unlabelled_pixels():
    rng = np.random.default_rng(3)
    target = torch.from_numpy(rng.integers(0, 3, (4, 16, 16)))
    prediction = torch.where(torch.from_numpy(rng.random((4, 16, 16)) < 0.3),
                             torch.from_numpy(rng.integers(0, 3, (4, 16, 16))), target)
    target[:, :2] = 255  # unlabelled rows: whatever is predicted there does not count
    counts = confusion_counts(prediction, target, num_classes=3, ignore_index=255)
    metrics = segmentation_metrics(counts.numpy(), ["background", "left", "right"])
    keep = (target != 255).flatten().numpy()
    y, p = target.flatten().numpy()[keep], prediction.flatten().numpy()[keep]
    per_class = f1_score(y, p, labels=[0, 1, 2], average=None)
    iou = jaccard_score(y, p, labels=[0, 1, 2], average=None)
    assert [metrics[f"dice/{n}"] for n in ("background", "left", "right")] == \
        pytest.approx(per_class, abs=1e-12)
    assert [metrics[f"iou/{n}"] for n in ("background", "left", "right")] == \
        pytest.approx(iou, abs=1e-12)
    assert metrics["dice"] == pytest.approx(per_class[1:].mean(), abs=1e-12)  # foreground mean


def test_bootstrap_interval_contains_the_estimate_and_is_deterministic(multilabel):
    labels, scores = multilabel
    names = ["a", "b", "c", "never"]
    report = classification_report(labels, scores, names, num_resamples=150, seed=7)
    again = classification_report(labels, scores, names, num_resamples=150, seed=7)
    other = classification_report(labels, scores, names, num_resamples=150, seed=8)
    assert json.dumps(report) == json.dumps(again)  # NaN-aware equality
    assert report["confidence_intervals"] != other["confidence_intervals"]
    for name in ("mean_auc", "auc/a", "auc/b", "auc/c"):
        low, high = report["confidence_intervals"][name]
        assert low < report["metrics"][name] < high
        assert high - low < 0.25
    assert all(math.isnan(v) for v in report["confidence_intervals"]["auc/never"])
    assert report["num_samples"] == 300 and report["confidence_level"] == 0.95


def test_bootstrap_interval_narrows_with_more_images_and_with_lower_confidence():
    rng = np.random.default_rng(4)
    values = rng.normal(size=2000)

    def width(n: int, confidence: float) -> float:
        low, high = bootstrap_interval(lambda idx: {"mean": values[:n][idx].mean()}, n,
                                       num_resamples=400, confidence=confidence)["mean"]
        return high - low

    assert width(2000, 0.95) < width(200, 0.95) / 2.5  # ~ 1/sqrt(n)
    assert width(2000, 0.8) < width(2000, 0.95)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval(lambda idx: {}, 10, confidence=1.0)


def test_segmentation_report_intervals_over_images():
    rng = np.random.default_rng(5)
    target = torch.from_numpy((rng.random((40, 16, 16)) < 0.1).astype(np.int64))
    prediction = torch.where(torch.from_numpy(rng.random((40, 16, 16)) < 0.05), 1 - target,
                             target)
    counts = confusion_counts(prediction, target, 2).numpy()
    report = segmentation_report(counts, ["lesion"], num_resamples=200, seed=0)
    low, high = report["confidence_intervals"]["dice"]
    assert low < report["metrics"]["dice"] < high
    assert json.dumps(report) == json.dumps(
        segmentation_report(counts, ["lesion"], num_resamples=200, seed=0))
