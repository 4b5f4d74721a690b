"""Frozen-feature evaluation: how well a backbone's embeddings separate labelled images.

For a labelled set (any classification source of :mod:`caid_hf.finetuning.data`): the
embeddings (``CAiDModel`` ``pooler_output``, [N, C], or every encoder stage's average-pooled
features side by side, see :data:`EMBEDDINGS`), k-nearest-neighbour and linear-probe
(logistic regression on standardised features) scores from scikit-learn, and a 2-D t-SNE
map of the embeddings coloured by label, saved as PNG (matplotlib, Agg backend).

Scores are ROC-AUC per label and their mean (each label a binary problem, as in
multi-label fine-tuning), plus accuracy. They come from a separate test set when one is
given, otherwise from stratified k-fold cross-validation on the one set (out-of-fold
predictions, so every image is scored by a probe that never saw it). When the images have
patient ids (``patient_id_from``, the rule fine-tuning splits by, see
:mod:`caid_hf.data.patients`), the folds are grouped by patient
(scikit-learn's ``StratifiedGroupKFold``): a patient's films are all in one fold, so no
probe is scored on a patient whose other films it was fit on.

Images a CSV lists but that are missing, or that cannot be decoded, are left out and
listed with their CSV line in ``out_dir/bad_files.tsv``; more than ``max_bad_fraction`` of
them stop the evaluation with one message.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

from ..data.bad_files import BadFileLog
from ..data.patients import patient_ids_of
from .data import ClassificationDataset, collate_labelled

__all__ = ["EMBEDDINGS", "FeatureScores", "extract_embeddings", "plot_embedding_map", "probe_scores",
           "evaluate_features", "recalibrate_batch_norm"]


@torch.no_grad()
def recalibrate_batch_norm(backbone, source, image_size: int, batch_size: int = 64,
                           device: str | torch.device | None = None) -> None:
    """Re-estimate the encoder's BatchNorm running statistics on ``source``'s images (no
    labels used), in place: every statistic becomes the average over the set's batches.

    Why: a frozen backbone embeds with the statistics it was saved with. A randomly
    initialised network has never seen an image (mean 0, variance 1 everywhere), so in eval
    mode it computes an unnormalised function whose pooled activations grow with image
    intensity: not the network a trained one is compared against. Measuring every backbone
    with statistics from the same images puts random and pre-trained weights on an equal
    footing (on the phantoms this moved random init's linear-probe AUC from 0.72-0.79 to
    0.49-0.55).
    """
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    backbone = backbone.to(device)
    norms = [m for m in backbone.encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    backbone.encoder.train()
    try:
        loader = DataLoader(ClassificationDataset(source, image_size, report_bad_images=True),
                            batch_size=batch_size, collate_fn=collate_labelled)
        for batch in loader:
            pixels = batch["pixel_values"][batch["readable"]]  # unreadable images left out
            if len(pixels):
                backbone.encoder(pixels.to(device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        backbone.eval()


# What an image's embedding is: "pooled" is the last stage averaged over space (the model's
# ``pooler_output``, what a classifier head sees); "stages" puts every encoder stage's
# spatial average side by side (stem first, last stage last: 64+64+128+256+512 = 1024 values
# for a ResNet-18), so a probe can also read the low and mid-level features a small finding
# (a few-pixel nodule) lives in, which the deepest, most view-invariant stage averages away.
EMBEDDINGS = ("pooled", "stages")
# where a frozen backbone's BatchNorm statistics come from: its own, or the images embedded
BATCH_NORM_STATISTICS = ("model", "data")


def _check_embedding(embedding: str) -> None:
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")


@torch.no_grad()
def extract_embeddings(backbone, source, image_size: int, batch_size: int = 64,
                       device: str | torch.device | None = None, num_workers: int = 0,
                       embedding: str = "pooled", bad_files: list | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and labels of every image of a labelled source.

    Args:
        backbone: a :class:`~caid_hf.CAiDModel` (run in eval mode, no reconstruction).
        source: a labelled classification source (``targets`` [N, L]).
        image_size: side the images are resized to (as :class:`~caid_hf.CAiDImageProcessor`).
        embedding: ``"pooled"`` (``pooler_output``, [N, C_last]) or ``"stages"`` (every
            encoder stage's global average, concatenated; the last ``C_last`` columns are
            ``pooler_output``); see :data:`EMBEDDINGS`.
        bad_files: a list to collect unreadable images in: given, such an image is left out
            of the returned arrays and ``(index in source, image_id, reason)`` appended;
            without it, an unreadable image raises.

    Returns:
        ``(embeddings float32 [N, C], targets float32 [N, L] in {0, 1})``.
    """
    _check_embedding(embedding)
    stages = embedding == "stages"
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    backbone = backbone.to(device).eval()
    report = bad_files is not None
    loader = DataLoader(ClassificationDataset(source, image_size, report_bad_images=report),
                        batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_labelled if report else None)
    parts, labels, start = [], [], 0
    for batch in loader:
        pixels, targets = batch["pixel_values"], batch["labels"]
        if report:
            readable = batch["readable"]
            unreadable = iter(batch["bad_files"])
            for offset in torch.nonzero(~readable).flatten().tolist():
                bad_files.append((start + offset, *next(unreadable)))
            start += len(readable)
            pixels, targets = pixels[readable], targets[readable]
            if not len(pixels):
                continue
        out = backbone(pixels.to(device), compute_reconstruction=False,
                       output_hidden_states=stages)
        # hidden_states[0] is the input image itself, not a feature
        x = (torch.cat([h.mean(dim=(2, 3)) for h in out.hidden_states[1:]], dim=1) if stages
             else out.pooler_output)
        parts.append(x.float().cpu().numpy())
        labels.append(targets.numpy())
    if not parts:
        raise ValueError(f"none of the {len(source)} images could be read: "
                         + "; ".join(f"{i} ({r})" for _, i, r in (bad_files or [])[:3]))
    return np.concatenate(parts), np.concatenate(labels)


def _linear_probe(seed: int):
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))


def _knn(k: int):
    return KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance")


def cross_validation_folds(y: np.ndarray, folds: int, seed: int,
                           groups: np.ndarray | None = None
                           ) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """(fit, scored) index arrays of stratified k-fold cross-validation on labels ``y``
    [N] in {0, 1}; with ``groups`` [N] (patient ids) grouped: every group's images in one
    fold (``StratifiedGroupKFold``). Fewer folds than ``folds`` where the smaller class has
    fewer images (or patients); ``None`` when no split leaves both classes in every fit.
    """
    if groups is None:
        splits = min(folds, int(np.bincount(y, minlength=2).min()))
        if splits < 2:
            return None
        cv = StratifiedKFold(n_splits=splits, shuffle=True, random_state=seed)
        return list(cv.split(np.zeros(len(y)), y))
    # a fold's fit must hold both classes: at most as many folds as patients with each
    splits = min(folds, len(set(groups[y == 1])), len(set(groups[y == 0])))
    for n in range(splits, 1, -1):
        cv = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed)
        split = list(cv.split(np.zeros(len(y)), y, groups))
        if all(0 < y[fit].sum() < len(fit) for fit, _ in split):
            return split
    return None


def probe_scores(train_x: np.ndarray, train_y: np.ndarray, label_names: list[str],
                 test_x: np.ndarray | None = None, test_y: np.ndarray | None = None,
                 k: int = 20, folds: int = 5, seed: int = 0,
                 groups: list[str] | np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """k-NN and linear-probe scores of embeddings, per label and on average.

    Args:
        train_x, train_y: embeddings [N, C] and labels [N, L] in {0, 1} the probes learn
            (NaN entries are ignored: left out of that label's fit and score).
        test_x, test_y: a held-out set scored by probes fit on all of ``train``; without it,
            out-of-fold predictions of ``folds``-fold stratified cross-validation on ``train``.
        k: neighbours of the k-NN classifier (cosine distance, distance-weighted votes).
        groups: the patient of every training image [N]: the folds are then grouped by
            patient (:func:`cross_validation_folds`), so no patient is on both sides.

    Returns:
        ``{"linear_probe": {...}, "knn": {...}}``, each with ``mean_auc``, ``mean_accuracy``,
        ``auc/<name>``, ``accuracy/<name>``; a label with one outcome only (in the scored
        set), or too few patients of one outcome to fold, gets NaN.
    """
    scores: dict[str, dict[str, float]] = {"linear_probe": {}, "knn": {}}
    groups = None if groups is None else np.asarray(groups)
    if groups is not None and len(groups) != len(train_x):
        raise ValueError(f"{len(groups)} patient ids for {len(train_x)} images")
    for j, name in enumerate(label_names):
        known = np.isfinite(train_y[:, j])  # ignored (NaN) entries are left out, per label
        fit_x, y = train_x[known], train_y[known, j].astype(int)
        split = None
        if np.bincount(y, minlength=2).min() >= 2 and test_x is None:
            split = cross_validation_folds(y, folds, seed,
                                           None if groups is None else groups[known])
        if np.bincount(y, minlength=2).min() < 2 or (test_x is None and split is None):
            for method in scores:
                scores[method][f"auc/{name}"] = scores[method][f"accuracy/{name}"] = math.nan
            continue
        fit_size = len(y) if test_x is not None else min(len(fit) for fit, _ in split)
        if test_x is None and groups is None:  # image-level folds: k as it always was
            fit_size = len(y) - math.ceil(len(y) / len(split))
        probes = {"linear_probe": _linear_probe(seed), "knn": _knn(max(1, min(k, fit_size)))}
        for method, probe in probes.items():
            if test_x is None:
                probability = cross_val_predict(probe, fit_x, y, cv=split,
                                                method="predict_proba")[:, 1]
                truth = y
            else:
                scored = np.isfinite(test_y[:, j])
                probability = probe.fit(fit_x, y).predict_proba(test_x[scored])[:, 1]
                truth = test_y[scored, j].astype(int)
            defined = 0 < truth.sum() < len(truth)
            scores[method][f"auc/{name}"] = (float(roc_auc_score(truth, probability))
                                             if defined else math.nan)
            scores[method][f"accuracy/{name}"] = float(accuracy_score(truth, probability >= 0.5))
    for values in scores.values():
        for metric in ("auc", "accuracy"):
            per_label = [values[f"{metric}/{n}"] for n in label_names]
            finite = [v for v in per_label if math.isfinite(v)]
            values[f"mean_{metric}"] = float(np.mean(finite)) if finite else math.nan
    return {method: dict(sorted(values.items(), key=lambda kv: "/" in kv[0]))
            for method, values in scores.items()}


def point_categories(targets: np.ndarray, label_names: list[str],
                     color_label: str | None = None) -> list[str]:
    """The category each point is coloured by.

    One label (or ``color_label``): ``name`` / ``no name``. Single-label data (one-hot
    rows): the class. Several labels: the one finding of an image, ``no finding`` or
    ``several findings``. An ignored (NaN) entry counts as absent here.
    """
    targets = np.nan_to_num(np.asarray(targets, dtype=np.float32))
    if color_label is not None or len(label_names) == 1:
        name = color_label or label_names[0]
        if name not in label_names:
            raise ValueError(f"color_label {name!r} is not a label; labels: {label_names}")
        column = targets[:, label_names.index(name)]
        return [name if v else f"no {name}" for v in column]
    counts = targets.sum(axis=1)
    if (counts == 1).all():
        return [label_names[k] for k in targets.argmax(axis=1)]
    return [label_names[int(row.argmax())] if c == 1 else
            ("no finding" if c == 0 else "several findings") for row, c in zip(targets, counts)]


def plot_embedding_map(points: np.ndarray, categories: list[str], path: str | Path,
                       title: str, subtitle: str | None = None) -> Path:
    """Save a scatter plot of 2-D points [N, 2] coloured by category as a PNG.

    Axes are labelled ``t-SNE 1`` / ``t-SNE 2`` (their scale carries no meaning, so the
    ticks are hidden); the legend gives each category's image count.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # absence first ("no nodule", "no finding"), then the rest by name: stable colours
    names = sorted(set(categories), key=lambda c: (not c.startswith("no "), c))
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=120)
    marker_size = 22 if len(points) <= 1000 else 8
    for k, name in enumerate(names):
        chosen = np.asarray([c == name for c in categories])
        ax.scatter(points[chosen, 0], points[chosen, 1], s=marker_size, alpha=0.75,
                   color=colours(k % colours.N), edgecolors="none",
                   label=f"{name} ({int(chosen.sum())})")
    ax.set_xlabel("t-SNE 1", fontsize=12)
    ax.set_ylabel("t-SNE 2", fontsize=12)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title if subtitle is None else f"{title}\n{subtitle}", fontsize=12)
    ax.legend(title="label (images)", fontsize=10, title_fontsize=10, loc="best",
              frameon=True, markerscale=1.5)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def tsne_map(embeddings: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE coordinates [N, 2] of standardised embeddings [N, C] (PCA initialisation,
    perplexity 30 or less for small sets)."""
    from sklearn.manifold import TSNE

    x = StandardScaler().fit_transform(embeddings)
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca",
                random_state=seed).fit_transform(x)


@dataclass
class FeatureScores:
    """What :func:`evaluate_features` measured and wrote."""

    scores: dict[str, dict[str, float]]
    embeddings: np.ndarray
    targets: np.ndarray
    label_names: list[str]
    png: Path
    json: Path


def evaluate_features(backbone, source, out_dir: str | Path, image_size: int,
                      test_source=None, model_name: str = "CAiD backbone", k: int = 20,
                      folds: int = 5, seed: int = 0, batch_size: int = 64,
                      color_label: str | None = None, device: str | None = None,
                      batch_norm_statistics: str = "model",
                      embedding: str = "pooled", patient_id_from: str = "auto",
                      max_bad_fraction: float = 0.01) -> FeatureScores:
    """Embed a labelled set, score k-NN and linear probes, and draw its t-SNE map.

    Without ``test_source`` the probes are cross-validated on ``source``, in folds grouped
    by patient when its images have patient ids under ``patient_id_from`` (the rule
    fine-tuning splits by; ``none``: image-level folds).

    Images the sources found missing (``bad_images``) or that cannot be decoded are left
    out and listed in ``out_dir/bad_files.tsv``; more than ``max_bad_fraction`` of them
    stop the evaluation.

    ``embedding``: ``"pooled"`` (``pooler_output``) or ``"stages"`` (every encoder stage's
    average, concatenated); see :func:`extract_embeddings`.

    ``batch_norm_statistics``: ``"model"`` embeds with the backbone's saved BatchNorm
    statistics; ``"data"`` first re-estimates them on ``source``'s images
    (:func:`recalibrate_batch_norm`; the backbone is changed in place), the fair way to
    measure a randomly initialised network.

    Writes ``out_dir/scores.json`` (scores, set sizes, settings), ``out_dir/embeddings.npz``
    (``embeddings`` [N, C], ``targets`` [N, L], ``label_names``) and ``out_dir/tsne.png``
    (the map of ``source``'s embeddings).
    """
    if batch_norm_statistics not in BATCH_NORM_STATISTICS:
        raise ValueError(f"batch_norm_statistics must be 'model' or 'data', got "
                         f"{batch_norm_statistics!r}")
    _check_embedding(embedding)
    names = list(source.label_names)
    groups = None if test_source is not None else patient_ids_of(source, patient_id_from)
    out_dir = Path(out_dir)  # created only once the arguments are known to be good
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = [s for s in (source, test_source) if s is not None]
    bad_files = BadFileLog(out_dir / "bad_files.tsv",
                           sum(getattr(s, "rows_read", len(s)) for s in sources),
                           max_bad_fraction, remedy="Fix the paths (--images-root?) or the "
                           "files, remove their rows, or raise --max-bad-fraction.")
    bad_files.add(record for s in sources for record in getattr(s, "bad_images", []))
    bad_files.check()
    if batch_norm_statistics == "data":
        recalibrate_batch_norm(backbone, source, image_size, batch_size, device)
    unreadable: list = []
    x, y = extract_embeddings(backbone, source, image_size, batch_size, device,
                              embedding=embedding, bad_files=unreadable)
    if groups is not None and unreadable:
        left_out = {i for i, _, _ in unreadable}
        groups = [g for i, g in enumerate(groups) if i not in left_out]
    test_x = test_y = None
    if test_source is not None:
        if list(test_source.label_names) != names:
            raise ValueError(f"the test set's labels {test_source.label_names} differ from "
                             f"the set's {names}")
        test_x, test_y = extract_embeddings(backbone, test_source, image_size, batch_size,
                                            device, embedding=embedding, bad_files=unreadable)
    bad_files.add((image_id, reason) for _, image_id, reason in unreadable)
    bad_files.check()
    scores = probe_scores(x, y, names, test_x, test_y, k=k, folds=folds, seed=seed,
                          groups=groups)
    evaluation = (f"test set of {len(test_x)} images" if test_x is not None
                  else f"{folds}-fold cross-validation" if groups is None
                  else f"{folds}-fold cross-validation grouped by patient "
                       f"({len(set(groups))} patients)")
    png = plot_embedding_map(
        tsne_map(x, seed), point_categories(y, names, color_label), out_dir / "tsne.png",
        title=f"t-SNE of {model_name} embeddings ({len(x)} images"
              f"{', all encoder stages' if embedding == 'stages' else ''})",
        subtitle=(f"linear probe AUC {scores['linear_probe']['mean_auc']:.3f}, "
                  f"{k}-NN AUC {scores['knn']['mean_auc']:.3f} ({evaluation})"))
    np.savez_compressed(out_dir / "embeddings.npz", embeddings=x, targets=y,
                        label_names=np.asarray(names))
    summary = {"model": model_name, "num_images": len(x),
               "num_test_images": None if test_x is None else len(test_x),
               "evaluation": evaluation, "embedding_dim": int(x.shape[1]), "knn_k": k,
               "image_size": image_size, "batch_norm_statistics": batch_norm_statistics,
               "embedding": embedding, "patient_id_from": patient_id_from,
               "num_patients": None if groups is None else len(set(groups)),
               "bad_files": len(bad_files),
               "label_names": names, **scores}
    path = out_dir / "scores.json"
    path.write_text(json.dumps(summary, indent=2))
    return FeatureScores(scores, x, y, names, png, path)
