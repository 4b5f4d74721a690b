"""Watch the features while pre-training: an online k-NN and linear probe.

Losses say whether the objective is being optimised, not whether the encoder learns
anything a downstream task can use (a collapsed or nodule-blind encoder can still lower
the reconstruction loss). Every ``probe_steps`` optimizer steps the current encoder embeds
a small labelled set, frozen, and the same k-NN and logistic-regression probes as ``caid-hf
evaluate-features`` score it (solo-learn's online evaluation, done with the offline
evaluation's own code so the numbers are comparable): ``probe/linear_probe_auc`` and
``probe/knn_auc`` in TensorBoard and on the console.

The encoder is embedded in eval mode and fp32, exactly as ``caid-hf evaluate-features``
embeds a saved backbone: by default with its current BatchNorm running statistics
(``--batch-norm-statistics model``; on the weights saved at that step both give the same
AUC), or with ``batch_norm_statistics="data"`` with statistics re-estimated on the probe's
fitting images, on a copy (``--batch-norm-statistics data``). A learning curve needs
``data``: a randomly initialised encoder (step 0) has no statistics of its own, and its
unnormalised features score higher than they should (on the ChestX-ray14-like phantoms
0.80 against 0.69 with statistics of the probe's images), so a curve measured with
``model`` starts above where pre-training can reach.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..data.source_spec import PHANTOM_SPECS
from ..finetuning.data import LabelledSourceOptions, labelled_source_from_spec
from ..finetuning.features import (
    BATCH_NORM_STATISTICS,
    EMBEDDINGS,
    extract_embeddings,
    probe_scores,
    recalibrate_batch_norm,
)

PROBE_PHANTOM_SEED = 1000  # evaluate-features' --phantom-seed default: its sets, not training's


@dataclass
class ProbeResult:
    """AUCs of one probe: mean over the labels, on the held-out set (or cross-validated)."""

    linear_probe_auc: float
    knn_auc: float
    label_aucs: dict[str, float] = field(default_factory=dict)  # linear probe, per label

    def logs(self) -> dict[str, float]:
        """The two means, and with several labels the linear probe's AUC of each
        (``probe/linear_probe_auc/<label>``)."""
        per_label = ({f"probe/linear_probe_auc/{name}": auc
                      for name, auc in self.label_aucs.items()}
                     if len(self.label_aucs) > 1 else {})
        return {"probe/linear_probe_auc": self.linear_probe_auc, "probe/knn_auc": self.knn_auc,
                **per_label}


class OnlineProbe:
    """k-NN and linear-probe AUC of an encoder on a fixed labelled set.

    Args:
        source: ``"phantoms"`` (label ``nodule``) or ``"phantoms:cxr14"`` (eight findings,
            each also logged alone): ``num_images`` phantoms of side ``phantom_size`` to fit
            on, as many others to score on (the sets of ``caid-hf evaluate-features --source
            phantoms --test-source phantoms``); or any
            labelled classification source spec fine-tuning reads (CSV, split list with
            labels, Hugging Face dataset), scored by ``folds``-fold cross-validation.
        image_size: side the images are resized to (the pre-training view size).
        embedding: ``"stages"`` (every encoder stage's average: low-level detail counts) or
            ``"pooled"`` (``pooler_output``).
    """

    def __init__(self, source: str, image_size: int, num_images: int = 256,
                 phantom_size: int = 128, images_root: str | None = None,
                 embedding: str = "stages", k: int = 20, folds: int = 5, seed: int = 0,
                 batch_size: int = 64, batch_norm_statistics: str = "model"):
        if batch_norm_statistics not in BATCH_NORM_STATISTICS:
            raise ValueError(f"probe_batch_norm_statistics must be one of "
                             f"{list(BATCH_NORM_STATISTICS)}, got {batch_norm_statistics!r}")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"probe_embedding must be one of {list(EMBEDDINGS)}, got "
                             f"{embedding!r}")
        if num_images < 10:
            raise ValueError(f"probe_num_images must be at least 10, got {num_images}")
        options = LabelledSourceOptions(images_root=images_root, num_phantoms=num_images,
                                        phantom_size=phantom_size,
                                        phantom_seed=PROBE_PHANTOM_SEED)
        self.train = labelled_source_from_spec(source, options)
        self.test = (labelled_source_from_spec(source, options, phantom_seed_offset=2)
                     if source in PHANTOM_SPECS else None)
        self.image_size, self.embedding = image_size, embedding
        self.batch_norm_statistics = batch_norm_statistics
        self.k, self.folds, self.seed, self.batch_size = k, folds, seed, batch_size
        self.description = (f"{len(self.train)} + {len(self.test)} held-out phantoms"
                            if self.test is not None
                            else f"{len(self.train)} images of {source}, {folds}-fold CV")

    @torch.no_grad()
    def __call__(self, backbone) -> ProbeResult:
        """Score ``backbone`` (a :class:`~caid_hf.CAiDModel`); its train/eval mode is
        restored afterwards, its weights and BatchNorm statistics are not changed."""
        was_training = backbone.training
        device = next(backbone.parameters()).device
        if self.batch_norm_statistics == "data" or any(
                p.dim() == 4 and not p.is_contiguous() for p in backbone.parameters()):
            # a contiguous copy: statistics re-estimated on the probe's images leave
            # training's untouched, and channels_last training weights are embedded as
            # evaluate-features embeds the saved backbone (the memory format changes the
            # convolutions' rounding)
            backbone = copy.deepcopy(backbone).to(memory_format=torch.contiguous_format)
        # the loaders draw their base seed from the global RNG: without the fork, turning
        # the probe on would change the run's key shuffles and everything after them
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._score(backbone, device, was_training)

    def _score(self, backbone, device: torch.device, was_training: bool) -> ProbeResult:
        try:
            if self.batch_norm_statistics == "data":
                recalibrate_batch_norm(backbone, self.train, self.image_size, self.batch_size,
                                       device)
            x, y = extract_embeddings(backbone, self.train, self.image_size, self.batch_size,
                                      device, embedding=self.embedding)
            test_x = test_y = None
            if self.test is not None:
                test_x, test_y = extract_embeddings(backbone, self.test, self.image_size,
                                                    self.batch_size, device,
                                                    embedding=self.embedding)
        finally:
            backbone.train(was_training)
        scores = probe_scores(x, y, list(self.train.label_names), test_x, test_y, k=self.k,
                              folds=self.folds, seed=self.seed)
        linear = scores["linear_probe"]
        return ProbeResult(linear["mean_auc"], scores["knn"]["mean_auc"],
                           {name: linear[f"auc/{name}"] for name in self.train.label_names})
