"""Pre-training on a streaming Hugging Face dataset: one process and two."""

import io
import json
import os
import shutil
import subprocess
import sys

import datasets
import pytest
from PIL import Image

from caid_hf.data.hf_sources import HFStreamingSource
from caid_hf.data.phantoms import generate_phantom
from caid_hf.data.streaming import StreamingTwoCrops, take_head
from caid_hf.training.pretrain import main

from helpers import ROOT, TINY


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _parquet_shards(folder, num_images=48, num_files=4, size=80):
    """Phantom PNGs in ``num_files`` parquet files, with an ``id`` column."""
    def png(i):
        buffer = io.BytesIO()
        Image.fromarray(generate_phantom(i, size, 0, True)[0]).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    data = datasets.Dataset.from_dict(
        {"image": [png(i) for i in range(num_images)], "id": [f"img{i:03d}" for i in range(num_images)]}
    ).cast_column("image", datasets.Image())
    folder.mkdir(parents=True)
    for index in range(num_files):
        data.shard(num_files, index, contiguous=True).to_parquet(folder / f"part-{index}.parquet")
    return str(folder / "*.parquet")


def test_streaming_crops_skip_the_held_out_head_and_follow_the_epoch(tmp_path):
    pattern = _parquet_shards(tmp_path / "shards", num_images=12, num_files=2)
    from caid_hf.data.hf_sources import open_hf_dataset

    def stream():
        return HFStreamingSource(open_hf_dataset(pattern, streaming=True), id_column="id")

    head = take_head(stream(), 3)
    assert head.ids == ["img000", "img001", "img002"] and head.load(0).shape == (80, 80)
    crops = StreamingTwoCrops(stream(), 32, seed=1, exclude=frozenset(head.ids))
    first = list(crops)
    assert len(first) == 9 and all(item[0].shape == (2, 32, 32) and item[1] == [] for item in first)
    again = list(crops)
    assert all((a[0] == b[0]).all() for a, b in zip(first, again))  # same epoch, same crops
    crops.set_epoch(1)
    assert not all((a[0] == b[0]).all() for a, b in zip(first, list(crops)))


@pytest.mark.slow
def test_streaming_run_trains_and_validates_on_the_held_out_head(tmp_path):
    pattern = _parquet_shards(tmp_path / "shards")
    out = tmp_path / "run"
    result = main(TINY + ["--train_source", pattern, "--streaming", "true", "--id_column", "id",
                          "--streaming_validation_images", "8", "--max_steps", "4",
                          "--output_dir", str(out)])
    assert result.global_step == 4 and (out / "final" / "model.safetensors").is_file()
    assert [h["val/loss"] for h in result.history if "val/loss" in h]
    with pytest.raises(ValueError, match="max_steps"):
        main(TINY + ["--train_source", pattern, "--streaming", "true",
                     "--output_dir", str(tmp_path / "no_steps")])


def _decoded(folder, rank):
    lines = (folder / f"decoded_{rank}.tsv").read_text().splitlines()
    return [tuple(line.split("\t")) for line in lines]


@pytest.mark.slow
def test_two_process_stream_killed_mid_epoch_resumes_at_its_position(tmp_path, free_port):
    """Two ranks, two DataLoader workers each, a shuffle window: within each pass over the
    stream the ranks read disjoint images; SIGKILLed at step 7 (the last checkpoint is step
    6, mid-epoch), the same command resumes at the saved stream position, decodes none of
    the images already trained on, and ends bit for bit where an uninterrupted run ends."""
    from helpers import assert_identical_runs

    pattern = _parquet_shards(tmp_path / "shards", num_images=96, num_files=4, size=72)
    script = ROOT / "tests" / "scripts" / "stream_resume.py"
    args = [*TINY, "--per_device_train_batch_size", "4", "--train_source", pattern,
            "--streaming", "true", "--id_column", "id", "--validation_source", "phantoms",
            "--streaming_shuffle_buffer", "5", "--dataloader_num_workers", "2",
            "--max_steps", "14", "--save_steps", "2", "--save_total_limit", "3",
            "--full_determinism", "true", "--resume_from_checkpoint", "latest"]

    def launch(out, logs, **env_extra):
        logs.mkdir(exist_ok=True)
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
               "CAID_DECODE_LOG": str(logs), **env_extra}
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(free_port), str(script),
               *args, "--output_dir", str(out)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)

    reference = tmp_path / "reference"
    proc = launch(reference, tmp_path / "log_reference")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    read = [_decoded(tmp_path / "log_reference", rank) for rank in (0, 1)]
    epochs = {e for rank in read for e, _ in rank}
    assert {"0", "1"} <= epochs  # 14 steps of 8 take more than one pass over 96 images
    for epoch in epochs:  # datasets may hand the shards out differently in each pass
        ids0, ids1 = ({i for e, i in rank if e == epoch} for rank in read)
        assert ids0 and ids1 and not ids0 & ids1, epoch
    killed = tmp_path / "killed"
    proc = launch(killed, tmp_path / "log_killed", CAID_SIGKILL_AT_STEP="7")
    assert proc.returncode != 0
    state = json.loads((killed / "checkpoints" / "checkpoint_6" / "checkpoint_state.json")
                       .read_text())
    assert state["epoch"] == 0 and state["batches_in_epoch"] == 6  # of 12: 96 images / 8
    assert [p["lanes"] for p in state["stream_positions"]] == [2, 2]
    proc = launch(killed, tmp_path / "log_resumed")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the stream resumes at its saved position in epoch 0" in proc.stdout
    assert_identical_runs(reference, killed, step=14)
    for rank in (0, 1):
        # Each rank's part of epoch 0 is 48 images; its first 6 batches (24 images) were
        # trained on before the kill. The resumed run decodes the other 24, once each.
        first = [i for e, i in _decoded(tmp_path / "log_reference", rank) if e == "0"]
        again = [i for e, i in _decoded(tmp_path / "log_resumed", rank) if e == "0"]
        assert len(first) == len(set(first)) == 48
        assert len(again) == len(set(again)) == 24 and set(again) <= set(first)


def test_a_resumed_stream_continues_at_its_position_or_says_why_not(tmp_path, capsys):
    pattern = _parquet_shards(tmp_path / "shards", num_images=40, num_files=2, size=64)
    args = TINY + ["--train_source", pattern, "--streaming", "true", "--id_column", "id",
                   "--streaming_validation_images", "4", "--streaming_shuffle_buffer", "6",
                   "--save_steps", "2", "--per_device_train_batch_size", "4", "--max_steps", "4"]
    reference = main(args + ["--output_dir", str(tmp_path / "reference")])
    checkpoint = tmp_path / "reference" / "checkpoints" / "checkpoint_2"
    saved = json.loads((checkpoint / "checkpoint_state.json").read_text())
    assert saved["batches_in_epoch"] == 2  # mid-epoch
    assert saved["stream_positions"][0]["lanes"] == 1  # no workers: one lane
    position = saved["stream_positions"][0]["positions"][0]
    assert position["block"] >= 1 and 0 < position["taken"] <= position["size"] == 6
    capsys.readouterr()
    resumed = main(args + ["--output_dir", str(tmp_path / "resumed"),
                           "--resume_from_checkpoint", str(checkpoint)])
    assert "the stream resumes at its saved position in epoch 0" in capsys.readouterr().out
    losses = [[h["train/loss"] for h in run.history if "train/loss" in h]
              for run in (reference, resumed)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    main(args + ["--output_dir", str(tmp_path / "other"), "--resume_from_checkpoint",
                 str(checkpoint), "--dataloader_num_workers", "2"])
    assert ("the checkpoint's stream position is for 1 DataLoader workers, this run has 2: "
            "reading the epoch's first 2 batches again to skip them") in capsys.readouterr().out
    damaged = tmp_path / "copied" / "checkpoint_2"  # a hand-edited position: re-read, say why
    shutil.copytree(checkpoint, damaged)
    saved["stream_positions"][0]["positions"] = "garbage"
    (damaged / "checkpoint_state.json").write_text(json.dumps(saved))
    again = main(args + ["--output_dir", str(tmp_path / "damaged"), "--resume_from_checkpoint",
                         str(damaged)])
    assert "the checkpoint's stream position is unreadable" in capsys.readouterr().out
    assert [h["train/loss"] for h in again.history if "train/loss" in h] == losses[0]
