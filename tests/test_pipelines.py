"""transformers pipelines on CAiD folders: feature extraction, classification, segmentation,
for PIL images, paths and DICOM files (caid-hf installed: no remote code, no prompt)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from caid_hf import (
    CAiDConfig,
    CAiDForImageClassification,
    CAiDForSemanticSegmentation,
    CAiDImageProcessor,
    CAiDModel,
)
from caid_hf.data.phantoms import generate_phantom

from helpers import twelve_bit_monochrome1

TINY = {"encoder_name": "resnet18", "encoder_weights": None, "image_size": 64}


@pytest.fixture
def inputs(tmp_path):
    """The same kinds of input a user has: a PIL image, a PNG path, a DICOM path."""
    image = Image.fromarray(generate_phantom(0, 96)[0])
    image.save(tmp_path / "chest.png")
    twelve_bit_monochrome1().save_as(tmp_path / "chest.dcm", enforce_file_format=True)
    return [image, str(tmp_path / "chest.png"), str(tmp_path / "chest.dcm")]


def _save(model, folder):
    model.eval().save_pretrained(folder)
    CAiDImageProcessor(size=64).save_pretrained(folder)
    return str(folder)


def test_feature_extraction_pipeline_gives_the_backbone_embedding(tmp_path, inputs, capfd):
    torch.manual_seed(0)
    backbone = CAiDModel(CAiDConfig(**TINY))
    extractor = pipeline("image-feature-extraction", model=_save(backbone, tmp_path / "m"))
    printed = capfd.readouterr()
    assert "custom code" not in printed.out + printed.err  # no remote-code prompt
    processor = CAiDImageProcessor(size=64)
    for item in inputs:
        pooled = np.asarray(extractor(item, pool=True))
        with torch.no_grad():
            expected = backbone(processor(item, return_tensors="pt").pixel_values).pooler_output
        assert pooled.shape == (1, 512)
        np.testing.assert_allclose(pooled, expected.numpy(), rtol=1e-5, atol=1e-6)
        assert np.asarray(extractor(item)).shape == (1, 512, 2, 2)  # last_hidden_state


def test_classification_pipeline_names_the_labels(tmp_path, inputs):
    torch.manual_seed(0)
    config = CAiDConfig(**TINY, num_labels=2, id2label={0: "nodule", 1: "effusion"},
                        label2id={"nodule": 0, "effusion": 1},
                        problem_type="multi_label_classification")
    classifier = CAiDForImageClassification(config)
    with torch.no_grad():
        classifier.classifier.bias.copy_(torch.tensor([2.0, -2.0]))
    classify = pipeline("image-classification", model=_save(classifier, tmp_path / "m"))
    for item in inputs:
        result = classify(item)
        assert [r["label"] for r in result] == ["nodule", "effusion"]  # by score
        with torch.no_grad():
            logits = classifier(CAiDImageProcessor(size=64)(item, return_tensors="pt")
                                .pixel_values).logits[0]
        np.testing.assert_allclose([r["score"] for r in result], logits.sigmoid().tolist(),
                                   rtol=1e-5)


def test_segmentation_pipeline_gives_a_mask_per_class_at_the_image_size(tmp_path, inputs):
    torch.manual_seed(0)
    unet = CAiDForSemanticSegmentation(CAiDConfig(**TINY, num_labels=1, id2label={0: "nodule"},
                                                  label2id={"nodule": 0}))
    with torch.no_grad():  # confident foreground on the left half of every image
        unet.classifier[0].weight.zero_()
        unet.classifier[0].bias.fill_(-6.0)
    segment = pipeline("image-segmentation", model=_save(unet, tmp_path / "m"))
    assert segment(inputs[0]) == []  # nothing above the threshold: no segment
    with torch.no_grad():
        unet.classifier[0].bias.fill_(6.0)
    segment = pipeline("image-segmentation", model=_save(unet, tmp_path / "m2"))
    for item, size in zip(inputs, [(96, 96), (96, 96), (8, 8)], strict=True):
        (result,) = segment(item)
        assert result["label"] == "nodule" and result["score"] > 0.99
        mask = np.asarray(result["mask"])
        assert mask.shape == size and set(np.unique(mask)) == {255}  # the original's size


def test_post_process_semantic_segmentation_several_classes_and_binary():
    processor = CAiDImageProcessor(size=64)
    logits = torch.zeros(1, 3, 4, 4)
    logits[0, 2, :2] = 5.0  # top half: class 2; bottom: ties → class 0
    (labels,) = processor.post_process_semantic_segmentation({"logits": logits})
    assert labels.tolist() == [[2] * 4] * 2 + [[0] * 4] * 2
    (resized,) = processor.post_process_semantic_segmentation({"logits": logits},
                                                              target_sizes=[(8, 6)])
    assert resized.shape == (8, 6) and resized[0, 0] == 2 and resized[-1, -1] == 0
    binary = torch.full((2, 1, 4, 4), -3.0)
    binary[1, 0, 0, 0] = 3.0
    first, second = processor.post_process_semantic_segmentation({"logits": binary})
    assert first.sum() == 0 and second.sum() == 1 and second[0, 0] == 1
    with pytest.raises(ValueError, match="target_sizes has 1 sizes for 2 images"):
        processor.post_process_semantic_segmentation({"logits": binary}, target_sizes=[(4, 4)])
