import json
import pickle

import numpy as np
import pytest
from datasets import load_from_disk
from PIL import Image

from caid_hf.cli import main
from caid_hf.data.cache import CachedSource, default_cache_size, is_cache, prepare_cache
from caid_hf.data.crops import TwoCropDataset
from caid_hf.data.phantoms import generate_phantom, write_phantoms
from caid_hf.data.sources import ImageFolderSource, PhantomSource, decode_grey

from helpers import TINY


def expected_resize(image: np.ndarray, size: int) -> np.ndarray:
    """The documented rule, written out: short side to ``size`` (long side rounded), Lanczos."""
    height, width = image.shape
    short = min(height, width)
    if short <= size:
        return image
    new_height = int(height * size / short + 0.5)  # nearest pixel, halves up
    new_width = int(width * size / short + 0.5)
    resized = Image.fromarray(image).resize((new_width, new_height), Image.LANCZOS,
                                            reducing_gap=2.0)
    return np.asarray(resized)


class ShapesSource:
    """Crops of phantoms in assorted shapes: portrait, landscape, small, exactly ``size``."""

    shapes = [(300, 200), (70, 101), (150, 150), (50, 40), (64, 100), (30, 500)]

    def __len__(self):
        return len(self.shapes)

    def load(self, i):
        height, width = self.shapes[i]
        return generate_phantom(i, 512)[0][:height, :width]

    def image_id(self, i):
        return f"shape_{i}"


class CountingSource(PhantomSource):
    """Phantoms that count their loads and raise KeyboardInterrupt on load number ``stop_at``."""

    def __init__(self, num_images, stop_at=None):
        super().__init__(num_images, size=64)
        self.loads = 0
        self.stop_at = stop_at

    def load(self, i):
        self.loads += 1
        if self.loads == self.stop_at:
            raise KeyboardInterrupt
        return super().load(i)


def rows(path):
    cache = CachedSource(path)
    return [(cache.image_id(i), cache.load(i).copy()) for i in range(len(cache))]


def test_default_size_covers_the_smallest_crop():
    assert default_cache_size() == 608
    assert default_cache_size(view_size=224, crop_scale_min=1.0, max_aspect=1.0) == 224
    assert default_cache_size(view_size=64) == 192  # 64 / sqrt(0.15) = 165.3


def test_pixels_follow_the_short_side_rule(tmp_path):
    source = ShapesSource()
    cache = CachedSource(prepare_cache(source, tmp_path / "cache", size=64, progress=False))
    shapes = [cache.load(i).shape for i in range(len(cache))]
    assert shapes == [(96, 64), (64, 92), (64, 64), (50, 40), (64, 100), (30, 500)]
    for i in range(len(source)):
        image = cache.load(i)
        assert image.dtype == np.uint8
        np.testing.assert_array_equal(image, expected_resize(source.load(i), 64))
    np.testing.assert_array_equal(cache.load(3), source.load(3))  # small: stored as is
    assert [cache.image_id(i) for i in range(len(cache))] == [f"shape_{i}" for i in range(6)]
    assert cache.metadata["size"] == 64 and cache.metadata["num_images"] == 6


def test_bad_files_are_skipped_and_listed(tmp_path):
    folder = tmp_path / "images"
    write_phantoms(folder, 5, size=96)
    png = (folder / "phantom_00000.png").read_bytes()
    (folder / "bad_empty.png").write_bytes(b"")
    (folder / "bad_text.png").write_text("not an image")
    (folder / "bad_truncated.png").write_bytes(png[: len(png) // 2])
    source = ImageFolderSource(folder)
    out = prepare_cache(source, tmp_path / "cache", size=64, chunk_size=3,
                        source_description="test folder", progress=False)

    assert is_cache(out) and not (tmp_path / "cache.partial").exists()
    written = rows(out)
    assert [image_id for image_id, _ in written] == [f"phantom_{i:05d}.png" for i in range(5)]
    for i, (_, image) in enumerate(written):
        np.testing.assert_array_equal(image, expected_resize(decode_grey(folder / f"phantom_{i:05d}.png"), 64))
    metadata = json.loads((out / "caid_cache.json").read_text())
    bad = {entry["image_id"]: entry["reason"] for entry in metadata["bad_files"]}
    assert sorted(bad) == ["bad_empty.png", "bad_text.png", "bad_truncated.png"]
    assert all(reason.startswith("ValueError: cannot decode image") for reason in bad.values())
    assert (metadata["num_images"], metadata["num_source_images"]) == (5, 8)
    assert metadata["source"] == "test folder" and metadata["resize_filter"] == "LANCZOS"
    assert {"caid_hf_version", "created"} <= set(metadata)

    dataset = load_from_disk(str(out))  # a standard datasets folder
    assert json.loads(dataset.info.description) == metadata
    assert dataset.column_names == ["image_id", "height", "width", "pixels"]
    first = dataset[0]
    assert (first["height"], first["width"]) == (64, 64) and len(first["pixels"]) == 64 * 64


def test_interrupted_run_resumes_without_recomputing(tmp_path):
    out = tmp_path / "cache"
    interrupted = CountingSource(10, stop_at=7)  # chunk 0 (loads 1-4) done, chunk 1 cut short
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(interrupted, out, size=48, chunk_size=4, progress=False)
    partial = tmp_path / "cache.partial"
    assert sorted(p.name for p in partial.iterdir()) == [
        "chunk_00000.arrow", "chunk_00000.json", "manifest.json"]  # no temporary file left
    assert not out.exists()

    resumed = CountingSource(10)
    prepare_cache(resumed, out, size=48, chunk_size=4, progress=False)
    assert resumed.loads == 6  # chunks 1 and 2 only
    assert not partial.exists()
    written = rows(out)
    assert [image_id for image_id, _ in written] == [f"phantom_{i:05d}" for i in range(10)]
    for i, (_, image) in enumerate(written):
        np.testing.assert_array_equal(image, expected_resize(resumed.load(i), 48))


def test_partial_folder_of_another_job_is_refused(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(CountingSource(10, stop_at=6), tmp_path / "cache", size=48, chunk_size=4,
                      progress=False)
    with pytest.raises(ValueError, match=r"size: 48 there, 32 now.*Delete that folder"):
        prepare_cache(CountingSource(10), tmp_path / "cache", size=32, chunk_size=4,
                      progress=False)
    with pytest.raises(ValueError, match="num_source_images: 10 there, 12 now"):
        prepare_cache(CountingSource(12), tmp_path / "cache", size=48, chunk_size=4,
                      progress=False)


def test_finished_cache_needs_overwrite(tmp_path):
    out = prepare_cache(PhantomSource(3, size=40), tmp_path / "cache", size=32, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare_cache(PhantomSource(4, size=40), out, size=32, progress=False)
    prepare_cache(PhantomSource(4, size=40), out, size=32, progress=False, overwrite=True)
    assert len(CachedSource(out)) == 4
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a caid-hf cache"):
        prepare_cache(PhantomSource(4, size=40), tmp_path / "other", overwrite=True, progress=False)


def test_two_processes_give_the_same_cache(tmp_path):
    source = PhantomSource(9, size=80)
    serial = prepare_cache(source, tmp_path / "one", size=48, chunk_size=2, progress=False)
    parallel = prepare_cache(source, tmp_path / "two", size=48, chunk_size=2, num_proc=2,
                             progress=False)
    one, two = load_from_disk(str(serial)), load_from_disk(str(parallel))
    assert one.data.table.equals(two.data.table)
    assert one["image_id"] == [source.image_id(i) for i in range(9)]


def test_cached_source_pickles_and_feeds_the_crops(tmp_path):
    cache = CachedSource(prepare_cache(PhantomSource(4, size=100), tmp_path / "cache", size=64,
                                       progress=False))
    image = cache.load(2)
    assert image.shape == (64, 64) and not image.flags.writeable
    payload = pickle.dumps(cache)
    assert len(payload) < 2000  # the path and metadata, never pixels
    clone = pickle.loads(payload)
    assert len(clone) == 4 and clone.metadata == cache.metadata
    for i in range(4):
        np.testing.assert_array_equal(clone.load(i), cache.load(i))
    assert clone.image_id(3) == "phantom_00003"
    with pytest.raises(IndexError):
        cache.load(4)
    assert TwoCropDataset(cache, image_size=32)[0].shape == (2, 32, 32)
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        CachedSource(tmp_path)


def test_cli_prepare_data(tmp_path, capsys):
    folder = tmp_path / "images"
    write_phantoms(folder, 5, size=72)
    (folder / "broken.png").write_bytes(b"")
    out = tmp_path / "cache"
    main(["prepare-data", str(folder), "--out", str(out), "--size", "48", "--chunk-size", "2",
          "--num-proc", "2"])
    summary = capsys.readouterr().out
    assert "wrote 5 images (1 bad files) with short side 48" in summary
    cache = CachedSource(out)
    assert cache.metadata["source"] == str(folder.resolve())
    assert cache.metadata["bad_files"][0]["image_id"] == "broken.png"
    np.testing.assert_array_equal(cache.load(4), expected_resize(generate_phantom(4, 72)[0], 48))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # a user's mistake: status 2, one message
        main(["prepare-data", str(folder), "--out", str(out), "--size", "48"])
    assert exit_info.value.code == 2
    assert "already holds a finished cache" in capsys.readouterr().err
    main(["prepare-data", str(folder), "--out", str(out), "--overwrite"])
    assert CachedSource(out).load(0).shape == (72, 72)  # default 608: never upscaled


def test_cached_source_reads_across_arrow_chunks(tmp_path):
    out = prepare_cache(PhantomSource(7, size=40), tmp_path / "cache", size=32, progress=False)
    resharded = tmp_path / "resharded"  # large caches come as several files and record batches
    load_from_disk(str(out)).save_to_disk(str(resharded), num_shards=3)
    (resharded / "caid_cache.json").write_bytes((out / "caid_cache.json").read_bytes())
    one, three = CachedSource(out), CachedSource(resharded)
    assert three.load(0) is not None and len(three._columns["starts"]) == 4
    for i in range(7):
        np.testing.assert_array_equal(three.load(i), one.load(i))
        assert three.image_id(i) == one.image_id(i)


@pytest.mark.slow
def test_pretraining_reads_a_cache_like_any_source(tmp_path):

    from caid_hf.training.pretrain import main as pretrain

    images = tmp_path / "pngs"
    write_phantoms(images, 24, size=96, seed=0)
    (images / "empty.png").write_bytes(b"")
    cache = tmp_path / "cache"
    main(["prepare-data", str(images), "--out", str(cache), "--size", "80"])
    assert CachedSource(cache).load(0).shape == (80, 80)
    out = tmp_path / "run"
    result = pretrain(TINY + ["--train_source", str(cache), "--max_steps", "2",
                              "--output_dir", str(out)])
    assert result.global_step == 2 and (out / "final" / "model.safetensors").is_file()
    assert not (out / "bad_files.tsv").exists()  # the cache left the empty file out
    # its parquet shards, streamed (the layout the Hub serves)
    shards = tmp_path / "shards"
    main(["prepare-data", str(images), "--out", str(shards), "--size", "80", "--shards", "2",
          "--shard-format", "parquet"])
    result = pretrain(TINY + ["--train_source", str(shards), "--streaming", "true",
                              "--streaming_validation_images", "8", "--max_steps", "2",
                              "--output_dir", str(tmp_path / "streamed")])
    assert result.global_step == 2 and [h for h in result.history if "val/loss" in h]


def test_sharded_caches_hold_the_same_rows_and_stream(tmp_path, capsys, monkeypatch):
    """``--shards N``: N Arrow files (random access and streaming) or N parquet files with
    a dataset card (streaming, locally or as ``hf:``); every layout yields the one-file
    cache's images and ids in the same order."""
    import datasets

    from caid_hf.data.hf_sources import HFStreamingSource
    from caid_hf.data.source_spec import HFOptions, is_hf_spec, open_hf_spec, source_from_spec

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    folder = tmp_path / "images"
    write_phantoms(folder, 11, size=72)
    (folder / "broken.png").write_bytes(b"")
    one = CachedSource(prepare_cache(ImageFolderSource(folder), tmp_path / "one", size=48,
                                     chunk_size=4, progress=False))
    main(["prepare-data", str(folder), "--out", str(tmp_path / "arrow"), "--size", "48",
          "--chunk-size", "4", "--shards", "3"])
    assert "wrote 11 images (1 bad files) with short side 48 as 3 arrow shards" in \
        capsys.readouterr().out
    main(["prepare-data", str(folder), "--out", str(tmp_path / "parquet"), "--size", "48",
          "--shards", "4", "--shard-format", "parquet"])
    assert sorted(p.name for p in (tmp_path / "arrow").glob("*.arrow")) == [
        f"data-0000{k}-of-00003.arrow" for k in range(3)]
    assert sorted(p.name for p in (tmp_path / "parquet" / "data").iterdir()) == [
        f"train-0000{k}-of-00004.parquet" for k in range(4)]
    arrow = CachedSource(tmp_path / "arrow")
    assert arrow.metadata["num_shards"] == 3 and len(arrow) == len(one) == 11
    for i in range(11):
        np.testing.assert_array_equal(arrow.load(i), one.load(i))
    for spec in (str(tmp_path / "arrow"), str(tmp_path / "parquet"),
                 f"hf:{tmp_path / 'parquet'}"):
        assert is_hf_spec(spec)
        stream = open_hf_spec(spec, None, HFOptions(), streaming=True)
        assert stream.num_shards == (3 if spec.endswith("arrow") else 4)
        items = list(HFStreamingSource(stream))
        assert [image_id for image_id, _ in items] == [one.image_id(i) for i in range(11)]
        for i, (_, grey) in enumerate(items):
            np.testing.assert_array_equal(grey, one.load(i))
    with pytest.raises(ValueError, match="parquet shards, which are read as a stream: train "
                                         "with --streaming true"):
        source_from_spec(str(tmp_path / "parquet"))
    with pytest.raises(ValueError, match="num_shards=12 is more than the 11 images"):
        prepare_cache(ImageFolderSource(folder), tmp_path / "many", size=48, num_shards=12,
                      progress=False)
