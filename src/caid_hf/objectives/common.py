"""What every instance-discrimination objective shares: the protocol
:class:`CAiDForPreTraining <caid_hf.CAiDForPreTraining>` speaks to them, their output, the
one projection-head builder, global pooling and the collapse indicator they report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import GlobalBatchNorm1d, use_global_batch_norm
from ..modeling_caid import global_pool


@dataclass
class ObjectiveOutput:
    """loss: scalar fp32; projections: [B, D] the first view's projections (the collapse
    indicator is computed on them); logits: MoCo's [B, 1 + K] (None for the others);
    key_features: the second view's encoder stages when the objective encoded it with the
    query encoder (Barlow Twins, SimSiam), for its reconstruction; None otherwise."""

    loss: torch.Tensor
    projections: torch.Tensor
    logits: torch.Tensor | None = None
    key_features: list[torch.Tensor] | None = None


class Objective(nn.Module):
    """The small interface of an instance-discrimination objective.

    Subclasses set ``config_fields`` (the configuration fields whose change makes a saved
    objective unusable), and, as needed, ``reconstructs_key_view`` (the key view goes
    through the query encoder, so the U-Net can reconstruct it too) and ``ignored_buffers``
    (buffers identical on every process by construction, which DDP must not broadcast).
    They implement :meth:`from_config` and :meth:`forward`; the other hooks (how the
    backbone's layers are prepared, how the query branch runs, what happens at
    initialisation, loading and freezing) default to the plain behaviour.
    """

    config_fields: ClassVar[tuple[str, ...]] = ()
    reconstructs_key_view: ClassVar[bool] = False
    ignored_buffers: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def prepare_model(cls, caid: nn.Module) -> None:
        """Adapt the backbone's layers before the objective is built (default: nothing)."""

    @classmethod
    def from_config(cls, config, encoder: nn.Module) -> Objective:
        """The objective of ``config`` for the query ``encoder`` (an smp encoder)."""
        raise NotImplementedError

    @classmethod
    def check_run(cls, config, per_device_batch_size: int, num_processes: int) -> None:
        """Refuse, before any compute, a run this objective cannot train (ValueError)."""

    def initialize_buffers(self) -> None:
        """Fill the objective's buffers at weight initialisation (default: nothing)."""

    def encode_query(self, caid: nn.Module, pixel_values: torch.Tensor, reconstruct: bool
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The query branch: pooled features [B, C] of the first views and, with
        ``reconstruct``, the U-Net's restored image [B, 1, H, W] (else None)."""
        features = caid.encode(pixel_values)
        return global_pool(features[-1]), caid.reconstruct(features) if reconstruct else None

    def forward(self, query_embedding: torch.Tensor, key_pixel_values: torch.Tensor,
                query_encoder: nn.Module, encode: Callable[[torch.Tensor], list[torch.Tensor]],
                update_momentum: bool = True) -> ObjectiveOutput:
        """The loss of the pooled query features [B, C] (with gradient) against the key
        views [B, 3, H, W]; ``encode`` runs the query encoder (stages), ``query_encoder`` is
        the encoder itself (MoCo's momentum source)."""
        raise NotImplementedError

    def reset(self, query_encoder: nn.Module) -> None:
        """Start of training, after the weights are initialised."""

    def after_loading(self, query_encoder: nn.Module, missing_keys: set[str]) -> None:
        """After ``from_pretrained``: set up what the checkpoint did not hold (``missing_keys``
        relative to the objective)."""

    def freeze(self) -> None:
        """Parameters that must not be trained (after construction and after loading)."""

    def fixed_lr_parameters(self) -> list[nn.Parameter]:
        """Parameters that keep their initial learning rate (SimSiam's predictor)."""
        return []


class SymmetricObjective(Objective):
    """An objective whose two views both go through the query encoder (Barlow Twins,
    SimSiam): the key view is encoded with ``encode``, its features come back for its
    reconstruction, and every BatchNorm of the model normalises over the global batch when
    several processes train (SyncBatchNorm semantics, as the originals convert their whole
    model: a multi-process step then equals a one-process step on the global batch).
    Subclasses implement :meth:`embeddings_loss`."""

    reconstructs_key_view = True

    @classmethod
    def prepare_model(cls, caid: nn.Module) -> None:
        use_global_batch_norm(caid)

    def forward(self, query_embedding: torch.Tensor, key_pixel_values: torch.Tensor,
                query_encoder: nn.Module, encode: Callable[[torch.Tensor], list[torch.Tensor]],
                update_momentum: bool = True) -> ObjectiveOutput:
        key_features = encode(key_pixel_values)
        output = self.embeddings_loss(query_embedding, global_pool(key_features[-1]))
        output.key_features = key_features
        return output

    def embeddings_loss(self, embedding: torch.Tensor, key_embedding: torch.Tensor
                        ) -> ObjectiveOutput:
        """Pooled features [B, C] of the first and second views (with gradient) → loss."""
        raise NotImplementedError


def projection_head(in_features: int, dims: list[int], batch_norm: bool = True,
                    output_norm: bool = False, last_bias: bool = False) -> nn.Module:
    """The projection heads (and SimSiam's predictor) of every method: Linear layers of
    output widths ``dims``, each but the last followed by (with ``batch_norm``) a BatchNorm,
    then a ReLU; with ``output_norm`` the last is followed by an affine-free BatchNorm.

    A Linear followed by a BatchNorm has no bias (the BatchNorm would remove it), nor has
    the last unless ``last_bias`` (Barlow Twins' loss standardises it away). The BatchNorms
    use the global batch when several processes train
    (:class:`~caid_hf.distributed.GlobalBatchNorm1d`). MoCo-v2's head is ``batch_norm=False,
    last_bias=True`` (keys ``0.*``, ``2.*`` as the original's ``encoder_q.fc``).
    """
    layers: list[nn.Module] = []
    for i, width in enumerate(dims):
        last = i == len(dims) - 1
        layers.append(nn.Linear(in_features, width, bias=last_bias if last else not batch_norm))
        if not last:
            layers += [GlobalBatchNorm1d(width)] if batch_norm else []
            layers.append(nn.ReLU(inplace=True))
        elif output_norm:
            layers.append(GlobalBatchNorm1d(width, affine=False))
        in_features = width
    return nn.Sequential(*layers)


@torch.no_grad()
def embedding_std(embeddings: torch.Tensor) -> torch.Tensor:
    """Collapse indicator of SimSiam (Chen & He, CVPR 2021, section 4.1): the mean over
    dimensions of the per-dimension standard deviation, across the batch, of the
    L2-normalised embeddings.

    Args:
        embeddings: [B, D] (any float dtype).
    Returns:
        detached fp32 scalar: about 1/sqrt(D) for embeddings spread over the sphere, 0 when
        all collapse to one vector. Bessel-corrected; a one-image batch has no spread (0).
    """
    z = F.normalize(embeddings.float(), dim=1)
    return z.std(dim=0, correction=1 if z.shape[0] > 1 else 0).mean()
