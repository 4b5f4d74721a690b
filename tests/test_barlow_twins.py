import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from caid_hf import CAiDConfig, CAiDForPreTraining
from caid_hf.distributed import GlobalBatchNorm1d, GlobalBatchNorm2d
from caid_hf.objectives.barlow_twins import BarlowTwins, BarlowTwinsLoss

from helpers import random_views, reference_projections

ROOT = Path(__file__).resolve().parents[1]

Z1 = [[1.0, 2.0, 0.5], [0.0, -1.0, 1.5], [2.0, 0.0, -0.5], [-1.0, 1.0, 0.0]]
Z2 = [[0.5, 1.0, 1.0], [1.0, -2.0, 0.0], [1.5, 0.5, -1.0], [-2.0, 0.0, 0.5]]


def _standardise_by_hand(z: list[list[float]], eps: float = 1e-5) -> list[list[float]]:
    n, d = len(z), len(z[0])
    out = [[0.0] * d for _ in range(n)]
    for j in range(d):
        mean = sum(z[b][j] for b in range(n)) / n
        var = sum((z[b][j] - mean) ** 2 for b in range(n)) / n  # biased, as BatchNorm
        for b in range(n):
            out[b][j] = (z[b][j] - mean) / math.sqrt(var + eps)
    return out


def _barlow_loss_by_hand(z1, z2, lambd):
    a1, a2 = _standardise_by_hand(z1), _standardise_by_hand(z2)
    n, d = len(z1), len(z1[0])
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a1[b][i] * a2[b][j] for b in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lambd * c**2
    return loss


@pytest.mark.parametrize("lambd", [0.0051, 0.5])
def test_loss_matches_hand_computed_values(lambd):
    criterion = BarlowTwinsLoss(3, off_diagonal_weight=lambd)
    loss = criterion(torch.tensor(Z1), torch.tensor(Z2))
    assert loss.dtype == torch.float32 and loss.shape == ()
    expected = _barlow_loss_by_hand(Z1, Z2, lambd)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # evaluation mode standardises over the batch too (no running statistics)
    assert criterion.eval()(torch.tensor(Z1), torch.tensor(Z2)).item() == pytest.approx(expected, rel=1e-5)


def test_identical_decorrelated_views_have_near_zero_loss():
    # columns with mean 0, equal variance and zero correlation: c = I up to BatchNorm's eps
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    loss = BarlowTwinsLoss(2)(z, z)
    assert loss.item() == pytest.approx(2 * (1e-5 / (1 + 1e-5)) ** 2, abs=1e-9)
    # a collapsed (constant) embedding is the worst case of the invariance term: c = 0
    constant = torch.ones(4, 2)
    assert BarlowTwinsLoss(2)(constant, constant).item() == pytest.approx(2.0)


def test_projector_shapes_and_layers():
    head = BarlowTwins(feature_dim=512, projector_dims=[64, 32, 16])
    layers = list(head.projector)
    kinds = [type(m) for m in layers]
    assert kinds == [nn.Linear, GlobalBatchNorm1d, nn.ReLU, nn.Linear, GlobalBatchNorm1d, nn.ReLU,
                     nn.Linear]
    assert [(m.in_features, m.out_features) for m in layers if isinstance(m, nn.Linear)] == [
        (512, 64), (64, 32), (32, 16)]
    assert all(m.bias is None for m in layers if isinstance(m, nn.Linear))
    out = head.embeddings_loss(torch.randn(6, 512), torch.randn(6, 512))
    assert out.projections.shape == (6, 16) and out.loss.shape == ()
    assert CAiDConfig().barlow_projector_dims == [8192, 8192, 8192]
    assert CAiDConfig().barlow_off_diagonal_weight == 0.0051


def _config(**kwargs):
    return CAiDConfig(encoder_name="resnet18", image_size=64, discrimination_method="barlow_twins",
                      barlow_projector_dims=[32, 32, 16], **kwargs)


def test_model_loss_matches_independent_computation():
    model = CAiDForPreTraining(_config()).train()
    q, k, target, _ = random_views()
    ref = copy.deepcopy(model)
    feats, z1, z2 = reference_projections(ref, q, k)
    a1 = F.batch_norm(z1, None, None, training=True)
    a2 = F.batch_norm(z2, None, None, training=True)
    c = a1.T @ a2 / 4
    off = c - torch.diag(torch.diagonal(c))
    bt = ((1 - torch.diagonal(c)) ** 2).sum() + 0.0051 * (off**2).sum()
    mse = F.mse_loss(torch.sigmoid(ref.caid.segmentation_head(ref.caid.decoder(feats))), target)

    out = model(q, k, labels=target)
    torch.testing.assert_close(out.contrastive_loss, bt, rtol=1e-5, atol=1e-5)
    assert out.logits is None and "discrimination_loss" not in out  # one name per loss
    torch.testing.assert_close(out.reconstruction_loss, mse, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, bt + 10 * mse, rtol=1e-5, atol=1e-5)
    # the collapse indicator reads the projections as the loss sees them (standardised)
    torch.testing.assert_close(out.embedding_std, F.normalize(a1, dim=1).std(dim=0).mean())
    assert not out.embedding_std.requires_grad
    # both views train the one encoder; there is no momentum branch and no queue
    out.loss.backward()
    assert model.caid.encoder.conv1.weight.grad.abs().sum() > 0
    assert model.objective.projector[0].weight.grad.abs().sum() > 0
    assert not any("momentum" in n or "queue" in n for n in model.state_dict())


def test_every_batch_norm_can_use_the_global_batch():
    model = CAiDForPreTraining(_config())
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds == {GlobalBatchNorm1d, GlobalBatchNorm2d}
    # the backbone the model publishes is still smp.Unet's, key for key
    import segmentation_models_pytorch as smp

    assert list(model.caid.state_dict()) == list(smp.Unet("resnet18", encoder_weights=None).state_dict())


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    """2 gloo processes with 4 images each = 1 process with 8: same loss, same gradients,
    same BatchNorm running statistics (float64, so that only the statistics can differ)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = ROOT / "tests" / "scripts" / "global_batch_check.py"
    proc = subprocess.run([sys.executable, str(script), "barlow_twins", "first", "float64",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref = torch.load(tmp_path / "reference.pt")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for rank in ranks:
        # the Barlow Twins loss is computed from the reduced correlation: equal on every rank
        torch.testing.assert_close(rank["contrastive_loss"], ref["contrastive_loss"],
                                   rtol=0, atol=1e-5)
        assert rank["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(rank["grads"][name], grad, rtol=0, atol=1e-5, msg=name)
        for name, value in ref["running"].items():
            torch.testing.assert_close(rank["running"][name], value, rtol=0, atol=1e-5, msg=name)
    # the reconstruction loss is each rank's own mean; their mean is the global one
    for key in ("loss", "reconstruction_loss"):
        torch.testing.assert_close((ranks[0][key] + ranks[1][key]) / 2, ref[key], rtol=0, atol=1e-5)
    assert not torch.allclose(ranks[0]["reconstruction_loss"], ranks[1]["reconstruction_loss"])
