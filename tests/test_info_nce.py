"""caid_hf.objectives.info_nce: MoCo's loss, against its formula written out."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from caid_hf.objectives.info_nce import InfoNCE


def _unit(*shape, dim, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=dim)


def test_loss_and_logits_equal_the_formula():
    q, k, queue = _unit(4, 16, dim=1, seed=0), _unit(4, 16, dim=1, seed=1), _unit(16, 32, dim=0, seed=2)
    loss, logits = InfoNCE(temperature=0.2)(q, k, queue)
    assert logits.shape == (4, 33) and logits.dtype == torch.float32
    torch.testing.assert_close(logits[:, 0], (q * k).sum(1) / 0.2)
    torch.testing.assert_close(logits[:, 1:], q @ queue / 0.2)
    # -log of the positive's softmax share, averaged over the queries
    expected = -(logits[:, 0] - torch.logsumexp(logits, dim=1)).mean()
    torch.testing.assert_close(loss, expected)


def test_a_query_equal_to_its_key_and_far_from_the_queue_has_a_small_loss():
    q = _unit(1, 8, dim=1, seed=3)
    loss, _ = InfoNCE(temperature=0.1)(q, q, -q.T.repeat(1, 8))  # 8 negatives at cosine -1
    assert loss.item() == pytest.approx(math.log1p(8 * math.exp(-20)), abs=1e-6)


def test_the_gradient_uses_the_queue_as_the_loss_saw_it():
    q = _unit(3, 8, dim=1, seed=4).requires_grad_()
    k, queue = _unit(3, 8, dim=1, seed=5), _unit(8, 10, dim=0, seed=6)
    loss, _ = InfoNCE()(q, k, queue)
    reference = torch.autograd.grad(InfoNCE()(q, k, queue.clone())[0], q)[0]
    queue.mul_(-1)  # the enqueue after the loss overwrites the queue in place
    loss.backward()
    torch.testing.assert_close(q.grad, reference)
