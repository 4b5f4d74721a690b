"""CPU cost of training-ready CAiD batches: decode, two crops, batched view augmentation.

Measures, on one core by default, how many milliseconds of CPU it takes to turn stored
chest radiographs into a (query, key, target) batch at 224 px in CAiD mode, (a) from
1024x1024 8-bit PNGs (ChestX-ray14's format) and (b) from the decode-once cache
(`caid-hf prepare-data`). Everything runs in this process: the per-image work a DataLoader
worker does (read or decode, two RandomResizedCrops) and the batched augmentation the
training process does (jitter, blur, flip, distortion, target), here on the CPU.

The reference figure is the original implementation's 12.7 ms of one core per sample
(per-sample PIL + numpy on 3-channel copies; measured on a 2-core development machine
like ours, of which PNG decoding is about 5 ms).

    python benchmarks/data_pipeline.py                    # 64 generated phantom PNGs
    python benchmarks/data_pipeline.py --images DIR       # your own PNGs
    python benchmarks/data_pipeline.py --crop-reducing-gap 1.0

Each case prints one line with the median ms/sample over --repeats passes (CPU time of
this process, which with --threads 1 is the cost on one core), samples/s per core and the
ratio to the original.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from caid_hf.data.augment import AugmentationConfig, ViewAugmenter
from caid_hf.data.cache import CachedSource, default_cache_size, prepare_cache
from caid_hf.data.crops import TwoCropDataset
from caid_hf.data.phantoms import write_phantoms
from caid_hf.data.sources import ImageFolderSource

ORIGINAL_MS_PER_SAMPLE = 12.7


def measure(source, args) -> dict:
    """Median CPU ms per sample (total, crops, augmentation) over ``args.repeats`` passes."""
    dataset = TwoCropDataset(source, args.image_size, seed=args.seed, per_epoch=True,
                             reducing_gap=args.crop_reducing_gap)
    augmenter = ViewAugmenter(AugmentationConfig(), context_prediction=True, seed=args.seed)
    n = len(dataset) - len(dataset) % args.batch_size
    if n == 0:
        raise SystemExit(f"need at least --batch-size={args.batch_size} images, got {len(dataset)}")
    totals, crops_only, walls = [], [], []
    for repeat in range(args.repeats + 1):  # the first pass warms caches and is dropped
        dataset.set_epoch(repeat)
        crop_time = 0.0
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for start in range(0, n, args.batch_size):
            c0 = time.process_time()
            crops = torch.stack([dataset[i] for i in range(start, start + args.batch_size)])
            crop_time += time.process_time() - c0
            views = augmenter(crops)
            assert views.query.shape == (args.batch_size, 3, args.image_size, args.image_size)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        if repeat:
            totals.append(cpu / n * 1e3)
            crops_only.append(crop_time / n * 1e3)
            walls.append(wall / n * 1e3)
    return {"ms": statistics.median(totals), "crop_ms": statistics.median(crops_only),
            "wall_ms": statistics.median(walls), "n": n}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=None,
                        help="Folder of PNGs to use instead of generated phantoms.")
    parser.add_argument("--num-images", type=int, default=64, help="Phantoms to generate.")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="Where generated PNGs and the cache go (default: a temporary folder).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: per-core cost).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--cache-size", type=int, default=None,
                        help=f"Short side of the cache (default {default_cache_size()}).")
    parser.add_argument("--crop-reducing-gap", type=float, default=None,
                        help="PIL reducing_gap for the crops (default: exact resize).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed passes (median reported).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        images = args.images
        if images is None:
            images = workdir / "png1024"
            if not images.is_dir():
                print(f"writing {args.num_images} 1024x1024 8-bit phantom PNGs to {images} ...")
                write_phantoms(images, args.num_images, size=1024, seed=args.seed)
        pngs = ImageFolderSource(images)
        cache = workdir / f"cache{args.cache_size or default_cache_size()}"
        if not cache.is_dir():
            prepare_cache(pngs, cache, size=args.cache_size, progress=False,
                          source_description=str(images))
        cached = CachedSource(cache)
        print(f"{len(pngs)} images, batches of {args.batch_size} at {args.image_size} px, CAiD "
              f"mode, {args.threads} thread(s), crop reducing_gap {args.crop_reducing_gap}, "
              f"median of {args.repeats} passes (CPU time of this process)")
        for name, source in (("png", pngs), (f"cache {cached.metadata['size']}", cached)):
            r = measure(source, args)
            print(f"{name:<10} {r['ms']:6.2f} ms/sample ({r['crop_ms']:.2f} read+crop, "
                  f"{r['ms'] - r['crop_ms']:.2f} augment; wall {r['wall_ms']:.2f}), "
                  f"{1e3 / r['ms']:6.1f} samples/s per core, "
                  f"{ORIGINAL_MS_PER_SAMPLE / r['ms']:.2f}x the original's "
                  f"{ORIGINAL_MS_PER_SAMPLE} ms/sample")


if __name__ == "__main__":
    main()
