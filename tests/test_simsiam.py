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
from caid_hf.distributed import GlobalBatchNorm1d
from caid_hf.objectives.simsiam import SimSiam, SimSiamLoss

from helpers import random_views, reference_projections

ROOT = Path(__file__).resolve().parents[1]

P1 = [[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]]
P2 = [[0.0, 1.0, 1.0], [-1.0, 2.0, 0.5]]
Z1 = [[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
Z2 = [[1.0, 0.0, 1.0], [0.0, -3.0, 4.0]]


def _cosine_by_hand(u, v):
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def test_loss_matches_hand_computed_values():
    loss = SimSiamLoss()(*(torch.tensor(x) for x in (P1, P2, Z1, Z2)))
    n = len(P1)
    expected = -0.5 * sum(_cosine_by_hand(P1[b], Z2[b]) for b in range(n)) / n \
        - 0.5 * sum(_cosine_by_hand(P2[b], Z1[b]) for b in range(n)) / n
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # perfect predictions reach the minimum -1, whatever the scale
    z = torch.tensor(Z1)
    assert SimSiamLoss()(3 * z, 0.5 * z, z, z).item() == pytest.approx(-1.0)


def test_no_gradient_reaches_the_target_branch():
    p1, p2, z1, z2 = (torch.tensor(x, requires_grad=True) for x in (P1, P2, Z1, Z2))
    SimSiamLoss()(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None  # stop-gradient on the targets
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0
    # the gradient of a prediction is that of -cos(p, target) / 2 / B, by hand for row 0:
    # d cos(p, z) / dp = z / (|p||z|) - cos(p, z) p / |p|^2
    p, t = P1[0], Z2[0]
    cos, norm_p, norm_t = _cosine_by_hand(p, t), math.sqrt(sum(a * a for a in p)), \
        math.sqrt(sum(a * a for a in t))
    expected = [-(t[i] / (norm_p * norm_t) - cos * p[i] / norm_p**2) / 2 / 2 for i in range(3)]
    torch.testing.assert_close(p1.grad[0], torch.tensor(expected), rtol=1e-5, atol=1e-7)


def test_projector_and_predictor_shapes():
    head = SimSiam(feature_dim=512, projector_dims=[64, 32, 16], predictor_hidden_dim=8)
    assert [type(m) for m in head.projector] == [
        nn.Linear, GlobalBatchNorm1d, nn.ReLU, nn.Linear, GlobalBatchNorm1d, nn.ReLU, nn.Linear,
        GlobalBatchNorm1d]
    linears = [m for m in head.projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 64), (64, 32), (32, 16)]
    assert not head.projector[-1].affine  # output BatchNorm without scale and shift
    assert [type(m) for m in head.predictor] == [nn.Linear, GlobalBatchNorm1d, nn.ReLU, nn.Linear]
    assert (head.predictor[0].in_features, head.predictor[0].out_features) == (16, 8)
    assert head.predictor[0].bias is None and head.predictor[3].bias is not None
    assert (head.predictor[3].in_features, head.predictor[3].out_features) == (8, 16)
    out = head.embeddings_loss(torch.randn(6, 512), torch.randn(6, 512))
    assert out.projections.shape == (6, 16) and -1 <= out.loss.item() <= 1
    c = CAiDConfig()
    assert c.simsiam_projector_dims == [2048, 2048, 2048] and c.simsiam_predictor_hidden_dim == 512


def _config(**kwargs):
    return CAiDConfig(encoder_name="resnet18", image_size=64, discrimination_method="simsiam",
                      simsiam_projector_dims=[32, 32, 16], simsiam_predictor_hidden_dim=8, **kwargs)


def test_model_loss_and_gradients_match_independent_computation():
    model = CAiDForPreTraining(_config()).train()
    q, k, target, _ = random_views()
    ref = copy.deepcopy(model)
    feats, z1, z2 = reference_projections(ref, q, k)
    p1, p2 = ref.objective.predictor(z1), ref.objective.predictor(z2)
    simsiam = -(F.cosine_similarity(p1, z2.detach()).mean()
                + F.cosine_similarity(p2, z1.detach()).mean()) / 2
    mse = F.mse_loss(torch.sigmoid(ref.caid.segmentation_head(ref.caid.decoder(feats))), target)
    (simsiam + 10 * mse).backward()

    out = model(q, k, labels=target)
    torch.testing.assert_close(out.contrastive_loss, simsiam, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, simsiam + 10 * mse, rtol=0, atol=1e-5)
    assert out.logits is None
    torch.testing.assert_close(out.embedding_std, F.normalize(z1, dim=1).std(dim=0).mean())
    out.loss.backward()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_predictor_is_its_own_parameter_group_with_a_fixed_learning_rate():
    model = CAiDForPreTraining(_config())
    groups = model.optimizer_param_groups()
    assert [(g["name"], g["fix_lr"]) for g in groups] == [("model", False), ("predictor", True)]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.objective.predictor.parameters()}
    every = [id(p) for g in groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert model.optimizer_param_groups(fix_predictor_lr=False)[1]["fix_lr"] is False
    # torch keeps the flag with the group, for the schedule to read
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    assert [g["fix_lr"] for g in optimizer.param_groups] == [False, True]


def test_both_views_reconstructed_average_their_errors():
    model = CAiDForPreTraining(_config(reconstruct_views="both")).train()
    q, k, target, key_target = random_views()
    out = model(q, k, labels=target, key_labels=key_target)
    first = F.mse_loss(out.reconstruction, target)
    second = F.mse_loss(out.key_reconstruction, key_target)
    torch.testing.assert_close(out.reconstruction_loss, (first + second) / 2)
    torch.testing.assert_close(out.loss, out.contrastive_loss + 10 * out.reconstruction_loss)
    with pytest.raises(ValueError, match="key_labels"):
        model(q, k, labels=target)
    # the default reconstructs the first view only
    single = CAiDForPreTraining(_config()).train()(q, k, labels=target)
    assert single.key_reconstruction is None


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    """2 gloo processes with 4 images each = 1 process with 8: same (mean) loss, same
    gradients, same BatchNorm running statistics, both views reconstructed (float64, so
    that only the statistics can differ)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = ROOT / "tests" / "scripts" / "global_batch_check.py"
    proc = subprocess.run([sys.executable, str(script), "simsiam", "both", "float64",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref = torch.load(tmp_path / "reference.pt")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    # SimSiam's loss is each rank's own batch mean; DDP optimises their mean, the global one
    for key in ("loss", "contrastive_loss", "reconstruction_loss"):
        torch.testing.assert_close((ranks[0][key] + ranks[1][key]) / 2, ref[key], rtol=0, atol=1e-5)
    for rank in ranks:
        assert rank["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(rank["grads"][name], grad, rtol=0, atol=1e-5, msg=name)
        for name, value in ref["running"].items():
            torch.testing.assert_close(rank["running"][name], value, rtol=0, atol=1e-5, msg=name)
