import pytest
import segmentation_models_pytorch as smp
import torch
import torchvision
from transformers import AutoModel, AutoModelForPreTraining

from caid_hf import CAiDConfig, CAiDForPreTraining, CAiDModel


def _strip(key: str, prefixes=("module.", "backbone.", "encoder.")) -> str:
    for p in prefixes:
        if key.startswith(p):
            key = key[len(p):]
    return key


def _train_a_little(model, steps=3, size=64, batch=4):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.rand(batch, 3, size, size, generator=g)
        out = model(x, torch.rand(batch, 3, size, size, generator=g),
                    labels=torch.rand(batch, 1, size, size, generator=g))
        out.loss.backward()
        opt.step()
        opt.zero_grad()


def test_state_dict_keys_equal_smp_unet(tiny_config):
    ours = CAiDModel(tiny_config).state_dict()
    theirs = smp.Unet("resnet18", encoder_weights=None).state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_backbone_outputs_shapes(tiny_config):
    model = CAiDModel(tiny_config).eval()
    x = torch.rand(2, 3, 64, 96)
    out = model(x, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 512, 2, 3)
    assert out.pooler_output.shape == (2, 512)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean((2, 3)))
    assert out.reconstruction.shape == (2, 1, 64, 96)
    assert 0 <= out.reconstruction.min() and out.reconstruction.max() <= 1
    assert len(out.hidden_states) == 6
    assert model(x, compute_reconstruction=False).reconstruction is None


def test_backbone_round_trip_is_bit_exact(tiny_config, tmp_path):
    pre = CAiDForPreTraining(tiny_config)
    _train_a_little(pre)
    pre.caid.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = CAiDModel.from_pretrained(tmp_path)
    auto = AutoModel.from_pretrained(tmp_path)
    assert isinstance(auto, CAiDModel)
    ref = pre.caid.state_dict()
    for m in (loaded, auto):
        sd = m.state_dict()
        assert sd.keys() == ref.keys()
        assert all(torch.equal(sd[k], ref[k]) for k in ref)
    x = torch.rand(2, 3, 64, 64)
    pre.caid.eval()
    assert torch.equal(loaded.eval()(x).reconstruction, pre.caid(x).reconstruction)


def test_pretraining_round_trip_keeps_queue_and_key_branch(tiny_config, tmp_path):
    pre = CAiDForPreTraining(tiny_config)
    _train_a_little(pre)
    assert int(pre.objective.queue_ptr) == 12
    pre.save_pretrained(tmp_path)
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path)
    assert isinstance(loaded, CAiDForPreTraining)
    ref, sd = pre.state_dict(), loaded.state_dict()
    assert sd.keys() == ref.keys()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    # loading must not unfreeze the key branch
    assert not any(p.requires_grad for p in loaded.objective.momentum_parameters())
    assert all(p.requires_grad for p in loaded.caid.parameters())


def test_continue_from_backbone_initialises_queue_and_key_branch(tiny_config, tmp_path):
    pre = CAiDForPreTraining(tiny_config)
    _train_a_little(pre)
    pre.caid.save_pretrained(tmp_path)
    cont = CAiDForPreTraining.from_pretrained(tmp_path)
    queue = cont.objective.queue
    assert torch.isfinite(queue).all()
    torch.testing.assert_close(queue.norm(dim=0), torch.ones(queue.shape[1]))
    assert int(cont.objective.queue_ptr) == 0
    enc = cont.caid.encoder.state_dict()
    key = cont.objective.momentum_encoder.state_dict()
    assert all(torch.equal(enc[k], key[k]) for k in enc)
    head_q = cont.objective.projection_head.state_dict()
    head_k = cont.objective.momentum_projection_head.state_dict()
    assert all(torch.equal(head_q[k], head_k[k]) for k in head_q)
    assert not any(p.requires_grad for p in cont.objective.momentum_parameters())
    ref = pre.caid.state_dict()
    assert all(torch.equal(cont.caid.state_dict()[k], ref[k]) for k in ref)


def test_original_recipes_load_our_weights(tmp_path):
    """The original code's downstream recipes on our safetensors file, ResNet-50 as in the paper."""
    from safetensors.torch import load_file

    config = CAiDConfig(encoder_name="resnet50", image_size=64, queue_size=32)
    model = CAiDModel(config)
    # non-trivial BN statistics so the comparison means something
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 64, 64), compute_reconstruction=False)
    model.eval()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    x = torch.rand(2, 3, 64, 64)
    ours = model(x, output_hidden_states=True).hidden_states

    # classification recipe: torchvision resnet50
    tv = torchvision.models.resnet50(num_classes=14)
    cls_state = {_strip(k): v for k, v in state.items()
                 if not _strip(k).startswith(("fc", "segmentation_head", "decoder"))}
    missing, unexpected = tv.load_state_dict(cls_state, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    tv.eval()
    with torch.no_grad():
        h = tv.relu(tv.bn1(tv.conv1(x)))
        assert torch.equal(h, ours[1])
        h = tv.layer1(tv.maxpool(h))
        assert torch.equal(h, ours[2])
        for layer, feature in zip((tv.layer2, tv.layer3, tv.layer4), ours[3:]):
            h = layer(h)
            assert torch.equal(h, feature)

    # segmentation recipe: smp.Unet("resnet50")
    unet = smp.Unet("resnet50", encoder_weights=None)
    seg_state = {_strip(k, ("module.", "backbone.")): v for k, v in state.items()}
    seg_state = {k: v for k, v in seg_state.items() if not k.startswith(("fc", "segmentation_head"))}
    missing, unexpected = unet.load_state_dict(seg_state, strict=False)
    assert set(missing) == {"segmentation_head.0.weight", "segmentation_head.0.bias"}
    assert not unexpected
    unet.eval()
    with torch.no_grad():
        for a, b in zip(unet.encoder(x), ours):
            assert torch.equal(a, b)


def test_exports_carry_the_same_weights(tiny_config):
    model = CAiDModel(tiny_config).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        unet = model.to_smp().eval()
        torch.testing.assert_close(unet(x), ref.reconstruction, rtol=0, atol=0)
        tv = model.to_torchvision(num_classes=3).eval()
        assert tv.fc.out_features == 3
        feats = torch.nn.Sequential(*list(tv.children())[:-2])(x)
        assert torch.equal(feats, ref.last_hidden_state)


def test_timm_export_and_smp_folder(tiny_config, tmp_path):
    model = CAiDModel(tiny_config).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        timm_model = model.to_timm(num_classes=4).eval()
        assert torch.equal(timm_model.forward_features(x), ref.last_hidden_state)
        assert timm_model.get_classifier().out_features == 4
        model.export_smp(tmp_path / "unet")
        unet = smp.from_pretrained(tmp_path / "unet").eval()
        assert isinstance(unet, smp.Unet)
        assert torch.equal(unet(x), ref.reconstruction)


# --- every discrimination method shares the backbone, its files and the downstream loading ---

METHOD_CONFIGS = {
    "barlow_twins": {"barlow_projector_dims": [32, 32, 16]},
    "simsiam": {"simsiam_projector_dims": [32, 32, 16], "simsiam_predictor_hidden_dim": 8},
}


def _method_config(method, **kwargs):
    return CAiDConfig(encoder_name="resnet18", image_size=64, discrimination_method=method,
                      **METHOD_CONFIGS[method], **kwargs)


def test_embedding_std_hand_computed():
    from caid_hf.objectives import embedding_std

    # rows normalise to (1, 0), (0, 1), (0.6, 0.8): per-dimension sample std, then the mean
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [3.0, 4.0]])
    col0, col1 = [1.0, 0.0, 0.6], [0.0, 1.0, 0.8]

    def std(values):
        mean = sum(values) / 3
        return (sum((v - mean) ** 2 for v in values) / 2) ** 0.5

    assert embedding_std(x).item() == pytest.approx((std(col0) + std(col1)) / 2, rel=1e-6)
    assert embedding_std(torch.ones(5, 4) * 7).item() == 0.0  # collapsed
    healthy = embedding_std(torch.randn(4096, 64, generator=torch.Generator().manual_seed(0)))
    assert healthy.item() == pytest.approx(1 / 64**0.5, rel=0.02)
    assert embedding_std(x[:1]).item() == 0.0  # one image: no spread


def test_moco_output_names_its_loss_and_collapse_indicator(tiny_config):
    model = CAiDForPreTraining(tiny_config).train()
    captured = {}
    model.objective.register_forward_hook(lambda m, a, out: captured.update(q=out.projections))
    out = model(torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64))
    assert "discrimination_loss" not in out and out.logits.shape == (4, 33)  # one name per loss
    torch.testing.assert_close(out.embedding_std, captured["q"].std(dim=0).mean())
    groups = model.optimizer_param_groups()
    assert [(g["name"], g["fix_lr"]) for g in groups] == [("model", False)]
    assert not any(p is q for p in groups[0]["params"] for q in model.objective.momentum_parameters())


@pytest.mark.parametrize("method", ["barlow_twins", "simsiam"])
def test_pretraining_round_trip_of_every_method(method, tmp_path):
    pre = CAiDForPreTraining(_method_config(method))
    _train_a_little(pre)
    pre.save_pretrained(tmp_path)
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path)
    assert isinstance(loaded, CAiDForPreTraining)
    assert loaded.config.discrimination_method == method
    ref, sd = pre.state_dict(), loaded.state_dict()
    assert sd.keys() == ref.keys()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    assert all(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("method", ["barlow_twins", "simsiam"])
def test_published_backbone_of_every_method_loads_downstream(method, tmp_path):
    from caid_hf import CAiDForImageClassification, CAiDForSemanticSegmentation

    pre = CAiDForPreTraining(_method_config(method))
    _train_a_little(pre)
    pre.caid.save_pretrained(tmp_path / "backbone")
    pre.save_pretrained(tmp_path / "pretraining")
    reference = pre.caid.state_dict()
    theirs = smp.Unet("resnet18", encoder_weights=None).state_dict()
    backbone = CAiDModel.from_pretrained(tmp_path / "backbone").state_dict()
    assert list(backbone) == list(theirs) and all(torch.equal(backbone[k], reference[k]) for k in backbone)
    for folder in ("backbone", "pretraining"):
        clf, info = CAiDForImageClassification.from_pretrained(
            tmp_path / folder, num_labels=3, output_loading_info=True)
        assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}, folder
        assert not info["unexpected_keys"] and not info["mismatched_keys"]
        encoder = clf.caid.encoder.state_dict()
        assert all(torch.equal(encoder[k], reference[f"encoder.{k}"]) for k in encoder)
        seg, info = CAiDForSemanticSegmentation.from_pretrained(
            tmp_path / folder, num_labels=1, output_loading_info=True)
        assert info["missing_keys"] == {"classifier.0.weight", "classifier.0.bias"}, folder
        assert not info["unexpected_keys"] and not info["mismatched_keys"]
        unet = seg.caid.state_dict()
        assert all(torch.equal(unet[k], reference[k]) for k in unet)
    # continuing pre-training from the backbone: U-Net loaded, heads sensibly initialised
    cont = CAiDForPreTraining.from_pretrained(tmp_path / "backbone")
    assert all(torch.equal(cont.caid.state_dict()[k], reference[k]) for k in reference)
    for name, tensor in cont.objective.state_dict().items():
        assert torch.isfinite(tensor.float()).all(), name
        if name.endswith("running_var"):
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        if name.endswith("running_mean"):
            assert torch.equal(tensor, torch.zeros_like(tensor)), name
    linear = cont.objective.projector[0].weight
    assert 0 < linear.abs().max() <= 1 / linear.shape[1] ** 0.5  # torch's default Linear bound
    assert all(p.requires_grad for p in cont.parameters())


@pytest.mark.parametrize("method", ["barlow_twins", "simsiam"])
def test_instance_discrimination_baseline_of_every_method_skips_the_decoder(method):
    model = CAiDForPreTraining(_method_config(method, context_prediction=False)).train()
    assert not any(p.requires_grad for p in model.caid.decoder.parameters())
    grouped = {id(p) for g in model.optimizer_param_groups() for p in g["params"]}
    assert not any(id(p) in grouped for p in model.caid.decoder.parameters())
    calls = []
    model.caid.decoder.register_forward_hook(lambda *a: calls.append(1))
    out = model(torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64))
    assert out.reconstruction is None and out.reconstruction_loss is None and not calls
    torch.testing.assert_close(out.loss, out.contrastive_loss)
    out.loss.backward()
    assert all(p.grad is None for p in model.caid.decoder.parameters())
    assert model.caid.encoder.conv1.weight.grad.abs().sum() > 0


# --- inputs the U-Net cannot take are refused with their shape, by every model ---

def _models_taking_pixel_values(config):
    from caid_hf import CAiDForImageClassification, CAiDForSemanticSegmentation

    config.num_labels = 2
    return [CAiDModel(config), CAiDForImageClassification(config), CAiDForSemanticSegmentation(config)]


@pytest.mark.parametrize("shape", [(2, 3, 70, 64), (2, 3, 64, 48), (1, 3, 16, 16)])
def test_sides_not_multiples_of_32_are_refused_by_every_model(tiny_config, shape):
    message = (f"pixel_values has shape {list(shape)}: height and width must be multiples of 32 "
               f"(the encoder downsamples 5 times); resize or pad the images, e.g. with "
               f"CAiDImageProcessor")
    for model in _models_taking_pixel_values(tiny_config):
        with pytest.raises(ValueError) as error:
            model(torch.rand(shape))
        assert str(error.value) == message, type(model).__name__
    pre = CAiDForPreTraining(tiny_config).train()
    good = torch.rand(2, 3, 64, 64)
    with pytest.raises(ValueError) as error:
        pre(torch.rand(shape), good)
    assert str(error.value) == message
    with pytest.raises(ValueError) as error:  # MoCo's keys never pass through caid.encode
        pre(good, torch.rand(shape))
    assert str(error.value) == message.replace("pixel_values", "key_pixel_values", 1)
    assert int(pre.objective.queue_ptr) == 0  # refused before anything was enqueued


@pytest.mark.parametrize(
    "shape, match",
    [
        ((3, 64, 64), r"shape \[3, 64, 64\]: expected 4 dimensions \[B, C, H, W\]"),
        ((1, 2, 3, 64, 64), r"shape \[1, 2, 3, 64, 64\]: expected 4 dimensions"),
        ((2, 1, 64, 64), r"shape \[2, 1, 64, 64\]: expected 3 channels"),
    ],
)
def test_inputs_of_the_wrong_rank_or_channels_are_refused_by_every_model(tiny_config, shape, match):
    for model in _models_taking_pixel_values(tiny_config):
        with pytest.raises(ValueError, match=match):
            model(torch.rand(shape))
    with pytest.raises(ValueError, match=match):
        CAiDForPreTraining(tiny_config)(torch.rand(shape), torch.rand(2, 3, 64, 64))


def test_multiples_of_32_of_any_aspect_still_pass(tiny_config):
    backbone, classifier, segmenter = (m.eval() for m in _models_taking_pixel_values(tiny_config))
    x = torch.rand(1, 3, 32, 96)
    with torch.no_grad():
        assert backbone(x).last_hidden_state.shape == (1, 512, 1, 3)
        assert backbone(x).reconstruction.shape == (1, 1, 32, 96)
        assert classifier(x).logits.shape == (1, 2)
        assert segmenter(x).logits.shape == (1, 2, 32, 96)


def test_the_divisor_comes_from_the_encoder_depth():
    from types import SimpleNamespace

    from caid_hf.modeling_caid import check_pixel_values

    four_stages = SimpleNamespace(encoder_depth=4, in_channels=3)  # CAiDConfig allows only 5
    check_pixel_values(torch.rand(1, 3, 48, 80), four_stages)  # multiples of 16, not of 32
    with pytest.raises(ValueError, match=r"\[1, 3, 40, 48\]: height and width must be multiples "
                                         r"of 16 \(the encoder downsamples 4 times\)"):
        check_pixel_values(torch.rand(1, 3, 40, 48), four_stages)
    with pytest.raises(TypeError, match="pixel_values must be a torch.Tensor"):
        check_pixel_values([[0.0]], four_stages)
