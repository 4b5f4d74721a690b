"""Shared pieces of the Barlow Twins and SimSiam model tests."""

import torch


def random_views(batch: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """(query, key, target, key target) of ``batch`` random 64 px images."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, c, 64, 64, generator=g) for c in (3, 3, 1, 1)]


def reference_projections(model, query: torch.Tensor, key: torch.Tensor):
    """The query's encoder features and both views' projections, computed directly from
    the model's modules (encoder → global average pool → projector), for checking losses."""
    features = model.caid.encoder(query)
    z1 = model.objective.projector(features[-1].mean((2, 3)))
    z2 = model.objective.projector(model.caid.encoder(key)[-1].mean((2, 3)))
    return features, z1, z2
