"""Cross-process helpers of the objectives: gathers and the shuffle of shuffle-BN.

Every function is a no-op (or the single-process equivalent) when no process group is
initialised, so the same model code runs on one CPU, one GPU or many nodes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of processes in the default group (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """Rank of this process (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [B, ...] of every rank along dim 0 → [world * B, ...], rank order.

    No gradient flows through the gather; every rank must pass the same shape.
    """
    n = world_size()
    if n == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(n)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def shuffle_across_ranks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's batch shuffle: gather the global batch, permute it, hand each rank a slice.

    Args:
        x: local batch [B, ...] (same B on every rank).
    Returns:
        (local slice of the permuted global batch [B, ...], the inverse permutation [world * B]).
        The permutation is drawn on rank 0 and broadcast, so every rank agrees.
    """
    gathered = concat_all_gather(x)
    total = gathered.shape[0]
    permutation = torch.randperm(total, device=x.device)
    if world_size() > 1:
        dist.broadcast(permutation, src=0)
    inverse = torch.argsort(permutation)
    local = permutation.view(world_size(), -1)[rank()]
    return gathered[local], inverse


@torch.no_grad()
def unshuffle_across_ranks(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Undo :func:`shuffle_across_ranks` on its encoded output [B, ...] → [B, ...]."""
    gathered = concat_all_gather(x)
    local = inverse.view(world_size(), -1)[rank()]
    return gathered[local]
