"""CAiD pre-training model: the U-Net backbone plus an instance-discrimination objective.

Kept apart from :mod:`caid_hf.modeling_caid` (the backbone and the downstream models),
which a model repository on the Hub ships as remote code: this module needs the objectives,
the distributed helpers and the rest of caid-hf, so it is pre-training's, not a Hub
visitor's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_caid import CAiDConfig
from .modeling_caid import CAiDModel, CAiDPreTrainedModel, check_pixel_values
from .objectives import Objective, embedding_std, objective_class

__all__ = ["CAiDForPreTraining", "CAiDForPreTrainingOutput"]


@dataclass
class CAiDForPreTrainingOutput(ModelOutput):
    """Output of :class:`CAiDForPreTraining`.

    Args:
        loss: ``contrastive_weight * contrastive_loss + reconstruction_weight *
            reconstruction_loss`` (fp32 scalar; the reconstruction term only when ``labels``
            are given).
        contrastive_loss: the instance-discrimination loss (fp32 scalar): MoCo InfoNCE,
            Barlow Twins redundancy reduction, SimSiam negative cosine (the name predates the
            two, which are not contrastive).
        reconstruction_loss: mean squared error of ``reconstruction`` against ``labels``; with
            ``reconstruct_views="both"`` the mean of both views' errors.
        logits: [B, 1 + K] MoCo logits divided by the temperature (column 0 = positive key);
            ``None`` for Barlow Twins and SimSiam.
        reconstruction: [B, 1, H, W] in [0, 1] of the first view, ``None`` for the
            instance-discrimination baseline.
        embeddings: pooled first-view features [B, C].
        embedding_std: collapse indicator (detached fp32 scalar,
            :func:`~caid_hf.objectives.embedding_std`) of the first view's projections:
            ≈ 1/sqrt(D) when healthy, → 0 when collapsed.
        key_reconstruction: [B, 1, H, W] of the second view with ``reconstruct_views="both"``.
    """

    loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    embeddings: torch.FloatTensor | None = None
    embedding_std: torch.FloatTensor | None = None
    key_reconstruction: torch.FloatTensor | None = None



class CAiDForPreTraining(CAiDPreTrainedModel):
    """CAiD pre-training: instance discrimination on the encoder + reconstruction by the U-Net.

    ``self.caid`` is the published backbone; the method's heads (and MoCo's momentum key
    branch and queue) live in ``self.objective`` and never enter the backbone's files. With
    ``config.context_prediction=False`` it is the plain instance-discrimination baseline:
    the decoder is frozen and never run (its weights stay at their initialisation).

    ``config.discrimination_method`` picks the objective. MoCo-v2 encodes the second (key)
    view with its momentum encoder and shuffle-BN; Barlow Twins and SimSiam encode both views
    with ``self.caid.encoder`` (each view its own BatchNorm statistics, as in their originals)
    and, when several processes train, every BatchNorm of this model uses the global batch.
    """

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Objective):  # MoCo: a fresh queue of random unit keys
            module.initialize_buffers()

    def __init__(self, config: CAiDConfig):
        super().__init__(config)
        self.caid = CAiDModel(config)
        objective = objective_class(config.discrimination_method)
        objective.prepare_model(self.caid)  # before the objective copies any of it
        self.objective = objective.from_config(config, self.caid.encoder)
        # Private DDP API: the public broadcast_buffers=False would also stop the broadcast
        # of BatchNorm's running statistics, which the original keeps; only the buffers
        # identical on every rank by construction (MoCo's queue) are left out here.
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, [f"objective.{name}" for name in objective.ignored_buffers])
        self.post_init()
        self.objective.reset(self.caid.encoder)
        self.freeze_unused()

    def freeze_unused(self) -> None:
        """Parameters that must not be trained: the objective's (MoCo's key branch), the
        decoder in ID-only mode.

        DDP raises on trainable parameters without gradients, and ``from_pretrained`` turns
        ``requires_grad`` back on, so this runs after construction and after loading.
        """
        self.objective.freeze()
        train_decoder = self.config.context_prediction
        for p in [*self.caid.decoder.parameters(), *self.caid.segmentation_head.parameters()]:
            p.requires_grad_(train_decoder)

    def optimizer_param_groups(self, fix_predictor_lr: bool = True) -> list[dict]:
        """The trainable parameters as optimizer parameter groups.

        Returns ``[{"name": "model", "params": [...], "fix_lr": False}]`` and, for SimSiam, a
        second group ``{"name": "predictor", "params": [the predictor's], "fix_lr":
        fix_predictor_lr}``. A group with ``fix_lr=True`` is meant to keep its initial learning
        rate (no warm-up, no decay), as SimSiam trains its predictor; the schedule must honour
        the flag (torch optimizers keep extra keys in their groups). Frozen parameters (MoCo's
        key branch, the decoder of the ID-only baseline) are left out.
        """
        predictor = {id(p) for p in self.objective.fixed_lr_parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        groups = [{"name": "model", "params": [p for p in trainable if id(p) not in predictor],
                   "fix_lr": False}]
        if predictor:
            groups.append({"name": "predictor", "fix_lr": fix_predictor_lr,
                           "params": [p for p in trainable if id(p) in predictor]})
        return groups

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Load a pre-training checkpoint, or start pre-training from a published backbone.

        A backbone folder (``CAiDModel``) has no objective: the objective sets up what it
        lacks (:meth:`~caid_hf.objectives.Objective.after_loading`: MoCo copies the loaded
        query branch into its key branch and draws a fresh queue); the heads of every method
        are initialised by ``_init_weights``.
        """
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = {k.removeprefix("objective.") for k in info["missing_keys"]
                   if k.startswith("objective.")}
        model.objective.after_loading(model.caid.encoder, missing)
        model.freeze_unused()
        return (model, info) if want_info else model

    def _reconstruction_loss(self, reconstruction: torch.Tensor, labels: torch.Tensor,
                             name: str) -> torch.Tensor:
        if labels.shape != reconstruction.shape:
            raise ValueError(
                f"{name} must be the reconstruction target {list(reconstruction.shape)} "
                f"([B, 1, H, W] in [0, 1]), got {list(labels.shape)}"
            )
        dtype = torch.promote_types(reconstruction.dtype, torch.float32)
        return F.mse_loss(reconstruction.to(dtype), labels.to(dtype))

    def forward_loss(self, discrimination_loss: torch.Tensor,
                     reconstruction: torch.Tensor | None, labels: torch.Tensor | None,
                     key_reconstruction: torch.Tensor | None = None,
                     key_labels: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CAiD's loss: ``contrastive_weight · L_ID + reconstruction_weight · L_MSE`` (the
        second term only with ``labels``; with a key reconstruction, L_MSE is the mean of
        both views' errors). Returns (loss, L_MSE or None)."""
        c = self.config
        loss = c.contrastive_weight * discrimination_loss
        if reconstruction is None or labels is None:
            return loss, None
        reconstruction_loss = self._reconstruction_loss(reconstruction, labels, "labels")
        if key_reconstruction is not None:
            if key_labels is None:
                raise ValueError("reconstruct_views='both' needs key_labels, the second "
                                 "view's reconstruction target, along with labels")
            key_loss = self._reconstruction_loss(key_reconstruction, key_labels, "key_labels")
            reconstruction_loss = (reconstruction_loss + key_loss) / 2
        return loss + c.reconstruction_weight * reconstruction_loss, reconstruction_loss

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        key_pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        key_labels: torch.Tensor | None = None,
        update_momentum: bool = True,
        **kwargs,
    ) -> CAiDForPreTrainingOutput | tuple:
        """One CAiD step.

        Args:
            pixel_values: first (query) views [B, 3, H, W], float in [0, 1] (distorted in CAiD mode).
            key_pixel_values: second (key) views [B, 3, H, W], float in [0, 1].
            labels: reconstruction target of the first view [B, 1, H, W] in [0, 1] (the view
                undistorted).
            key_labels: the same for the second view; needed with ``reconstruct_views="both"``
                whenever ``labels`` are given.
            update_momentum: MoCo only: in training mode, move the key branch towards the query
                branch before encoding the keys; pass ``False`` for all but the first
                micro-batch of a gradient-accumulation window.

        Raises:
            ValueError: either view is not [B, 3, H, W] with H, W multiples of 32.
        """
        if kwargs:
            raise TypeError(f"CAiDForPreTraining.forward() got unexpected arguments {sorted(kwargs)}")
        # here, not only in caid.encode: MoCo's keys bypass it, and shuffle-BN would report
        # the shape of a sub-batch
        check_pixel_values(pixel_values, self.config)
        check_pixel_values(key_pixel_values, self.config, "key_pixel_values")
        c = self.config
        # query → pooled features [B, C] (and the restored image [B, 1, H, W] in CAiD mode)
        embeddings, reconstruction = self.objective.encode_query(self.caid, pixel_values,
                                                                 c.context_prediction)
        # keys → the objective's loss (MoCo: InfoNCE against the queue, then enqueue)
        result = self.objective(embeddings, key_pixel_values, self.caid.encoder, self.caid.encode,
                                update_momentum)
        key_reconstruction = (self.caid.reconstruct(result.key_features)
                              if c.context_prediction and c.reconstruct_views == "both" else None)
        loss, reconstruction_loss = self.forward_loss(result.loss, reconstruction, labels,
                                                      key_reconstruction, key_labels)
        output = CAiDForPreTrainingOutput(
            loss=loss,
            contrastive_loss=result.loss,
            reconstruction_loss=reconstruction_loss,
            logits=result.logits,
            reconstruction=reconstruction,
            embeddings=embeddings,
            embedding_std=embedding_std(result.projections),
            key_reconstruction=key_reconstruction,
        )
        return output
