"""Classifiers and U-Nets started from a CAiD backbone."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageClassification, AutoModelForSemanticSegmentation

from caid_hf import CAiDForImageClassification, CAiDForSemanticSegmentation
from caid_hf.data.phantoms import generate_phantom


@pytest.fixture(scope="module")
def backbone_dir(tiny_pretraining_run):
    """The best/ folder a (tiny) pre-training run writes: weights, processor and card."""
    from caid_hf import CAiDModel

    folder = tiny_pretraining_run / "best"
    assert (folder / "README.md").is_file() and (folder / "preprocessor_config.json").is_file()
    return folder, CAiDModel.from_pretrained(folder).state_dict()


def _phantom_batch(n=8, size=64):
    images, masks = zip(*(generate_phantom(i, size=size, seed=3) for i in range(n)))
    x = torch.from_numpy(np.stack(images)).float().div(255).unsqueeze(1).expand(n, 3, size, size)
    mask = torch.from_numpy(np.stack(masks)).float().unsqueeze(1)
    return x.contiguous(), mask


def test_classifier_loads_encoder_only_and_reports_only_its_head(backbone_dir):
    folder, reference = backbone_dir
    clf, info = AutoModelForImageClassification.from_pretrained(
        folder, num_labels=14, problem_type="multi_label_classification", output_loading_info=True)
    assert isinstance(clf, CAiDForImageClassification)
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert clf.caid.decoder is None and not any("decoder" in k for k in clf.state_dict())
    encoder = clf.caid.encoder.state_dict()
    assert all(torch.equal(encoder[k], reference[f"encoder.{k}"]) for k in encoder)
    # the new head is sensibly initialised, not left to uninitialised memory
    assert abs(clf.classifier.weight.std().item() - 0.01) < 0.002
    assert torch.equal(clf.classifier.bias, torch.zeros(14))


def test_segmenter_loads_unet_and_reports_only_its_head(backbone_dir):
    folder, reference = backbone_dir
    for labels in (1, 3):
        seg, info = AutoModelForSemanticSegmentation.from_pretrained(
            folder, num_labels=labels, output_loading_info=True)
        assert isinstance(seg, CAiDForSemanticSegmentation)
        assert info["missing_keys"] == {"classifier.0.weight", "classifier.0.bias"}
        assert not info["unexpected_keys"] and not info["mismatched_keys"]
        unet = seg.caid.state_dict()
        assert unet.keys() == {k for k in reference if not k.startswith("segmentation_head")}
        assert all(torch.equal(unet[k], reference[k]) for k in unet)
        weight = seg.classifier[0].weight
        fan_in, fan_out = 16 * 9, labels * 9  # xavier-uniform bound sqrt(6 / (in + out))
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert weight.abs().max() <= bound and weight.std() > bound / 4
        assert torch.equal(seg.classifier[0].bias, torch.zeros(labels))


def test_classification_losses_follow_transformers_problem_types(backbone_dir):
    folder, _ = backbone_dir
    x = torch.rand(4, 3, 64, 64)
    multi = CAiDForImageClassification.from_pretrained(
        folder, num_labels=3, problem_type="multi_label_classification").eval()
    target = torch.tensor([[1.0, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]])
    out = multi(x, labels=target)
    assert out.logits.shape == (4, 3)
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, target))
    single = CAiDForImageClassification.from_pretrained(folder, num_labels=3).eval()
    classes = torch.tensor([0, 2, 1, 2])
    out = single(x, labels=classes)
    assert single.config.problem_type == "single_label_classification"
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, classes))
    regression = CAiDForImageClassification.from_pretrained(folder, num_labels=1).eval()
    values = torch.tensor([0.5, 1.0, -1.0, 2.0])
    out = regression(x, labels=values)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), values))


def test_segmentation_losses(backbone_dir):
    from segmentation_models_pytorch.losses import DiceLoss

    folder, _ = backbone_dir
    x = torch.rand(2, 3, 64, 64)
    binary = CAiDForSemanticSegmentation.from_pretrained(folder, num_labels=1).eval()
    mask = (torch.rand(2, 1, 64, 64) > 0.7).float()
    out = binary(x, labels=mask)
    assert out.logits.shape == (2, 1, 64, 64)
    expected = (F.binary_cross_entropy_with_logits(out.logits, mask)
                + DiceLoss("binary", from_logits=True)(out.logits, mask))
    torch.testing.assert_close(out.loss, expected)
    multi = CAiDForSemanticSegmentation.from_pretrained(
        folder, num_labels=3, segmentation_dice_weight=0.0).eval()
    classes = torch.randint(0, 3, (2, 64, 64))
    out = multi(x, labels=classes)
    assert out.logits.shape == (2, 3, 64, 64)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, classes))
    unlabelled = classes.clone()
    unlabelled[:, :32] = 255  # transformers' ignore index: those pixels do not count
    keep = unlabelled != 255
    expected = F.cross_entropy(out.logits.permute(0, 2, 3, 1)[keep], classes[keep])
    torch.testing.assert_close(multi(x, labels=unlabelled).loss, expected)


def test_a_few_steps_on_phantom_labels_lower_the_losses(backbone_dir):
    folder, _ = backbone_dir
    x, mask = _phantom_batch()
    present = (mask.flatten(1).amax(1) > 0).float().unsqueeze(1)  # nodule present
    assert 0 < present.sum() < len(present)
    torch.manual_seed(0)
    for model, labels in (
        (CAiDForImageClassification.from_pretrained(
            folder, num_labels=1, problem_type="multi_label_classification"), present),
        (CAiDForSemanticSegmentation.from_pretrained(folder, num_labels=1), mask),
    ):
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(10):
            loss = model(x, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < 0.85 * losses[0], (type(model).__name__, losses)


def test_fine_tuned_models_round_trip(backbone_dir, tmp_path):
    folder, _ = backbone_dir
    x = torch.rand(2, 3, 64, 64)
    for cls, auto in ((CAiDForImageClassification, AutoModelForImageClassification),
                      (CAiDForSemanticSegmentation, AutoModelForSemanticSegmentation)):
        model = cls.from_pretrained(folder, num_labels=2).eval()
        model.save_pretrained(tmp_path / cls.__name__)
        loaded = auto.from_pretrained(tmp_path / cls.__name__).eval()
        assert type(loaded) is cls and loaded.config.num_labels == 2
        with torch.no_grad():
            assert torch.equal(loaded(x).logits, model(x).logits)
