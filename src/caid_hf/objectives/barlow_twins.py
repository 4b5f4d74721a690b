"""Barlow Twins instance discrimination by redundancy reduction.

Zbontar, Jing, Misra, LeCun, Deny: "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction", ICML 2021.

Both views go through the same encoder and projector; the cross-correlation matrix of their
batch-standardised projections is pushed towards the identity: its diagonal to 1 (the
embedding is invariant to the distortions), its off-diagonal to 0 (its dimensions are
decorrelated). No negatives, no momentum encoder, no stop-gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import GlobalBatchNorm1d, all_reduce_with_grad, world_size
from .common import ObjectiveOutput, SymmetricObjective, projection_head


class BarlowTwinsLoss(nn.Module):
    """``sum_i (1 - c_ii)^2 + off_diagonal_weight * sum_{i != j} c_ij^2``, with ``c`` the
    cross-correlation of the two views' projections standardised over the batch.

    The standardisation is an affine-free BatchNorm (biased variance, ``eps`` 1e-5) with batch
    statistics in training and evaluation alike. When several processes train, it and ``c``
    use the global batch: ``c`` is summed over ranks (differentiably) and divided by the global
    batch size, so the loss (equal on every rank) and its gradient are those of one process
    holding the whole batch. Computed in fp32 (or fp64) with autocast off.

    Args:
        dim: width D of the projections.
        off_diagonal_weight: λ, 0.0051 in Barlow Twins (about 1/D for D = 8192 and ~ 0.005 on
            smaller projectors).
    """

    def __init__(self, dim: int, off_diagonal_weight: float = 0.0051):
        super().__init__()
        self.off_diagonal_weight = off_diagonal_weight
        self.standardise = GlobalBatchNorm1d(dim, affine=False, track_running_stats=False)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """z1, z2: projections [B, D] of the first and second views (row b of each: one image)
        → scalar loss (at least fp32)."""
        with torch.autocast(z1.device.type, enabled=False):
            dtype = torch.promote_types(z1.dtype, torch.float32)
            a1, a2 = self.standardise(z1.to(dtype)), self.standardise(z2.to(dtype))
            batch = torch.tensor(float(z1.shape[0]), dtype=dtype, device=z1.device)
            if self.training and world_size() > 1:
                batch = all_reduce_with_grad(batch)
                c = all_reduce_with_grad(a1.T @ a2) / batch
            else:
                c = a1.T @ a2 / batch
            on_diagonal = (1 - c.diagonal()).square().sum()
            off_diagonal = c.square().sum() - c.diagonal().square().sum()
            return on_diagonal + self.off_diagonal_weight * off_diagonal


@dataclass
class BarlowTwinsOutput(ObjectiveOutput):
    """loss: scalar fp32; projections: [B, D] the first view's projections as the loss sees
    them, standardised over this process's batch (detached; the analogue of SimSiam's
    output-BatchNorm projections, on which the collapse indicator is defined)."""



class BarlowTwins(SymmetricObjective):
    """Barlow Twins projector and loss.

    Args:
        feature_dim: channels C of the pooled encoder features (2048 for ResNet-50).
        projector_dims: widths of the projector's linear layers, BatchNorm + ReLU between
            them; 8192 × 3 in Barlow Twins.
        off_diagonal_weight: λ of :class:`BarlowTwinsLoss`.
    """

    config_fields = ("discrimination_method", "barlow_projector_dims")
    @classmethod
    def from_config(cls, config, encoder: nn.Module) -> BarlowTwins:
        return cls(encoder.out_channels[-1], config.barlow_projector_dims,
                   config.barlow_off_diagonal_weight)

    def __init__(self, feature_dim: int, projector_dims: list[int] = (8192, 8192, 8192),
                 off_diagonal_weight: float = 0.0051):
        super().__init__()
        self.projector = projection_head(feature_dim, list(projector_dims))
        self.criterion = BarlowTwinsLoss(projector_dims[-1], off_diagonal_weight)

    def embeddings_loss(self, embedding: torch.Tensor, key_embedding: torch.Tensor
                        ) -> BarlowTwinsOutput:
        """Pooled features [B, C] of the first and second views (with gradient) → loss."""
        z1, z2 = self.projector(embedding), self.projector(key_embedding)
        # the raw projections carry a common offset that the loss ignores (and that would
        # read as a false collapse); standardised locally, without another collective
        standardised = F.batch_norm(z1.detach().float(), None, None, training=True)
        return BarlowTwinsOutput(loss=self.criterion(z1, z2), projections=standardised)
