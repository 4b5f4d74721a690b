"""Model cards of fine-tuned CAiD models, with their test metrics and confidence intervals.

Rendered like the backbone cards (:mod:`caid_hf.model_card`): huggingface_hub's
:class:`~huggingface_hub.ModelCard` from a Jinja template and
:class:`~huggingface_hub.ModelCardData`, so the Hub parses the YAML header.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from ..model_card import (
    BASE_TAGS,
    CARD_HEAD,
    CARD_TAIL,
    CITATION,
    NOT_RECORDED,
    TRAINING_SECTION,
    _format_duration,
    _init_text,
    _is_hub_id,
    _without_secrets,
)

TEMPLATE = CARD_HEAD + """\
## Results

{{ results_intro }}

| metric | value | {{ ci_header }} |
|---|---:|---:|
{% for name, value, interval in result_rows %}| {{ name }} | {{ value }} | {{ interval }} |
{% endfor %}
""" + TRAINING_SECTION + """\

## How to use

Inputs are `[B, 3, H, W]` float tensors in **[0, 1]** (grey radiographs replicated to 3
channels), **no mean/std normalisation**, {{ image_size }} × {{ image_size }} px; the saved
`AutoImageProcessor` makes them from PIL images, arrays or DICOM files.

```python
{{ usage }}
```

""" + CARD_TAIL


def _number(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _hub_id(init_from: str) -> str | None:
    """``init_from`` when it reads as a Hub id (``org/name``) and is no local path."""
    return init_from if _is_hub_id(init_from) else None


def build_finetuned_card(folder: str | Path, run: dict[str, Any], report: dict[str, Any],
                         state: dict[str, Any], repo_id: str | None = None) -> ModelCard:
    """The card of a fine-tuned model saved in ``folder``.

    Args:
        folder: the saved model (``config.json``).
        run: the run configuration ``{"model": {...}, "data": {...}, "training": {...}}``.
        report: :func:`~caid_hf.finetuning.metrics.classification_report` /
            ``segmentation_report`` output plus ``"split"`` (``test`` or ``validation``)
            and ``"source"``.
        state: facts of the run: ``best_metric``, ``best_step``, ``metric_for_best_model``,
            ``global_step``, ``stopped_early``, ``num_train_images``,
            ``num_validation_images``, ``hardware``, ``training_time_s``.
        repo_id: Hub id for the usage snippet (default ``org/name``).
    """
    import json

    config = json.loads((Path(folder) / "config.json").read_text())
    model, data, training = run["model"], run["data"], run["training"]
    task = model["task"]
    segmentation = task == "segmentation"
    encoder = config.get("encoder_name", "?")
    labels = [config["id2label"][k] for k in sorted(config.get("id2label", {}), key=int)]
    init = model["init_from"]
    init_text = _init_text(init)
    card_data = ModelCardData(
        license="apache-2.0", library_name="transformers",
        pipeline_tag="image-segmentation" if segmentation else "image-classification",
        tags=[t for t in BASE_TAGS if t != "image-feature-extraction"] + [encoder, "fine-tuned"],
        base_model=_hub_id(init),
    )
    metrics, intervals = report["metrics"], report.get("confidence_intervals", {})
    level = report.get("confidence_level", 0.95)
    result_rows = [(name, _number(value),
                    "[{} – {}]".format(*map(_number, intervals[name])) if name in intervals else "—")
                   for name, value in metrics.items()]
    what = ("pooled over all pixels of the set (Dice = 2·TP / (2·TP + FP + FN), IoU = "
            "TP / (TP + FP + FN)); the means are over the foreground classes"
            if segmentation else "ROC-AUC per label (scikit-learn) and their mean over the "
                                 "labels where it is defined")
    results_intro = (
        f"Measured once, with the model of the best validation "
        f"`{state.get('metric_for_best_model')}`, on the **{report.get('split', 'test')}** set "
        f"(`{report.get('source')}`, {report.get('num_samples')} images): {what}. Intervals: "
        f"{round(level * 100)} % percentile bootstrap over images "
        f"({report.get('bootstrap_resamples')} resamples).")
    head = ("U-Net (encoder + decoder) with a new 3×3 head" if segmentation
            else "encoder → global average pool → linear head")
    model_rows = [
        ("Task", "semantic segmentation" if segmentation
         else model.get("problem_type", "").replace("_", " ")),
        ("Architecture", f"`{encoder}` {head}"),
        ("Labels", ", ".join(f"`{name}`" for name in labels) or "—"),
        ("Initialised from", init_text),
        ("Image size", f"{config.get('image_size')} px"),
    ]
    training_rows = _training_rows(data, training, state)
    usage = _usage(repo_id or "org/name", segmentation, model.get("problem_type"))
    return ModelCard.from_template(
        card_data, template_str=TEMPLATE,
        title=f"CAiD {encoder} fine-tuned for {'segmentation' if segmentation else 'classification'}",
        summary=(f"A `{encoder}` model fine-tuned with caid-hf from {init_text} on "
                 f"`{data.get('train_source')}`. CAiD: Context-Aware instance Discrimination "
                 "(Hosseinzadeh Taher et al., MIDL 2022)."),
        model_rows=model_rows, results_intro=results_intro,
        ci_header=f"{round(level * 100)} % CI", result_rows=result_rows,
        training_rows=training_rows,
        run_config_yaml=yaml.safe_dump(_without_secrets(run), sort_keys=False).strip()
        if run else "", not_recorded=NOT_RECORDED,
        image_size=config.get("image_size"), usage=usage, citation=CITATION,
    )


def _training_rows(data: dict, training: dict, state: dict) -> list[tuple[str, str]]:
    """The card's "Training" table: data, optimisation, model selection, hardware, time."""
    best = state.get("best_metric")
    training_rows = [
        ("Training data", f"`{data.get('train_source')}`, {state.get('num_train_images')} images"
         + (f" ({data['label_fraction']:.0%} of the labels)" if data.get("label_fraction", 1) < 1
            else "")),
        ("Validation data", (f"`{data['validation_source']}`" if data.get("validation_source")
                             else "held-out phantoms" if data.get("train_source") == "phantoms"
                             else f"{data.get('validation_fraction')} of the training source, "
                                  "held out") + f", {state.get('num_validation_images')} images"),
        ("Optimizer", f"{training.get('optimizer')}, learning rate "
                      f"`{training.get('learning_rate')}`, weight decay "
                      f"`{training.get('weight_decay')}`, {training.get('lr_scheduler_type')} "
                      f"schedule"),
        ("Batch size per device", f"`{training.get('per_device_train_batch_size')}`"),
        ("Steps", f"{state.get('global_step')}"
         + (" (stopped early)" if state.get("stopped_early") else "")),
        ("Model selection", f"best validation `{state.get('metric_for_best_model')}` = "
                            f"{_number(best)} at step {state.get('best_step')}"),
        ("Seed", f"`{training.get('seed')}`"),
        ("Hardware", state.get("hardware", "not recorded")),
        ("Training time", _format_duration(state["training_time_s"])
         if state.get("training_time_s") is not None else "not recorded"),
    ]
    return training_rows


def _usage(name: str, segmentation: bool, problem_type: str | None) -> str:
    """The card's usage snippet for repo ``name``."""
    auto = "AutoModelForSemanticSegmentation" if segmentation else "AutoModelForImageClassification"
    output = ("logits = model(pixel_values).logits   # [B, num_labels, H, W]" if segmentation
              else "probabilities = model(pixel_values).logits.sigmoid()   # [B, num_labels]"
              if problem_type == "multi_label_classification"
              else "probabilities = model(pixel_values).logits.softmax(-1)   # [B, num_labels]")
    return "\n".join([
        "import caid_hf  # registers the \"caid\" model type with the Auto classes",
        f"from transformers import AutoImageProcessor, {auto}",
        "",
        f'processor = AutoImageProcessor.from_pretrained("{name}")',
        f'model = {auto}.from_pretrained("{name}").eval()',
        'pixel_values = processor(images, return_tensors="pt").pixel_values',
        output,
    ])


def write_finetuned_card(folder: str | Path, run: dict[str, Any], report: dict[str, Any],
                         state: dict[str, Any], repo_id: str | None = None) -> Path:
    """Write ``folder/README.md`` (see :func:`build_finetuned_card`); returns its path."""
    path = Path(folder) / "README.md"
    build_finetuned_card(folder, run, report, state, repo_id).save(path)
    return path
