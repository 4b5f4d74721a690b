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
)

from ._version import __version__ as __version__
from .configuration_caid import CAiDConfig
from .image_processing_caid import CAiDImageProcessor
from .modeling_caid import (
    CAiDForImageClassification,
    CAiDForPreTraining,
    CAiDForPreTrainingOutput,
    CAiDForSemanticSegmentation,
    CAiDModel,
    CAiDModelOutput,
    CAiDPreTrainedModel,
)

AutoConfig.register("caid", CAiDConfig)
AutoModel.register(CAiDConfig, CAiDModel)
AutoModelForPreTraining.register(CAiDConfig, CAiDForPreTraining)
AutoModelForImageClassification.register(CAiDConfig, CAiDForImageClassification)
AutoModelForSemanticSegmentation.register(CAiDConfig, CAiDForSemanticSegmentation)
# one processor serves both backends transformers knows (it needs neither)
AutoImageProcessor.register(
    CAiDConfig, image_processor_classes={"torchvision": CAiDImageProcessor, "pil": CAiDImageProcessor}
)

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
