"""Saved folders load where caid-hf is not installed (``trust_remote_code=True``).

A second virtual environment is built that sees this one's packages (torch, transformers,
segmentation-models-pytorch, safetensors, pydicom) but not caid-hf: a ``.pth`` line adds
this environment's site-packages, whose own ``.pth`` files (caid-hf's editable install
among them) Python does not process there. It loads a backbone, a classifier, a U-Net and
the image processor through the Auto classes and writes its outputs, which must equal
caid-hf's bit for bit.
"""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from caid_hf import (
    CAiDConfig,
    CAiDForImageClassification,
    CAiDForSemanticSegmentation,
    CAiDImageProcessor,
    CAiDModel,
)

REMOTE = r"""
import json, sys
import numpy as np, torch
try:
    import caid_hf  # noqa: F401
    sys.exit("caid_hf is importable: not a clean environment")
except ImportError:
    pass
from transformers import (AutoImageProcessor, AutoModel, AutoModelForImageClassification,
                          AutoModelForSemanticSegmentation)
root, out = sys.argv[1], sys.argv[2]
processor = AutoImageProcessor.from_pretrained(root + "/backbone", trust_remote_code=True)
pixels = processor([root + "/chest.png", root + "/chest.dcm"], return_tensors="pt").pixel_values
results = {"processor_class": type(processor).__name__, "pixels": pixels.numpy()}
with torch.no_grad():
    backbone = AutoModel.from_pretrained(root + "/backbone", trust_remote_code=True).eval()
    results["pooled"] = backbone(pixels).pooler_output.numpy()
    classifier = AutoModelForImageClassification.from_pretrained(
        root + "/classifier", trust_remote_code=True).eval()
    results["class_logits"] = classifier(pixels).logits.numpy()
    results["labels"] = json.dumps(classifier.config.id2label)
    unet = AutoModelForSemanticSegmentation.from_pretrained(root + "/unet",
                                                            trust_remote_code=True).eval()
    results["mask_logits"] = unet(pixels).logits.numpy()
    started = AutoModelForImageClassification.from_pretrained(  # a classifier from a backbone
        root + "/backbone", trust_remote_code=True, num_labels=3)
    results["started_module"] = type(started).__module__
np.savez(out, **results)
"""


def _environment_without_caid_hf(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True,
                   capture_output=True)
    python = folder / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True)
    Path(site.stdout.strip(), "shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _write_inputs(root: Path) -> None:
    from caid_hf.data.phantoms import generate_phantom

    from helpers import twelve_bit_monochrome1

    Image.fromarray(generate_phantom(3, 80)[0]).save(root / "chest.png")
    twelve_bit_monochrome1().save_as(root / "chest.dcm", enforce_file_format=True)


@pytest.mark.slow
def test_saved_folders_load_with_trust_remote_code_without_caid_hf(tmp_path):
    torch.manual_seed(0)
    config = CAiDConfig(encoder_name="resnet18", encoder_weights=None, image_size=64)
    backbone = CAiDModel(config).eval()
    backbone.save_pretrained(tmp_path / "backbone")
    processor = CAiDImageProcessor(size=64)
    processor.save_pretrained(tmp_path / "backbone")
    classifier = CAiDForImageClassification(CAiDConfig(
        encoder_name="resnet18", encoder_weights=None, image_size=64, num_labels=2,
        id2label={0: "nodule", 1: "effusion"}, label2id={"nodule": 0, "effusion": 1},
        problem_type="multi_label_classification")).eval()
    classifier.save_pretrained(tmp_path / "classifier")
    unet = CAiDForSemanticSegmentation(CAiDConfig(
        encoder_name="resnet18", encoder_weights=None, image_size=64, num_labels=1)).eval()
    unet.save_pretrained(tmp_path / "unet")
    for name in ("backbone", "classifier", "unet"):
        saved = sorted(p.name for p in (tmp_path / name).iterdir())
        assert {"configuration_caid.py", "modeling_caid.py"} <= set(saved), saved
        assert "AutoModelForSemanticSegmentation" in json.loads(
            (tmp_path / name / "config.json").read_text())["auto_map"]
    _write_inputs(tmp_path)

    python = _environment_without_caid_hf(tmp_path / "env")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "PYTHONPATH": ""}
    result = subprocess.run([str(python), "-c", REMOTE, str(tmp_path), str(tmp_path / "out.npz")],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = np.load(tmp_path / "out.npz")

    pixels = processor([tmp_path / "chest.png", tmp_path / "chest.dcm"],
                       return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = {"pixels": pixels.numpy(),
                    "pooled": backbone(pixels).pooler_output.numpy(),
                    "class_logits": classifier(pixels).logits.numpy(),
                    "mask_logits": unet(pixels).logits.numpy()}
    for key, value in expected.items():
        assert remote[key].shape == value.shape, key
        assert np.abs(remote[key] - value).max() == 0, key  # bit for bit
    assert str(remote["processor_class"]) == "CAiDImageProcessor"
    assert json.loads(str(remote["labels"])) == {"0": "nodule", "1": "effusion"}
    assert str(remote["started_module"]).startswith("transformers_modules")  # remote code ran
