"""The per-sample CPU work of the data pipeline: decode and two random crops.

Everything after the crops (appearance jitter, blur, flip, distortion and the
reconstruction target) runs batched on the device in ``augment.py``, so a
DataLoader worker only decodes an image and cuts two views out of it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2

from .sources import ImageSource

__all__ = ["TwoCropDataset"]


class TwoCropDataset(Dataset):
    """Two independent RandomResizedCrops of each image of a source.

    ``dataset[i]`` is a uint8 tensor [2, image_size, image_size] in 0..255:
    two crops of the grey image ``source.load(i)`` (uint8 [H, W]), each
    covering a ``scale`` fraction of the image area with aspect ratio in
    ``ratio``, resized bilinearly with antialiasing (the CAiD views before
    augmentation, REFERENCE.md step 2). A DataLoader batches them to
    [B, 2, image_size, image_size]. The crops draw from torch's global RNG,
    so ``torch.manual_seed`` (and DataLoader worker seeding) makes them
    reproducible. With ``seed`` set, image ``i`` always gets the same two crops
    (drawn from a stream seeded by ``(seed, i)``, whichever worker loads it):
    the fixed views of a validation set.
    """

    def __init__(
        self,
        source: ImageSource,
        image_size: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        seed: int | None = None,
    ) -> None:
        self.source = source
        self.seed = seed
        self.image_size = image_size
        self.crop = v2.RandomResizedCrop(
            image_size,
            scale=scale,
            ratio=ratio,
            interpolation=InterpolationMode.BILINEAR,
            antialias=True,
        )

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self.source.load(i)
        if image.ndim != 2 or image.dtype != np.uint8:
            raise ValueError(
                f"source image {self.source.image_id(i)!r} must be grey uint8 [H, W], "
                f"got {image.dtype} {list(image.shape)}"
            )
        if not (image.flags.writeable and image.flags.c_contiguous):
            image = np.array(image)  # torch.from_numpy warns on read-only arrays
        grey = torch.from_numpy(image).unsqueeze(0)
        if self.seed is None:
            return torch.cat([self.crop(grey), self.crop(grey)])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + i)
            return torch.cat([self.crop(grey), self.crop(grey)])
