"""The training loop with each instance-discrimination method (Barlow Twins, SimSiam, MoCo)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from caid_hf import CAiDConfig, CAiDForPreTraining, CAiDModel
from caid_hf.data.augment import AugmentationConfig, ViewAugmenter
from caid_hf.runs import build_lr_scheduler
from caid_hf.training.pretrain import main

from helpers import ROOT, tiny_pretraining_args

TINY = tiny_pretraining_args(num_train_phantoms=16, queue_size=None, projection_dim=None)
BARLOW = ["--discrimination_method", "barlow_twins", "--barlow_projector_dims", "32", "32"]
SIMSIAM = ["--discrimination_method", "simsiam", "--simsiam_projector_dims", "32", "32",
           "--simsiam_predictor_hidden_dim", "8"]


def _history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["history"]


@pytest.mark.parametrize("method", [BARLOW, SIMSIAM], ids=["barlow_twins", "simsiam"])
def test_symmetric_methods_train_and_log_the_collapse_indicator(tmp_path, method):
    out = tmp_path / "run"
    # queue_size 60 is not divisible by the batch: only MoCo has a queue, so no refusal
    result = main(TINY + method + ["--queue_size", "60", "--output_dir", str(out),
                                   "--max_steps", "2"])
    assert result.global_step == 2
    history = _history(out)
    trains = [h for h in history if "train/loss" in h]
    vals = [h for h in history if "val/loss" in h]
    assert len(trains) == 2 and len(vals) == 1
    for record in trains:
        assert 0 < record["train/embedding_std"] < 1 and math.isfinite(record["train/loss"])
        assert "train/contrastive_accuracy" not in record  # MoCo's only
    assert 0 < vals[0]["val/embedding_std"] < 1 and "val/contrastive_accuracy" not in vals[0]
    assert "val/reconstruction_loss" in vals[0] and math.isfinite(vals[0]["val/discrimination_loss"])
    # the published backbone is a plain U-Net, whatever the method
    backbone = CAiDModel.from_pretrained(out / "final")
    assert set(backbone.state_dict()) == set(result.model.caid.state_dict())
    assert not any(k.startswith("objective") for k in backbone.state_dict())


def test_moco_logs_its_accuracy_and_the_collapse_indicator(tmp_path):
    out = tmp_path / "run"
    main(TINY + ["--queue_size", "64", "--projection_dim", "16", "--output_dir", str(out),
                 "--max_steps", "1"])
    record = [h for h in _history(out) if "train/loss" in h][0]
    # top-1 accuracy of the positive key over one batch of 8 queries: k / 8, k in 0..8
    assert 0 <= record["train/contrastive_accuracy"] <= 1
    assert record["train/contrastive_accuracy"] * 8 == pytest.approx(
        round(record["train/contrastive_accuracy"] * 8), abs=1e-6)
    assert 0 < record["train/embedding_std"] < 1
    # the loss is CAiD's weighted sum: 1 × MoCo's InfoNCE + 10 × the reconstruction MSE
    assert record["train/loss"] == pytest.approx(
        record["train/contrastive_loss"] + 10 * record["train/reconstruction_loss"], rel=1e-5)


def test_simsiam_predictor_keeps_its_learning_rate():
    model = CAiDForPreTraining(CAiDConfig(
        encoder_name="resnet18", encoder_weights=None, image_size=64,
        discrimination_method="simsiam", simsiam_projector_dims=[32, 32],
        simsiam_predictor_hidden_dim=8))
    for fixed in (True, False):
        groups = model.optimizer_param_groups(fix_predictor_lr=fixed)
        optimizer = torch.optim.SGD(groups, lr=0.05)
        scheduler = build_lr_scheduler(optimizer, "cosine", warmup_steps=2, total_steps=10)
        rates = []
        for _ in range(6):
            rates.append([g["lr"] for g in optimizer.param_groups])
            optimizer.step()
            scheduler.step()
        model_rates = [r[0] for r in rates]
        predictor_rates = [r[1] for r in rates]
        assert model_rates[:3] == pytest.approx([0.0, 0.025, 0.05])  # warm-up, then decay
        assert model_rates[5] < model_rates[3]
        if fixed:
            assert predictor_rates == [0.05] * 6
        else:
            assert predictor_rates == pytest.approx(model_rates)
    n_predictor = sum(p.numel() for p in model.objective.predictor.parameters())
    assert sum(p.numel() for p in groups[1]["params"]) == n_predictor


def test_reconstructing_both_views_trains(tmp_path):
    out = tmp_path / "run"
    result = main(TINY + SIMSIAM + ["--reconstruct_views", "both", "--output_dir", str(out),
                                    "--max_steps", "1"])
    assert result.global_step == 1
    record = [h for h in _history(out) if "train/loss" in h][0]
    assert math.isfinite(record["train/reconstruction_loss"])


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_key_target_is_the_key_crop_flipped_with_the_key_view(flip_p):
    torch.manual_seed(0)
    crops = torch.randint(0, 256, (6, 2, 32, 32), dtype=torch.uint8)
    config = AugmentationConfig(flip_p=flip_p)
    plain = ViewAugmenter(config, context_prediction=True, seed=3)(crops.clone())
    both = ViewAugmenter(config, context_prediction=True, seed=3, key_target=True)(crops.clone())
    # the same draws: only the extra target differs
    assert torch.equal(plain.query, both.query) and torch.equal(plain.key, both.key)
    assert plain.key_target is None and both.key_target.shape == (6, 1, 32, 32)
    key = crops[:, 1:].float() / 255
    torch.testing.assert_close(both.key_target, key.flip(-1) if flip_p else key, rtol=0, atol=0)
    query = crops[:, :1].float() / 255
    torch.testing.assert_close(both.target, query.flip(-1) if flip_p else query, rtol=0, atol=0)


@pytest.mark.slow
def test_two_process_simsiam_run_keeps_ranks_identical(tmp_path, free_port):
    """Global-batch BatchNorm under DDP: both ranks end with the same parameters."""
    out = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port),
           str(ROOT / "tests" / "scripts" / "two_rank_pretrain.py"), *TINY, *SIMSIAM,
           "--per_device_train_batch_size", "4", "--output_dir", str(out), "--max_steps", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == 2 and r0["local_keys"] == []  # no MoCo queue
    for name in r0["parameters"]:
        assert torch.equal(r0["state"][name], r1["state"][name]), name
    # global-batch BatchNorm: the running statistics agree too (each rank saw the same mean)
    stats = [k for k in r0["state"] if k.endswith("running_mean")]
    assert stats and all(torch.allclose(r0["state"][k], r1["state"][k], atol=1e-6) for k in stats)


PRETRAINING_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml")
                             if not p.name.startswith("finetune_"))


@pytest.mark.parametrize("path", PRETRAINING_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_pretraining_config_parses_into_a_valid_run(path):
    from caid_hf.training.arguments import parse_pretraining_args

    model_args, data_args, args = parse_pretraining_args(["--config", str(path)])
    config = CAiDConfig(**{k: v for k, v in vars(model_args).items()})
    name = path.stem
    if "barlow" in name:
        assert config.discrimination_method == "barlow_twins"
    elif "simsiam" in name:
        assert config.discrimination_method == "simsiam"
    else:
        assert config.discrimination_method == "moco_v2"
    assert config.context_prediction == (not name.startswith("id_") and not name.endswith("_id"))
    if name.startswith("demo"):
        assert config.encoder_name == "resnet18"
        assert data_args.train_source == ("phantoms:cxr14" if name == "demo" else "phantoms")
    else:
        assert config.encoder_name == "resnet50" and config.image_size == 224
