"""``import caid_hf`` registers "caid" with transformers' Auto classes without importing them.

The model and processor modules cost seconds to import: torch, segmentation_models_pytorch
and timm, transformers' modelling code, and transformers' image utilities (which import
torchvision and with it torch's compiler). transformers keeps its own import cheap by
naming its models and importing each on first use; caid-hf does the same in two steps:

1. Each registration waits for the transformers module that holds the registry it writes
   to. ``AutoConfig``'s registry lives in ``transformers.models.auto.configuration_auto``,
   the models' in ``modeling_auto``, the image processor's in ``image_processing_auto``:
   when that module has been imported (already, or later by ``from transformers import
   AutoModel``), the registration runs. Until then nothing of transformers or torch is
   imported.
2. The model registries receive a stand-in per model class: a class with the model's name,
   module and ``config_class`` that imports the real class the first time it is asked for
   anything else (``from_pretrained``, ``from_config``, a call). So ``from transformers
   import AutoModel`` stays as cheap after ``import caid_hf`` as before it, and the model
   code is imported by the first ``AutoModel.from_pretrained`` of a "caid" folder.

The image processor is registered as itself: its registry checks that it subclasses
transformers' ``BaseImageProcessor``, and once ``image_processing_auto`` is imported the
processor's own imports are already loaded.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import threading
from collections.abc import Callable

_PACKAGE = __name__.rpartition(".")[0]
_AUTO = "transformers.models.auto."
# Auto class name -> (module of caid-hf, class name)
MODELS = {
    "AutoModel": ("modeling_caid", "CAiDModel"),
    "AutoModelForPreTraining": ("modeling_caid_pretraining", "CAiDForPreTraining"),
    "AutoModelForImageClassification": ("modeling_caid", "CAiDForImageClassification"),
    "AutoModelForSemanticSegmentation": ("modeling_caid", "CAiDForSemanticSegmentation"),
}


class _Deferred(type):
    """The type of a stand-in: attribute reads it cannot answer, and calls, go to the real
    class, imported on first need."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(cls._load(), name)

    def __call__(cls, *args, **kwargs):
        return cls._load()(*args, **kwargs)


def stand_in(module: str, name: str, config_class: type) -> type:
    """A class named like ``module.name`` that loads it on first use."""

    def load() -> type:
        return getattr(importlib.import_module(f"{_PACKAGE}.{module}"), name)

    return _Deferred(name, (), {"__module__": f"{_PACKAGE}.{module}", "__qualname__": name,
                                "__doc__": f"Imports {_PACKAGE}.{module}.{name} on first use.",
                                "config_class": config_class, "_load": staticmethod(load)})


def _register_config() -> None:
    from transformers import AutoConfig

    from .configuration_caid import CAiDConfig

    AutoConfig.register("caid", CAiDConfig, exist_ok=True)


def _register_models() -> None:
    from transformers.models.auto import modeling_auto

    from .configuration_caid import CAiDConfig

    for auto_name, (module, name) in MODELS.items():
        getattr(modeling_auto, auto_name).register(CAiDConfig, stand_in(module, name, CAiDConfig),
                                                   exist_ok=True)


def _register_image_processor() -> None:
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    from .configuration_caid import CAiDConfig
    from .image_processing_caid import CAiDImageProcessor

    # one processor serves both backends transformers knows (it needs neither)
    AutoImageProcessor.register(CAiDConfig, image_processor_classes={
        "torchvision": CAiDImageProcessor, "pil": CAiDImageProcessor}, exist_ok=True)


def _register_video_processor() -> None:
    # transformers' AutoVideoProcessor (which every pipeline tries) reads the processor's
    # auto_map as remote video code and asks to run it; a "caid" entry without classes makes
    # it see local code, find none, and give up quietly
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor

    from .configuration_caid import CAiDConfig

    try:
        AutoVideoProcessor.register(CAiDConfig, exist_ok=True,
                                    video_processor_classes={"torchvision": None, "pil": None})
    except (TypeError, ValueError):  # a transformers that refuses the empty entry: a prompt lost
        pass


REGISTRATIONS: dict[str, Callable[[], None]] = {
    _AUTO + "configuration_auto": _register_config,
    _AUTO + "modeling_auto": _register_models,
    _AUTO + "image_processing_auto": _register_image_processor,
    _AUTO + "video_processing_auto": _register_video_processor,
}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a registration right after transformers has executed the module holding its
    registry. Finds nothing itself: it wraps the spec the other finders return."""

    def __init__(self) -> None:
        self._finding = threading.local()

    def find_spec(self, fullname, path, target=None):
        if fullname not in REGISTRATIONS or getattr(self._finding, "name", None) == fullname:
            return None
        self._finding.name = fullname  # the lookup below must not come back here
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding.name = None
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module) -> None:
            exec_module(module)
            REGISTRATIONS[fullname]()

        spec.loader.exec_module = exec_then_register
        return spec


_FINDER = _AfterImport()


def register_when_transformers_is_ready() -> None:
    """Register now where transformers' registry module is already imported, later (on its
    import) where not. Safe to call more than once."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    for name, register in REGISTRATIONS.items():
        if name in sys.modules:
            register()
