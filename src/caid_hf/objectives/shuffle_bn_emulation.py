"""One-process shuffle-BN: MoCo's cross-device BatchNorm behaviour on a single device.

MoCo computes BatchNorm statistics per device, and shuffles the key batch across devices
so that a query and its key are never normalised with the same images (else the model
could cheat through the batch statistics). One process has one device, so here the batch
is cut into ``shuffle_bn_splits`` consecutive sub-batches, each normalised with its own
statistics as if it were on its own device, and the key batch is permuted before it is cut
(a key then lands in its query's sub-batch with probability 1 / splits, as in MoCo).

Everything MoCo needs goes through three calls: :func:`use_split_batch_norm` (once, on the
model), :func:`query_branch_in_splits` (the query encoder and decoder) and
:func:`keys_in_shuffled_splits` (the key encoder). :func:`capture_splits` lets a
gradient-checkpointed recomputation see the sub-batches its first pass saw.

Inside, every ``nn.BatchNorm2d`` becomes a :class:`SplitBatchNorm2d` (same parameters,
buffers and state-dict keys) whose ``splits`` is set around a forward; the convolutions run
once on the whole batch and only the BatchNorms normalise their sub-batches, with torch's
own kernels. Outputs, gradients and running statistics equal running each sub-batch alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from .common import global_pool


class SplitBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers and state-dict keys) that, in training
    mode with ``splits > 1``, normalises ``splits`` consecutive sub-batches each with its own
    statistics, as ``splits`` devices would, inside one pass of the network.

    The convolutions then run once on the whole batch (not once per sub-batch, which made
    the one-process emulation of shuffle-BN cost a pass per sub-batch); only each
    BatchNorm runs on its sub-batches, with torch's own kernel, and their outputs are
    joined. Outputs, gradients and running statistics equal running the module on each
    sub-batch in turn (running statistics are updated once per sub-batch, in order).
    ``splits`` is set around a forward by :func:`batch_norm_splits`; it is 1 otherwise.
    """

    splits = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        splits = min(self.splits, x.shape[0])
        if splits <= 1 or not self.training or not self.track_running_stats:
            return super().forward(x)
        self._check_input_dim(x)
        # what nn.BatchNorm2d does once per call, once per sub-batch
        if self.momentum is None:  # cumulative average: a factor per sub-batch's count
            done = int(self.num_batches_tracked)
            factors = [1.0 / (done + k) for k in range(1, splits + 1)]
        else:
            factors = [self.momentum] * splits
        self.num_batches_tracked.add_(splits)
        args = (self.weight, self.bias, self.running_mean, self.running_var, splits, factors,
                self.eps)
        if _traced():  # traceable ops, one update of each buffer
            return _split_batch_norm_composite(x, *args)
        if torch.is_grad_enabled() and (x.requires_grad or (
                self.weight is not None and self.weight.requires_grad)):
            return _SplitBatchNorm.apply(x, *args)
        return _split_batch_norm(x, *args)[0]  # no gradient (the key encoder): no autograd node


def _traced() -> bool:
    """Whether torch.compile is tracing (one place, so tests can take the traced path
    eagerly)."""
    return torch.compiler.is_compiling()


def _split_batch_norm(x, weight, bias, running_mean, running_var, splits, factors, eps):
    """Training-mode BatchNorm of ``splits`` consecutive sub-batches of ``x`` with torch's
    own kernel; returns the output and each sub-batch's saved (mean, invstd).

    ``torch.ops.aten.native_batch_norm`` (and its backward) rather than the public
    ``F.batch_norm`` per sub-batch: the public call gives no saved statistics for one
    backward node over all sub-batches, so slicing the input makes autograd add up one
    zero-padded full-size gradient per sub-batch (the emulation's cost either way is in
    benchmarks/RESULTS.md, one-process shuffle-BN emulation)."""
    saved = []
    if x.device.type == "cpu":
        # each sub-batch is normalised straight into its slice of the output (the slices
        # of a batch are contiguous in either memory format)
        out = torch.empty_like(x)
        for part, factor, into in zip(x.tensor_split(splits), factors, out.tensor_split(splits)):
            # CPU kernels keep their statistics in the running statistics' dtype
            mean, invstd = running_mean.new_empty(running_mean.shape), running_mean.new_empty(
                running_mean.shape)
            torch.ops.aten.native_batch_norm.out(
                part, weight, bias, running_mean, running_var, True, factor, eps,
                out=into, save_mean=mean, save_invstd=invstd)
            saved += [mean, invstd]
        return out, saved
    outputs = []
    for part, factor in zip(x.tensor_split(splits), factors):
        part_out, mean, invstd = torch.ops.aten.native_batch_norm(
            part, weight, bias, running_mean, running_var, True, factor, eps)
        outputs.append(part_out)
        saved += [mean, invstd]
    return torch.cat(outputs, dim=0), saved


def _split_batch_norm_composite(x, weight, bias, running_mean, running_var, splits, factors,
                                eps):
    """:func:`_split_batch_norm`'s output and running statistics from elementwise and
    reduction ops (autograd gives the gradient), for ``torch.compile``: the kernel path
    updates each running statistic once per sub-batch in place, and inductor rejects such
    chained in-place updates of one buffer in a graph (an AssertionError on ``copy_``,
    torch 2.14.1). Here the sub-batches' updates are folded into one ``copy_`` per buffer.
    Statistics are computed in float32 at least, as the kernel does."""
    outputs = []
    new_mean, new_var = running_mean, running_var
    dtype = torch.promote_types(x.dtype, torch.float32)
    for part, factor in zip(x.tensor_split(splits), factors):
        values = part.to(dtype)
        var, mean = torch.var_mean(values, dim=(0, 2, 3), correction=0)
        scale = torch.rsqrt(var + eps)
        if weight is not None:
            scale = scale * weight.to(dtype)
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias.to(dtype)
        outputs.append((values * scale[:, None, None] + shift[:, None, None]).to(x.dtype))
        count = part.numel() // part.shape[1]
        with torch.no_grad():
            new_mean = new_mean * (1 - factor) + mean.to(new_mean.dtype) * factor
            new_var = new_var * (1 - factor) + (var * (count / max(count - 1, 1))).to(
                new_var.dtype) * factor
    with torch.no_grad():
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
    return torch.cat(outputs, dim=0)


class _SplitBatchNorm(torch.autograd.Function):
    """:func:`_split_batch_norm` with its gradient (``native_batch_norm_backward`` per
    sub-batch). Written as one autograd node so that the sub-batches' input gradients are
    joined once (torch has no kernel that writes an input gradient into a slice: the
    ``out=`` form computes, then copies), where slicing the input would make autograd add up one zero-padded
    full-size gradient per sub-batch."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, splits, factors, eps):
        out, saved = _split_batch_norm(x, weight, bias, running_mean, running_var, splits,
                                       factors, eps)
        ctx.splits, ctx.eps = splits, eps
        ctx.save_for_backward(x, weight, running_mean, running_var, *saved)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, running_mean, running_var, *saved = ctx.saved_tensors
        needs = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                 weight is not None and ctx.needs_input_grad[2]]
        grads_x, grad_weight, grad_bias = [], None, None
        # on the CPU each sub-batch's input gradient goes into its slice of one tensor
        # (torch.cat of the sub-batches' gradients measured slower in channels_last)
        joined = torch.empty_like(x) if needs[0] and x.device.type == "cpu" else None
        slices = joined.tensor_split(ctx.splits) if joined is not None else None
        grad = grad.contiguous(memory_format=_memory_format(x))
        for k, (part, grad_part) in enumerate(zip(x.tensor_split(ctx.splits),
                                                  grad.tensor_split(ctx.splits))):
            if slices is not None:
                gx = slices[k]
                gw = running_mean.new_empty(running_mean.shape if needs[1] else 0)
                gb = running_mean.new_empty(running_mean.shape if needs[2] else 0)
                torch.ops.aten.native_batch_norm_backward.out(
                    grad_part, part, weight, running_mean, running_var, saved[2 * k],
                    saved[2 * k + 1], True, ctx.eps, needs, out0=gx, out1=gw, out2=gb)
            else:
                gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                    grad_part, part, weight, running_mean, running_var, saved[2 * k],
                    saved[2 * k + 1], True, ctx.eps, needs)
                grads_x.append(gx)
            if needs[1]:
                grad_weight = gw if grad_weight is None else grad_weight.add_(gw)
            if needs[2]:
                grad_bias = gb if grad_bias is None else grad_bias.add_(gb)
        grad_x = joined if joined is not None else (
            torch.cat(grads_x, dim=0) if needs[0] else None)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return (torch.channels_last if x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)


def use_split_batch_norm(module: nn.Module) -> nn.Module:
    """Turn every ``nn.BatchNorm2d`` inside ``module`` into a :class:`SplitBatchNorm2d` in
    place (the same object, parameters and buffers; only its class changes), so
    :func:`batch_norm_splits` can split it; returns ``module``."""
    # A class swap, not new modules: the layer objects, and what holds them (the encoder's
    # stages, a deep copy made later for MoCo's key branch, hooks), stay the same; building
    # a SplitBatchNorm2d per layer and copying its state (the public way) would replace
    # every object a caller may already hold.
    for child in module.modules():
        if type(child) is nn.BatchNorm2d:
            child.__class__ = SplitBatchNorm2d
    return module


@contextlib.contextmanager
def batch_norm_splits(module: nn.Module, splits: int):
    """Within the block, every :class:`SplitBatchNorm2d` of ``module`` normalises
    ``splits`` consecutive sub-batches separately."""
    norms = [m for m in module.modules() if isinstance(m, SplitBatchNorm2d)]
    for m in norms:
        m.splits = splits
    try:
        yield
    finally:
        for m in norms:
            m.splits = 1


def query_in_one_pass(x: torch.Tensor) -> bool:
    """Whether the one-process emulation runs the query branch (encoder and decoder, with
    gradient) in one pass with split BatchNorms, or once per sub-batch; the result is the
    same (fp32, 1e-6). The key encoder, without gradient, always runs in one pass.

    On the CPU, once per sub-batch: the one pass must join every BatchNorm's per-sub-batch
    input gradients with a copy (torch has no backward kernel writing into a slice), which
    measured 3.5–5.6 % of a step at ResNet-18, 128 px, batch 32, while sub-batch passes
    join nothing in the backward and their half-batch convolutions cost no more
    (``benchmarks/RESULTS.md``). Elsewhere (GPUs, where a halved batch leaves the device
    less to do) in one pass; and in one pass under ``torch.compile`` on any device: passes
    per sub-batch update each BatchNorm's running statistics several times in one graph,
    which inductor rejects (an AssertionError on chained ``copy_``, torch 2.14.1).
    """
    return x.device.type != "cpu" or _traced()


def query_branch_in_splits(encode, reconstruct, x: torch.Tensor, splits: int,
                           encoder_norms: nn.Module | None = None,
                           decoder_norms: nn.Module | None = None,
                           ) -> tuple[list[torch.Tensor] | None, torch.Tensor, torch.Tensor | None]:
    """The query branch of the one-process emulation: ``encode`` (image → stages) and, when
    ``reconstruct`` is given, the decoder, each emulated device's sub-batch with its own
    BatchNorm statistics. Returns (the stages for the whole batch, or None when the
    sub-batches ran separately; the pooled embeddings [B, C]; the reconstruction or None).

    One pass (:func:`encode_in_splits`, :func:`reconstruct_in_splits`) where
    :func:`query_in_one_pass`; otherwise each sub-batch runs encoder and decoder alone and
    only the embeddings and reconstructions are joined (their gradients then split by
    views, without a copy).
    """
    if splits > 1 and x.shape[0] >= 2 and not query_in_one_pass(x):
        parts = [encode(part) for part in x.tensor_split(min(splits, x.shape[0]))]
        embeddings = torch.cat([global_pool(stages[-1]) for stages in parts], dim=0)
        reconstruction = (torch.cat([reconstruct(stages) for stages in parts], dim=0)
                          if reconstruct is not None else None)
        return None, embeddings, reconstruction
    features = encode_in_splits(encode, x, splits, norms=encoder_norms)
    reconstruction = (reconstruct_in_splits(reconstruct, features, splits, norms=decoder_norms)
                      if reconstruct is not None else None)
    return features, global_pool(features[-1]), reconstruction


def _splittable(module: nn.Module | None) -> bool:
    return module is not None and any(isinstance(m, SplitBatchNorm2d) for m in module.modules())


def encode_in_splits(encoder, x: torch.Tensor, splits: int,
                     norms: nn.Module | None = None) -> list[torch.Tensor]:
    """Encode ``x`` with every BatchNorm computing ``splits`` consecutive sub-batches'
    statistics separately, as on ``splits`` devices (the one-process emulation of
    multi-device BatchNorm), and return each stage for the whole batch.

    ``encoder`` is an smp encoder (or a function like ``CAiDModel.encode``), ``norms`` the
    module holding its BatchNorms (default: ``encoder`` itself). When those are
    :class:`SplitBatchNorm2d`, the network runs once and only the BatchNorms split
    (a gradient-checkpointed recomputation sees the same splits, see
    ``CAiDModel._checkpointed``); otherwise the encoder runs once per sub-batch, with the
    same result.
    """
    norms = norms if norms is not None else (encoder if isinstance(encoder, nn.Module) else None)
    if splits <= 1 or x.shape[0] < 2:
        return encoder(x)
    if _splittable(norms):
        with batch_norm_splits(norms, splits):
            return encoder(x)
    chunks = [encoder(part) for part in x.tensor_split(min(splits, x.shape[0]))]
    return [torch.cat(stage, dim=0) for stage in zip(*chunks)]


def reconstruct_in_splits(reconstruct, features: list[torch.Tensor], splits: int,
                          norms: nn.Module | None = None) -> torch.Tensor:
    """Run the decoder (``reconstruct``: encoder stages → image) with the same ``splits``
    consecutive sub-batches as :func:`encode_in_splits`, so the decoder's BatchNorm also
    normalises each emulated device's images alone, as the multi-process original does
    (one pass when ``norms``, the decoder, holds :class:`SplitBatchNorm2d`)."""
    batch = features[0].shape[0]
    if splits <= 1 or batch < 2:
        return reconstruct(features)
    # One pass with split BatchNorms; a pass per sub-batch (same result) would slice the
    # encoder features, and autograd would add up one zero-padded full-size gradient per
    # slice (measured in benchmarks/RESULTS.md).
    if _splittable(norms):
        with batch_norm_splits(norms, splits):
            return reconstruct(features)
    parts = zip(*(stage.tensor_split(min(splits, batch)) for stage in features))
    return torch.cat([reconstruct(list(part)) for part in parts], dim=0)


def keys_in_shuffled_splits(encode: Callable[[torch.Tensor, int], torch.Tensor],
                            x: torch.Tensor, splits: int) -> torch.Tensor:
    """``encode(x[permutation], splits)`` (rows: keys of the permuted views, normalised in
    ``splits`` sub-batches) with its rows put back in ``x``'s order: MoCo's shuffle-BN on one
    device. Grey views expanded to 3 channels are permuted on their one channel."""
    permutation = torch.randperm(x.shape[0], device=x.device)
    x = (x[:, :1][permutation].expand_as(x) if x.dim() == 4 and x.stride(1) == 0
         else x[permutation])
    return encode(x, splits)[torch.argsort(permutation)]


def capture_splits(module: nn.Module) -> Callable[[], contextlib.AbstractContextManager]:
    """The sub-batch counts ``module``'s split BatchNorms have now, as a context manager
    factory that sets them again (for a gradient-checkpointed recomputation, which runs
    after :func:`batch_norm_splits` has reset them)."""
    norms = [m for m in module.modules() if isinstance(m, SplitBatchNorm2d)]
    captured = [m.splits for m in norms]

    @contextlib.contextmanager
    def replay():
        before = [m.splits for m in norms]
        try:
            for m, value in zip(norms, captured):
                m.splits = value
            yield
        finally:
            for m, value in zip(norms, before):
                m.splits = value

    return replay
