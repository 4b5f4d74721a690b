"""caid-hf: CAiD self-supervised pre-training for medical images, Hugging Face native."""

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from .configuration_caid import CAiDConfig
from .modeling_caid import (
    CAiDForPreTraining,
    CAiDForPreTrainingOutput,
    CAiDModel,
    CAiDModelOutput,
    CAiDPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register("caid", CAiDConfig)
AutoModel.register(CAiDConfig, CAiDModel)
AutoModelForPreTraining.register(CAiDConfig, CAiDForPreTraining)

__all__ = [
    "CAiDConfig",
    "CAiDModel",
    "CAiDModelOutput",
    "CAiDForPreTraining",
    "CAiDForPreTrainingOutput",
    "CAiDPreTrainedModel",
]
