import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoImageProcessor, AutoModel

from caid_hf import CAiDModel
from caid_hf.training.arguments import parse_pretraining_args
from caid_hf.training.pretrain import main

from helpers import ROOT, TINY


def test_yaml_and_command_line_precedence(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("encoder_name: resnet18\nlearning_rate: 0.5\nqueue_size: 128\n")
    model_args, data_args, args = parse_pretraining_args(
        ["--config", str(cfg), "--learning_rate", "0.1", "--context_prediction", "false"])
    assert model_args.encoder_name == "resnet18" and model_args.queue_size == 128
    assert args.learning_rate == 0.1 and model_args.context_prediction is False
    assert model_args.momentum == 0.999 and args.sgd_momentum == 0.9
    assert data_args.train_source == "phantoms"


def test_unknown_yaml_key_is_named_with_a_suggestion(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learnig_rate: 0.5\n")
    with pytest.raises(ValueError, match="learnig_rate.*learning_rate"):
        parse_pretraining_args(["--config", str(cfg)])


def test_queue_not_divisible_by_global_batch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="queue_size=60"):
        main(TINY + ["--queue_size", "60", "--output_dir", str(tmp_path), "--max_steps", "1"])


def test_world_size_without_process_group_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="no process group"):
        main(TINY + ["--output_dir", str(tmp_path), "--max_steps", "1"])


@pytest.mark.slow
def test_pretrain_writes_best_and_final_backbones(tmp_path):
    out = tmp_path / "run"
    result = main(TINY + ["--output_dir", str(out), "--num_train_epochs", "2",
                          "--report_to", "tensorboard"])
    assert result.global_step == 8  # 32 phantoms / batch 8 = 4 steps per epoch
    for name in ("best", "final"):
        assert (out / name / "model.safetensors").is_file()
        model = AutoModel.from_pretrained(out / name)
        assert isinstance(model, CAiDModel) and model.config.encoder_name == "resnet18"
        processor = AutoImageProcessor.from_pretrained(out / name)
        assert processor.size == 64  # the run's image_size
        card = ModelCard.load(out / name / "README.md")
        assert card.data.library_name == "transformers" and "synthetic-data" in card.data.tags
        assert "chest-x-ray" not in card.data.tags  # a phantom run
    final = CAiDModel.from_pretrained(out / "final").state_dict()
    trained = result.model.caid.state_dict()
    assert all(torch.equal(final[k], trained[k]) for k in trained)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and state["metric_for_best_model"] == "val/loss"
    assert 0 < state["best_metric"] < float("inf")
    assert state["num_train_images"] == 32 and state["num_validation_images"] == 8
    assert f"{state['best_metric']:.4f} at step {state['best_step']}" in (
        out / "best" / "README.md").read_text()
    last = [h for h in state["history"] if "val/loss" in h][-1]
    assert f"{last['val/loss']:.4f} at step 8" in (out / "final" / "README.md").read_text()
    vals = [h for h in state["history"] if "val/loss" in h]
    assert len(vals) == 2 and all("val/reconstruction_loss" in h for h in vals)
    trains = [h for h in state["history"] if "train/loss" in h]
    assert len(trains) == 8 and trains[0]["train/lr"] > trains[-1]["train/lr"]  # cosine decays
    assert len(list((out / "checkpoints").iterdir())) == 2  # one training state per epoch
    assert list(out.glob("tensorboard/events.out.tfevents.*"))
    assert (out / "run_config.yaml").is_file()
    assert int(result.model.objective.queue_ptr) == (8 * 8) % 64


@pytest.mark.slow
def test_resume_from_latest_checkpoint_continues_the_run(tmp_path):
    out = tmp_path / "run"
    main(TINY + ["--output_dir", str(out), "--num_train_epochs", "1"])
    resumed = main(TINY + ["--output_dir", str(out), "--num_train_epochs", "2",
                           "--resume_from_checkpoint", "latest"])
    assert resumed.global_step == 8
    # the second run did only the second epoch: its history starts at step 1 of run one
    steps = [h["step"] for h in resumed.history if "train/loss" in h]
    assert steps == list(range(1, 9))


@pytest.mark.slow
def test_instance_discrimination_baseline_trains(tmp_path):
    out = tmp_path / "id"
    result = main(TINY + ["--output_dir", str(out), "--max_steps", "3",
                          "--context_prediction", "false"])
    assert result.global_step == 3
    history = [h for h in result.history if "val/loss" in h]
    assert "val/reconstruction_loss" not in history[-1]
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_process_cpu_run_keeps_ranks_identical(tmp_path, free_port):
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port),
           str(ROOT / "tests" / "scripts" / "two_rank_pretrain.py"),
           *TINY, "--per_device_train_batch_size", "4", "--output_dir", str(out), "--max_steps", "3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    # Parameters (query and key branch), queue and pointer agree bit for bit. BatchNorm running
    # statistics are broadcast by DDP at the start of each forward, so after the last step each
    # rank holds its own; they are not compared.
    for name in [*r0["parameters"], "objective.queue", "objective.queue_ptr"]:
        assert torch.equal(r0["state"][name], r1["state"][name]), name
    assert int(r0["state"]["objective.queue_ptr"]) == 3 * 8  # 3 steps × global batch 8
    # The ranks train on disjoint shards of one shuffled order: 3 steps × 4 images each (plus
    # the batch the loader prefetches).
    seen0, seen1 = r0["train_indices"], r1["train_indices"]
    assert len(seen0) >= 12 and len(seen1) >= 12 and not set(seen0) & set(seen1)
    # The queue holds both ranks' keys: rank 0's then rank 1's, step after step.
    queue = r0["state"]["objective.queue"]
    assert len(r0["local_keys"]) == len(r1["local_keys"]) == 3
    for step, (k0, k1) in enumerate(zip(r0["local_keys"], r1["local_keys"])):
        assert not torch.allclose(k0, k1)
        start = step * 8
        torch.testing.assert_close(queue[:, start:start + 4], k0.T, rtol=0, atol=0)
        torch.testing.assert_close(queue[:, start + 4:start + 8], k1.T, rtol=0, atol=0)


@pytest.mark.slow
def test_continue_pretraining_from_a_published_backbone(tmp_path):
    first = main(TINY + ["--output_dir", str(tmp_path / "a"), "--max_steps", "2"])
    second = main(TINY + ["--output_dir", str(tmp_path / "b"), "--max_steps", "1",
                          "--learning_rate", "1e-4", "--init_from", str(tmp_path / "a" / "final")])
    assert second.global_step == 1
    # one small SGD step away from the loaded weights, not from a random initialisation
    start = first.model.caid.encoder.conv1.weight
    moved = (second.model.caid.encoder.conv1.weight - start).abs().max()
    assert 0 < moved < 0.01 * start.abs().max()
    assert torch.isfinite(second.model.objective.queue).all()


def test_cli_writes_phantoms_and_lists_commands(tmp_path, capsys):
    from PIL import Image

    from caid_hf.cli import main as cli
    from caid_hf.data.phantoms import generate_phantom

    cli(["phantoms", "--out", str(tmp_path), "--num", "3", "--size", "64", "--masks"])
    images = sorted(tmp_path.glob("phantom_*.png"))
    assert len(images) == 3 and len(list((tmp_path / "masks").glob("*.png"))) == 3
    assert np.array_equal(np.asarray(Image.open(images[2])), generate_phantom(2, size=64)[0])
    cli([])
    assert "pretrain" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli(["pretrian"])
    assert exit_info.value.code == 2
    assert "unknown command 'pretrian'" in capsys.readouterr().err


@pytest.mark.slow
def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    result = main(TINY + ["--output_dir", str(tmp_path), "--max_steps", "2",
                          "--gradient_accumulation_steps", "2"])
    assert result.global_step == 2
    # every micro-batch enqueues its keys: 4 micro-batches of 8
    assert int(result.model.objective.queue_ptr) == 32


def test_output_dir_of_another_run_is_refused_before_any_model_is_built(tmp_path, monkeypatch):
    (tmp_path / "checkpoints" / "checkpoint_0").mkdir(parents=True)
    built = []
    monkeypatch.setattr("caid_hf.training.pretrain.CAiDForPreTraining.__init__",
                        lambda *a, **k: built.append(1))
    with pytest.raises(FileExistsError, match="resume_from_checkpoint latest"):
        main(TINY + ["--output_dir", str(tmp_path), "--max_steps", "1"])
    assert not built and (tmp_path / "checkpoints" / "checkpoint_0").is_dir()


@pytest.mark.slow
def test_overwrite_output_dir_replaces_the_previous_run(tmp_path):
    main(TINY + ["--output_dir", str(tmp_path), "--max_steps", "1"])
    result = main(TINY + ["--output_dir", str(tmp_path), "--max_steps", "2",
                          "--overwrite_output_dir", "true"])
    assert result.global_step == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint_2"]


def test_init_from_with_another_architecture_is_refused(tmp_path):
    from caid_hf import CAiDConfig

    CAiDConfig(encoder_name="resnet34", image_size=64).save_pretrained(tmp_path / "backbone")
    with pytest.raises(ValueError, match="encoder_name='resnet34'.*encoder_name='resnet18'"):
        main(TINY + ["--output_dir", str(tmp_path / "run"), "--max_steps", "1",
                     "--init_from", str(tmp_path / "backbone")])


def test_cli_export_writes_an_smp_folder(tmp_path):
    import segmentation_models_pytorch as smp

    from caid_hf import CAiDConfig
    from caid_hf.cli import main as cli

    model = CAiDModel(CAiDConfig(encoder_name="resnet18", image_size=64)).eval()
    model.save_pretrained(tmp_path / "backbone")
    cli(["export", str(tmp_path / "backbone"), "--out", str(tmp_path / "smp")])
    unet = smp.from_pretrained(tmp_path / "smp").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(unet(x), model(x).reconstruction)


@pytest.mark.slow
def test_hub_dry_run_lists_the_best_folder(tmp_path, capsys):
    out = tmp_path / "run"
    main(TINY + ["--output_dir", str(out), "--max_steps", "2", "--hub_model_id", "org/caid-tiny",
                 "--hub_revision", "v1", "--hub_dry_run", "true"])
    printed = capsys.readouterr().out
    assert "org/caid-tiny" in printed and "v1" in printed
    files = sorted(p for p in (out / "best").iterdir() if p.is_file())
    assert {p.name for p in files} >= {"config.json", "model.safetensors",
                                       "preprocessor_config.json", "README.md"}
    for path in files:
        assert f"{path.name}  {path.stat().st_size} bytes" in printed
    listed = [line.split()[0] for line in printed.splitlines() if " bytes" in line
              and line.startswith("  ")]
    assert sorted(listed) == sorted(p.name for p in files)  # nothing else would be uploaded


def test_push_needs_a_repo_id(tmp_path):
    with pytest.raises(ValueError, match="hub_model_id"):
        main(TINY + ["--output_dir", str(tmp_path), "--push_to_hub", "true"])


def test_init_from_a_pretraining_folder_checks_its_head_and_queue(tmp_path):
    from caid_hf import CAiDConfig

    saved = CAiDConfig(encoder_name="resnet18", image_size=64, projection_head="linear",
                       queue_size=64, projection_dim=16, architectures=["CAiDForPreTraining"])
    saved.save_pretrained(tmp_path / "pt")
    with pytest.raises(ValueError, match="projection_head='linear'"):
        main(TINY + ["--output_dir", str(tmp_path / "run"), "--max_steps", "1",
                     "--init_from", str(tmp_path / "pt")])


def test_a_failed_main_process_step_is_raised_after_the_barrier():
    from caid_hf.runs import on_main_process

    events = []

    class Accelerator:
        is_main_process = True

        def wait_for_everyone(self):
            events.append("barrier")

    def failing_push():
        events.append("push")
        raise ConnectionError("hub unreachable")

    with pytest.raises(ConnectionError, match="hub unreachable"):
        on_main_process(Accelerator(), failing_push)
    assert events == ["push", "barrier"]  # the other processes were released first


def test_validation_writes_reconstruction_pictures(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from caid_hf.training.reports import grid_caption

    out = tmp_path / "run"
    result = main(TINY + ["--output_dir", str(out), "--max_steps", "4",
                          "--report_to", "tensorboard"])
    pngs = sorted((out / "pictures").glob("*.png"))
    assert [p.name for p in pngs] == ["reconstructions_step0000004.png"]
    loss = next(r["val/loss"] for r in result.history if "val/loss" in r and r["step"] == 4)
    with Image.open(pngs[0]) as picture:
        # 8 validation images as rows of (input | reconstruction | target): 64 px views
        # enlarged 2x (nearest) to 128 px tiles, 2 px gaps, a 20 px caption band (step,
        # loss, source) and a 20 px band of column labels
        assert picture.size == (3 * 128 + 4 * 2, 40 + 8 * 128 + 9 * 2)
        # what the caption says is also in the file, for programs
        assert picture.text["step"] == "4" and picture.text["source"] == "phantoms"
        assert float(picture.text["val_loss"]) == pytest.approx(loss, rel=1e-9)
        grid = np.asarray(picture.convert("L"), dtype=np.float64)
    caption, band, inputs = grid[:20], grid[20:40], grid[42:170, 2:130]
    reconstructions = grid[42:170, 132:260]
    for text_band in (caption, band):
        assert text_band.min() < 100 and text_band.mean() > 200  # dark text on white
    assert inputs.std() > 5 and reconstructions.std() > 0  # real images, not blank tiles
    # nearest enlargement: every 2 x 2 block holds one grey level
    np.testing.assert_array_equal(inputs[0::2, 0::2], inputs[1::2, 1::2])
    assert grid_caption(4, loss, "phantoms") == (
        f"step 4 | val loss {loss:.4f} | synthetic chest phantoms (phantoms)")
    assert grid_caption(10, 1.5, "/data/cxr") == "step 10 | val loss 1.5000 | data: /data/cxr"
    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents.*")).parent),
                              size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("val/reconstructions")] == [4]


MULTI_NODE_LAUNCH = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                     "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
                     "--main_process_ip", "127.0.0.1"]


@pytest.mark.slow
def test_two_machines_on_one_host_train_as_one(tmp_path, free_port):
    """The README's multi-node commands with both "machines" on this host: two separate
    ``accelerate launch --num_machines 2 --machine_rank {0,1}`` processes rendezvous at
    127.0.0.1 and train as one run of world size 2 (identical parameters and queue after
    the steps, keys of both machines in the queue)."""
    out = tmp_path / "nodes"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    script = [str(ROOT / "tests" / "scripts" / "two_rank_pretrain.py"), *TINY,
              "--per_device_train_batch_size", "4", "--output_dir", str(out), "--max_steps", "3"]
    machines = [subprocess.Popen([sys.executable, *MULTI_NODE_LAUNCH, "--machine_rank", str(r),
                                  "--main_process_port", str(free_port), *script],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True) for r in (0, 1)]
    logs = [m.communicate(timeout=600)[0] for m in machines]
    for machine, log in zip(machines, logs):
        assert machine.returncode == 0, log[-4000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    for name in [*r0["parameters"], "objective.queue", "objective.queue_ptr"]:
        assert torch.equal(r0["state"][name], r1["state"][name]), name
    assert int(r0["state"]["objective.queue_ptr"]) == 3 * 8  # global batch 2 machines × 4
    queue = r0["state"]["objective.queue"]
    for step, (k0, k1) in enumerate(zip(r0["local_keys"], r1["local_keys"])):
        torch.testing.assert_close(queue[:, step * 8:step * 8 + 4], k0.T, rtol=0, atol=0)
        torch.testing.assert_close(queue[:, step * 8 + 4:step * 8 + 8], k1.T, rtol=0, atol=0)
    assert "global batch 8" in logs[0]  # machine 0 prints the run's header
