"""Turn the run configuration's source strings into image sources."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset, Subset

from .sources import ImageFolderSource, PhantomSource, SplitListSource

PHANTOMS = "phantoms"


def source_from_spec(spec: str, images_root: str | None = None, num_phantoms: int = 1000,
                     phantom_size: int = 256, phantom_seed: int = 0):
    """``"phantoms"`` → :class:`PhantomSource`; a file → :class:`SplitListSource` (relative to
    ``images_root``, default: the list's folder); a folder → :class:`ImageFolderSource`."""
    if spec == PHANTOMS:
        return PhantomSource(num_phantoms, size=phantom_size, seed=phantom_seed)
    path = Path(spec)
    if path.is_dir():
        return ImageFolderSource(path)
    if path.is_file():
        return SplitListSource(path, images_root if images_root is not None else path.parent)
    raise FileNotFoundError(
        f"data source {spec!r} is neither 'phantoms', an existing split-list file nor a folder"
    )


def hold_out(train: Dataset, validation: Dataset, fraction: float, seed: int
             ) -> tuple[Subset, Subset]:
    """Hold out ``fraction`` of the indices with a fixed, seeded permutation.

    ``train`` and ``validation`` are two views of the same images (e.g. random and
    fixed crops); the training subset comes from the first, the held-out one from the second.
    """
    import torch

    n = len(train)
    n_val = max(1, round(n * fraction))
    if n - n_val < 1:
        raise ValueError(f"validation_fraction={fraction} leaves no training images out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(train, order[n_val:]), Subset(validation, order[:n_val])
