"""Cross-process helpers of the objectives: gathers, the shuffle of shuffle-BN, a
differentiable all-reduce and BatchNorm over the global batch.

Every function is a no-op (or the single-process equivalent) when no process group is
initialised, so the same model code runs on one CPU, one GPU or many nodes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


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


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is the sum over ranks of the gradients.

    torch.distributed.nn.functional.all_reduce does the same but is deprecated (a warning on
    every call) in favour of a private module, hence these few lines.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def all_reduce_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks (same shape everywhere), differentiable.

    Each rank back-propagates its own loss; the backward sums those gradients over ranks, so
    every rank's inputs receive the gradient of the sum of all ranks' losses. After DDP
    averages the parameter gradients, a loss that is the same on every rank (computed from
    reduced statistics) gets exactly its single-process gradient, and so does a per-rank mean.
    """
    if world_size() == 1:
        return tensor
    return _AllReduceSum.apply(tensor)


class _GlobalBatchStatistics:
    """BatchNorm whose training-mode statistics are those of the global batch (all ranks).

    torch's SyncBatchNorm refuses CPU tensors, so multi-process CPU (gloo) runs could not
    synchronise; this works on every backend. On one process, and in eval mode, it is plain
    BatchNorm (no collective: evaluation may see uneven batches). Statistics are computed in
    at least fp32, in two passes (mean, then centred squares) for accuracy; running statistics are
    updated as BatchNorm does, with the unbiased global variance.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        count = xf.new_tensor([x.numel() / x.shape[1]])
        sums = all_reduce_with_grad(torch.cat([xf.sum(dims), count]))
        n = sums[-1].detach()
        mean = sums[:-1] / n
        centred = xf - mean.view(shape)
        var = all_reduce_with_grad(centred.square().sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                unbiased = var * n / (n - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return out.to(x.dtype)


class GlobalBatchNorm1d(_GlobalBatchStatistics, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` (same arguments and state-dict keys) over the global batch; [B, C]."""


class GlobalBatchNorm2d(_GlobalBatchStatistics, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same arguments and state-dict keys) over the global batch; [B, C, H, W]."""


def use_global_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` inside ``module`` (in place) by its
    global-batch counterpart holding the same parameters and buffers; returns ``module``.

    State-dict keys are unchanged, so a converted smp encoder still saves as ``smp.Unet``'s.
    """
    for name, child in module.named_children():
        kind = {nn.BatchNorm1d: GlobalBatchNorm1d, nn.BatchNorm2d: GlobalBatchNorm2d}.get(type(child))
        if kind is None:
            use_global_batch_norm(child)
            continue
        new = kind(child.num_features, child.eps, child.momentum, child.affine,
                   child.track_running_stats)
        if child.affine:
            new.weight, new.bias = child.weight, child.bias
        new.running_mean, new.running_var = child.running_mean, child.running_var
        new.num_batches_tracked = child.num_batches_tracked
        new.train(child.training)
        setattr(module, name, new)
    return module
