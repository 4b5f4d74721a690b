"""caid_hf.objectives.common: the projector builder, the collapse indicator, and the
registry's lookups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from caid_hf.distributed import GlobalBatchNorm1d
from caid_hf.objectives import OBJECTIVES, objective_class
from caid_hf.objectives.common import Objective, embedding_std, projection_head


def test_projection_head_layers_and_shapes():
    mlp = projection_head(512, [64, 64, 32], output_norm=True)
    kinds = [type(m) for m in mlp]
    assert kinds == [nn.Linear, GlobalBatchNorm1d, nn.ReLU, nn.Linear, GlobalBatchNorm1d,
                     nn.ReLU, nn.Linear, GlobalBatchNorm1d]
    assert [m.in_features for m in mlp if isinstance(m, nn.Linear)] == [512, 64, 64]
    assert all(m.bias is None for m in mlp if isinstance(m, nn.Linear))
    assert not mlp[-1].affine  # the output BatchNorm only standardises
    assert mlp(torch.randn(6, 512)).shape == (6, 32)
    # MoCo-v2's head: Linear(C, C) → ReLU → Linear(C, D), both with bias, keys 0.* and 2.*
    moco = projection_head(8, [8, 4], batch_norm=False, last_bias=True)
    assert [type(m) for m in moco] == [nn.Linear, nn.ReLU, nn.Linear]
    assert sorted(moco.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    # one width: still a Sequential (Barlow Twins' one-layer projector keeps its keys 0.*)
    assert sorted(projection_head(8, [4]).state_dict()) == ["0.weight"]


def test_embedding_std_is_one_over_root_d_when_spread_and_zero_when_collapsed():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(4096, 64, generator=g)
    assert embedding_std(spread).item() == pytest.approx(1 / math.sqrt(64), rel=0.02)
    collapsed = torch.randn(1, 64, generator=g).expand(32, 64) * torch.rand(32, 1, generator=g)
    assert embedding_std(collapsed).item() == pytest.approx(0.0, abs=1e-6)  # one direction
    assert embedding_std(spread[:1]).item() == 0.0  # one image has no spread
    assert embedding_std(spread.bfloat16()).dtype == torch.float32


def test_registry_names_each_method_and_refuses_others():
    assert set(OBJECTIVES) == {"moco_v2", "barlow_twins", "simsiam"}
    for name, cls in OBJECTIVES.items():
        assert objective_class(name) is cls and issubclass(cls, Objective)
    with pytest.raises(ValueError, match="byol"):
        objective_class("byol")
