"""Instance-discrimination objectives, one module per method: ``moco.py`` (MoCo-v2),
``barlow_twins.py`` and ``simsiam.py``.

Each objective turns the pooled encoder features of the views into its loss and the first
view's projections. Shared here: the BatchNorm MLP of the projectors and the collapse
indicator every method reports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import GlobalBatchNorm1d


def batch_norm_mlp(in_features: int, dims: list[int], output_norm: bool) -> nn.Sequential:
    """Linear layers of output widths ``dims``, each but the last followed by BatchNorm + ReLU;
    with ``output_norm`` the last is followed by an affine-free BatchNorm.

    No Linear has a bias: each is followed by a BatchNorm, or (Barlow Twins' last layer) by
    the loss's standardisation, which would remove it. The BatchNorms use the global batch
    when several processes train (:class:`~caid_hf.distributed.GlobalBatchNorm1d`).
    """
    layers: list[nn.Module] = []
    for i, width in enumerate(dims):
        layers.append(nn.Linear(in_features, width, bias=False))
        if i < len(dims) - 1:
            layers += [GlobalBatchNorm1d(width), nn.ReLU(inplace=True)]
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
