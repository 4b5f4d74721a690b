"""Fine-tuning: labelled sources, model initialisation, the loop end to end, the saved folder."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
)

import caid_hf  # noqa: F401  (registers "caid" with the Auto classes)
from caid_hf import CAiDForImageClassification, CAiDForSemanticSegmentation, CAiDImageProcessor
from caid_hf.data.phantoms import generate_phantom, write_phantoms
from caid_hf.finetuning.arguments import (
    FinetuneDataArguments,
    FinetuneModelArguments,
    FinetuningArguments,
    parse_finetuning_args,
)
from caid_hf.finetuning.data import (
    CHESTXRAY14_LABELS,
    ClassificationDataset,
    CSVLabelledSource,
    HFLabelledSource,
    LabelledSourceOptions,
    MaskFolderSource,
    PhantomLabelledSource,
    SegmentationDataset,
    SplitListLabelledSource,
    labelled_source_from_spec,
)
from caid_hf.finetuning.finetune import BestWeights, build_model, finetune


@pytest.fixture(scope="module")
def backbone_dir(tiny_pretraining_run):
    """A tiny pre-trained demo-like backbone: ResNet-18 U-Net, 64 px, 2 CAiD steps."""
    return tiny_pretraining_run / "final"


def tiny_run(task: str, init_from: str, out, **training) -> tuple:
    model = FinetuneModelArguments(task=task, init_from=init_from, encoder_name="resnet18",
                                   image_size=64)
    data = FinetuneDataArguments(num_train_phantoms=16, num_validation_phantoms=8,
                                 num_test_phantoms=12, phantom_size=64)
    args = FinetuningArguments(**{
        "output_dir": str(out), "max_steps": 4, "eval_steps": 2,
        "per_device_train_batch_size": 8, "learning_rate": 1e-3, "bootstrap_resamples": 50,
        "dataloader_num_workers": 0, "report_to": "none", **training})
    return model, data, args


def fixed_input(size: int = 64) -> torch.Tensor:
    images = [generate_phantom(i, size=size, seed=99)[0] for i in range(3)]
    return CAiDImageProcessor(size=size)(images, return_tensors="pt")["pixel_values"]


@pytest.mark.slow
def test_classification_from_a_backbone_end_to_end(backbone_dir, tmp_path):
    result = finetune(*tiny_run("classification", str(backbone_dir), tmp_path / "clf"))
    out = result.output_dir
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md",
                 "test_results.json", "trainer_state.json", "run_config.yaml"):
        assert (out / name).is_file(), name
    report = json.loads((out / "test_results.json").read_text())
    assert report["split"] == "test" and report["num_samples"] == 12
    low, high = report["confidence_intervals"]["auc/nodule"]
    assert 0 <= low <= report["metrics"]["auc/nodule"] <= high <= 1
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card
    assert f"| mean_auc | {report['metrics']['mean_auc']:.4f} | [{low:.4f} – " in card
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["best_step"] in (2, 4)
    assert state["metric_for_best_model"] == "mean_auc"

    reloaded = AutoModelForImageClassification.from_pretrained(out).eval()
    assert isinstance(reloaded, CAiDForImageClassification)
    assert reloaded.config.id2label == {0: "nodule"}
    assert reloaded.config.problem_type == "multi_label_classification"
    trained = result.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in reloaded.state_dict().items())
    x = fixed_input()
    with torch.no_grad():
        new, old = reloaded(x).logits, result.model(x).logits
    # bit-identical weights; the linear head's BLAS kernel depends on the memory alignment of
    # its weight buffer (safetensors maps it at any offset), which may move the last bit
    torch.testing.assert_close(new, old, rtol=0, atol=1e-6)
    assert torch.equal(new > 0, old > 0)
    processor = AutoImageProcessor.from_pretrained(out)
    assert isinstance(processor, CAiDImageProcessor) and processor.size == 64


@pytest.mark.slow
def test_segmentation_from_a_backbone_end_to_end(backbone_dir, tmp_path):
    result = finetune(*tiny_run("segmentation", str(backbone_dir), tmp_path / "seg"))
    out = result.output_dir
    report = json.loads((out / "test_results.json").read_text())
    assert set(report["metrics"]) == {"dice", "iou", "dice/nodule", "iou/nodule"}
    assert "pipeline_tag: image-segmentation" in (out / "README.md").read_text()
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(out).eval()
    assert isinstance(reloaded, CAiDForSemanticSegmentation)
    assert reloaded.config.num_labels == 1
    x = fixed_input()
    with torch.no_grad():
        logits = reloaded(x).logits
        assert logits.shape == (3, 1, 64, 64)
        assert torch.equal(logits, result.model(x).logits)
    # the encoder moved away from the backbone's weights: it was fine-tuned, not frozen
    backbone = caid_hf.CAiDModel.from_pretrained(backbone_dir)
    assert not torch.equal(reloaded.caid.encoder.conv1.weight, backbone.encoder.conv1.weight)



@pytest.mark.slow
def test_multi_class_segmentation_from_a_mask_folder(tmp_path):
    # class 0 background, 1 bright anatomy, 2 nodules, as palette-free grey PNG masks
    (tmp_path / "data" / "masks").mkdir(parents=True)
    for i in range(6):
        image, nodules = generate_phantom(i, size=64)
        mask = np.where(nodules > 0, 2, (image > 120).astype(np.uint8)).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "data" / f"film{i}.png")
        Image.fromarray(mask).save(tmp_path / "data" / "masks" / f"film{i}.png")
    model, data, args = tiny_run("segmentation", "random", tmp_path / "out", max_steps=2,
                                 eval_steps=0, bootstrap_resamples=10)
    model.num_labels = 3
    data.train_source, data.label_names = str(tmp_path / "data"), ["background", "bright", "nodule"]
    result = finetune(model, data, args)
    assert result.model.config.id2label == {0: "background", 1: "bright", 2: "nodule"}
    report = result.test_report
    assert report["split"] == "validation"  # no test source: the held-out validation images
    assert {"dice/background", "dice/bright", "dice/nodule", "iou/nodule"} <= set(report["metrics"])
    foreground = [report["metrics"]["dice/bright"], report["metrics"]["dice/nodule"]]
    assert report["metrics"]["dice"] == pytest.approx(np.nanmean(foreground))

@pytest.mark.slow
@pytest.mark.parametrize("min_steps,stopped_at", [(0, 3), (-1, 11)])
def test_early_stopping_on_a_metric_that_cannot_improve(tmp_path, min_steps, stopped_at):
    # learning rate 0 and a frozen encoder: every validation gives the same Dice; validations
    # before early_stopping_min_steps (-1: half of the 20 steps) do not count. The arguments
    # refuse a zero learning rate, so it is set after they are checked.
    model, data, args = tiny_run("segmentation", "random", tmp_path / "stop", max_steps=20,
                                 eval_steps=1, early_stopping_patience=2,
                                 bootstrap_resamples=0, early_stopping_min_steps=min_steps)
    args.learning_rate = 0.0
    model.freeze_encoder = True
    data.num_train_phantoms, data.num_validation_phantoms, data.num_test_phantoms = 8, 4, 4
    result = finetune(model, data, args)
    assert result.stopped_early and result.global_step == stopped_at and result.best_step == 1


def test_output_dir_with_a_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        finetune(*tiny_run("classification", "random", tmp_path))


def test_yaml_config_and_command_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("task: segmentation\nlearning_rate: 0.01\nlabel_fraction: 0.05\n")
    model, data, args = parse_finetuning_args(["--config", str(config), "--learning_rate", "0.5"])
    assert model.task == "segmentation" and data.label_fraction == 0.05
    assert args.learning_rate == 0.5  # the command line wins
    config.write_text("learning_rat: 0.01\n")
    with pytest.raises(ValueError, match=r"run.yaml: unknown key 'learning_rat'; did you mean "
                                         r"'learning_rate'\?"):
        parse_finetuning_args(["--config", str(config)])
    with pytest.raises(ValueError, match="metric_for_best_model"):
        FinetuningArguments(metric_for_best_model="f1")


def test_shipped_finetuning_configs_parse():
    from pathlib import Path

    configs = sorted(Path(__file__).parent.parent.glob("configs/finetune_*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        parse_finetuning_args(["--config", str(path)])


def test_initialisations(tmp_path):
    import torchvision

    labels = ["a", "b", "c"]
    model = build_model(FinetuneModelArguments(encoder_name="resnet18", image_size=64), labels)
    assert model.config.num_labels == 3 and model.config.id2label == {0: "a", 1: "b", 2: "c"}
    # ImageNet-style weights the user has: a torchvision ResNet state dict
    reference = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(reference, tmp_path / "resnet18.pth")
    model = build_model(FinetuneModelArguments(init_from=str(tmp_path / "resnet18.pth"),
                                               encoder_name="resnet18"), labels)
    assert torch.equal(model.caid.encoder.layer4[1].conv2.weight,
                       reference["layer4.1.conv2.weight"])
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ValueError, match=r"r34.pth: the weights do not fit encoder 'resnet18'"):
        build_model(FinetuneModelArguments(init_from=str(tmp_path / "r34.pth"),
                                           encoder_name="resnet18"), labels)
    frozen = build_model(FinetuneModelArguments(encoder_name="resnet18", freeze_encoder=True,
                                                task="segmentation", num_labels=3), labels)
    assert not any(p.requires_grad for p in frozen.caid.encoder.parameters())
    assert all(p.requires_grad for p in frozen.caid.decoder.parameters())


def test_split_list_with_labels(tmp_path):
    write_phantoms(tmp_path / "images", 3, size=32)
    rows = ["0 1 0 0 0 1 0 0 0 0 0 0 0 1", "0 0 0 0 0 0 0 0 0 0 0 0 0 0",
            "1 1 1 1 1 1 1 1 1 1 1 1 1 1"]
    split = tmp_path / "train_official.txt"
    split.write_text("".join(f"images/phantom_{i:05d}.png {r}\n" for i, r in enumerate(rows)))
    source = SplitListLabelledSource(split, tmp_path)
    assert source.label_names == CHESTXRAY14_LABELS and source.targets.shape == (3, 14)
    assert source.targets[0].nonzero()[0].tolist() == [1, 5, 13]
    split.write_text("images/phantom_00000.png 0 1\nimages/phantom_00001.png 0 1 1\n")
    with pytest.raises(ValueError, match=r"train_official.txt:2: 3 labels, but the first line "
                                         r"has 2"):
        SplitListLabelledSource(split, tmp_path)
    split.write_text("images/phantom_00000.png 0 2\n")
    with pytest.raises(ValueError, match=r"train_official.txt:1: labels must be 0 or 1"):
        SplitListLabelledSource(split, tmp_path)
    split.write_text("images/phantom_00000.png\n")
    with pytest.raises(ValueError, match=r"train_official.txt:1: .* has no labels"):
        SplitListLabelledSource(split, tmp_path)


def test_csv_sources(tmp_path):
    write_phantoms(tmp_path / "png", 3, size=32, write_masks=True)
    table = tmp_path / "labels.csv"
    table.write_text("path,effusion,mass,site\npng/phantom_00000.png,1,0,A\n"
                     "png/phantom_00001.png,0,1,B\npng/phantom_00002.png,1,1,A\n")
    source = CSVLabelledSource(table)
    assert source.label_names == ["effusion", "mass"]  # numeric columns only
    assert source.targets.tolist() == [[1, 0], [0, 1], [1, 1]]
    assert source.load(2).shape == (32, 32)
    # ChestX-ray14's Data_Entry_2017.csv style: one column of |-separated findings
    table.write_text("Image Index,Finding Labels\npng/phantom_00000.png,Mass|Effusion\n"
                     "png/phantom_00001.png,No Finding\npng/phantom_00002.png,Mass\n")
    source = CSVLabelledSource(table, label_columns=["Finding Labels"])
    assert source.label_names == ["Effusion", "Mass"]
    assert source.targets.tolist() == [[1, 1], [0, 0], [0, 1]]
    with pytest.raises(ValueError, match=r"labels.csv:1: no column 'finding'"):
        CSVLabelledSource(table, label_columns=["finding"])
    table.write_text("image,label\npng/phantom_00000.png,yes\n")
    with pytest.raises(ValueError, match=r"labels.csv:2 column 'label': label must be 1, 0, -1 \(uncertain\) or blank"):
        CSVLabelledSource(table, label_columns=["label", "image"])
    table.write_text("image,mask\npng/phantom_00001.png,png/masks/phantom_00001.png\n")
    options = LabelledSourceOptions(task="segmentation", mask_column="mask")
    masks = labelled_source_from_spec(str(table), options)
    assert np.array_equal(masks.load_mask(0), generate_phantom(1, size=32)[1])


def test_mask_folder_source(tmp_path):
    write_phantoms(tmp_path, 4, size=32, write_masks=True)
    source = labelled_source_from_spec(str(tmp_path), LabelledSourceOptions(task="segmentation"))
    assert isinstance(source, MaskFolderSource) and len(source) == 4  # masks/ is no image
    for i in range(4):
        image, mask = generate_phantom(i, size=32)
        assert np.array_equal(source.load(i), image)
        assert np.array_equal(source.load_mask(i), mask)  # {0, 255} on disk → {0, 1}
    (tmp_path / "masks" / "phantom_00002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) .* have no mask .*phantom_00002"):
        MaskFolderSource(tmp_path)
    with pytest.raises(ValueError, match="folders carry no class labels"):
        labelled_source_from_spec(str(tmp_path), LabelledSourceOptions())


def test_hugging_face_sources(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Sequence
    from datasets import Image as ImageFeature

    pairs = [generate_phantom(i, size=32) for i in range(4)]
    images = [Image.fromarray(image) for image, _ in pairs]
    dataset = Dataset.from_dict(
        {"image": images, "label": [0, 2, 1, 2], "findings": [[0], [], [0, 1], [1]],
         "mask": [Image.fromarray(mask) for _, mask in pairs]},
        features=Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b", "c"]),
                           "findings": Sequence(ClassLabel(names=["x", "y"])),
                           "mask": ImageFeature()}))
    single = HFLabelledSource(dataset, "toy")
    assert single.label_names == ["a", "b", "c"]
    assert single.targets.argmax(1).tolist() == [0, 2, 1, 2] and single.targets.sum() == 4
    multi = HFLabelledSource(dataset, "toy", label_columns=["findings"])
    assert multi.label_names == ["x", "y"]
    assert multi.targets.tolist() == [[1, 0], [0, 0], [1, 1], [0, 1]]
    assert np.array_equal(multi.load(1), pairs[1][0])
    masks = HFLabelledSource(dataset, "toy", mask_column="mask")
    assert all(np.array_equal(masks.load_mask(i), pairs[i][1]) for i in range(4))
    with pytest.raises(ValueError, match=r"dataset toy: no column 'nope'"):
        HFLabelledSource(dataset, "toy", label_columns=["nope"])
    dataset.save_to_disk(tmp_path / "saved")
    reopened = labelled_source_from_spec(str(tmp_path / "saved"), LabelledSourceOptions())
    assert reopened.targets.tolist() == single.targets.tolist()
    data = ClassificationDataset(single, 64, single_label=True)
    assert data[1]["labels"].item() == 2
    with pytest.raises(ValueError, match="exactly one positive label"):
        ClassificationDataset(multi, 64, single_label=True)


def test_evaluation_preprocessing_is_the_processor_and_training_crops_keep_masks_aligned():
    source = PhantomLabelledSource(6, size=96, seed=3)
    data = SegmentationDataset(source, 64)
    expected = CAiDImageProcessor(size=64)(source.load(2), return_tensors="pt")["pixel_values"][0]
    item = data[2]
    assert torch.allclose(item["pixel_values"], expected, atol=1e-6)
    assert item["labels"].shape == (1, 64, 64) and set(item["labels"].unique().tolist()) <= {0, 1}
    # a training crop of an image whose "mask" is its own bright pixels stays aligned
    torch.manual_seed(0)

    class SelfMask(PhantomLabelledSource):
        def load_mask(self, i):
            return (self.load(i) > 128).astype(np.int64)

    train = SegmentationDataset(SelfMask(2, size=96, seed=3), 64, train=True,
                                crop_scale_min=0.3, horizontal_flip=True)
    for _ in range(4):
        item = train[0]
        bright = item["pixel_values"][0] > 0.6
        mask = item["labels"][0] > 0
        assert (bright & mask).sum() > 0.8 * bright.sum()


def test_best_weights_keep_the_best_copy_and_count_validations_without_improvement():
    model = torch.nn.Linear(2, 1)
    best = BestWeights(higher_is_better=True, margin=0.01)
    assert not best.offer(float("nan"), 1, model)  # undefined: never the best, but counted
    assert best.since == 1 and best.state is None and best.value is None
    assert best.offer(0.70, 2, model) and (best.value, best.step, best.since) == (0.70, 2, 0)
    kept = {k: v.clone() for k, v in best.state.items()}
    with torch.no_grad():
        model.weight.add_(1.0)  # the copy is the model's weights at step 2, not a view
    assert all(torch.equal(best.state[k], kept[k]) for k in kept)
    assert not best.offer(0.705, 3, model)  # within the margin
    assert not best.offer(0.5, 4, model, counts=False)  # before min_steps: not counted
    assert best.since == 1 and best.step == 2
    loss = BestWeights(higher_is_better=False)
    assert loss.offer(0.4, 1, model) and loss.offer(0.3, 2, model) and not loss.offer(0.35, 3, model)
