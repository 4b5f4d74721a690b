"""The online probe: the features of the encoder being trained, scored during the run with
the same numbers ``caid-hf evaluate-features`` gives on the saved weights."""

import json

import pytest
import torch

from caid_hf import CAiDConfig, CAiDModel
from caid_hf.cli import main as cli
from caid_hf.training.online_probe import OnlineProbe
from caid_hf.training.pretrain import main

from helpers import tiny_pretraining_args

TINY = tiny_pretraining_args(report_to=None)  # the probe's figures are read from TensorBoard


def test_online_probe_equals_offline_evaluation_of_the_saved_weights(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = main(TINY + ["--output_dir", str(out), "--max_steps", "3", "--probe_steps", "2",
                          "--probe_num_images", "40", "--report_to", "tensorboard"])
    probes = [r for r in result.history if "probe/linear_probe_auc" in r]
    assert [r["step"] for r in probes] == [2, 3]  # every 2 steps and at the last
    printed = capsys.readouterr().out
    assert "online probe every 2 steps: k-NN and linear probe on 40 + 40 held-out phantoms" \
        in printed
    assert "step 3 online probe: linear-probe AUC" in printed

    cli(["evaluate-features", str(out / "final"), "--source", "phantoms", "--test-source",
         "phantoms", "--num-phantoms", "40", "--num-test-phantoms", "40", "--phantom-size",
         "64", "--image-size", "64", "--embedding", "stages", "--seed", "42",
         "--out", str(tmp_path / "offline")])
    offline = json.loads((tmp_path / "offline" / "scores.json").read_text())
    assert offline["batch_norm_statistics"] == "model"
    assert probes[-1]["probe/linear_probe_auc"] == pytest.approx(
        offline["linear_probe"]["mean_auc"], abs=1e-9)
    assert probes[-1]["probe/knn_auc"] == pytest.approx(offline["knn"]["mean_auc"], abs=1e-9)

    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents.*"))
                                  .parent))
    events.Reload()
    logged = events.Scalars("probe/linear_probe_auc")
    assert [e.step for e in logged] == [2, 3]
    assert logged[-1].value == pytest.approx(probes[-1]["probe/linear_probe_auc"], abs=1e-6)


def test_probe_does_not_change_the_run(tmp_path):
    """The same run with and without the probe ends with the same weights."""
    runs = [main(TINY + ["--output_dir", str(tmp_path / name), "--max_steps", "3",
                         "--report_to", "none", *flags])
            for name, flags in (("plain", []), ("probed", ["--probe_steps", "1",
                                                           "--probe_num_images", "10"]))]
    plain, probed = (r.model.state_dict() for r in runs)
    for key, value in plain.items():
        torch.testing.assert_close(probed[key], value, rtol=0, atol=0, msg=key)


def test_probe_leaves_the_encoder_as_it_was(tmp_path):
    torch.manual_seed(0)
    backbone = CAiDModel(CAiDConfig(encoder_name="resnet18", image_size=64), add_decoder=False)
    backbone.train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    probe = OnlineProbe("phantoms", 64, num_images=20, phantom_size=64)
    result = probe(backbone)
    assert backbone.training  # train mode restored
    for key, value in backbone.state_dict().items():  # BatchNorm statistics untouched
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert 0.0 <= result.linear_probe_auc <= 1.0 and 0.0 <= result.knn_auc <= 1.0
    assert probe.description == "20 + 20 held-out phantoms"


def test_probe_with_data_statistics_equals_evaluate_features_data_and_leaves_the_encoder(
        tmp_path):
    """``batch_norm_statistics="data"`` re-estimates the statistics on the probe's fitting
    images, on a copy: the same AUC as ``evaluate-features --batch-norm-statistics data`` on
    the same weights, and the encoder's own statistics untouched (a random encoder's stay
    mean 0, variance 1)."""
    torch.manual_seed(0)
    backbone = CAiDModel(CAiDConfig(encoder_name="resnet18", image_size=64), add_decoder=False)
    backbone.save_pretrained(tmp_path / "random")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model_probe = OnlineProbe("phantoms", 64, num_images=40, phantom_size=64, seed=42)(backbone)
    data_probe = OnlineProbe("phantoms", 64, num_images=40, phantom_size=64, seed=42,
                             batch_norm_statistics="data")(backbone)
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    cli(["evaluate-features", str(tmp_path / "random"), "--source", "phantoms",
         "--test-source", "phantoms", "--num-phantoms", "40", "--num-test-phantoms", "40",
         "--phantom-size", "64", "--image-size", "64", "--embedding", "stages", "--seed", "42",
         "--batch-norm-statistics", "data", "--out", str(tmp_path / "offline")])
    offline = json.loads((tmp_path / "offline" / "scores.json").read_text())
    assert data_probe.linear_probe_auc == pytest.approx(offline["linear_probe"]["mean_auc"],
                                                        abs=1e-9)
    assert data_probe.knn_auc == pytest.approx(offline["knn"]["mean_auc"], abs=1e-9)
    # the statistics matter: unnormalised random features score differently
    assert model_probe.linear_probe_auc != pytest.approx(data_probe.linear_probe_auc, abs=1e-6)


def test_probe_arguments_are_checked():
    with pytest.raises(ValueError, match="probe_embedding must be one of"):
        OnlineProbe("phantoms", 64, num_images=20, embedding="last")
    with pytest.raises(ValueError, match="probe_batch_norm_statistics must be one of"):
        OnlineProbe("phantoms", 64, num_images=20, batch_norm_statistics="train")
    with pytest.raises(ValueError, match="probe_num_images must be at least 10"):
        OnlineProbe("phantoms", 64, num_images=4)
    with pytest.raises(ValueError, match="probe_steps must be >= 0"):
        main(TINY + ["--probe_steps", "-1", "--report_to", "none"])
