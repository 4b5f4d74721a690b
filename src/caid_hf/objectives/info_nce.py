"""InfoNCE against a queue of keys, MoCo's loss (van den Oord et al. 2018; He et al. 2020).

Each query [B, D] must pick its own key [B, D] (the positive, logit column 0) out of the
queue's K keys [D, K] (the negatives): cross-entropy over the B × (1 + K) logits, all
L2-normalised vectors, divided by the temperature T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.compiler.disable
def _against_the_queue(q: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
    """``q @ queue`` against a copy of the queue, so the backward uses the keys the loss saw
    after the queue has been overwritten by the enqueue that follows the loss. Kept out of
    torch.compile graphs: there the copy was optimised away and the backward read the queue
    as it stood after the enqueue (in fp32, gradients off by up to 0.4 with losses equal;
    in float64, where ``.float()`` copies, right), or failed when a graph break split the
    two."""
    return q @ queue.clone().float()


class InfoNCE(nn.Module):
    """``forward(q, k, queue)`` → (loss, logits): q, k [B, D] and queue [D, K] L2-normalised;
    logits [B, 1 + K] fp32, already divided by ``temperature``, column 0 the positive."""

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        self.temperature = temperature

    def forward(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        positive = (q * k).sum(dim=1, keepdim=True)
        logits = torch.cat([positive, _against_the_queue(q, queue)], dim=1) / self.temperature
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, target), logits
