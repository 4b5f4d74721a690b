import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader

from caid_hf.data.crops import TwoCropDataset, sample_crop_box
from caid_hf.data.sources import PhantomSource

SIZE = 32


@pytest.fixture
def dataset():
    return TwoCropDataset(PhantomSource(4, size=96), SIZE)


def test_item_is_two_uint8_crops(dataset):
    torch.manual_seed(0)
    crops = dataset[1]
    assert len(dataset) == 4
    assert crops.shape == (2, SIZE, SIZE) and crops.dtype == torch.uint8
    assert not torch.equal(crops[0], crops[1])
    assert crops.float().std() > 10  # image content, not a flat patch


def test_crops_reproducible_under_manual_seed(dataset):
    torch.manual_seed(7)
    first = dataset[0]
    torch.manual_seed(7)
    again = dataset[0]
    torch.manual_seed(8)
    other = dataset[0]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_full_crop_is_pils_antialiased_bilinear_resize():
    source = PhantomSource(1, size=96)
    whole = TwoCropDataset(source, SIZE, scale=(1.0, 1.0), ratio=(1.0, 1.0))[0]
    expected = np.asarray(Image.fromarray(source.load(0)).resize((SIZE, SIZE), Image.BILINEAR))
    assert torch.equal(whole[0], torch.from_numpy(expected.copy())) and torch.equal(whole[1], whole[0])
    # and within a grey level of torchvision's antialiased resize of the same image
    tv = TF.resize(torch.from_numpy(source.load(0))[None], [SIZE, SIZE], antialias=True)[0]
    assert (tv.int() - whole[0].int()).abs().float().mean() < 0.5


def test_crop_boxes_follow_random_resized_crop_statistics():
    generator = torch.Generator().manual_seed(0)
    boxes = torch.tensor([sample_crop_box(400, 400, (0.2, 1.0), (3 / 4, 4 / 3), generator)
                          for _ in range(4000)], dtype=torch.float64)
    top, left, height, width = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + height <= 400).all() and (left + width <= 400).all()
    area = height * width / (400 * 400)
    # accepted draws are U(0.2, 1) truncated where the box does not fit: inside the range
    assert area.min() > 0.19 and area.max() <= 1.0
    ratio = width / height
    assert ratio.min() > 0.74 and ratio.max() < 1.34
    # log-uniform aspect on a square image: log ratio is symmetric around 0
    assert abs(ratio.log().mean().item()) < 0.02
    # the centred fallback when nothing fits (tall image, wide ratios only)
    assert sample_crop_box(100, 10, (0.9, 1.0), (2.0, 3.0), generator) == (47, 0, 5, 10)


def test_reducing_gap_is_close_to_the_exact_resize():
    source = PhantomSource(2, size=512)
    exact = TwoCropDataset(source, 112, seed=1)
    fast = TwoCropDataset(source, 112, seed=1, reducing_gap=1.0)
    for i in range(2):
        difference = (exact[i].int() - fast[i].int()).abs().float()
        # the documented cost: about half a grey level on average (a few edge pixels more)
        assert 0 < difference.mean() < 1.0 and difference.max() < 32


def test_per_epoch_crops_depend_on_seed_epoch_and_index_only():
    dataset = TwoCropDataset(PhantomSource(6, size=96), 32, seed=5, per_epoch=True)
    epoch0 = torch.stack([dataset[i] for i in range(6)])
    dataset.set_epoch(1)
    epoch1 = torch.stack([dataset[i] for i in range(6)])
    assert not torch.equal(epoch0, epoch1)
    # persistent workers see the new epoch (shared memory), in any order
    loader = DataLoader(dataset, batch_size=2, num_workers=2, persistent_workers=True)
    dataset.set_epoch(0)
    assert torch.equal(torch.cat(list(loader)), epoch0)
    dataset.set_epoch(1)
    assert torch.equal(torch.cat(list(loader)), epoch1)
    with pytest.raises(ValueError, match="seed"):
        TwoCropDataset(PhantomSource(2), 32, per_epoch=True)


def test_dataloader_batches(dataset):
    batch = next(iter(DataLoader(dataset, batch_size=3)))
    assert batch.shape == (3, 2, SIZE, SIZE) and batch.dtype == torch.uint8


class _ArraySource:
    def __init__(self, array):
        self.array = array

    def __len__(self):
        return 1

    def load(self, i):
        return self.array

    def image_id(self, i):
        return "odd_image"


def test_read_only_and_non_contiguous_images_are_accepted():
    image = np.arange(64 * 80, dtype=np.uint8).reshape(64, 80)[:, ::2]
    image.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        crops = TwoCropDataset(_ArraySource(image), 16)[0]
    assert crops.shape == (2, 16, 16)


@pytest.mark.parametrize(
    "bad", [np.zeros((8, 8), np.float32), np.zeros((8, 8, 3), np.uint8)], ids=["float", "rgb"]
)
def test_rejects_images_that_are_not_grey_uint8(bad):
    with pytest.raises(TypeError, match="odd_image"):
        TwoCropDataset(_ArraySource(bad), 16)[0]


def test_seeded_crops_are_fixed_per_index_and_leave_the_global_rng_alone():
    dataset = TwoCropDataset(PhantomSource(6, size=96), 32, seed=5)
    state = torch.get_rng_state()
    first = torch.stack([dataset[i] for i in range(6)])
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)
    assert torch.equal(torch.stack([dataset[i] for i in range(6)]), first)
    # the same views whichever worker loads them, in any order
    loaded = torch.cat(list(DataLoader(dataset, batch_size=2, num_workers=2)))
    assert torch.equal(loaded, first)
    assert not torch.equal(first[0, 0], first[0, 1])
    other = TwoCropDataset(PhantomSource(6, size=96), 32, seed=6)
    assert not torch.equal(other[0], first[0])


def test_views_are_the_originals_crop_then_resize_bit_for_bit():
    """200 random boxes on odd-sized images: each view equals PIL crop, then resize (what
    torchvision's RandomResizedCrop does to a PIL image in the original)."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    from caid_hf.data.crops import cut_views, sample_crop_box

    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        height, width = rng.integers(40, 300, size=2)
        image = rng.integers(0, 256, (height, width), dtype=np.uint8)
        boxes = [sample_crop_box(int(height), int(width), (0.05, 1.0), (3 / 4, 4 / 3), generator)
                 for _ in range(10)]
        size = int(rng.choice([32, 64, 96]))
        views = cut_views(image, boxes, size)
        picture = Image.fromarray(image)
        for view, (top, left, box_height, box_width) in zip(views, boxes, strict=True):
            crop = picture.crop((left, top, left + box_width, top + box_height))
            expected = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))
            np.testing.assert_array_equal(view.numpy(), expected)
            original = TF.resized_crop(picture, top, left, box_height, box_width, [size, size],
                                       TF.InterpolationMode.BILINEAR)
            np.testing.assert_array_equal(view.numpy(), np.asarray(original))
