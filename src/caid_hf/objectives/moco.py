"""MoCo-v2 instance discrimination, the contrastive half of CAiD.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020;
Chen et al., "Improved Baselines with Momentum Contrastive Learning", arXiv:2003.04297.

A query embedding must pick its own key (the other view of the same image, encoded by a
slowly moving momentum copy of the encoder) out of a queue of keys from earlier batches.
Only the encoder and projection head have a momentum copy: CAiD's decoder never sees the
key view (the reference runs it there and discards the result).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import (
    concat_all_gather,
    shuffle_across_ranks,
    unshuffle_across_ranks,
    world_size,
)
from .common import Objective, ObjectiveOutput, global_pool


def build_projection_head(in_features: int, out_features: int, kind: str = "mlp") -> nn.Module:
    """MoCo-v2 ``mlp`` head Linear(C, C) → ReLU → Linear(C, D), or MoCo-v1 ``linear`` Linear(C, D).

    The MLP's state-dict keys (``0.*``, ``2.*``) match the reference's ``encoder_q.fc``.
    """
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(in_features, in_features), nn.ReLU(inplace=True), nn.Linear(in_features, out_features)
        )
    return nn.Linear(in_features, out_features)


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
    own kernel; returns the output and each sub-batch's saved (mean, invstd)."""
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


@dataclass
class MoCoOutput(ObjectiveOutput):
    """As :class:`ObjectiveOutput`; logits: [B, 1 + K] fp32 already divided by T (column 0 =
    positive); projections: [B, D] L2-normalised queries; keys: [B, D] L2-normalised keys of
    this rank's batch."""

    keys: torch.Tensor | None = None


@torch.compiler.disable
def _against_the_queue(q: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
    """``q @ queue`` against a copy of the queue, so the backward uses the keys the loss saw
    after :meth:`MoCoV2.enqueue` has overwritten some. Kept out of torch.compile graphs:
    there the copy was optimised away and the backward read the queue as it stood after
    the enqueue (in fp32, gradients off by up to 0.4 with losses equal; in float64, where
    ``.float()`` copies, right), or failed when a graph break split the two."""
    return q @ queue.clone().float()


class MoCoV2(Objective):
    """MoCo-v2 head, momentum key encoder and queue.

    Args:
        encoder: the query encoder (an smp encoder returning a list of stage features);
            a frozen deep copy becomes the momentum key encoder.
        feature_dim: channels of the deepest stage (2048 for ResNet-50, 512 for ResNet-18).
        projection_dim: embedding dimension D (128).
        queue_size: number of queued keys K (65,536).
        momentum: m of ``key = m * key + (1 - m) * query`` (0.999).
        temperature: T of the logits (0.2).
        head: ``"mlp"`` or ``"linear"``.
        shuffle_bn_splits: sub-batches of the single-process shuffle-BN emulation.
    """

    config_fields = ("discrimination_method", "projection_head", "projection_dim", "queue_size")
    # identical on every rank by construction: DDP must not re-broadcast them
    ignored_buffers = ("queue", "queue_ptr")

    @classmethod
    def from_config(cls, config, encoder: nn.Module) -> MoCoV2:
        return cls(encoder, feature_dim=encoder.out_channels[-1],
                   projection_dim=config.projection_dim, queue_size=config.queue_size,
                   momentum=config.momentum, temperature=config.contrastive_temperature,
                   head=config.projection_head, shuffle_bn_splits=config.shuffle_bn_splits)

    @classmethod
    def check_run(cls, config, per_device_batch_size: int, num_processes: int) -> None:
        splits = config.shuffle_bn_splits
        if num_processes == 1 and per_device_batch_size % splits:
            raise ValueError(
                f"shuffle_bn_splits={splits} must divide per_device_train_batch_size="
                f"{per_device_batch_size}: one process emulates shuffle-BN by encoding the batch "
                "in that many equal parts"
            )
        global_batch = per_device_batch_size * num_processes
        if config.queue_size % global_batch:
            below = config.queue_size // global_batch * global_batch
            above = below + global_batch
            nearest = " or ".join(str(q) for q in (below, above) if q > 0)
            raise ValueError(
                f"queue_size={config.queue_size} must be divisible by the global batch size "
                f"per_device_train_batch_size × processes = {per_device_batch_size} × "
                f"{num_processes} = {global_batch}; the nearest valid queue sizes are {nearest}"
            )

    def query_splits(self) -> int:
        """One process emulates per-device BatchNorm on the queries too (see
        :func:`encode_in_splits`); several processes have real devices."""
        return self.shuffle_bn_splits if self.training and world_size() == 1 else 1

    def reset(self, query_encoder: nn.Module) -> None:
        self.reset_momentum_branch(query_encoder)

    def after_loading(self, query_encoder: nn.Module, missing_keys: set[str]) -> None:
        """A backbone folder has no objective: the key branch becomes a copy of the loaded
        query branch and the queue fresh random keys."""
        if any(k.startswith("momentum_") for k in missing_keys):
            self.reset_momentum_branch(query_encoder)
        if {"queue", "queue_ptr"} & missing_keys:
            self.reset_queue()

    def freeze(self) -> None:
        self.freeze_momentum_branch()

    def __init__(
        self,
        encoder: nn.Module,
        feature_dim: int,
        projection_dim: int = 128,
        queue_size: int = 65536,
        momentum: float = 0.999,
        temperature: float = 0.2,
        head: str = "mlp",
        shuffle_bn_splits: int = 2,
    ):
        super().__init__()
        self.momentum = momentum
        self.temperature = temperature
        self.shuffle_bn_splits = shuffle_bn_splits
        self.projection_head = build_projection_head(feature_dim, projection_dim, head)
        self.momentum_encoder = copy.deepcopy(encoder)
        self.momentum_projection_head = copy.deepcopy(self.projection_head)
        self.register_buffer("queue", F.normalize(torch.randn(projection_dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.freeze_momentum_branch()

    def freeze_momentum_branch(self) -> None:
        """The key branch learns only through :meth:`momentum_update`, never from gradients."""
        for p in self.momentum_parameters():
            p.requires_grad_(False)

    def momentum_parameters(self) -> list[nn.Parameter]:
        return [*self.momentum_encoder.parameters(), *self.momentum_projection_head.parameters()]

    @torch.no_grad()
    def reset_momentum_branch(self, encoder: nn.Module) -> None:
        """Make the key branch an exact copy of the query branch (start of training)."""
        query = [*encoder.parameters(), *self.projection_head.parameters()]
        torch._foreach_copy_(self.momentum_parameters(), query)
        for k, q in zip(self.momentum_encoder.buffers(), encoder.buffers()):
            k.copy_(q)

    @torch.no_grad()
    def reset_queue(self) -> None:
        """Fresh queue: random normal keys, L2-normalised along the feature dimension."""
        self.queue.copy_(F.normalize(torch.randn_like(self.queue), dim=0))
        self.queue_ptr.zero_()

    @torch.no_grad()
    def momentum_update(self, encoder: nn.Module) -> None:
        """key ← m · key + (1 − m) · query for every parameter of encoder and head (buffers untouched)."""
        keys = self.momentum_parameters()
        queries = [*encoder.parameters(), *self.projection_head.parameters()]
        torch._foreach_mul_(keys, self.momentum)
        torch._foreach_add_(keys, queries, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def encode_keys(self, key_pixel_values: torch.Tensor) -> torch.Tensor:
        """Key embeddings [B, D] (fp32, L2-normalised) of the key views [B, 3, H, W], with shuffle-BN."""
        x, splits = key_pixel_values, 1
        shuffled = self.training and world_size() > 1
        if shuffled:
            x, plan = shuffle_across_ranks(x)
        elif self.training and self.shuffle_bn_splits > 1:
            permutation = torch.randperm(x.shape[0], device=x.device)
            # grey views expanded to 3 channels: permute the one channel, expand again
            x = (x[:, :1][permutation].expand_as(x) if x.dim() == 4 and x.stride(1) == 0
                 else x[permutation])
            inverse, splits = torch.argsort(permutation), self.shuffle_bn_splits
        features = encode_in_splits(self.momentum_encoder, x, splits)
        keys = F.normalize(self.momentum_projection_head(global_pool(features[-1])).float(), dim=1)
        if shuffled:
            return unshuffle_across_ranks(keys, plan)
        return keys[inverse] if splits > 1 else keys

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write the keys of all ranks [world * B, D] at the pointer (wrapping around) and advance it."""
        keys = concat_all_gather(keys)
        size = self.queue.shape[1]
        # the pointer stays a tensor: no host sync, and no graph break under torch.compile
        index = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[:, index] = keys.T.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def forward(
        self,
        query_embedding: torch.Tensor,
        key_pixel_values: torch.Tensor,
        query_encoder: nn.Module,
        encode=None,
        update_momentum: bool = True,
    ) -> MoCoOutput:
        """InfoNCE of the queries against their keys and the queue.

        Args:
            query_embedding: pooled query features [B, C] (with gradient).
            key_pixel_values: key views [B, 3, H, W] in [0, 1].
            query_encoder: the query encoder, source of the momentum update.
            encode: unused (the keys come from the momentum encoder).
            update_momentum: move the key branch first (training mode only). With gradient
                accumulation only the first micro-batch of an optimizer step should, or the
                key branch would move ``accumulation`` times per query update.
        In training mode the key branch is first moved towards the query branch and the new
        keys are enqueued after the loss is computed (MoCo's order); eval mode changes nothing.
        """
        if self.training and update_momentum:
            self.momentum_update(query_encoder)
        q = F.normalize(self.projection_head(query_embedding).float(), dim=1)
        k = self.encode_keys(key_pixel_values)
        positive = (q * k).sum(dim=1, keepdim=True)
        negative = _against_the_queue(q, self.queue)
        logits = torch.cat([positive, negative], dim=1) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
        if self.training:
            self.enqueue(k)
        return MoCoOutput(loss=loss, logits=logits, keys=k, projections=q)
