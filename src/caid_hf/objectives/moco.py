"""MoCo-v2 instance discrimination, the contrastive half of CAiD.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020;
Chen et al., "Improved Baselines with Momentum Contrastive Learning", arXiv:2003.04297.

A query embedding must pick its own key (the other view of the same image, encoded by a
slowly moving momentum copy of the encoder) out of a queue of keys from earlier batches.
Only the encoder and projection head have a momentum copy: CAiD's decoder never sees the
key view (the reference runs it there and discards the result). On one device, MoCo's
shuffle-BN is emulated (:mod:`.shuffle_bn_emulation`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from ..distributed import (
    concat_all_gather,
    shuffle_across_ranks,
    unshuffle_across_ranks,
    world_size,
)
from ..model_settings import DEFAULT_MOMENTUM, DEFAULT_QUEUE_SIZE
from .common import Objective, ObjectiveOutput, global_pool, projection_head
from .info_nce import InfoNCE
from .shuffle_bn_emulation import (
    capture_splits,
    encode_in_splits,
    keys_in_shuffled_splits,
    query_branch_in_splits,
    use_split_batch_norm,
)


@dataclass
class MoCoOutput(ObjectiveOutput):
    """As :class:`ObjectiveOutput`; logits: [B, 1 + K] fp32 already divided by T (column 0 =
    positive); projections: [B, D] L2-normalised queries; keys: [B, D] L2-normalised keys of
    this rank's batch."""

    keys: torch.Tensor | None = None


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
    def prepare_model(cls, caid: nn.Module) -> None:
        """BatchNorms that the one-device shuffle-BN emulation can split (the key branch is
        copied from them); a gradient-checkpointed recomputation replays their splits."""
        use_split_batch_norm(caid)
        caid.recomputation_hooks.append(capture_splits)

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
        """One process emulates per-device BatchNorm on the queries too; several processes
        have real devices."""
        return self.shuffle_bn_splits if self.training and world_size() == 1 else 1

    def encode_query(self, caid: nn.Module, pixel_values: torch.Tensor, reconstruct: bool
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder and decoder see each emulated device's sub-batch alone (one process)."""
        _, embeddings, reconstruction = query_branch_in_splits(
            caid.encode, caid.reconstruct if reconstruct else None, pixel_values,
            self.query_splits(), encoder_norms=caid.encoder, decoder_norms=caid.decoder)
        return embeddings, reconstruction

    def initialize_buffers(self) -> None:
        """A fresh queue of random unit keys."""
        init.copy_(self.queue, F.normalize(torch.randn_like(self.queue), dim=0))
        init.zeros_(self.queue_ptr)

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
        queue_size: int = DEFAULT_QUEUE_SIZE,
        momentum: float = DEFAULT_MOMENTUM,
        temperature: float = 0.2,
        head: str = "mlp",
        shuffle_bn_splits: int = 2,
    ):
        super().__init__()
        self.momentum = momentum
        self.shuffle_bn_splits = shuffle_bn_splits
        # MoCo-v2's MLP Linear(C, C) → ReLU → Linear(C, D), or MoCo-v1's Linear(C, D) (as
        # itself: its keys are weight and bias)
        dims = [feature_dim, projection_dim] if head == "mlp" else [projection_dim]
        self.projection_head = projection_head(feature_dim, dims, batch_norm=False,
                                               last_bias=True)
        if head != "mlp":
            self.projection_head = self.projection_head[0]
        self.criterion = InfoNCE(temperature)
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
        # torch._foreach_* (what torch's own optimizers use): one kernel launch per list
        # instead of one per parameter, as a Python loop of mul_/add_ would be
        torch._foreach_mul_(keys, self.momentum)
        torch._foreach_add_(keys, queries, alpha=1.0 - self.momentum)

    def _keys(self, x: torch.Tensor, splits: int = 1) -> torch.Tensor:
        """Momentum encoder and head → L2-normalised fp32 keys [B, D]."""
        features = encode_in_splits(self.momentum_encoder, x, splits)
        return F.normalize(self.momentum_projection_head(global_pool(features[-1])).float(), dim=1)

    @torch.no_grad()
    def encode_keys(self, key_pixel_values: torch.Tensor) -> torch.Tensor:
        """Key embeddings [B, D] (fp32, L2-normalised) of the key views [B, 3, H, W], with
        shuffle-BN: across processes, or emulated on one."""
        x = key_pixel_values
        if self.training and world_size() > 1:
            shuffled, plan = shuffle_across_ranks(x)
            return unshuffle_across_ranks(self._keys(shuffled), plan)
        if self.training and self.shuffle_bn_splits > 1:
            return keys_in_shuffled_splits(self._keys, x, self.shuffle_bn_splits)
        return self._keys(x)

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
        q = F.normalize(self.projection_head(query_embedding).float(), dim=1)  # [B, D]
        k = self.encode_keys(key_pixel_values)  # [B, D], no gradient
        loss, logits = self.criterion(q, k, self.queue)  # logits [B, 1 + K]
        if self.training:
            self.enqueue(k)
        return MoCoOutput(loss=loss, logits=logits, keys=k, projections=q)
