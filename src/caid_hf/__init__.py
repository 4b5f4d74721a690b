"""caid-hf: CAiD self-supervised pre-training for medical images, Hugging Face native."""

from ._startup import install_startup_handler

install_startup_handler()  # before the heavy imports below: SIGTERM now exits 75 (see there)

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    AutoModelForSemanticSegmentation,
    AutoVideoProcessor,
)

from ._version import __version__ as __version__
from .configuration_caid import CAiDConfig
from .decoding import register_dicom_with_pil
from .image_processing_caid import CAiDImageProcessor
from .modeling_caid import (
    CAiDForImageClassification,
    CAiDForSemanticSegmentation,
    CAiDModel,
    CAiDModelOutput,
    CAiDPreTrainedModel,
)
from .modeling_caid_pretraining import CAiDForPreTraining, CAiDForPreTrainingOutput

AutoConfig.register("caid", CAiDConfig)
AutoModel.register(CAiDConfig, CAiDModel)
AutoModelForPreTraining.register(CAiDConfig, CAiDForPreTraining)
AutoModelForImageClassification.register(CAiDConfig, CAiDForImageClassification)
AutoModelForSemanticSegmentation.register(CAiDConfig, CAiDForSemanticSegmentation)
# one processor serves both backends transformers knows (it needs neither)
AutoImageProcessor.register(
    CAiDConfig, image_processor_classes={"torchvision": CAiDImageProcessor, "pil": CAiDImageProcessor}
)
# Saved folders also carry the code (configuration_caid.py, modeling_caid.py,
# image_processing_caid.py, decoding.py) and an auto_map, so a Hub repo loads with
# trust_remote_code=True where caid-hf is not installed; with caid-hf installed the
# registrations above win and no remote code runs.
# PIL (and so transformers' pipelines) opens DICOM files the way pre-training decodes them
register_dicom_with_pil()
CAiDConfig.register_for_auto_class()
CAiDModel.register_for_auto_class("AutoModel")
CAiDForImageClassification.register_for_auto_class("AutoModelForImageClassification")
CAiDForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
CAiDImageProcessor.register_for_auto_class("AutoImageProcessor")
# transformers' AutoVideoProcessor (which every pipeline tries) reads the processor's auto_map
# as remote video code and asks to run it; a "caid" entry without classes makes it see local
# code, find none, and give up quietly
try:
    AutoVideoProcessor.register(CAiDConfig,
                                video_processor_classes={"torchvision": None, "pil": None})
except (TypeError, ValueError):  # a transformers that refuses the empty entry: only a prompt lost
    pass

__all__ = [
    "CAiDConfig",
    "CAiDModel",
    "CAiDModelOutput",
    "CAiDForPreTraining",
    "CAiDForPreTrainingOutput",
    "CAiDForImageClassification",
    "CAiDForSemanticSegmentation",
    "CAiDImageProcessor",
    "CAiDPreTrainedModel",
]
