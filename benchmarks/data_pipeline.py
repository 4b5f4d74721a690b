"""CPU cost per sample of CAiD's views: the original's per-sample pipeline against the package's.

All arms are timed in one run, taking turns sample by sample (median of --repeats passes,
the first dropped as warm-up), in CPU time of this process on one core (--threads 1), so
the ratios hold even on a shared machine:

- original: a stand-in of the original implementation's per-sample work on a 1024x1024
  8-bit PNG: PIL open + ``convert("RGB")``; for each of two views torchvision's
  ``RandomResizedCrop(224, scale=(0.2, 1))``, ``ColorJitter(0.4, 0.4, 0.4, 0.1)`` with
  p = 0.8, PIL Gaussian blur with sigma ~ U(0.1, 2) with p = 0.5, horizontal flip,
  ``ToTensor``, then the CAiD distortion on the numpy array (cut-out, out-painting or
  local shuffle); and the query's reconstruction target (its crop in grey).
- package, GPU path: what a DataLoader worker does per sample when the augmentation runs
  batched on the GPU: decode, two crops (``TwoCropDataset``), from the PNGs with PIL (the
  decoder before libpng), from the PNGs with libpng (OpenCV's, now), and from the
  decode-once cache (``caid-hf prepare-data``).
- the batched augmentation (jitter, blur, flip, distortion, target) per sample when it runs
  on this CPU too (CPU-only training), for reference.
- decoding alone: 1024x1024 8-bit PNGs, PIL against libpng; the same with their last rows
  black (the PIL path then inflates the image data a second time, to tell a complete image
  from one whose data ends early); 1024x1024 16-bit PNGs (12-bit data, as PadChest's)
  before (PIL, then the bit-depth arithmetic per pixel) and now (libpng, then a table of
  the same arithmetic). Both paths give the same pixels (checked before timing).

    python benchmarks/data_pipeline.py                    # generated phantom PNGs
    python benchmarks/data_pipeline.py --images DIR       # your own 8-bit PNGs
    python benchmarks/data_pipeline.py --deep-images DIR  # your own 16-bit PNGs

The first line names the CPU (model, torch kernels, bf16 flags, threads of cores): the
ratios depend on it.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import PIL
import torch
from PIL import Image, ImageFilter
from torchvision import transforms

from caid_hf import decoding
from caid_hf.data.augment import AugmentationConfig, ViewAugmenter
from caid_hf.data.cache import CachedSource, default_cache_size, prepare_cache
from caid_hf.data.crops import TwoCropDataset
from caid_hf.data.phantoms import generate_phantom, write_phantoms
from caid_hf.data.sources import ImageFolderSource
from caid_hf.performance import describe_cpu


class OriginalViews:
    """The original implementation's per-sample CPU work, as a stand-in: the image read as
    RGB by PIL, two views by torchvision transforms on PIL images, the CAiD distortion on
    numpy, and the query's target. Its random draws come from Python's, torch's and a numpy
    generator seeded by ``seed``; what it returns is only there to be computed."""

    def __init__(self, image_size: int = 224, seed: int = 0) -> None:
        self.image_size = image_size
        self.crop = transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0))
        self.appearance = transforms.Compose([
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomApply([transforms.Lambda(self._blur)], p=0.5),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ])
        self.rng = np.random.default_rng(seed)
        random.seed(seed)
        torch.manual_seed(seed)

    @staticmethod
    def _blur(image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))

    def __call__(self, path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with Image.open(path) as stored:
            image = stored.convert("RGB")
        views, target = [], None
        for view in range(2):
            crop = self.crop(image)
            if view == 0:
                target = transforms.functional.to_tensor(crop.convert("L"))
            pixels = self.appearance(crop).numpy()
            views.append(torch.from_numpy(self._distort(pixels)))
        return views[0], views[1], target

    def _distort(self, x: np.ndarray) -> np.ndarray:
        """CAiD's distortion of a [3, S, S] view in place: cut-out (p 0.3), out-painting
        (p 0.05), local shuffle (p 0.3) or none."""
        rng, size, margin = self.rng, x.shape[-1], 3
        r = rng.random()
        if r <= 0.30:
            for _ in range(10):
                h, w = rng.integers(10, 71, 2)
                top, left = rng.integers(margin, size - h - margin), rng.integers(margin, size - w - margin)
                x[:, top:top + h, left:left + w] = 0
                if rng.random() < 0.1:
                    break
        elif r <= 0.35:
            original = x.copy()
            x[:] = 0
            for _ in range(10):
                h, w = size - rng.integers(50, 71, 2)
                top, left = rng.integers(margin, size - h - margin), rng.integers(margin, size - w - margin)
                x[:, top:top + h, left:left + w] = original[:, top:top + h, left:left + w]
                if rng.random() < 0.1:
                    break
        elif r <= 0.65:
            for _ in range(10):
                h, w = rng.integers(10, 16, 2)
                (t1, t2), (l1, l2) = (rng.integers(margin, size - h - margin, 2),
                                      rng.integers(margin, size - w - margin, 2))
                block = x[:, t1:t1 + h, l1:l1 + w].copy()
                x[:, t1:t1 + h, l1:l1 + w] = x[:, t2:t2 + h, l2:l2 + w]
                x[:, t2:t2 + h, l2:l2 + w] = block
        return x


class PILFolderSource(ImageFolderSource):
    """An image folder decoded with PIL only: the package's decoder before libpng."""

    def load(self, i: int) -> np.ndarray:
        return decoding.decode_grey(self.path(i), self.bits_stored, libpng=False)


def decode_deep_before(path: Path) -> np.ndarray:
    """A 16-bit PNG as the package decoded it before libpng: PIL, the last-row check, then
    the bit-depth arithmetic pixel by pixel (float32). Same pixels as ``decode_grey``."""
    with Image.open(path) as image:
        image.load()
        decoding._check_png_complete(path, image)
        values = np.clip(np.asarray(image), 0, None).astype(np.float32)
    bits = decoding.png_significant_bits(path)
    if bits is None:
        bits = decoding._guessed_depth(int(values.max(initial=0)))
    return decoding._scale_float_by_depth(values, bits)


def libpng_version() -> str:
    """The libpng inside OpenCV, from its build information (``PNG: ... (ver 1.6.x)``)."""
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("PNG:") and "ver " in line:
            return "libpng " + line.split("ver ")[-1].rstrip(")").strip()
    return "libpng"


def write_deep_phantoms(folder: Path, count: int, size: int, seed: int) -> None:
    """16-bit PNGs holding 12-bit phantoms (grey * 16 plus noise in the low bits), no sBIT."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        grey = generate_phantom(index, size=size, seed=seed)[0].astype(np.uint16)
        deep = grey * 16 + rng.integers(0, 16, grey.shape, dtype=np.uint16)
        Image.fromarray(deep).save(folder / f"deep_{index:05d}.png")


def write_black_edged(sources: list[Path], folder: Path, rows: int = 8) -> None:
    """Copies of 8-bit PNGs whose last ``rows`` rows are black, as on a film with a black border."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in sources:
        with Image.open(path) as image:
            grey = np.array(image.convert("L"))
        grey[-rows:] = 0
        Image.fromarray(grey).save(folder / path.name)


def time_arms(arms: dict, repeats: int) -> dict[str, float]:
    """Median CPU ms per item of each arm: ``arms[name] = (function, items)``. Arms take
    turns item by item (item k of every arm, in an order rotated with k), so a change of
    load on a shared machine falls on all arms alike; each pass runs every item of every
    arm once, and the first pass is dropped as warm-up."""
    names = list(arms)
    longest = max(len(items) for _, items in arms.values())
    times = {name: [] for name in names}
    for repeat in range(repeats + 1):
        spent = dict.fromkeys(names, 0.0)
        for k in range(longest):
            shift = (k + repeat) % len(names)
            for name in names[shift:] + names[:shift]:
                function, items = arms[name]
                if k < len(items):
                    start = time.process_time()
                    function(items[k])
                    spent[name] += time.process_time() - start
        if repeat:
            for name in names:
                times[name].append(spent[name] / len(arms[name][1]) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=None,
                        help="Folder of 8-bit PNGs to use instead of generated phantoms.")
    parser.add_argument("--deep-images", type=Path, default=None,
                        help="Folder of 16-bit PNGs to use instead of generated ones.")
    parser.add_argument("--num-images", type=int, default=64, help="Phantoms to generate.")
    parser.add_argument("--num-deep-images", type=int, default=16,
                        help="16-bit phantoms to generate.")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="Where generated PNGs and the cache go (default: a temporary folder).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: per-core cost).")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="Batch of the batched augmentation.")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--cache-size", type=int, default=None,
                        help=f"Short side of the cache (default {default_cache_size()}).")
    parser.add_argument("--crop-reducing-gap", type=float, default=None,
                        help="PIL reducing_gap for the package's crops (default: exact resize).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed passes (median reported).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not decoding.libpng_available():
        raise SystemExit("OpenCV is not installed: nothing to compare PIL with")

    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        images = args.images or workdir / "png1024"
        if args.images is None and not images.is_dir():
            print(f"writing {args.num_images} 1024x1024 8-bit phantom PNGs to {images} ...")
            write_phantoms(images, args.num_images, size=1024, seed=args.seed)
        deep_images = args.deep_images or workdir / "png1024_16bit"
        if args.deep_images is None and not deep_images.is_dir():
            print(f"writing {args.num_deep_images} 1024x1024 16-bit phantom PNGs ...")
            write_deep_phantoms(deep_images, args.num_deep_images, 1024, args.seed)
        pngs = ImageFolderSource(images)
        black_edged = workdir / "png1024_black_edge"
        if not black_edged.is_dir():
            write_black_edged([pngs.path(i) for i in range(min(16, len(pngs)))], black_edged)
        black = ImageFolderSource(black_edged)
        cache = workdir / f"cache{args.cache_size or default_cache_size()}"
        if not cache.is_dir():
            prepare_cache(pngs, cache, size=args.cache_size, progress=False,
                          source_description=str(images))
        cached = CachedSource(cache)
        deep = ImageFolderSource(deep_images)

        def views(source):
            return TwoCropDataset(source, args.image_size, seed=args.seed,
                                  reducing_gap=args.crop_reducing_gap)

        def both_paths_agree(source) -> None:
            for i in range(len(source)):
                path = source.path(i)
                if not np.array_equal(decoding.decode_grey(path),
                                      decoding.decode_grey(path, libpng=False)):
                    raise SystemExit(f"libpng and PIL disagree on {path}")

        both_paths_agree(pngs)
        both_paths_agree(deep)
        both_paths_agree(black)
        original = OriginalViews(args.image_size, args.seed)
        on_pil, on_libpng, on_cache = views(PILFolderSource(images)), views(pngs), views(cached)
        crops = torch.stack([on_libpng[i] for i in range(len(on_libpng))])
        batches = list(torch.split(crops, args.batch_size))
        augmenter = ViewAugmenter(AugmentationConfig(), context_prediction=True, seed=args.seed)
        indices = list(range(len(pngs)))
        deep_paths = [deep.path(i) for i in range(len(deep))]
        black_paths = [black.path(i) for i in range(len(black))]
        arms = {
            "original": (original, [pngs.path(i) for i in indices]),
            "png_pil": (on_pil.__getitem__, indices),
            "png_libpng": (on_libpng.__getitem__, indices),
            "cache": (on_cache.__getitem__, indices),
            "augment": (augmenter, batches),
            "decode8_pil": (lambda i: decoding.decode_grey(pngs.path(i), libpng=False), indices),
            "decode8_libpng": (lambda i: decoding.decode_grey(pngs.path(i)), indices),
            "decode8_black_pil": (lambda p: decoding.decode_grey(p, libpng=False), black_paths),
            "decode8_black_libpng": (decoding.decode_grey, black_paths),
            "decode16_before": (decode_deep_before, deep_paths),
            "decode16_now": (decoding.decode_grey, deep_paths),
        }
        ms = time_arms(arms, args.repeats)
        ms["augment"] *= len(batches) / len(crops)  # per batch -> per sample
        cache_size = cached.metadata["size"]

    base = ms["original"]
    print(f"CPU: {describe_cpu(args.threads)}")
    print(f"{len(pngs)} 1024x1024 8-bit and {len(deep)} 16-bit PNGs ({images}, {deep_images}); "
          f"views of {args.image_size} px, CAiD mode; CPU ms per sample, median of "
          f"{args.repeats} passes, arms taking turns sample by sample; Pillow {PIL.__version__}, "
          f"OpenCV {cv2.__version__} ({libpng_version()}); crop reducing_gap "
          f"{args.crop_reducing_gap}")
    rows = [
        ("original: PIL RGB decode, 2 x torchvision views, numpy distortion", "original"),
        ("package, GPU path, from PNG, PIL decoder (before)", "png_pil"),
        ("package, GPU path, from PNG, libpng decoder (now)", "png_libpng"),
        (f"package, GPU path, from the cache ({cache_size} px)", "cache"),
    ]
    for label, name in rows:
        print(f"  {label:<68} {ms[name]:7.2f} ms  {base / ms[name]:6.2f}x the original's")
    print(f"  {'+ batched augmentation on this CPU (CPU-only training)':<68} "
          f"{ms['augment']:7.2f} ms")
    print(f"decode 1024x1024 8-bit PNG:  PIL {ms['decode8_pil']:.2f} ms, libpng "
          f"{ms['decode8_libpng']:.2f} ms ({ms['decode8_pil'] / ms['decode8_libpng']:.2f}x)")
    print(f"decode 1024x1024 8-bit PNG, last 8 rows black:  PIL {ms['decode8_black_pil']:.2f} ms, "
          f"libpng {ms['decode8_black_libpng']:.2f} ms "
          f"({ms['decode8_black_pil'] / ms['decode8_black_libpng']:.2f}x)")
    print(f"decode 1024x1024 16-bit PNG: before (PIL, arithmetic) {ms['decode16_before']:.2f} ms, "
          f"now (libpng, table) {ms['decode16_now']:.2f} ms "
          f"({ms['decode16_before'] / ms['decode16_now']:.2f}x)")


if __name__ == "__main__":
    main()
