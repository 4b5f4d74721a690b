"""Import of the original repository's checkpoints.

Checkpoints are built here in the original's formats: an ``smp.Unet`` state dict, and the
DDP-wrapped MoCo training state assembled by hand as the original's builder lays it out.
"""

import collections
import copy
import dataclasses

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from caid_hf import CAiDForPreTraining, CAiDModel
from caid_hf.convert_original import convert_original_checkpoint, infer_encoder_name


def _source_unet(encoder_name="resnet18", seed=0):
    """An smp.Unet as the original builds it, with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    unet = smp.Unet(encoder_name, encoder_weights=None, classes=1, activation="sigmoid")
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return unet.eval()


def _input(size=64):
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _moco_checkpoint(unet, projection_dim=128, queue_size=64):
    """The original's ``current_checkpoint.pth`` content for a DDP-wrapped MoCo U-Net."""
    c = unet.encoder.out_channels[-1]
    fc = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, projection_dim))
    unet_k, fc_k = copy.deepcopy(unet), copy.deepcopy(fc)
    with torch.no_grad():  # a key branch that has drifted from the query branch
        for p in [*unet_k.parameters(), *fc_k.parameters()]:
            p.add_(0.01 * torch.randn_like(p))
    state = {}
    for prefix, module in (("encoder_q.backbone.", unet), ("encoder_q.fc.", fc),
                           ("encoder_k.backbone.", unet_k), ("encoder_k.fc.", fc_k)):
        state.update({f"module.{prefix}{k}": v for k, v in module.state_dict().items()})
    state["module.queue"] = nn.functional.normalize(torch.randn(projection_dim, queue_size), dim=0)
    state["module.queue_ptr"] = torch.tensor([24], dtype=torch.long)
    optimizer = torch.optim.SGD(unet.parameters(), lr=0.03, momentum=0.9)
    return {"epoch": 7, "arch": "resnet18", "best_loss": 1.25, "optimizer": optimizer.state_dict(),
            "state_dict": state}


@pytest.mark.parametrize("prefix", ["", "module."])
def test_unet_state_dict_converts_to_identical_backbone(tmp_path, prefix):
    unet = _source_unet()
    path = tmp_path / "best_checkpoint.pth"
    torch.save({prefix + k: v for k, v in unet.state_dict().items()}, path)

    out = convert_original_checkpoint(path, tmp_path / "out", image_size=64)

    assert (out / "model.safetensors").is_file() and (out / "preprocessor_config.json").is_file()
    model = CAiDModel.from_pretrained(out).eval()
    assert model.config.encoder_name == "resnet18"
    assert model.config.decoder_channels == [256, 128, 64, 32, 16]
    assert model.config.image_size == 64
    for key, value in unet.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = _input()
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).reconstruction, unet(x))


def test_decoder_channels_and_explicit_encoder_name(tmp_path):
    torch.manual_seed(0)
    unet = smp.Unet("resnet18", encoder_weights=None, classes=1, activation="sigmoid",
                    decoder_channels=(64, 32, 16, 16, 8)).eval()
    path = tmp_path / "checkpoint.pth"
    torch.save(unet.state_dict(), path)

    out = convert_original_checkpoint(path, tmp_path / "out", encoder_name="resnet18")

    model = CAiDModel.from_pretrained(out).eval()
    assert model.config.decoder_channels == [64, 32, 16, 16, 8]
    assert model.config.image_size == 224
    x = _input()
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).reconstruction, unet(x))


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_encoder_is_inferred_from_the_weights(name):
    with torch.device("meta"):  # only names and shapes matter
        state = smp.Unet(name, encoder_weights=None, classes=1).state_dict()
    assert infer_encoder_name(state) == name


def test_resnext_is_not_guessed():
    with torch.device("meta"):
        state = smp.Unet("resnext50_32x4d", encoder_weights=None, classes=1).state_dict()
    with pytest.raises(ValueError, match="encoder_name"):
        infer_encoder_name(state)


def test_resnet50_checkpoint_converts_exactly(tmp_path):
    unet = _source_unet("resnet50")
    path = tmp_path / "best_checkpoint.pth"
    torch.save(unet.state_dict(), path)

    model = CAiDModel.from_pretrained(convert_original_checkpoint(path, tmp_path / "out")).eval()

    assert model.config.encoder_name == "resnet50"
    x = _input()
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).reconstruction, unet(x))


def test_moco_training_state_converts_for_continued_training(tmp_path):
    unet = _source_unet()
    checkpoint = _moco_checkpoint(unet)
    source = checkpoint["state_dict"]
    path = tmp_path / "current_checkpoint.pth"
    torch.save(checkpoint, path)

    out = convert_original_checkpoint(path, tmp_path / "out", image_size=64)

    model, info = CAiDForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    c = model.config
    assert (c.encoder_name, c.queue_size, c.projection_dim, c.projection_head) == ("resnet18", 64, 128, "mlp")
    assert c.momentum == 0.999
    objective = model.objective
    assert torch.equal(objective.queue, source["module.queue"])
    assert torch.equal(objective.queue_ptr, source["module.queue_ptr"])
    for ours, prefix in ((objective.projection_head, "module.encoder_q.fc."),
                         (objective.momentum_projection_head, "module.encoder_k.fc."),
                         (objective.momentum_encoder, "module.encoder_k.backbone.encoder.")):
        for key, value in ours.state_dict().items():
            assert torch.equal(value, source[prefix + key]), prefix + key
    assert all(not p.requires_grad for p in objective.momentum_parameters())

    x = _input()
    for caid in (model.caid.eval(), CAiDModel.from_pretrained(out / "backbone").eval()):
        with torch.no_grad():
            assert torch.equal(caid(pixel_values=x).reconstruction, unet(x))
    assert not any(k.startswith("objective.") for k in CAiDModel.from_pretrained(out / "backbone").state_dict())


@dataclasses.dataclass
class _Payload:
    value: int = 3


class _TrackedDict(collections.OrderedDict):
    pass


@pytest.mark.parametrize("content", [lambda sd: {"x": _Payload()}, lambda sd: _TrackedDict(sd)],
                         ids=["dataclass", "OrderedDict-subclass"])
def test_arbitrary_pickled_objects_are_refused(tmp_path, content):
    path = tmp_path / "evil_checkpoint.pth"
    torch.save(content(_source_unet().state_dict()), path)
    with pytest.raises(ValueError, match="evil_checkpoint.pth"):
        convert_original_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_and_missing_keys_are_named(tmp_path):
    state = _source_unet().state_dict()
    state["encoder.foo.weight"] = torch.zeros(3)
    del state["decoder.blocks.2.conv2.0.weight"]
    path = tmp_path / "checkpoint.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as error:
        convert_original_checkpoint(path, tmp_path / "out")
    assert "encoder.foo.weight" in str(error.value)
    assert "decoder.blocks.2.conv2.0.weight" in str(error.value)


def test_unmapped_moco_keys_are_named(tmp_path):
    checkpoint = _moco_checkpoint(_source_unet(), queue_size=32)
    checkpoint["state_dict"]["module.encoder_q.predictor.weight"] = torch.zeros(2)
    path = tmp_path / "current_checkpoint.pth"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"encoder_q\.predictor\.weight"):
        convert_original_checkpoint(path, tmp_path / "out")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        convert_original_checkpoint(tmp_path / "nowhere.pth", tmp_path / "out")


def test_cli_convert_original(tmp_path, capsys):
    from caid_hf.cli import main as cli

    unet = _source_unet()
    torch.save(unet.state_dict(), tmp_path / "best_checkpoint.pth")
    cli(["convert-original", str(tmp_path / "best_checkpoint.pth"), "--out", str(tmp_path / "out"),
         "--image_size", "64"])
    assert "wrote" in capsys.readouterr().out
    ours = CAiDModel.from_pretrained(tmp_path / "out").eval()
    assert ours.config.encoder_name == "resnet18" and ours.config.image_size == 64
    x = _input()
    with torch.no_grad():
        assert torch.equal(ours(x).reconstruction, unet.eval()(x))


def test_moco_temperature_and_momentum_from_flags_or_the_checkpoints_args(tmp_path, capsys):
    from caid_hf.cli import main

    unet = _source_unet()
    plain = tmp_path / "current_checkpoint.pth"
    torch.save(_moco_checkpoint(unet), plain)
    main(["convert-original", str(plain), "--out", str(tmp_path / "flags"), "--image_size", "64",
          "--moco-t", "0.07", "--moco-m", "0.99"])
    config = CAiDForPreTraining.from_pretrained(tmp_path / "flags").config
    assert (config.contrastive_temperature, config.momentum) == (0.07, 0.99)
    with_args = tmp_path / "with_args.pth"
    torch.save({**_moco_checkpoint(unet), "args": {"moco_t": 0.1, "moco_m": 0.995}}, with_args)
    out = convert_original_checkpoint(with_args, tmp_path / "args", image_size=64)
    config = CAiDForPreTraining.from_pretrained(out).config
    assert (config.contrastive_temperature, config.momentum) == (0.1, 0.995)
    out = convert_original_checkpoint(with_args, tmp_path / "given", image_size=64, momentum=0.9)
    assert CAiDForPreTraining.from_pretrained(out).config.momentum == 0.9  # a flag wins
