import io
import pickle

import datasets
import numpy as np
import pytest
import torch.utils.data
from datasets import Dataset, DatasetDict, Image, IterableDataset
from PIL import Image as PILImage
from torch.utils.data import DataLoader

from caid_hf.data.hf_sources import HFImageSource, HFStreamingSource, open_hf_dataset
from caid_hf.data.sources import ImageSource

NUM_GREY = 12
SHAPE = (5, 7)


@pytest.fixture(autouse=True)
def _quick_local_datasets(tmp_path, monkeypatch):
    # load_dataset writes an Arrow cache; keep it out of the user's ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _grey(i: int) -> np.ndarray:
    """Image i: a ramp 0..34 shifted by 20 * i, so every image and pixel is known."""
    return (np.arange(35, dtype=np.uint8).reshape(SHAPE) + 20 * i).astype(np.uint8)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _rgba() -> tuple[bytes, np.ndarray]:
    rgb = np.zeros(SHAPE + (3,), np.uint8)
    rgb[..., 0] = 255  # pure red: ITU-R 601 luma 0.299 * 255 = 76
    alpha = np.full(SHAPE, 17, np.uint8)  # must not leak into the grey values
    return _png(np.concatenate([rgb, alpha[..., None]], axis=-1)), np.full(SHAPE, 76, np.uint8)


def _sixteen_bit() -> tuple[bytes, np.ndarray]:
    values = np.zeros(SHAPE, np.uint16)
    values[0, 0], values[0, 1] = 4095, 2048  # 12-bit data: 4095 -> 255, 2048 -> 127.5 -> 128
    buffer = io.BytesIO()
    PILImage.fromarray(values).save(buffer, format="PNG")
    expected = np.zeros(SHAPE, np.uint8)
    expected[0, 0], expected[0, 1] = 255, 128
    return buffer.getvalue(), expected


def _rows() -> tuple[list[dict], list[np.ndarray]]:
    rows = [{"bytes": _png(_grey(i)), "path": f"grey_{i:02d}.png"} for i in range(NUM_GREY)]
    expected = [_grey(i) for i in range(NUM_GREY)]
    for name, (data, grey) in (("rgba.png", _rgba()), ("sixteen.png", _sixteen_bit())):
        rows.append({"bytes": data, "path": name})
        expected.append(grey)
    return rows, expected


def _dataset(rows: list[dict]) -> Dataset:
    names = [f"case-{i}" for i in range(len(rows))]
    return Dataset.from_dict({"image": rows, "name": names}).cast_column("image", Image())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    rows, expected = _rows()
    folder = tmp_path_factory.mktemp("saved") / "chest"
    _dataset(rows).save_to_disk(folder)
    return folder, expected


# HFImageSource over a save_to_disk folder


def test_saved_dataset_decodes_to_the_written_values(saved):
    folder, expected = saved
    dataset = open_hf_dataset(folder)
    assert isinstance(dataset, Dataset) and dataset.num_rows == NUM_GREY + 2
    source = HFImageSource(dataset)
    assert isinstance(source, ImageSource) and len(source) == NUM_GREY + 2
    assert source.image_column == "image"
    for i, grey in enumerate(expected):
        loaded = source.load(i)
        assert loaded.dtype == np.uint8 and loaded.shape == SHAPE
        np.testing.assert_array_equal(loaded, grey)
    assert source.image_id(3) == "grey_03.png"
    assert source.image_id(NUM_GREY) == "rgba.png"
    assert HFImageSource(dataset, id_column="name").image_id(5) == "case-5"
    with pytest.raises(IndexError):
        source.load(NUM_GREY + 2)


def test_row_number_ids_and_shuffled_index_mapping():
    rows = [{"bytes": _png(_grey(i)), "path": None} for i in range(4)]
    source = HFImageSource(_dataset(rows))
    assert [source.image_id(i) for i in range(4)] == [f"row_{i:06d}" for i in range(4)]
    shuffled = _dataset(rows).shuffle(seed=3)
    order = [int(name.split("-")[1]) for name in shuffled["name"]]
    assert order != sorted(order)
    source = HFImageSource(shuffled, id_column="name")
    for i, original in enumerate(order):
        assert source.image_id(i) == f"case-{original}"
        np.testing.assert_array_equal(source.load(i), _grey(original))


def test_pickles_cheaply_from_disk(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (16, 32, 32), dtype=np.uint8)
    rows = [{"bytes": _png(image), "path": f"noise_{i}.png"} for i, image in enumerate(noise)]
    in_memory = HFImageSource(_dataset(rows))
    _dataset(rows).save_to_disk(tmp_path / "noise")
    source = HFImageSource(open_hf_dataset(tmp_path / "noise"))
    # A memory-mapped dataset pickles as its file names, not its 16 KiB of PNGs.
    assert len(pickle.dumps(in_memory)) > 16 * 1024
    pickled = pickle.dumps(source)
    assert len(pickled) < 4096
    copy = pickle.loads(pickled)
    assert len(copy) == 16 and copy.image_id(2) == "noise_2.png"
    np.testing.assert_array_equal(copy.load(7), noise[7])


def test_column_errors_name_the_dataset_and_columns():
    rows = [{"bytes": _png(_grey(0)), "path": "a.png"}]
    dataset = _dataset(rows)
    with pytest.raises(ValueError, match=r"chest.*no column 'scan'.*\['image', 'name'\]"):
        HFImageSource(dataset, image_column="scan", name="chest")
    with pytest.raises(ValueError, match="no id column 'uid'"):
        HFImageSource(dataset, id_column="uid")
    with pytest.raises(ValueError, match=r"column 'name' .* not datasets.Image"):
        HFImageSource(dataset, image_column="name")
    no_images = Dataset.from_dict({"text": ["x"], "label": [1]})
    with pytest.raises(ValueError, match=r"no datasets.Image column \(columns: \['text', 'label'\]\)"):
        HFImageSource(no_images, name="notes")


def test_undecodable_rows_raise_value_error_naming_the_row():
    rows = [
        {"bytes": _png(_grey(0)), "path": "fine.png"},
        {"bytes": b"not a png at all", "path": "broken.png"},
        {"bytes": _png(_grey(2))[:40], "path": "truncated.png"},
        {"bytes": None, "path": None},
    ]
    source = HFImageSource(_dataset(rows), name="chest")
    np.testing.assert_array_equal(source.load(0), _grey(0))
    with pytest.raises(ValueError, match=r"dataset chest, row 1 \(broken.png\): cannot decode"):
        source.load(1)
    with pytest.raises(ValueError, match=r"row 2 \(truncated.png\)"):
        source.load(2)
    with pytest.raises(ValueError, match=r"row 3 \(row_000003\): .*no image bytes and no path"):
        source.load(3)


# open_hf_dataset


def test_imagefolder_reads_png_files(tmp_path):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(3):
        PILImage.fromarray(_grey(i)).save(folder / f"scan_{i}.png")
    source = HFImageSource(open_hf_dataset("imagefolder", data_dir=folder))
    by_name = {source.image_id(i).rsplit("/", 1)[-1]: source.load(i) for i in range(len(source))}
    assert sorted(by_name) == ["scan_0.png", "scan_1.png", "scan_2.png"]
    for i in range(3):
        np.testing.assert_array_equal(by_name[f"scan_{i}.png"], _grey(i))
    with pytest.raises(ValueError, match=r"'imagefolder'.*'validation'.*Unknown split"):
        open_hf_dataset("imagefolder", split="validation", data_dir=folder)
    with pytest.raises(ValueError, match="needs data_dir"):
        open_hf_dataset("imagefolder")


def test_saved_dataset_dict_picks_the_split(tmp_path):
    train = _dataset([{"bytes": _png(_grey(1)), "path": "t.png"}])
    test = _dataset([{"bytes": _png(_grey(2)), "path": "v.png"}, {"bytes": _png(_grey(3)), "path": "w.png"}])
    DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "dict")
    dataset = open_hf_dataset(tmp_path / "dict", split="test")
    assert dataset.num_rows == 2
    np.testing.assert_array_equal(HFImageSource(dataset).load(1), _grey(3))
    with pytest.raises(ValueError, match=r"split 'validation'.*\['train', 'test'\]"):
        open_hf_dataset(tmp_path / "dict", split="validation")


def test_missing_dataset_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_hf_dataset(tmp_path / "nowhere")
    with pytest.raises(ConnectionError, match="'some-org/chest-films', split 'train'"):
        open_hf_dataset("some-org/chest-films")  # tests run with HF_DATASETS_OFFLINE=1


def test_saved_dataset_streams(saved):
    folder, expected = saved
    stream = open_hf_dataset(folder, streaming=True)
    assert isinstance(stream, IterableDataset)
    items = dict(HFStreamingSource(stream, id_column="name"))
    assert len(items) == NUM_GREY + 2
    np.testing.assert_array_equal(items[f"case-{NUM_GREY + 1}"], expected[-1])


def test_single_parquet_file(tmp_path):
    rows, expected = _rows()
    _dataset(rows).to_parquet(tmp_path / "chest.parquet")
    source = HFImageSource(open_hf_dataset(tmp_path / "chest.parquet"))
    assert len(source) == NUM_GREY + 2 and source.image_id(4) == "grey_04.png"
    np.testing.assert_array_equal(source.load(NUM_GREY + 1), expected[-1])


# HFStreamingSource over parquet shards


def _write_shards(folder, rows, num_files: int):
    folder.mkdir()
    dataset = _dataset(rows)
    for index in range(num_files):
        dataset.shard(num_files, index, contiguous=True).to_parquet(folder / f"part-{index}.parquet")
    return folder


@pytest.fixture(scope="module")
def grey_rows():
    return [{"bytes": _png(_grey(i)), "path": f"grey_{i:02d}.png"} for i in range(NUM_GREY)]


def test_streaming_yields_written_values(tmp_path, grey_rows):
    stream = open_hf_dataset(_write_shards(tmp_path / "shards", grey_rows, 4), streaming=True)
    assert isinstance(stream, IterableDataset) and stream.num_shards == 4
    items = list(HFStreamingSource(stream))
    assert [image_id for image_id, _ in items] == [f"grey_{i:02d}.png" for i in range(NUM_GREY)]
    for i, (_, grey) in enumerate(items):
        assert grey.dtype == np.uint8
        np.testing.assert_array_equal(grey, _grey(i))
    by_name = dict(HFStreamingSource(stream, id_column="name"))
    np.testing.assert_array_equal(by_name["case-7"], _grey(7))
    globbed = open_hf_dataset(str(tmp_path / "shards" / "part-[12].parquet"), streaming=True)
    assert globbed.num_shards == 2
    assert [image_id for image_id, _ in HFStreamingSource(globbed)] == [
        f"grey_{i:02d}.png" for i in range(3, 9)
    ]


@pytest.mark.parametrize("num_files", [4, 3])  # 3 % 2 != 0: ranks skip examples, not shards
def test_streaming_ranks_are_disjoint_and_complete(tmp_path, grey_rows, num_files):
    stream = open_hf_dataset(_write_shards(tmp_path / "shards", grey_rows, num_files), streaming=True)
    everything = {f"grey_{i:02d}.png" for i in range(NUM_GREY)}
    for shuffle_buffer in (0, 5):
        parts = [
            [image_id for image_id, _ in HFStreamingSource(
                stream, rank=rank, world_size=2, shuffle_buffer=shuffle_buffer, seed=7)]
            for rank in (0, 1)
        ]
        assert len(parts[0]) + len(parts[1]) == NUM_GREY
        assert set(parts[0]).isdisjoint(parts[1]) and set(parts[0]) | set(parts[1]) == everything
    # Through DataLoader workers, after an epoch change of the shuffle.
    parts = []
    for rank in (0, 1):
        source = HFStreamingSource(stream, rank=rank, world_size=2, shuffle_buffer=5, seed=7)
        source.set_epoch(3)
        assert source.epoch == 3
        loader = DataLoader(source, batch_size=None, num_workers=2)
        parts.append([image_id for image_id, grey in loader])
    assert len(parts[0]) + len(parts[1]) == NUM_GREY
    assert set(parts[0]).isdisjoint(parts[1]) and set(parts[0]) | set(parts[1]) == everything


def test_streaming_skips_and_counts_bad_rows(tmp_path, grey_rows):
    rows = list(grey_rows[:4])
    rows[1] = {"bytes": b"garbage", "path": "broken.png"}
    stream = open_hf_dataset(_write_shards(tmp_path / "shards", rows, 2), streaming=True)
    bad = []
    source = HFStreamingSource(stream, on_bad=lambda image_id, reason: bad.append((image_id, reason)))
    assert [image_id for image_id, _ in source] == ["grey_00.png", "grey_02.png", "grey_03.png"]
    assert source.num_bad == 1
    assert bad[0][0] == "broken.png" and "cannot decode" in bad[0][1]


def test_streaming_argument_errors(tmp_path, grey_rows):
    stream = open_hf_dataset(_write_shards(tmp_path / "shards", grey_rows, 2), streaming=True)
    with pytest.raises(ValueError, match="rank"):
        HFStreamingSource(stream, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"no column 'scan'"):
        HFStreamingSource(stream, image_column="scan")
    with pytest.raises(TypeError, match="HFImageSource"):
        HFStreamingSource(_dataset(grey_rows))


# Stream positions: resuming a pass exactly, without decoding what was already read


class _Positioned(torch.utils.data.IterableDataset):
    """The image ids of a source's lane, each with the lane's position after it."""

    def __init__(self, source):
        super().__init__()
        self.source = source

    def __iter__(self):
        for image_id, _, position in self.source.iter_items():
            yield image_id, position


def _collate(items):
    return [image_id for image_id, _ in items], items[-1][1]


def _ids_loader(stream, workers, shuffle_buffer, rank, world, resume=None):
    source = HFStreamingSource(stream, rank=rank, world_size=world,
                               shuffle_buffer=shuffle_buffer, seed=3)
    source.set_epoch(2)
    source.resume_from(resume)
    return DataLoader(_Positioned(source), batch_size=3, num_workers=workers,
                      collate_fn=_collate, drop_last=True)


@pytest.mark.parametrize("num_files, workers, shuffle_buffer, rank, world", [
    (4, 0, 0, 0, 1), (4, 2, 5, 1, 2), (3, 3, 5, 0, 2), (3, 2, 0, 0, 1),
])
def test_a_stream_resumes_at_any_batch_exactly(tmp_path, num_files, workers, shuffle_buffer,
                                               rank, world):
    """Stopped after any number of batches and resumed from the positions the batches
    carried, the loader yields exactly the rest of the uninterrupted pass: through
    DataLoader workers (lanes; 3 workers over 3 shards end unevenly), a shuffle window, two
    ranks, and shard counts that ranks share by shards (4) or by rows (3)."""
    rows = [{"bytes": _png(_grey(i % NUM_GREY)), "path": f"img_{i:02d}.png"} for i in range(41)]
    stream = open_hf_dataset(_write_shards(tmp_path / "shards", rows, num_files), streaming=True)
    full = [ids for ids, _ in _ids_loader(stream, workers, shuffle_buffer, rank, world)]
    flat = [i for ids in full for i in ids]
    assert len(flat) == len(set(flat)) >= (41 // world) - 3 * max(workers, 1) * 3
    if shuffle_buffer:
        assert flat != sorted(flat)
    lanes = max(workers, 1)
    for cut in range(len(full)):
        positions, first_lane = [None] * lanes, 0
        loader = _ids_loader(stream, workers, shuffle_buffer, rank, world)
        for _, (_, position) in zip(range(cut), loader):
            positions[position["lane"]] = position
            first_lane = (position["lane"] + 1) % lanes
        resume = {"epoch": 2, "lanes": lanes, "first_lane": first_lane, "positions": positions}
        rest = [ids for ids, _ in _ids_loader(stream, workers, shuffle_buffer, rank, world, resume)]
        assert rest == full[cut:], cut


def test_a_resumed_stream_decodes_only_what_is_left(tmp_path, grey_rows):
    stream = open_hf_dataset(_write_shards(tmp_path / "shards", grey_rows, 2), streaming=True)
    for shuffle_buffer in (0, 5):
        def source(shuffle_buffer=shuffle_buffer):
            return HFStreamingSource(stream, shuffle_buffer=shuffle_buffer, seed=1)

        everything = list(source().iter_items())
        for cut in (1, 4, 5, 7, NUM_GREY - 1):
            first = source()
            position = [item for _, item in zip(range(cut), first.iter_items())][-1][2]
            assert first.num_decoded == cut
            resumed = source()
            resumed.resume_from({"epoch": 0, "lanes": 1, "first_lane": 0, "positions": [position]})
            rest = list(resumed.iter_items())
            assert [i for i, _, _ in rest] == [i for i, _, _ in everything[cut:]]
            for (_, a, _), (_, b, _) in zip(rest, everything[cut:]):
                np.testing.assert_array_equal(a, b)
            assert resumed.num_decoded == NUM_GREY - cut  # none of the first `cut` again
    other = source()
    other.resume_from({"epoch": 0, "lanes": 2, "first_lane": 0, "positions": [None, None]})
    with pytest.raises(ValueError, match="saved position is for 2 DataLoader workers"):
        list(other)
    other.set_epoch(1)  # a position of another epoch is not used
    assert len(list(other)) == NUM_GREY
