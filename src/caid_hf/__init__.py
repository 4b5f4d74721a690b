"""caid-hf: CAiD self-supervised pre-training for medical images, Hugging Face native.

``import caid_hf`` is cheap: it registers "caid" with transformers' Auto classes
(:mod:`._auto`: the registrations run when transformers' registries are imported, and the
model classes are imported on first use) and lets PIL open DICOM files. The classes below
are imported when first named (``caid_hf.CAiDModel``, ``from caid_hf import CAiDConfig``).
"""

from __future__ import annotations

import importlib

from ._auto import register_when_transformers_is_ready
from ._startup import install_startup_handler
from ._version import __version__ as __version__

install_startup_handler()  # first: a caid-hf command's SIGTERM during start-up exits 75

register_when_transformers_is_ready()

# public name -> module that defines it
_CLASSES = {
    "CAiDConfig": "configuration_caid",
    "CAiDImageProcessor": "image_processing_caid",
    "CAiDModel": "modeling_caid",
    "CAiDModelOutput": "modeling_caid",
    "CAiDPreTrainedModel": "modeling_caid",
    "CAiDForImageClassification": "modeling_caid",
    "CAiDForSemanticSegmentation": "modeling_caid",
    "CAiDForPreTraining": "modeling_caid_pretraining",
    "CAiDForPreTrainingOutput": "modeling_caid_pretraining",
}
__all__ = list(_CLASSES)


def __getattr__(name: str):
    if name not in _CLASSES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_CLASSES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_CLASSES])


def _register_dicom_with_pil() -> None:
    # PIL (and so transformers' pipelines) opens DICOM files the way pre-training decodes them
    from .decoding import register_dicom_with_pil

    register_dicom_with_pil()


_register_dicom_with_pil()
