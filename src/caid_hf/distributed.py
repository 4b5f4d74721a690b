"""Cross-process helpers of the objectives: gathers, the shuffle of shuffle-BN, a
differentiable all-reduce and BatchNorm over the global batch.

Every function is a no-op (or the single-process equivalent) when no process group is
initialised, so the same model code runs on one CPU, one GPU or many nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class ShufflePlan:
    """Who sends which images where in one shuffle-BN exchange (see
    :func:`shuffle_across_ranks`); :func:`unshuffle_across_ranks` runs it backwards.

    ``send_order``: this rank's local indices in the order they are sent (grouped by the
    receiving rank); ``send_counts[j]``: how many go to rank j. ``recv_slots``: the slot in
    the shuffled local batch of each received item, in arrival order; ``recv_counts[j]``:
    how many come from rank j. ``permutation``: MoCo's global permutation, drawn on rank 0.
    """

    send_order: torch.Tensor
    send_counts: list[int]
    recv_slots: torch.Tensor
    recv_counts: list[int]
    permutation: torch.Tensor


def shuffle_plan(permutation: torch.Tensor, batch: int, world: int, me: int) -> ShufflePlan:
    """The all-to-all plan of MoCo's shuffle: rank ``r`` ends with the global items
    ``permutation[r*B:(r+1)*B]`` in that order, global item ``g`` being local item
    ``g % B`` of rank ``g // B``."""
    permutation = permutation.cpu()
    position = torch.argsort(permutation)  # position of every global item in the permutation
    mine = torch.arange(me * batch, (me + 1) * batch)
    destination = position[mine] // batch
    send_order = torch.argsort(position[mine])  # by position: grouped by destination, in order
    send_counts = torch.bincount(destination, minlength=world).tolist()
    slots = torch.arange(batch)
    source = permutation[me * batch:(me + 1) * batch] // batch
    # senders send in position order, so arrivals are ordered by (source, slot)
    arrival = torch.argsort(source * batch + slots)
    recv_counts = torch.bincount(source, minlength=world).tolist()
    return ShufflePlan(send_order, send_counts, slots[arrival], recv_counts, permutation)


def _exchange(payload: torch.Tensor, send_counts: list[int], recv_counts: list[int]
              ) -> torch.Tensor:
    """``all_to_all_single`` of rows with uneven splits (gloo and NCCL)."""
    out = payload.new_empty((sum(recv_counts), *payload.shape[1:]))
    dist.all_to_all_single(out, payload.contiguous(), output_split_sizes=recv_counts,
                           input_split_sizes=send_counts)
    return out


def _wire_form(x: torch.Tensor) -> tuple[torch.Tensor, object]:
    """The narrowest exact form of a batch of views for the wire, and how to undo it.

    One channel when all channels are equal (caid-hf's grey views are one channel
    expanded to three); uint8 when every value is exactly ``k / 255`` (views not changed
    by augmentation); else the autocast dtype when autocast is on (the key encoder's first
    convolution would round to it anyway), else the tensor's own dtype.
    """
    channels = x.shape[1] if x.dim() > 1 else 1
    grey = x.dim() == 4 and channels > 1 and (x.stride(1) == 0 or torch.equal(x[:, :1].expand_as(x), x))
    body = x[:, :1] if grey else x
    dtype = x.dtype
    if body.is_floating_point():
        as_bytes = torch.round(body * 255).clamp_(0, 255).to(torch.uint8)
        if torch.equal(as_bytes.to(dtype) / 255, body):
            payload = as_bytes
        elif torch.is_autocast_enabled(x.device.type):
            payload = body.to(torch.get_autocast_dtype(x.device.type))
        else:
            payload = body
    else:
        payload = body

    def restore(received: torch.Tensor) -> torch.Tensor:
        values = received.to(dtype) / 255 if payload.dtype == torch.uint8 and dtype != torch.uint8 \
            else received.to(dtype)
        return values.expand(-1, channels, *values.shape[2:]) if grey else values

    return payload, restore


@torch.no_grad()
def shuffle_across_ranks(x: torch.Tensor) -> tuple[torch.Tensor, ShufflePlan]:
    """MoCo's batch shuffle by one all-to-all: each rank receives only its B images.

    The semantics are MoCo's (``batch_shuffle_ddp``): a permutation of the global batch is
    drawn on rank 0 and broadcast, and rank ``r`` gets the permuted global batch's slice
    ``r`` (so a key is normalised with images of other ranks, never with its query's
    sub-batch statistics alone). Instead of gathering the whole global batch on every rank,
    each rank sends each image straight to the rank that needs it, in the narrowest exact
    form (:func:`_wire_form`: one grey channel, uint8 or the autocast dtype).

    Args:
        x: local batch [B, ...] (same B on every rank).
    Returns:
        (this rank's slice of the permuted global batch [B, ...], the plan that undoes it).
    """
    batch, world, me = x.shape[0], world_size(), rank()
    permutation = torch.randperm(batch * world, device=x.device)
    if world > 1:
        dist.broadcast(permutation, src=0)
    plan = shuffle_plan(permutation, batch, world, me)
    if world == 1:
        return x[permutation.to(x.device)], plan
    payload, restore = _wire_form(x)
    received = _exchange(payload[plan.send_order.to(x.device)], plan.send_counts,
                         plan.recv_counts)
    local = torch.empty_like(received)
    local[plan.recv_slots.to(x.device)] = received
    return restore(local), plan


@torch.no_grad()
def unshuffle_across_ranks(x: torch.Tensor, plan: ShufflePlan) -> torch.Tensor:
    """Undo :func:`shuffle_across_ranks` on its encoded output [B, ...] → [B, ...] (each
    rank's own items back, in their original order; one all-to-all of B rows)."""
    if world_size() == 1:
        return x[torch.argsort(plan.permutation).to(x.device)]
    received = _exchange(x[plan.recv_slots.to(x.device)], plan.recv_counts, plan.send_counts)
    local = torch.empty_like(received)
    local[plan.send_order.to(x.device)] = received
    return local


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
