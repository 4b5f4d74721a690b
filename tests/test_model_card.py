"""The model card renders with metadata that huggingface_hub parses back."""

import dataclasses
import json
import re

import pytest
import yaml
from huggingface_hub import ModelCard

from caid_hf import CAiDConfig, CAiDModel
from caid_hf.model_card import CITATION, NOT_RECORDED, write_model_card
from caid_hf.training.arguments import DataArguments, PretrainingArguments

# a run on the embedded phantoms: never a chest-radiograph tag
EXPECTED_TAGS = {"medical-imaging", "self-supervised-learning", "synthetic-data", "caid", "moco",
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
    assert EXPECTED_TAGS <= set(data["tags"]) and "chest-x-ray" not in data["tags"]
    assert "resnet18" in data["tags"]
    assert data["base_model"] == "org/caid-resnet18-base"
    assert data["datasets"] == ["org/chestxray14"]


def test_card_body_reports_the_run(backbone_dir, run_dir):
    card = ModelCard.load(write_model_card(backbone_dir, run_dir, hardware="2-core CPU",
                                           training_time_s=282.0))
    body = card.text
    assert "| Validation loss of these weights (best) | 5.2852 at step 64 |" in body
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
        assert f"| Validation loss of these weights (best) | {NOT_RECORDED} |" in card.text
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


def _run_files(run, train_source, history):
    training = dataclasses.asdict(PretrainingArguments(output_dir=str(run), max_steps=8))
    config = {"model": {"encoder_name": "resnet18", "image_size": 64},
              "data": dataclasses.asdict(DataArguments(train_source=train_source)),
              "training": training}
    (run / "run_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    state = {"global_step": 8, "metric_for_best_model": "val/loss", "best_metric": 5.1,
             "best_step": 4, "history": history}
    (run / "trainer_state.json").write_text(json.dumps(state))


def test_phantom_run_card_never_claims_chest_radiographs(backbone_dir, run_dir):
    card = ModelCard.load(write_model_card(backbone_dir, run_dir))
    assert "synthetic chest phantoms embedded in caid-hf" in card.text
    assert "on chest radiographs" not in card.text
    assert "chest-x-ray" not in card.data.tags and "synthetic-data" in card.data.tags


def test_folder_run_card_names_its_data_without_the_local_path(tmp_path):
    run = tmp_path / "run"
    CAiDModel(CAiDConfig(encoder_name="resnet18", image_size=64)).save_pretrained(run / "best")
    _run_files(run, "/data/hospital/cxr_pngs", [{"step": 4, "val/loss": 5.1}])
    card = ModelCard.load(write_model_card(run / "best", run, base_model="/data/other/best"))
    assert "pre-trained without labels on `cxr_pngs`" in card.text
    assert "chest-x-ray" in card.data.tags and "synthetic-data" not in card.data.tags
    assert "base_model" not in card.data.to_dict()  # a local path is no Hub id


def test_final_and_best_cards_give_the_numbers_of_their_own_weights(tmp_path):
    run = tmp_path / "run"
    for name in ("best", "final"):
        CAiDModel(CAiDConfig(encoder_name="resnet18", image_size=64)).save_pretrained(run / name)
    _run_files(run, "phantoms", [{"step": 4, "val/loss": 5.1}, {"step": 8, "val/loss": 5.3}])
    best = ModelCard.load(write_model_card(run / "best", run, weights="best")).text
    final = ModelCard.load(write_model_card(run / "final", run, weights="final")).text
    assert "| Validation loss of these weights (best) | 5.1000 at step 4 |" in best
    assert "| Validation loss of these weights (last) | 5.3000 at step 8 |" in final
    assert "best-validation weights of the run" in best and "last weights of the run" in final
    assert best != final


def test_licence_and_datasets_are_card_metadata(backbone_dir, run_dir):
    card = ModelCard.load(write_model_card(backbone_dir, run_dir, license="cc-by-nc-4.0",
                                           datasets=["org/mimic-cxr"]))
    assert card.data.license == "cc-by-nc-4.0" and card.data.datasets == ["org/mimic-cxr"]
    other = ModelCard.load(write_model_card(backbone_dir, run_dir, license="other",
                                            license_name="physionet-credentialed",
                                            license_link="https://physionet.org/about/licenses/"))
    assert other.data.license == "other"
    assert other.data.to_dict()["license_name"] == "physionet-credentialed"
    with pytest.raises(ValueError, match="license_name and license_link"):
        write_model_card(backbone_dir, run_dir, license="other")


def test_push_fills_the_repo_id_and_licence_into_the_card(backbone_dir, run_dir, capsys):
    from caid_hf.publishing import push_folder, update_card

    write_model_card(backbone_dir, run_dir)
    assert '"org/name"' in (backbone_dir / "README.md").read_text()
    before = (backbone_dir / "README.md").read_bytes()
    push_folder(backbone_dir, "you/caid-demo", dry_run=True, license="mit",
                datasets=["you/xrays"])
    assert (backbone_dir / "README.md").read_bytes() == before  # a dry run changes nothing
    update_card(backbone_dir, "you/caid-demo", license="mit", datasets=["you/xrays"])
    card = ModelCard.load(backbone_dir / "README.md")
    assert '"org/name"' not in card.text and card.text.count('"you/caid-demo"') == 5
    assert 'AutoModel.from_pretrained("you/caid-demo", trust_remote_code=True)' in card.text
    assert card.data.license == "mit" and card.data.datasets == ["you/xrays"]


def test_card_raw_weights_recipe_loads_into_smp_and_torchvision(backbone_dir, monkeypatch):
    """The card's lines for loading the raw safetensors run as written."""
    import huggingface_hub
    import torch

    torch.manual_seed(0)
    text = ModelCard.load(write_model_card(backbone_dir, repo_id="you/caid")).text
    snippet = text.split("The raw weights")[1].split("```python\n")[1].split("```")[0]
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, name: str(backbone_dir / name))
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the card's own snippet (timm comes with smp)
    saved = CAiDModel.from_pretrained(backbone_dir).state_dict()
    assert all(torch.equal(scope["unet"].state_dict()[k], v) for k, v in saved.items())
    assert set(scope["missing"]) == {"fc.weight", "fc.bias"} and not scope["unexpected"]
    assert scope["timm_missing"] == []
    assert torch.equal(scope["resnet"].conv1.weight, saved["encoder.conv1.weight"])


def test_push_with_exports_writes_smp_and_timm_folders_that_load(backbone_dir, capsys):
    import segmentation_models_pytorch as smp
    import timm
    import torch

    from caid_hf.publishing import add_exports, push_folder

    plan = dict(push_folder(backbone_dir, "you/caid-demo", dry_run=True, with_exports=True))
    assert {"smp/config.json", "smp/model.safetensors", "smp/README.md",
            "timm/config.json", "timm/model.safetensors", "timm/README.md"} <= set(plan)
    assert not (backbone_dir / "smp").exists()  # the dry run prepared them on a copy
    assert "export: smp/ would be written into" in capsys.readouterr().out
    add_exports(backbone_dir, "you/caid-demo")
    assert plan["smp/model.safetensors"] == (backbone_dir / "smp" / "model.safetensors"
                                             ).stat().st_size
    saved = CAiDModel.from_pretrained(backbone_dir).state_dict()
    unet = smp.from_pretrained(str(backbone_dir / "smp"))
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in saved.items())
    resnet = timm.create_model(f"local-dir:{backbone_dir / 'timm'}", pretrained=True)
    encoder = {k.removeprefix("encoder."): v for k, v in saved.items() if k.startswith("encoder.")}
    assert resnet.state_dict().keys() == encoder.keys()
    assert all(torch.equal(resnet.state_dict()[k], v) for k, v in encoder.items())
    assert "[you/caid-demo](https://huggingface.co/you/caid-demo)" in (
        backbone_dir / "smp" / "README.md").read_text()


def _section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level
    (lines in code blocks, such as ``# a comment``, are not headings)."""
    level = len(heading.split(" ")[0])
    lines = text.split(f"\n{heading}\n", 1)[1].splitlines()
    fenced, kept = False, []
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        hashes = len(line) - len(line.lstrip("#"))
        if not fenced and 0 < hashes <= level and line[hashes:hashes + 1] == " ":
            break
        kept.append(line)
    return "\n".join(kept)


def test_card_states_uses_limits_evaluation_and_loading_without_installing(backbone_dir,
                                                                           run_dir):
    """The Hub card template's sections (uses, out-of-scope, limitations), the run's last
    online-probe figures as the evaluation, the trust_remote_code path first, and no
    install line naming a package no index serves."""
    state = json.loads((run_dir / "trainer_state.json").read_text())
    state["history"].append({"step": 192, "probe/linear_probe_auc": 0.7123,
                             "probe/knn_auc": 0.6401,
                             "probe/linear_probe_auc/Cardiomegaly": 0.9012,
                             "probe/linear_probe_auc/Nodule": 0.5234})
    (run_dir / "trainer_state.json").write_text(json.dumps(state))
    text = ModelCard.load(write_model_card(backbone_dir, run_dir, repo_id="you/caid")).text
    uses = _section(text, "## Uses")
    assert "demonstration" in uses and "not a diagnostic model" in uses  # phantoms
    out_of_scope = _section(text, "### Out-of-scope use")
    assert "clinical use" in out_of_scope and "regulatory clearance" in out_of_scope
    limitations = _section(text, "## Bias, Risks, and Limitations")
    assert "synthetic chest phantoms only" in limitations  # this run trained on phantoms
    assert "64 px" in limitations and "per site" in limitations
    evaluation = _section(text, "## Evaluation")
    assert "step 192" in evaluation and "linear-probe mean AUC 0.712" in evaluation
    assert "k-NN mean AUC 0.640" in evaluation
    assert "| Cardiomegaly | 0.901 |" in evaluation and "| Nodule | 0.523 |" in evaluation
    usage = _section(text, "## How to use")
    remote = usage.index('AutoModel.from_pretrained("you/caid", trust_remote_code=True)')
    assert remote < usage.index("import caid_hf")  # no installing comes first
    installs = re.findall(r"pip install ([^\n`(]+)", text)
    assert installs  # the dependencies are named
    for line in installs:
        assert "caid-hf" not in line.split() and "caid_hf" not in line.split(), line
    assert "pip install -e ." in usage  # caid-hf itself from its source


def test_card_without_a_probe_says_how_to_evaluate(backbone_dir, run_dir):
    text = ModelCard.load(write_model_card(backbone_dir, run_dir)).text
    evaluation = _section(text, "## Evaluation")
    assert evaluation.strip().startswith("Not evaluated on labelled data")
    assert "caid-hf evaluate-transfer" in evaluation
