import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from caid_hf.data.phantoms import generate_phantom, write_phantoms

SIZE = 256


def _box(image: np.ndarray, top: float, bottom: float, left: float, right: float) -> float:
    """Mean grey value of a box given in fractions of the image side."""
    n = image.shape[0]
    return float(image[int(top * n) : int(bottom * n), int(left * n) : int(right * n)].mean())


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    pooled = F.max_pool2d(torch.from_numpy(mask)[None, None].float(), 2 * radius + 1, 1, radius)
    return pooled[0, 0].numpy() > 0


def test_deterministic_per_seed_and_index():
    image, mask = generate_phantom(3, SIZE)
    again, mask_again = generate_phantom(3, SIZE)
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(mask, mask_again)
    other_index = generate_phantom(4, SIZE)[0]
    other_seed = generate_phantom(3, SIZE, seed=1)[0]
    assert np.abs(image.astype(int) - other_index).mean() > 5
    assert np.abs(image.astype(int) - other_seed).mean() > 5


@pytest.mark.parametrize("size", [64, 200, 1024])
def test_shape_dtype_and_value_range(size):
    image, mask = generate_phantom(1, size)
    assert image.shape == mask.shape == (size, size)
    assert image.dtype == mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}
    assert image.min() < 30 and image.max() > 200  # air and bone both present


def test_anatomy_scales_with_size():
    small = generate_phantom(5, 64)[0].astype(np.float64)
    large = generate_phantom(5, 512)[0].astype(np.float64)
    pooled = large.reshape(64, 8, 64, 8).mean(axis=(1, 3))
    assert np.corrcoef(small.ravel(), pooled.ravel())[0, 1] > 0.95
    assert abs(small.mean() - pooled.mean()) < 3


@pytest.mark.parametrize("index", range(6))
def test_intensity_ordering(index):
    image = generate_phantom(index, SIZE, nodules=False)[0]
    background = max(_box(image, 0, 0.04, 0, 0.04), _box(image, 0, 0.04, 0.96, 1))
    lungs = max(_box(image, 0.38, 0.5, 0.24, 0.33), _box(image, 0.3, 0.42, 0.66, 0.75))
    heart = _box(image, 0.6, 0.68, 0.55, 0.62)
    abdomen = _box(image, 0.88, 0.95, 0.2, 0.35)
    assert background < 25
    assert background + 40 < lungs
    assert lungs + 25 < min(heart, abdomen)
    # Column profile across the mediastinum above the heart: the spine
    # stands out from the soft tissue beside it.
    profile = image[int(0.1 * SIZE) : int(0.3 * SIZE), int(0.4 * SIZE) : int(0.6 * SIZE)].mean(0)
    beside = np.r_[profile[:8], profile[-8:]]
    assert profile.max() > beside.max() + 10
    assert profile.max() > heart


def test_nodules_in_about_half_the_phantoms():
    with_nodules = [generate_phantom(i, 64)[1].any() for i in range(40)]
    assert 10 <= sum(with_nodules) <= 30
    assert not any(generate_phantom(i, 64, nodules=False)[1].any() for i in range(40))


def test_nodules_are_bright_blobs_in_the_lungs():
    contrasts = []
    for index in range(20):
        image, mask = generate_phantom(index, SIZE)
        twin = generate_phantom(index, SIZE, nodules=False)[0]
        if not mask.any():
            np.testing.assert_array_equal(image, twin)  # nodules are the only difference
            continue
        # Nothing but the nodules changes (their soft tails may round a grey level).
        difference = np.abs(image.astype(int) - twin)
        assert difference[~_dilate(mask, 12)].max() <= 3
        assert twin[mask > 0].mean() < 120  # placed in the (dark) lungs
        ring = _dilate(mask, 8) & ~_dilate(mask, 4)
        contrasts.append(image[mask > 0].mean() - image[ring].mean())
    assert len(contrasts) >= 5
    assert min(contrasts) > 5
    assert np.mean(contrasts) > 20


def test_invalid_arguments():
    with pytest.raises(ValueError, match="size"):
        generate_phantom(0, 16)
    with pytest.raises(ValueError, match="non-negative"):
        generate_phantom(-1, SIZE)


def test_write_phantoms_round_trip(tmp_path):
    folder = tmp_path / "nested" / "phantoms"
    paths = write_phantoms(folder, 3, size=96, seed=2, write_masks=True)
    assert [p.name for p in paths] == [f"phantom_0000{i}.png" for i in range(3)]
    for index, path in enumerate(paths):
        image, mask = generate_phantom(index, 96, seed=2)
        with Image.open(path) as stored:
            assert stored.mode == "L"
            np.testing.assert_array_equal(np.asarray(stored), image)
        with Image.open(folder / "masks" / path.name) as stored_mask:
            np.testing.assert_array_equal(np.asarray(stored_mask), mask * 255)


def test_write_phantoms_without_masks(tmp_path):
    paths = write_phantoms(tmp_path, 2, size=64, nodules=False)
    assert all(p.is_file() for p in paths)
    assert not (tmp_path / "masks").exists()
