"""Bytes each rank receives per step for MoCo's shuffle-BN: the gather shuffle against
caid-hf's all-to-all.

The old shuffle (MoCo's ``batch_shuffle_ddp``, caid-hf before the change) all-gathers every
rank's float32, 3-channel key views, so every rank receives the whole global batch, then
all-gathers the encoded keys [B, D] to un-shuffle. The new one sends each key view straight
to the rank that needs it (one grey channel, bf16 under bf16 autocast, uint8 when the views
are still 8-bit) and each key straight back.

Measured: ``--ranks`` gloo processes on this machine run both shuffles on the same inputs,
counting the bytes of every tensor a collective delivers to the rank from *other* ranks
(its own slice does not cross the network); both shuffles must give equal results.
Computed: the same counts from the formulas, for larger worlds, and checked against the
measured ones.

    python benchmarks/shuffle_traffic.py                       # ResNet-50 keys (D=128), 224 px, B=64
    python benchmarks/shuffle_traffic.py --ranks 2 4 --computed 8 64 512

The permutation is random, so how many of a rank's own views stay home varies per step; the
measured figure is the median over ``--steps`` steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from caid_hf.distributed import shuffle_across_ranks, unshuffle_across_ranks  # noqa: E402

WIRE_BYTES = {"fp32": 4, "bf16": 2, "uint8": 1}


def old_shuffle(x: torch.Tensor, permutation: torch.Tensor, counter: list):
    """MoCo's gather shuffle, counting what arrives from other ranks."""
    world, me = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    counter.append(sum(p.numel() * p.element_size() for k, p in enumerate(parts) if k != me))
    local = torch.cat(parts)[permutation.view(world, -1)[me]]
    return local, torch.argsort(permutation)


def old_unshuffle(y: torch.Tensor, inverse: torch.Tensor, counter: list):
    world, me = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(parts, y.contiguous())
    counter.append(sum(p.numel() * p.element_size() for k, p in enumerate(parts) if k != me))
    return torch.cat(parts)[inverse.view(world, -1)[me]]


def _count_all_to_all(counter: list):
    """Wrap all_to_all_single so it records the bytes arriving from other ranks."""
    original = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, **kwargs):
        me = dist.get_rank()
        row = output[0].numel() * output.element_size() if output.shape[0] else 0
        counter.append(sum(n for k, n in enumerate(output_split_sizes) if k != me) * row)
        return original(output, input, output_split_sizes=output_split_sizes,
                        input_split_sizes=input_split_sizes, **kwargs)

    dist.all_to_all_single = counting


def _worker(me: int, world: int, store: str, args, results: dict) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=me, world_size=world)
    new_counts: list = []
    _count_all_to_all(new_counts)
    rows = []
    try:
        for step in range(args.steps):
            g = torch.Generator().manual_seed(1000 * step + me)
            grey = torch.rand(args.batch_size, 1, args.image_size, args.image_size, generator=g)
            views = grey.expand(-1, 3, -1, -1)  # caid-hf's key views: grey, expanded
            keys_dim = args.key_dim
            torch.manual_seed(step)
            new_counts.clear()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.wire == "bf16"):
                ours, plan = shuffle_across_ranks(views)
            keys = ours[:, 0].flatten(1)[:, :keys_dim].float().contiguous()
            back = unshuffle_across_ranks(keys, plan)
            new_views, new_keys = new_counts[0], new_counts[1]
            old_counts: list = []
            local, inverse = old_shuffle(views.contiguous(), plan.permutation, old_counts)
            old_keys = local[:, 0].flatten(1)[:, :keys_dim].contiguous()
            old_back = old_unshuffle(old_keys, inverse, old_counts)
            expected = views.to(torch.bfloat16).float() if args.wire == "bf16" else views
            same = torch.equal(ours, local.to(torch.bfloat16).float() if args.wire == "bf16"
                               else local) and torch.equal(
                back, expected[:, 0].flatten(1)[:, :keys_dim])
            same_old = torch.equal(old_back, views[:, 0].flatten(1)[:, :keys_dim])
            rows.append((old_counts[0], old_counts[1], new_views, new_keys, same and same_old))
        results[me] = rows
    finally:
        dist.destroy_process_group()


def computed(world: int, batch: int, side: int, key_dim: int, wire: str) -> tuple[float, float]:
    """Expected bytes received per rank per step: (old, new). Old: (world - 1) ranks' whole
    fp32 3-channel batches plus their [B, D] fp32 keys. New: on average B (world - 1) / world
    of this rank's B shuffled views come from other ranks (one channel in the wire dtype),
    and as many keys come back."""
    old = (world - 1) * batch * (3 * side * side * 4 + key_dim * 4)
    remote = batch * (world - 1) / world
    new = remote * (side * side * WIRE_BYTES[wire] + key_dim * 4)
    return old, new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--computed", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--batch-size", type=int, default=64, help="Per rank.")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--key-dim", type=int, default=128, help="MoCo's D (ResNet-50: 128).")
    parser.add_argument("--wire", choices=["fp32", "bf16"], default="bf16",
                        help="bf16: the views travel in bf16, as under bf16 autocast (the "
                             "default of GPU training); fp32 without autocast.")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(f"shuffle-BN traffic, received per rank per step: batch {args.batch_size} per rank, "
          f"{args.image_size} px, keys of {args.key_dim} floats, views on the wire as "
          f"{args.wire} grey (old: fp32 RGB)")
    mb = 1e6
    for world in args.ranks:
        with tempfile.TemporaryDirectory() as folder:
            results = mp.Manager().dict()
            mp.spawn(_worker, args=(world, str(Path(folder) / "store"), args, results),
                     nprocs=world, join=True)
        rows = [row for me in range(world) for row in results[me]]
        if not all(row[4] for row in rows):
            raise SystemExit("the two shuffles disagree")
        old = statistics.median(r[0] + r[1] for r in rows)
        new = statistics.median(r[2] + r[3] for r in rows)
        expect_old, expect_new = computed(world, args.batch_size, args.image_size,
                                          args.key_dim, args.wire)
        print(f"  measured {world:>3} ranks: old {old / mb:9.2f} MB, new {new / mb:8.2f} MB, "
              f"{old / new:7.1f}x less (formula: {expect_old / mb:.2f} / {expect_new / mb:.2f} "
              f"MB; median of {len(rows)} rank-steps; results equal)")
    for world in args.computed:
        old, new = computed(world, args.batch_size, args.image_size, args.key_dim, args.wire)
        print(f"  computed {world:>3} ranks: old {old / mb:9.2f} MB, new {new / mb:8.2f} MB, "
              f"{old / new:7.1f}x less")


if __name__ == "__main__":
    main()
