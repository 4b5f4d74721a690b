import json

import pytest
from transformers import AutoConfig

from caid_hf import CAiDConfig, CAiDForPreTraining


def test_defaults_are_the_papers_setting():
    c = CAiDConfig()
    assert c.model_type == "caid"
    assert c.encoder_name == "resnet50" and c.image_size == 224
    assert c.discrimination_method == "moco_v2" and c.projection_head == "mlp"
    assert c.queue_size == 65536 and c.momentum == 0.999
    assert c.contrastive_temperature == 0.2 and c.projection_dim == 128
    assert c.contrastive_weight == 1.0 and c.reconstruction_weight == 10.0
    assert c.reconstruction_activation == "sigmoid" and c.context_prediction is True
    assert c.decoder_channels == [256, 128, 64, 32, 16]


@pytest.mark.parametrize(
    "field,value",
    [
        ("encoder_name", "resnet51"),
        ("discrimination_method", "byol"),
        ("image_size", 100),
        ("image_size", 0),
        ("queue_size", 0),
        ("queue_size", -5),
        ("momentum", 1.0),
        ("contrastive_temperature", 0.0),
        ("projection_dim", 0),
        ("projection_head", "deep"),
        ("encoder_depth", 6),
        ("encoder_depth", 3),
        ("decoder_channels", [16, 8]),
        ("shuffle_bn_splits", 0),
        ("reconstruction_weight", -1.0),
        ("reconstruction_activation", "tanh"),
        ("classifier_dropout", 1.0),
        ("reconstruct_views", "second"),
        ("reconstruct_views", "both"),  # MoCo (the default) cannot reconstruct its key view
        ("barlow_projector_dims", []),
        ("barlow_projector_dims", [64, 0]),
        ("barlow_off_diagonal_weight", -0.1),
        ("simsiam_projector_dims", []),
        ("simsiam_projector_dims", [-1, 64]),
        ("simsiam_predictor_hidden_dim", 0),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        CAiDConfig(**{field: value})


def test_method_fields_defaults_and_choices():
    c = CAiDConfig()
    assert c.reconstruct_views == "first"
    assert c.barlow_projector_dims == [8192, 8192, 8192] and c.barlow_off_diagonal_weight == 0.0051
    assert c.simsiam_projector_dims == [2048, 2048, 2048] and c.simsiam_predictor_hidden_dim == 512
    for method in ("moco_v2", "barlow_twins", "simsiam"):
        assert CAiDConfig(discrimination_method=method).discrimination_method == method
    with pytest.raises(ValueError, match="discrimination_method='byol'.*barlow_twins.*simsiam"):
        CAiDConfig(discrimination_method="byol")
    for method in ("barlow_twins", "simsiam"):
        assert CAiDConfig(discrimination_method=method, reconstruct_views="both").reconstruct_views == "both"
    from caid_hf.model_settings import DISCRIMINATION_METHODS, SYMMETRIC_METHODS
    from caid_hf.objectives import OBJECTIVES, objective_class

    # config_fields are the fields whose change makes a saved objective unusable: changing
    # one of them changes that objective's weights' names or shapes, changing another
    # method's leaves them as they are
    small = {"projection_head": "mlp", "projection_dim": 16, "queue_size": 64,
             "barlow_projector_dims": [32, 32], "simsiam_projector_dims": [32, 32],
             "simsiam_predictor_hidden_dim": 8}
    other_value = {"projection_head": "linear", "projection_dim": 8, "queue_size": 32,
                   "barlow_projector_dims": [16, 16], "simsiam_projector_dims": [16, 16],
                   "simsiam_predictor_hidden_dim": 4}
    assert set(small) == {f for m in OBJECTIVES for f in objective_class(m).config_fields[1:]}

    def shapes(method, **change):
        config = CAiDConfig(encoder_name="resnet18", image_size=64, discrimination_method=method,
                            **{**small, **change})
        return {k: tuple(v.shape) for k, v in CAiDForPreTraining(config).objective.state_dict().items()}

    for method in OBJECTIVES:
        fields = objective_class(method).config_fields
        assert fields[0] == "discrimination_method"
        before = shapes(method)
        for name in small:
            after = shapes(method, **{name: other_value[name]})
            assert (after != before) == (name in fields), (method, name)
    # the configuration's names (torch-free, for the Hub's remote code) match the registry
    assert DISCRIMINATION_METHODS == tuple(OBJECTIVES)
    assert SYMMETRIC_METHODS == tuple(m for m, o in OBJECTIVES.items() if o.reconstructs_key_view)


def test_method_fields_survive_save_and_load(tmp_path):
    c = CAiDConfig(discrimination_method="simsiam", reconstruct_views="both",
                   simsiam_projector_dims=(512, 256), simsiam_predictor_hidden_dim=64,
                   barlow_projector_dims=[1024, 1024, 1024], barlow_off_diagonal_weight=0.005)
    c.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    for key in ("discrimination_method", "reconstruct_views", "simsiam_projector_dims",
                "simsiam_predictor_hidden_dim", "barlow_projector_dims",
                "barlow_off_diagonal_weight"):
        assert getattr(loaded, key) == getattr(c, key), key
    assert loaded.simsiam_projector_dims == [512, 256]


def test_save_and_auto_config_round_trip(tmp_path):
    c = CAiDConfig(encoder_name="resnet18", image_size=128, queue_size=4096, momentum=0.99,
                   contrastive_temperature=0.07, context_prediction=False)
    c.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "caid"
    assert "temperature" not in saved and saved["contrastive_temperature"] == 0.07
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, CAiDConfig)
    for key in ("encoder_name", "image_size", "queue_size", "momentum", "context_prediction",
                "decoder_channels", "contrastive_temperature"):
        assert getattr(loaded, key) == getattr(c, key)


def test_learning_rate_scaling_rules():
    from caid_hf.training.arguments import parse_pretraining_args, scaled_learning_rate
    from caid_hf.training.pretrain import lr_line

    assert scaled_learning_rate(0.03, "none", 4096) == 0.03
    assert scaled_learning_rate(0.03, "linear", 4096) == pytest.approx(0.48)
    assert scaled_learning_rate(0.03, "sqrt", 4096) == pytest.approx(0.12)
    _, _, args = parse_pretraining_args(["--scale_lr", "linear", "--learning_rate", "0.05"])
    assert "learning rate 0.1 (0.05 x (512/256))" in lr_line(args, 512)
    _, _, plain = parse_pretraining_args([])
    assert "--scale_lr linear with warm-up" in lr_line(plain, 3072)
    assert "warm-up (" not in lr_line(plain, 256)
    with pytest.raises(ValueError, match=r"scale_lr must be one of"):
        parse_pretraining_args(["--scale_lr", "quadratic"])


def test_a_queue_that_the_global_batch_does_not_divide_names_the_nearest_valid_sizes():
    from caid_hf import CAiDConfig
    from caid_hf.objectives.moco import MoCoV2

    config = CAiDConfig(queue_size=65536)
    with pytest.raises(ValueError, match=r"48 = 3072; the nearest valid queue sizes are "
                                         r"64512 or 67584"):
        MoCoV2.check_run(config, 64, 48)
    MoCoV2.check_run(config, 64, 32)  # 2048 divides 65536
