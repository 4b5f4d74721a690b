"""Model cards (``README.md`` with Hub metadata) for published CAiD backbones.

The card is rendered with huggingface_hub's :class:`~huggingface_hub.ModelCard` from a
Jinja template and :class:`~huggingface_hub.ModelCardData`, so the YAML header is written
by the library and the Hub (and ``ModelCard.load``) parse it back. What the card says about
the run is read from the files a pre-training run leaves (``run_config.yaml``,
``trainer_state.json``); whatever is missing is reported as "not recorded".
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

NOT_RECORDED = "not recorded"

BASE_TAGS = [
    "medical-imaging",
    "self-supervised-learning",
    "caid",
    "moco",
    "image-feature-extraction",
    "u-net",
]
PHANTOMS = "phantoms"
# the tag of the data: a run on the embedded phantoms never claims chest radiographs
DATA_TAGS = {PHANTOMS: ["synthetic-data"], None: ["chest-x-ray"]}

CITATION = """\
@inproceedings{taher2022caid,
  title     = {{CAiD}: Context-Aware Instance Discrimination for Self-supervised Learning in Medical Imaging},
  author    = {Hosseinzadeh Taher, Mohammad Reza and Haghighi, Fatemeh and Gotway, Michael B. and Liang, Jianming},
  booktitle = {Proceedings of The 5th International Conference on Medical Imaging with Deep Learning},
  series    = {Proceedings of Machine Learning Research},
  volume    = {172},
  pages     = {535--551},
  year      = {2022},
  publisher = {PMLR}
}"""

# The README's table, condensed; keep the two in step.
DIFFERENCES = [
    "The key view goes through a momentum copy of the encoder and projection head only "
    "(the original runs the whole momentum U-Net and discards the decoder output).",
    "The reconstruction target follows the view's horizontal flip (the original does not flip "
    "it; `reference_compat` restores that).",
    "Distortion sizes scale with the view size (identical to the original at 224 px).",
    "The projection head takes the encoder's real width (the original hard-codes 2048, "
    "ResNet-50 only).",
    "Runs on CPU, one GPU (shuffle-BN emulated), multi-GPU and multi-node; the original is "
    "multi-GPU DDP only. The MoCo queue is kept identical across ranks by construction "
    "instead of being re-broadcast every step.",
    "Cosine learning-rate decay per optimizer step with optional warm-up (the original decays "
    "per epoch); validation does no momentum update or enqueue.",
    "Weights are saved as safetensors folders for `from_pretrained` instead of pickled "
    "`torch.save` files; state-dict keys are those of `segmentation_models_pytorch.Unet`.",
]

# Fields of run_config.yaml that never belong in a public card (credentials).
_SECRET_MARKERS = ("token", "password", "secret")

# The front matter, title, summary and model table every caid-hf card starts with.
CARD_HEAD = """\
---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Model

| | |
|---|---|
{% for key, value in model_rows %}| {{ key }} | {{ value }} |
{% endfor %}
"""

# The training table and the full run configuration, and the citation, of every card.
TRAINING_SECTION = """\
## Training

| | |
|---|---|
{% for key, value in training_rows %}| {{ key }} | {{ value }} |
{% endfor %}
{%- if run_config_yaml %}
<details>
<summary>Full run configuration (<code>run_config.yaml</code>)</summary>

```yaml
{{ run_config_yaml }}
```

</details>
{%- else %}
Run configuration: {{ not_recorded }}.
{%- endif %}
"""
CARD_TAIL = """\
## Citation

```bibtex
{{ citation }}
```
"""

# Uses, out-of-scope uses and limitations (the Hub card template's sections), and the
# evaluation this folder's run recorded.
INTENDED_USE = {
    False: "A starting point for research models on the kind of images it was trained on: "
           "an image feature extractor (frozen embeddings for linear probes, retrieval or "
           "clustering) and the initialisation of classifiers and segmentation U-Nets that "
           "are then fine-tuned on labelled images, usually with few labels.",
    True: "A demonstration: it shows and tests the pipeline end to end (loading, frozen "
          "features, fine-tuning a classifier or a segmentation U-Net from it) on synthetic "
          "phantoms; pre-train on your own images for a backbone worth using.",
}
USES_SECTION = """\
## Uses

{{ intended_use }} It is a backbone, not a diagnostic model: it outputs features and a
reconstruction, never a finding.

### Out-of-scope use

- Any clinical use: diagnosis, triage, screening or treatment decisions about patients.
  These weights are not a medical device, have no regulatory clearance and were not
  validated on patients.
- Findings or images unlike the training data (other modalities, paediatric films, other
  views or resolutions) without evaluating a fine-tuned model on them first.

## Bias, Risks, and Limitations

{% for item in limitations %}- {{ item }}
{% endfor %}
## Evaluation

{{ evaluation }}
"""

TEMPLATE = CARD_HEAD + """\
{{ method_note }}

""" + USES_SECTION + """\

""" + TRAINING_SECTION + """\

## How to use

Inputs are `[B, 3, H, W]` float tensors in **[0, 1]** (grey radiographs replicated to 3
channels), **no mean/std normalisation**, `H` and `W` multiples of 32 (pre-trained at
{{ image_size }} px).{% if has_processor %} `AutoImageProcessor` (the saved
`CAiDImageProcessor`) produces exactly that from PIL images, arrays or DICOM files.{% endif %}

Without installing caid-hf: the repo carries its code, so `trust_remote_code=True` loads
it with torch, transformers and segmentation-models-pytorch alone:

```python
{{ remote_usage }}
```

With caid-hf installed from its source repository (`pip install -e .` in a clone; it is
not on a package index), its classes are registered with the Auto classes:

```python
{{ usage }}
```

The raw weights, into segmentation_models_pytorch{% if resnet %}, torchvision or timm{% endif %}
(`smp.from_pretrained` reads smp's own repo layout, not this one):

```python
{{ raw_usage }}
```

## Differences from the original implementation

{% for item in differences %}- {{ item }}
{% endfor %}
""" + CARD_TAIL


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _read_yaml(path: Path) -> dict[str, Any] | None:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _without_secrets(value: Any) -> Any:
    """Copy of a nested run config without any field whose name looks like a credential."""
    if isinstance(value, dict):
        return {k: _without_secrets(v) for k, v in value.items()
                if not any(marker in str(k).lower() for marker in _SECRET_MARKERS)}
    return value


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _data_size(run: dict[str, Any], state: dict[str, Any], train: int | None,
               val: int | None) -> str:
    """Training / validation image counts: arguments, then trainer_state, then the config."""
    train = train if train is not None else state.get("num_train_images")
    val = val if val is not None else state.get("num_validation_images")
    data = run.get("data", {})
    if train is None and data.get("train_source") == "phantoms":
        train = data.get("num_train_phantoms")
        if val is None and not data.get("validation_source"):
            val = data.get("num_validation_phantoms")
    if train is None:
        return NOT_RECORDED
    def count(n) -> str:  # a number, or e.g. "streamed"
        return f"{n:,}" if isinstance(n, int) else str(n)

    text = f"{count(train)} training images"
    return text + (f", {count(val)} validation images" if val is not None else "")


def _these_weights(state: dict[str, Any], weights: str | None) -> tuple[float | None, Any]:
    """(validation loss, step) of the weights in the folder: the best ones for ``best``, the
    last validation for ``final``."""
    if weights == "final":
        validations = [h for h in state.get("history", []) if "val/loss" in h]
        if validations and validations[-1].get("step") == state.get("global_step"):
            return validations[-1]["val/loss"], validations[-1]["step"]
        return None, state.get("global_step")
    best = state.get("best_metric") if state.get("metric_for_best_model") == "val/loss" else None
    return best, state.get("best_step")


def _is_hub_id(name: str | None) -> bool:
    """A ``namespace/name`` Hub id, not a local path."""
    return bool(name) and name.count("/") == 1 and not Path(name).exists() and \
        not name.startswith((".", "/", "~"))


def _init_text(init_from: str) -> str:
    """How a card names the starting point: a Hub id as is, a local folder without its path."""
    if init_from in ("random", "imagenet"):
        return {"random": "random initialisation",
                "imagenet": "ImageNet encoder weights (segmentation_models_pytorch)"}[init_from]
    return f"`{init_from}`" if _is_hub_id(init_from) else "a local checkpoint (not on the Hub)"


def _training_rows(run: dict[str, Any] | None, state: dict[str, Any] | None,
                   hardware: str | None, training_time_s: float | None,
                   num_train_images: int | None,
                   num_validation_images: int | None,
                   weights: str | None = None) -> list[tuple[str, str]]:
    run, state = run or {}, state or {}
    data, training = run.get("data", {}), run.get("training", {})

    def get(section: dict[str, Any], key: str) -> str:
        value = section.get(key)
        return NOT_RECORDED if value is None else f"`{value}`"

    best_loss, best_step = _these_weights(state, weights)
    has_best = isinstance(best_loss, int | float) and math.isfinite(best_loss)
    which = "last" if weights == "final" else "best"
    length = NOT_RECORDED
    if training:
        max_steps = training.get("max_steps", -1)
        length = (f"{max_steps} steps" if max_steps and max_steps > 0
                  else f"{training.get('num_train_epochs', NOT_RECORDED)} epochs")
    return [
        ("Training data", get(data, "train_source")),
        ("Validation data", get(data, "validation_source") if data.get("validation_source")
         else (NOT_RECORDED if not data
               else f"{data.get('validation_fraction', NOT_RECORDED)} of the training source"
               if data.get("train_source") != "phantoms" else "held-out phantoms")),
        ("Data size", _data_size(run, state, num_train_images, num_validation_images)),
        ("Schedule", length),
        ("Batch size per device", get(training, "per_device_train_batch_size")),
        ("Gradient accumulation", get(training, "gradient_accumulation_steps")),
        ("Optimizer", "SGD, " + ", ".join(f"{k} `{training[k]}`" for k in
                                          ("learning_rate", "sgd_momentum", "weight_decay")
                                          if k in training) if training else NOT_RECORDED),
        ("Learning-rate schedule", get(training, "lr_scheduler_type")
         + (f", warm-up {training['warmup_steps']} steps" if training.get("warmup_steps") else "")),
        ("Mixed precision", get(training, "mixed_precision")),
        ("Seed", get(training, "seed")),
        ("Initialised from", _init_text(training.get("init_from")) if training.get("init_from")
         else ("random initialisation" if training else NOT_RECORDED)),
        ("Total optimizer steps", str(state["global_step"]) if "global_step" in state
         else NOT_RECORDED),
        (f"Validation loss of these weights ({which})", f"{best_loss:.4f} at step {best_step}"
         if has_best else NOT_RECORDED),
        ("Hardware", hardware or NOT_RECORDED),
        ("Training time", _format_duration(training_time_s) if training_time_s is not None
         else NOT_RECORDED),
    ]


def _usage(model_id: str, has_processor: bool) -> str:
    processor_import = "AutoImageProcessor, " if has_processor else ""
    lines = [
        "import caid_hf  # registers the \"caid\" model type with the Auto classes",
        f"from transformers import (AutoModel, {processor_import}AutoModelForImageClassification,",
        "                          AutoModelForSemanticSegmentation)",
        "",
    ]
    if has_processor:
        lines += [
            f'processor = AutoImageProcessor.from_pretrained("{model_id}")',
            'pixel_values = processor(images, return_tensors="pt").pixel_values',
        ]
    lines += [
        f'backbone = AutoModel.from_pretrained("{model_id}")',
        "features = backbone(pixel_values).pooler_output          # [B, C] embedding",
        "",
        "# classification: encoder + global pool + a new linear head (no decoder loaded)",
        "clf = AutoModelForImageClassification.from_pretrained(",
        f'    "{model_id}", num_labels=14, problem_type="multi_label_classification")',
        "",
        "# segmentation: encoder + decoder from this checkpoint + a new head",
        f'seg = AutoModelForSemanticSegmentation.from_pretrained("{model_id}", num_labels=1)',
        "logits = seg(pixel_values).logits                         # [B, 1, H, W]",
    ]
    return "\n".join(lines)


def _remote_usage(model_id: str, has_processor: bool) -> str:
    lines = ["# pip install torch transformers segmentation-models-pytorch  (pydicom for DICOM)",
             f"from transformers import {'AutoImageProcessor, ' if has_processor else ''}AutoModel",
             ""]
    if has_processor:
        lines.append(f'processor = AutoImageProcessor.from_pretrained("{model_id}", '
                     "trust_remote_code=True)")
    lines.append(f'backbone = AutoModel.from_pretrained("{model_id}", trust_remote_code=True)')
    return "\n".join(lines)


def _raw_usage(model_id: str, encoder: str) -> str:
    """The exact lines that put this repo's safetensors into smp, torchvision and timm."""
    return "\n".join([
        "import segmentation_models_pytorch as smp",
        "from huggingface_hub import hf_hub_download",
        "from safetensors.torch import load_file",
        "",
        f'state = load_file(hf_hub_download("{model_id}", "model.safetensors"))',
        "# segmentation_models_pytorch: the keys are smp.Unet's (1 output channel here)",
        f'unet = smp.Unet("{encoder}", encoder_weights=None, classes=1)',
        "unet.load_state_dict(state)",
    ] + ([] if not encoder.startswith("resnet") else [
        "# torchvision / timm ResNet: the encoder's keys without the \"encoder.\" prefix",
        "encoder = {k.removeprefix(\"encoder.\"): v for k, v in state.items()",
        "           if k.startswith(\"encoder.\")}",
        "import torchvision",
        f"resnet = torchvision.models.{encoder}()",
        "missing, unexpected = resnet.load_state_dict(encoder, strict=False)  # missing: fc.*",
        "import timm",
        f'resnet = timm.create_model("{encoder}", num_classes=0)',
        "timm_missing, _ = resnet.load_state_dict(encoder, strict=False)  # nothing missing",
    ]))


def _model_rows(config: dict[str, Any], encoder: str, method_name: str, context: bool
                ) -> list[tuple[str, str]]:
    """The card's "Model" table."""
    return [
        ("Architecture", f"U-Net (segmentation_models_pytorch) with a `{encoder}` encoder"),
        ("Pre-training", f"CAiD: {method_name} + context prediction" if context
         else f"{method_name} instance discrimination only (baseline)"),
        ("Image size", f"{config.get('image_size', NOT_RECORDED)} px"),
        ("Loss weights", f"instance discrimination {config.get('contrastive_weight')}, "
                         f"reconstruction {config.get('reconstruction_weight')}"
         if context else f"instance discrimination {config.get('contrastive_weight')}"),
        ("MoCo queue / momentum / temperature",
         f"{config.get('queue_size')} / {config.get('momentum')} / "
         f"{config.get('contrastive_temperature')}"),
        ("Outputs", "`pooler_output` [B, C], `last_hidden_state` [B, C, H/32, W/32], "
                    "`reconstruction` [B, 1, H, W]"),
    ]


def _card_data(run: dict[str, Any] | None, encoder: str, datasets, base_model, license: str,
               license_name: str | None, license_link: str | None
               ) -> tuple[ModelCardData, str, bool]:
    """The card's Hub metadata, what the weights were trained on in words (never a
    chest-radiograph claim, or tag, for the embedded phantoms) and whether that was the
    phantoms."""
    source = ((run or {}).get("data") or {}).get("train_source")
    phantoms = str(source).partition(":")[0] == PHANTOMS  # phantoms, phantoms:cxr14 …
    extra = {"license_name": license_name, "license_link": license_link} \
        if license == "other" else {}
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        tags=BASE_TAGS + DATA_TAGS[PHANTOMS if phantoms else None] + [encoder],
        datasets=datasets or None,
        base_model=base_model if _is_hub_id(base_model) else None,
        **extra,
    )
    if phantoms:
        trained_on = ("the synthetic chest phantoms embedded in caid-hf (a demonstration: no "
                      "real radiograph was seen)")
    elif source:
        trained_on = f"`{Path(source).name if not _is_hub_id(source) else source}`"
    else:
        trained_on = "images not recorded in this folder"
    return card_data, trained_on, phantoms


def _limitations(phantoms: bool, image_size: Any) -> list[str]:
    """What a user must know before trusting these weights."""
    items = []
    if phantoms:
        items.append("These weights were trained on synthetic chest phantoms only, for "
                     "demonstration and testing: they have never seen a radiograph and are "
                     "no starting point for a real task.")
    items += [
        "Self-supervised features inherit the training images' population, scanners, "
        "hospitals and acquisition habits (AP/PA, portable films, burnt-in markers); expect "
        "them to transfer less well to other sites and check a fine-tuned model per site "
        "and per patient group (sex, age, device).",
        "Shortcuts in the images (text markers, tubes and lines, collimation) can be learned "
        "as readily as anatomy; a downstream model can rely on them.",
        f"Pre-trained at {image_size} px: findings smaller than a few pixels at that size "
        "are not represented; use larger inputs for small findings.",
        "Downstream figures depend on the labels used to fine-tune: report-mined labels "
        "(ChestX-ray14, CheXpert, MIMIC-CXR) are noisy.",
    ]
    return items


def _evaluation(state: dict[str, Any] | None) -> str:
    """The online probe's last figures of the run (trainer_state.json), or how to evaluate."""
    probes = [r for r in (state or {}).get("history", [])
              if isinstance(r, dict) and "probe/linear_probe_auc" in r]
    how = ("`caid-hf evaluate-features` (frozen k-NN and linear probes) and `caid-hf "
           "evaluate-transfer` (linear probe and fine-tuning at several label fractions "
           "against a random start) measure it on labelled data.")
    if not probes:
        return f"Not evaluated on labelled data during pre-training. {how}"
    last = probes[-1]
    per_label = {k.split("/", 2)[2]: v for k, v in last.items()
                 if k.startswith("probe/linear_probe_auc/")}
    lines = [f"Online probe of the run at step {last.get('step', '?')} (frozen encoder; "
             "logistic regression and k-NN on a small labelled set, ROC-AUC on held-out "
             "images): linear-probe mean AUC "
             f"{last['probe/linear_probe_auc']:.3f}, k-NN mean AUC "
             f"{last.get('probe/knn_auc', float('nan')):.3f}."]
    if per_label:
        lines += ["", "| label | linear-probe AUC |", "|---|---:|"]
        lines += [f"| {name} | {auc:.3f} |" for name, auc in per_label.items()]
    lines += ["", f"This is a check that the features learned, not a benchmark. {how}"]
    return "\n".join(lines)


def build_model_card(
    folder: str | Path,
    run_dir: str | Path | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    hardware: str | None = None,
    training_time_s: float | None = None,
    repo_id: str | None = None,
    num_train_images: int | None = None,
    num_validation_images: int | None = None,
    weights: str | None = None,
    license: str = "apache-2.0",
    license_name: str | None = None,
    license_link: str | None = None,
) -> ModelCard:
    """The model card of the saved backbone in ``folder`` (a ``huggingface_hub.ModelCard``).

    Args:
        folder: a saved CAiD backbone (``config.json`` + ``model.safetensors``).
        run_dir: the pre-training output directory; its ``run_config.yaml`` and
            ``trainer_state.json`` fill the training section (missing → "not recorded").
        base_model: Hub id of the checkpoint this one continued from, if any.
        datasets: Hub dataset ids it was trained on, for the metadata.
        hardware: free text, e.g. ``"4x NVIDIA A100 80GB"``.
        training_time_s: wall-clock training time in seconds.
        repo_id: Hub id used in the usage snippets (default: the placeholder ``org/name``,
            which ``caid-hf push`` replaces with the repo it pushes to).
        num_train_images, num_validation_images: data size, when the run files lack it.
        weights: ``"best"`` or ``"final"``: which of the run's weights the folder holds, so
            the card gives the validation loss of those weights (final ≠ best).
        license: the Hub licence id (weights trained on MIMIC-CXR or CheXpert usually
            cannot be apache-2.0); ``"other"`` needs ``license_name`` and ``license_link``.
    """
    if license == "other" and not (license_name and license_link):
        raise ValueError("license 'other' needs license_name and license_link (the licence's "
                         "short name and a URL of its text)")
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    if config is None:
        raise FileNotFoundError(f"{folder} holds no config.json: save the model there first")
    run_dir = Path(run_dir) if run_dir is not None else None
    run = _read_yaml(run_dir / "run_config.yaml") if run_dir else None
    state = _read_json(run_dir / "trainer_state.json") if run_dir else None
    run = _without_secrets(run) if run else None

    encoder = config.get("encoder_name", "unknown")
    context = config.get("context_prediction", True)
    method = config.get("discrimination_method", "moco_v2")
    method_name = {"moco_v2": "MoCo-v2"}.get(method, method)
    has_processor = (folder / "preprocessor_config.json").is_file()

    card_data, trained_on, phantoms = _card_data(run, encoder, datasets, base_model, license,
                                       license_name, license_link)
    model_id = repo_id or "org/name"
    model_rows = _model_rows(config, encoder, method_name, context)
    method_note = (
        "The encoder learned global features by instance discrimination while the whole "
        "U-Net learned local detail by restoring the original image from a locally distorted "
        "view (cut-out, out-painting, local pixel shuffle)."
        if context else
        "This is the instance-discrimination-only baseline: the decoder was never trained and "
        "carries its random initialisation; the encoder is what this checkpoint offers."
    )
    card = ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        title=f"CAiD {encoder} backbone ({config.get('image_size', '?')} px)",
        summary=(
            f"A `{encoder}` U-Net pre-trained without labels on {trained_on} with "
            f"CAiD (Context-Aware instance Discrimination, Hosseinzadeh Taher et al., MIDL "
            f"2022), packaged with caid-hf for `from_pretrained`. Use it "
            f"as an image feature extractor or to initialise classifiers and segmentation "
            f"U-Nets. These are the {'last' if weights == 'final' else 'best-validation'} "
            f"weights of the run."
        ),
        model_rows=model_rows,
        method_note=method_note,
        training_rows=_training_rows(run, state, hardware, training_time_s,
                                     num_train_images, num_validation_images, weights),
        run_config_yaml=yaml.safe_dump(run, sort_keys=False).strip() if run else "",
        not_recorded=NOT_RECORDED,
        image_size=config.get("image_size", NOT_RECORDED),
        has_processor=has_processor,
        usage=_usage(model_id, has_processor),
        remote_usage=_remote_usage(model_id, has_processor),
        raw_usage=_raw_usage(model_id, encoder),
        resnet=encoder.startswith("resnet"),
        differences=DIFFERENCES,
        citation=CITATION,
        limitations=_limitations(phantoms, config.get("image_size", NOT_RECORDED)),
        evaluation=_evaluation(state),
        intended_use=INTENDED_USE[phantoms],
    )
    return card


def write_model_card(folder: str | Path, run_dir: str | Path | None = None, **card_args) -> Path:
    """Write ``folder/README.md``: the card :func:`build_model_card` makes for the backbone in
    ``folder`` (same keyword arguments: run_dir, base_model, datasets, hardware,
    training_time_s, repo_id, num_train_images, num_validation_images).

    Returns:
        The path of the written ``README.md``. Credentials (fields named like tokens) in the
        run configuration are never copied into the card.
    """
    path = Path(folder) / "README.md"
    build_model_card(folder, run_dir, **card_args).save(path)
    return path
