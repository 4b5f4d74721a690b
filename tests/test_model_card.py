"""The model card renders with metadata that huggingface_hub parses back."""

import dataclasses
import json

import pytest
import yaml
from huggingface_hub import ModelCard

from caid_hf import CAiDConfig, CAiDModel
from caid_hf.model_card import CITATION, NOT_RECORDED, write_model_card
from caid_hf.training.arguments import DataArguments, PretrainingArguments

EXPECTED_TAGS = {"medical-imaging", "self-supervised-learning", "chest-x-ray", "caid", "moco",
                 "image-feature-extraction"}


@pytest.fixture
def backbone_dir(tmp_path):
    folder = tmp_path / "run" / "best"
    CAiDModel(CAiDConfig(encoder_name="resnet18", image_size=64)).save_pretrained(folder)
    return folder


@pytest.fixture
def run_dir(backbone_dir):
    """The two files a pre-training run leaves, shaped as training/pretrain.py writes them."""
    run = backbone_dir.parent
    training = dataclasses.asdict(PretrainingArguments(output_dir=str(run), max_steps=192,
                                                       per_device_train_batch_size=32))
    training["hub_token"] = "hf_should_never_appear"
    config = {"model": {"encoder_name": "resnet18", "image_size": 64},
              "data": dataclasses.asdict(DataArguments(train_source="phantoms",
                                                       num_train_phantoms=1000)),
              "training": training}
    (run / "run_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    state = {"global_step": 192, "metric_for_best_model": "val/loss", "best_metric": 5.28517, "best_step": 64,
             "history": [{"step": 64, "val/loss": 5.28517}]}
    (run / "trainer_state.json").write_text(json.dumps(state))
    return run


def test_card_metadata_parses_back(backbone_dir, run_dir):
    path = write_model_card(backbone_dir, run_dir, base_model="org/caid-resnet18-base",
                            datasets=["org/chestxray14"], hardware="2-core CPU",
                            training_time_s=282.0)
    assert path == backbone_dir / "README.md"

    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0"
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-feature-extraction"
    assert EXPECTED_TAGS <= set(data["tags"])
    assert "resnet18" in data["tags"]
    assert data["base_model"] == "org/caid-resnet18-base"
    assert data["datasets"] == ["org/chestxray14"]


def test_card_body_reports_the_run(backbone_dir, run_dir):
    card = ModelCard.load(write_model_card(backbone_dir, run_dir, hardware="2-core CPU",
                                           training_time_s=282.0))
    body = card.text
    assert "| Best validation loss | 5.2852 |" in body
    assert "| Best validation step | 64 |" in body
    assert "| Total optimizer steps | 192 |" in body
    assert "1,000 training images, 200 validation images" in body
    assert "192 steps" in body
    assert "| Hardware | 2-core CPU |" in body
    assert "| Training time | 4 min 42 s |" in body
    assert "resnet18" in body and "64 px" in body and "MoCo-v2 + context prediction" in body
    assert "AutoModelForImageClassification" in body
    assert "AutoModelForSemanticSegmentation" in body and "num_labels" in body
    assert "[0, 1]" in body and "no mean/std normalisation" in body
    assert "Differences from the original implementation" in body
    assert CITATION in body
    assert "hf_should_never_appear" not in card.content


def test_card_without_run_files(backbone_dir, tmp_path):
    empty_run = tmp_path / "no-run"
    empty_run.mkdir()
    for run in (None, empty_run):
        card = ModelCard.load(write_model_card(backbone_dir, run))
        assert "base_model" not in card.data.to_dict()
        assert card.data.license == "apache-2.0"
        assert f"| Best validation loss | {NOT_RECORDED} |" in card.text
        assert f"| Data size | {NOT_RECORDED} |" in card.text
        assert f"| Hardware | {NOT_RECORDED} |" in card.text
        assert f"Run configuration: {NOT_RECORDED}." in card.text
        assert CITATION in card.text


def test_baseline_card_says_decoder_is_untrained(tmp_path):
    folder = tmp_path / "id_only"
    CAiDModel(CAiDConfig(encoder_name="resnet18", image_size=64,
                         context_prediction=False)).save_pretrained(folder)
    text = ModelCard.load(write_model_card(folder)).text
    assert "instance discrimination only" in text and "decoder was never trained" in text


def test_card_needs_a_saved_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        write_model_card(tmp_path)


def test_usage_uses_repo_id_and_processor_when_saved(backbone_dir):
    assert "AutoImageProcessor" not in ModelCard.load(write_model_card(backbone_dir)).text
    (backbone_dir / "preprocessor_config.json").write_text("{}")
    text = ModelCard.load(write_model_card(backbone_dir, repo_id="org/caid-r18")).text
    assert 'AutoImageProcessor.from_pretrained("org/caid-r18")' in text
    assert 'AutoModelForSemanticSegmentation.from_pretrained("org/caid-r18", num_labels=1)' in text
