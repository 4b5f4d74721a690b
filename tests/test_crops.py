import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader

from caid_hf.data.crops import TwoCropDataset
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


def test_full_crop_is_an_antialiased_bilinear_resize():
    source = PhantomSource(1, size=96)
    whole = TwoCropDataset(source, SIZE, scale=(1.0, 1.0), ratio=(1.0, 1.0))[0]
    expected = TF.resize(torch.from_numpy(source.load(0))[None], [SIZE, SIZE], antialias=True)
    assert torch.equal(whole[0], expected[0]) and torch.equal(whole[1], expected[0])


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
    with pytest.raises(ValueError, match="odd_image"):
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
