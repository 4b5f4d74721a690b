"""Gradient checkpointing of the CAiD models: same loss, gradients and BatchNorm state as
without it (fp32, small images: the 512 px memory saving is measured in
benchmarks/RESULTS.md), and the transformers switch round-trips."""

from __future__ import annotations

import copy

import pytest
import torch

from caid_hf import (
    CAiDConfig,
    CAiDForImageClassification,
    CAiDForPreTraining,
    CAiDForSemanticSegmentation,
    CAiDModel,
)
from caid_hf.performance import enable_gradient_checkpointing

pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")


def _config(**overrides) -> CAiDConfig:
    return CAiDConfig(encoder_name="resnet18", image_size=64, queue_size=32, projection_dim=16,
                      **overrides)


def _images(seed: int = 0, batch: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(batch, c, 64, 64, generator=g) for c in (3, 3, 1))


def _saved_bytes(loss_fn) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of ``loss_fn()``."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn()
    return total


def _assert_same_step(plain: torch.nn.Module, checkpointed: torch.nn.Module, run) -> None:
    """``run(model)`` → loss on two models with identical weights and BatchNorm state:
    losses, every parameter's gradient (1e-5) and every buffer afterwards must agree."""
    torch.manual_seed(1)
    loss_a = run(plain)
    loss_a.backward()
    torch.manual_seed(1)
    loss_b = run(checkpointed)
    loss_b.backward()
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-5)
    graded = 0
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-5, msg=name)
            graded += 1
    assert graded > 0
    # BatchNorm running statistics moved once per forward, as without checkpointing
    for (name, a), b in zip(plain.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def test_caid_model_gradients_match_without_checkpointing():
    plain = CAiDModel(_config()).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    x, _, target = _images()

    def run(model):
        out = model(x)
        return torch.nn.functional.mse_loss(out.reconstruction, target) + out.pooler_output.square().mean()

    _assert_same_step(plain, checkpointed, run)
    assert plain.encoder.bn1.num_batches_tracked.item() == 1
    assert checkpointed.encoder.bn1.num_batches_tracked.item() == 1


@pytest.mark.parametrize("method", ["moco_v2", "simsiam"])
def test_pretraining_gradients_match_without_checkpointing(method):
    # MoCo's shuffle-BN emulation encodes the queries in 2 sub-batches, each checkpointed
    plain = CAiDForPreTraining(_config(discrimination_method=method)).train()
    checkpointed = copy.deepcopy(plain)
    enable_gradient_checkpointing(checkpointed)
    q, k, target = _images()

    def run(model):
        return model(q, k, labels=target).loss

    _assert_same_step(plain, checkpointed, run)
    # two BatchNorm passes per step (MoCo: 2 query sub-batches; SimSiam: 2 views), not four
    assert checkpointed.caid.encoder.layer3[0].bn1.num_batches_tracked.item() == 2


def test_checkpointing_keeps_fewer_activations():
    model = CAiDForPreTraining(_config()).train()
    q, k, target = _images()
    plain = _saved_bytes(lambda: model(q, k, labels=target).loss)
    enable_gradient_checkpointing(model)
    checkpointed = _saved_bytes(lambda: model(q, k, labels=target).loss)
    assert checkpointed < plain / 2


def test_checkpointing_is_inactive_in_eval_mode_and_without_grad():
    model = CAiDModel(_config())
    model.gradient_checkpointing_enable()
    x, _, _ = _images()
    calls = []
    model._gradient_checkpointing_func = lambda fn, *args, **kwargs: calls.append(fn) or fn(*args)
    with torch.no_grad():
        model.train()(x)
    model.eval()(x)
    assert calls == []
    model.train()(x)
    assert len(calls) == 5 + 5  # five encoder stages, five decoder blocks


def test_flag_round_trips():
    for model in (CAiDModel(_config()), CAiDForPreTraining(_config()),
                  CAiDForImageClassification(_config(num_labels=3)),
                  CAiDForSemanticSegmentation(_config(num_labels=1))):
        backbone = getattr(model, "caid", model)
        assert model.supports_gradient_checkpointing
        assert not backbone.gradient_checkpointing
        model.gradient_checkpointing_enable()
        assert backbone.gradient_checkpointing and model.is_gradient_checkpointing
        model.gradient_checkpointing_disable()
        assert not backbone.gradient_checkpointing and not model.is_gradient_checkpointing
        enable_gradient_checkpointing(model)
        assert backbone.gradient_checkpointing


def test_reentrant_request_still_checkpoints_non_reentrant():
    # reentrant checkpointing would leave the weights without gradients (the images need none)
    plain = CAiDModel(_config()).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    x, _, target = _images()
    _assert_same_step(plain, checkpointed,
                      lambda m: torch.nn.functional.mse_loss(m(x).reconstruction, target))


def test_classifier_and_segmenter_gradients_match_without_checkpointing():
    x, _, target = _images()
    classifier = CAiDForImageClassification(_config(num_labels=3)).train()
    labels = torch.tensor([0, 1, 2, 1])
    checkpointed = copy.deepcopy(classifier)
    checkpointed.gradient_checkpointing_enable()
    _assert_same_step(classifier, checkpointed, lambda m: m(x, labels=labels).loss)

    segmenter = CAiDForSemanticSegmentation(_config(num_labels=1)).train()
    checkpointed = copy.deepcopy(segmenter)
    checkpointed.gradient_checkpointing_enable()
    mask = (target > 0.5).float()
    _assert_same_step(segmenter, checkpointed, lambda m: m(x, labels=mask).loss)
