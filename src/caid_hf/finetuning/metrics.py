"""Downstream metrics with bootstrap confidence intervals.

Classification: per-class ROC-AUC and their mean over the classes where it is defined (both
outcomes present), as the paper reports for ChestX-ray14. The AUC is the Mann-Whitney
statistic over mid-ranks, which equals scikit-learn's ``roc_auc_score`` (tests check it to
1e-12) at a fraction of its per-call cost: a test report's 1,000 bootstrap replicates of
eight findings took about 12 s through scikit-learn. Ignored label entries (NaN, e.g.
CheXpert's uncertain labels under ``uncertain_labels=ignore``) are left out of their class's
AUC. Segmentation: Dice and IoU per class, pooled over all pixels of the set
(``2·TP / (2·TP + FP + FN)`` and ``TP / (TP + FP + FN)``, which equal scikit-learn's
``f1_score`` and ``jaccard_score`` on the flattened masks: tests check that), and their
mean over the foreground classes. Pooling over pixels keeps images without any foreground
(half the phantoms) well defined.

Segmentation metrics are computed from per-image confusion counts rather than by handing
every pixel to scikit-learn, because the bootstrap resamples images: one count array
[N, C, 3] serves the point estimate and every bootstrap replicate.

Confidence intervals: the percentile bootstrap over images (resampled with replacement,
``num_resamples`` times from one seeded generator, so a seed gives the same interval);
replicates where a metric is undefined (e.g. a resample without positives) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "binary_auc",
    "bootstrap_interval",
    "classification_metrics",
    "classification_report",
    "confusion_counts",
    "per_class_auc",
    "segmentation_metrics",
    "segmentation_report",
]


def per_class_auc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC-AUC of every column, float64 [L]; NaN where a column has one outcome only.

    Args:
        labels: [N, L] in {0, 1} (multi-hot, or one-hot for single-label data); NaN entries
            are ignored (each column's AUC is over its known entries only).
        scores: [N, L] real (probabilities or logits; only their order matters).
    """
    labels, scores = np.asarray(labels), np.asarray(scores)
    if labels.shape != scores.shape or labels.ndim != 2:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must both be [N, L]")
    auc = np.full(labels.shape[1], np.nan)
    for k in range(labels.shape[1]):
        known = np.isfinite(labels[:, k])
        truth = labels[known, k]
        if 0 < truth.sum() < len(truth):
            auc[k] = binary_auc(truth, scores[known, k])
    return auc


def binary_auc(truth: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of scores [N] against truth [N] in {0, 1} with both outcomes present: the
    probability that a positive scores above a negative, ties counting half (mid-ranks);
    NaN when a score is NaN."""
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).any():
        return math.nan
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # each tie group's
    sizes = np.diff(np.r_[starts, len(ordered)])
    ranks = np.empty(len(ordered))
    ranks[order] = np.repeat(starts + (sizes + 1) / 2, sizes)  # 1-based mid-ranks
    positive = np.asarray(truth) == 1
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(labels: np.ndarray, scores: np.ndarray,
                           label_names: Sequence[str]) -> dict[str, float]:
    """``{"mean_auc", "auc/<name>" …}`` for [N, L] labels and scores; ``accuracy`` too for
    single-label data (every row one-hot), taking the highest score as the prediction."""
    auc = per_class_auc(labels, scores)
    metrics = {"mean_auc": float(np.nanmean(auc)) if np.isfinite(auc).any() else math.nan}
    metrics.update({f"auc/{name}": float(value) for name, value in zip(label_names, auc)})
    labels = np.asarray(labels)
    if labels.shape[1] > 1 and np.isfinite(labels).all() and (labels.sum(axis=1) == 1).all():
        metrics["accuracy"] = float((np.asarray(scores).argmax(1) == labels.argmax(1)).mean())
    return metrics


def confusion_counts(predictions: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None = None) -> torch.Tensor:
    """Per-image, per-class pixel counts (TP, FP, FN): int64 [B, C, 3].

    Args:
        predictions: [B, H, W] predicted class indices in 0..C-1 (for a binary mask,
            ``C = 2`` with 1 the foreground).
        target: [B, H, W] true class indices; pixels equal to ``ignore_index`` are left out.
        num_classes: C.
    """
    if predictions.shape != target.shape or predictions.dim() != 3:
        raise ValueError(f"predictions {list(predictions.shape)} and target "
                         f"{list(target.shape)} must both be [B, H, W]")
    batch = predictions.shape[0]
    predictions, target = predictions.reshape(batch, -1).long(), target.reshape(batch, -1).long()
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None \
        else target != ignore_index
    # joint index target·C + prediction per image, counted with one bincount
    joint = (target.clamp(0, num_classes - 1) * num_classes + predictions
             + torch.arange(batch, device=target.device)[:, None] * num_classes ** 2)
    matrix = torch.bincount(joint[valid], minlength=batch * num_classes ** 2)
    matrix = matrix.view(batch, num_classes, num_classes)  # [B, true, predicted]
    tp = matrix.diagonal(dim1=1, dim2=2)
    fp = matrix.sum(dim=1) - tp
    fn = matrix.sum(dim=2) - tp
    return torch.stack([tp, fp, fn], dim=-1)


def _dice_iou(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pooled Dice and IoU per class [C] from counts [N, C, 3]; NaN for a class that is
    absent from both target and prediction."""
    tp, fp, fn = counts.sum(axis=0).astype(np.float64).T
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
    return dice, iou


def _foreground(class_names: Sequence[str]) -> slice:
    """Classes averaged into the mean: all but the background (class 0) when there are
    several; the only class of a binary task (passed as ``[name]`` for class 1)."""
    return slice(1, None) if len(class_names) > 1 else slice(0, None)


def segmentation_metrics(counts: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """``{"dice", "iou", "dice/<name>", "iou/<name>" …}`` from counts [N, C, 3].

    For a binary task (``counts`` of classes {background, foreground}, ``class_names`` one
    name) only the foreground is reported; otherwise every class, with ``dice`` and ``iou``
    the means over classes 1..C-1.
    """
    counts = np.asarray(counts)
    dice, iou = _dice_iou(counts)
    if len(class_names) == 1:  # binary: the foreground column only
        dice, iou = dice[1:], iou[1:]
    elif len(class_names) != counts.shape[1]:
        raise ValueError(f"{len(class_names)} class names for counts of {counts.shape[1]} classes")
    keep = _foreground(class_names)
    metrics = {"dice": float(np.nanmean(dice[keep])) if np.isfinite(dice[keep]).any() else math.nan,
               "iou": float(np.nanmean(iou[keep])) if np.isfinite(iou[keep]).any() else math.nan}
    for name, d, j in zip(class_names, dice, iou):
        metrics[f"dice/{name}"] = float(d)
        metrics[f"iou/{name}"] = float(j)
    return metrics


def bootstrap_interval(statistic: Callable[[np.ndarray], dict[str, float]], num_samples: int,
                       num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
                       ) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of every metric a statistic returns.

    Args:
        statistic: maps sample indices int64 [M] (with repeats) to ``{name: value}``.
        num_samples: N, the number of samples (images) resampled.
        num_resamples: bootstrap replicates B (each draws N indices with replacement).
        confidence: two-sided level, e.g. 0.95 → the 2.5th and 97.5th percentiles.
        seed: seed of the generator; the same seed gives the same intervals.

    Returns:
        ``{name: (low, high)}``; ``(nan, nan)`` for a metric undefined in every replicate.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if num_samples < 1 or num_resamples < 1:
        raise ValueError(f"need samples and resamples, got {num_samples} and {num_resamples}")
    rng = np.random.default_rng(seed)
    replicates: dict[str, list[float]] = {}
    for _ in range(num_resamples):
        for name, value in statistic(rng.integers(0, num_samples, num_samples)).items():
            replicates.setdefault(name, []).append(value)
    tail = 100 * (1 - confidence) / 2
    intervals = {}
    for name, values in replicates.items():
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        intervals[name] = (tuple(float(v) for v in np.percentile(values, [tail, 100 - tail]))
                           if values.size else (math.nan, math.nan))
    return intervals


def _report(point: dict[str, float], intervals: dict[str, tuple[float, float]],
            confidence: float, num_samples: int, num_resamples: int) -> dict:
    return {"metrics": point,
            "confidence_intervals": {k: list(v) for k, v in intervals.items()},
            "confidence_level": confidence, "num_samples": num_samples,
            "bootstrap_resamples": num_resamples}


def classification_report(labels: np.ndarray, scores: np.ndarray, label_names: Sequence[str],
                          num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
                          ) -> dict:
    """Point estimates of :func:`classification_metrics` with bootstrap intervals.

    Returns ``{"metrics": {...}, "confidence_intervals": {name: [low, high]},
    "confidence_level", "num_samples", "bootstrap_resamples"}``.
    """
    labels, scores = np.asarray(labels), np.asarray(scores)
    point = classification_metrics(labels, scores, label_names)
    intervals = bootstrap_interval(
        lambda idx: classification_metrics(labels[idx], scores[idx], label_names),
        len(labels), num_resamples, confidence, seed) if num_resamples else {}
    return _report(point, intervals, confidence, len(labels), num_resamples)


def segmentation_report(counts: np.ndarray, class_names: Sequence[str],
                        num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
                        ) -> dict:
    """Point estimates of :func:`segmentation_metrics` with bootstrap intervals over images
    (``counts`` [N, C, 3]); same layout as :func:`classification_report`."""
    counts = np.asarray(counts)
    point = segmentation_metrics(counts, class_names)
    intervals = bootstrap_interval(
        lambda idx: segmentation_metrics(counts[idx], class_names),
        len(counts), num_resamples, confidence, seed) if num_resamples else {}
    return _report(point, intervals, confidence, len(counts), num_resamples)
