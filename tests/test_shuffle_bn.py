"""Shuffle-BN by all-to-all: the same permutation semantics as MoCo's gather-based
``batch_shuffle_ddp``, checked on 2 and 3 gloo processes, and the wire forms."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from caid_hf.distributed import (
    _wire_form,
    shuffle_across_ranks,
    shuffle_plan,
    unshuffle_across_ranks,
)


def moco_batch_shuffle(x: torch.Tensor, permutation: torch.Tensor):
    """MoCo's batch_shuffle_ddp / batch_unshuffle_ddp written out (the gather version),
    with the permutation given: what every rank must end up with."""
    world, me = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    gathered = torch.cat(parts)
    local = gathered[permutation.view(world, -1)[me]]
    return local, torch.argsort(permutation)


def moco_batch_unshuffle(y: torch.Tensor, inverse: torch.Tensor):
    world, me = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(parts, y.contiguous())
    return torch.cat(parts)[inverse.view(world, -1)[me]]


def _worker(me: int, world: int, store: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=me, world_size=world)
    try:
        checks = {}
        for trial, (batch, kind) in enumerate([(6, "grey"), (5, "rgb"), (4, "bytes"),
                                               (8, "grey")]):
            g = torch.Generator().manual_seed(100 * trial + me)
            if kind == "grey":  # one channel expanded to three, as caid-hf's views
                x = torch.rand(batch, 1, 8, 8, generator=g).expand(-1, 3, -1, -1)
            elif kind == "rgb":
                x = torch.rand(batch, 3, 8, 8, generator=g)
            else:  # views that are still 8-bit
                x = torch.randint(0, 256, (batch, 1, 8, 8), generator=g).float().div(255)
            torch.manual_seed(trial)  # the same permutation for both shuffles (drawn on rank 0)
            ours, plan = shuffle_across_ranks(x)
            reference, inverse = moco_batch_shuffle(x, plan.permutation)
            keys = ours.flatten(1)[:, :5] * 2 + 1  # any per-image function of the shuffled views
            back = unshuffle_across_ranks(keys, plan)
            checks[trial] = (torch.equal(ours, reference),
                             torch.equal(back, moco_batch_unshuffle(keys, inverse)),
                             torch.equal(back, x.flatten(1)[:, :5] * 2 + 1))
        results[me] = checks
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_all_to_all_shuffle_equals_moco_gather_shuffle(tmp_path, world):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), results), nprocs=world, join=True)
    for me in range(world):
        for trial, (same, unshuffled, round_trip) in results[me].items():
            assert same, f"rank {me} trial {trial}: shuffled views differ from MoCo's"
            assert unshuffled and round_trip, f"rank {me} trial {trial}: unshuffle differs"


def test_plan_hands_each_rank_its_slice_of_the_permutation():
    world, batch = 4, 5
    permutation = torch.randperm(world * batch, generator=torch.Generator().manual_seed(0))
    plans = [shuffle_plan(permutation, batch, world, r) for r in range(world)]
    for r, plan in enumerate(plans):
        assert sum(plan.send_counts) == batch and sum(plan.recv_counts) == batch
        # what r receives from j is what j sends to r
        for j in range(world):
            assert plan.recv_counts[j] == plans[j].send_counts[r]
    # simulate the exchange with global ids: every rank ends with its permutation slice
    for r, plan in enumerate(plans):
        arrivals = []
        for j in range(world):
            sent = [j * batch + int(i) for i in plans[j].send_order]
            start = sum(plans[j].send_counts[:r])
            arrivals += sent[start:start + plans[j].send_counts[r]]
        local = [None] * batch
        for slot, item in zip(plan.recv_slots.tolist(), arrivals):
            local[slot] = item
        assert local == permutation[r * batch:(r + 1) * batch].tolist()


def test_wire_forms_are_exact_and_narrow():
    grey = torch.rand(4, 1, 8, 8).expand(-1, 3, -1, -1)
    payload, restore = _wire_form(grey)
    assert payload.shape == (4, 1, 8, 8) and payload.dtype == torch.float32
    assert torch.equal(restore(payload), grey)
    eight_bit = torch.randint(0, 256, (4, 1, 8, 8)).float().div(255).expand(-1, 3, -1, -1)
    payload, restore = _wire_form(eight_bit)
    assert payload.dtype == torch.uint8 and payload.shape[1] == 1
    assert torch.equal(restore(payload), eight_bit)
    colour = torch.rand(4, 3, 8, 8)
    payload, restore = _wire_form(colour)
    assert payload.shape == (4, 3, 8, 8) and torch.equal(restore(payload), colour)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        payload, restore = _wire_form(grey)
    assert payload.dtype == torch.bfloat16  # what autocast's first convolution rounds to
    assert torch.equal(restore(payload), grey.to(torch.bfloat16).float())


def _moco_step_worker(me: int, world: int, store: str, results: dict) -> None:
    """One MoCo/CAiD training step on each of ``world`` ranks, with our all-to-all shuffle
    and with MoCo's gather shuffle (same weights, inputs and permutation)."""
    import copy

    import caid_hf.objectives.moco as moco_module
    from caid_hf import CAiDConfig, CAiDForPreTraining

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=me, world_size=world)
    try:
        torch.manual_seed(0)  # the same weights and queue on every rank
        config = CAiDConfig(encoder_name="resnet18", image_size=64, queue_size=32,
                            projection_dim=16)
        base = CAiDForPreTraining(config).train()
        g = torch.Generator().manual_seed(10 + me)  # each rank its own images
        query = torch.rand(4, 1, 64, 64, generator=g).expand(-1, 3, -1, -1)
        key = torch.rand(4, 1, 64, 64, generator=g).expand(-1, 3, -1, -1)
        target = torch.rand(4, 1, 64, 64, generator=g)
        outcomes = []
        for shuffle in ("ours", "moco"):
            model = copy.deepcopy(base)
            if shuffle == "moco":
                def reference_shuffle(x):
                    permutation = torch.randperm(x.shape[0] * world)
                    dist.broadcast(permutation, src=0)
                    return moco_batch_shuffle(x, permutation)

                moco_module.shuffle_across_ranks = reference_shuffle
                moco_module.unshuffle_across_ranks = moco_batch_unshuffle
            torch.manual_seed(1)
            out = model(pixel_values=query, key_pixel_values=key, labels=target)
            out.loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            outcomes.append((out.loss.detach(), grads, model.objective.queue.clone()))
        (loss_a, grads_a, queue_a), (loss_b, grads_b, queue_b) = outcomes
        results[me] = {
            "loss": float((loss_a - loss_b).abs()),
            "grad": max(float((grads_a[n] - grads_b[n]).abs().max()) for n in grads_a),
            "queue": float((queue_a - queue_b).abs().max()),
            "same_names": sorted(grads_a) == sorted(grads_b),
            "queue_moved": float((queue_a - base.objective.queue).abs().max()),
        }
    finally:
        dist.destroy_process_group()


def test_two_rank_step_matches_moco_gather_shuffle_in_fp32(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_moco_step_worker, args=(2, str(tmp_path / "store"), results), nprocs=2, join=True)
    print({me: dict(results[me]) for me in range(2)})  # the differences, for the record
    for me in range(2):
        r = results[me]
        assert r["same_names"] and r["queue_moved"] > 0
        assert r["loss"] <= 1e-5 and r["grad"] <= 1e-5 and r["queue"] <= 1e-5, r
