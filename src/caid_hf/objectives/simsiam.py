"""SimSiam instance discrimination: a Siamese network with a predictor and a stop-gradient.

Chen, He: "Exploring Simple Siamese Representation Learning", CVPR 2021.

Both views go through the same encoder and projector f; a predictor h maps one view's
projection to the other's. The loss is the symmetric negative cosine similarity
``D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2`` with ``p = h(z)``; the stop-gradient ``sg`` on the
target side is what keeps the representation from collapsing (no negatives, no momentum
encoder). SimSiam keeps the predictor's learning rate fixed while the rest decays:
:meth:`caid_hf.CAiDForPreTraining.optimizer_param_groups` marks its parameters for that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import ObjectiveOutput, SymmetricObjective, projection_head


class SimSiamLoss(nn.Module):
    """Symmetric negative cosine similarity with stop-gradient on the targets:
    ``-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2``, averaged over the batch; in [-1, 1], -1 when
    every prediction points at the other view's projection.

    With several processes it is each rank's own batch mean (DDP's gradient average then
    makes it the global mean); no collective is needed, the batch enters only through the
    projector's and predictor's BatchNorms.
    """

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor,
                z2: torch.Tensor) -> torch.Tensor:
        """p1, p2: predictions [B, D] of the two views; z1, z2: their projections [B, D]
        (detached here) → scalar loss (at least fp32)."""
        def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            dtype = torch.promote_types(p.dtype, torch.float32)
            return -F.cosine_similarity(p.to(dtype), z.detach().to(dtype), dim=1).mean()

        return 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)


def build_predictor(dim: int, hidden_dim: int) -> nn.Sequential:
    """SimSiam's predictor h: Linear(d, h) → BatchNorm → ReLU → Linear(h, d) (bias, no norm)."""
    return projection_head(dim, [hidden_dim, dim], last_bias=True)


@dataclass
class SimSiamOutput(ObjectiveOutput):
    """loss: scalar fp32; projections: [B, D] the first view's projector output z1."""



class SimSiam(SymmetricObjective):
    """SimSiam projector, predictor and loss.

    Args:
        feature_dim: channels C of the pooled encoder features (2048 for ResNet-50).
        projector_dims: widths of the projector's linear layers, BatchNorm after each (ReLU
            after all but the last; the output BatchNorm is affine-free, as in SimSiam's
            release); 2048 × 3 in SimSiam.
        predictor_hidden_dim: the predictor's bottleneck, 512 in SimSiam.
    """

    config_fields = ("discrimination_method", "simsiam_projector_dims", "simsiam_predictor_hidden_dim")
    @classmethod
    def from_config(cls, config, encoder: nn.Module) -> SimSiam:
        return cls(encoder.out_channels[-1], config.simsiam_projector_dims,
                   config.simsiam_predictor_hidden_dim)

    def fixed_lr_parameters(self) -> list[nn.Parameter]:
        """SimSiam trains its predictor at a fixed learning rate."""
        return list(self.predictor.parameters())

    def __init__(self, feature_dim: int, projector_dims: list[int] = (2048, 2048, 2048),
                 predictor_hidden_dim: int = 512):
        super().__init__()
        self.projector = projection_head(feature_dim, list(projector_dims), output_norm=True)
        self.predictor = build_predictor(projector_dims[-1], predictor_hidden_dim)
        self.criterion = SimSiamLoss()

    def embeddings_loss(self, embedding: torch.Tensor, key_embedding: torch.Tensor
                        ) -> SimSiamOutput:
        """Pooled features [B, C] of the first and second views (with gradient) → loss."""
        z1, z2 = self.projector(embedding), self.projector(key_embedding)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return SimSiamOutput(loss=self.criterion(p1, p2, z1, z2), projections=z1)
