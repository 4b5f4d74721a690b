"""Configuration of CAiD models (backbone, pre-training objective, downstream heads)."""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from .model_settings import CAiDSettings

_SETTINGS = tuple(f.name for f in dataclasses.fields(CAiDSettings))


class CAiDConfig(PretrainedConfig):
    r"""Configuration of a CAiD U-Net and its pre-training objective.

    Its arguments are the fields of :class:`~caid_hf.model_settings.CAiDSettings`, where
    each is defined and documented once with its default, and checked: a ResNet-50 U-Net on
    224 px views, MoCo-v2 with an MLP head, a queue of 65,536 keys of dimension 128,
    momentum 0.999, temperature 0.2, loss ``1 * L_ID + 10 * L_MSE`` on a sigmoid
    reconstruction (the paper's setting). Every other keyword goes to transformers'
    ``PretrainedConfig`` (``id2label``, ``architectures`` ...).

    Raises:
        ValueError: one message naming every invalid setting, a line each.
    """

    model_type = "caid"

    def __init__(self, **kwargs):
        settings = CAiDSettings(**{name: kwargs.pop(name) for name in _SETTINGS if name in kwargs})
        for name in _SETTINGS:
            setattr(self, name, getattr(settings, name))
        super().__init__(**kwargs)


# save_pretrained writes this file beside the weights and names it in config.json's auto_map
CAiDConfig.register_for_auto_class()
