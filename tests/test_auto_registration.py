"""``import caid_hf`` is cheap and still registers "caid" with every Auto class it names, in
either import order (each case in a fresh interpreter: registrations are per process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_loads_neither_torch_nor_transformers():
    out = run_python("""
        import sys
        import caid_hf
        heavy = sorted(m for m in ("torch", "transformers", "torchvision",
                                   "segmentation_models_pytorch") if m in sys.modules)
        print(heavy, caid_hf.__version__ != "")
    """)
    assert out.split() == ["[]", "True"]


@pytest.mark.parametrize("order", ["caid_hf first", "transformers first"])
def test_auto_classes_build_caid_models_in_either_import_order(order, tmp_path):
    imports = ("import caid_hf\nfrom transformers import AutoConfig, AutoModel"
               if order == "caid_hf first" else
               "from transformers import AutoConfig, AutoModel\nimport caid_hf")
    out = run_python(f"""
        import sys
        {imports.replace(chr(10), chr(10) + '        ')}
        from transformers import (AutoImageProcessor, AutoModelForImageClassification,
                                  AutoModelForPreTraining, AutoModelForSemanticSegmentation)
        # registered, but the model code is not imported until a model is asked for
        print("modeling imported:", "caid_hf.modeling_caid" in sys.modules)
        config = AutoConfig.for_model("caid", encoder_name="resnet18", image_size=64)
        backbone = AutoModel.from_config(config)
        print(type(backbone) is caid_hf.CAiDModel, type(config) is caid_hf.CAiDConfig)
        backbone.save_pretrained({str(tmp_path)!r})
        caid_hf.CAiDImageProcessor(size=64).save_pretrained({str(tmp_path)!r})
        loaded = AutoModel.from_pretrained({str(tmp_path)!r})
        print(type(loaded).__name__, loaded.config.auto_map["AutoModel"])
        for auto in (AutoModelForPreTraining, AutoModelForImageClassification,
                     AutoModelForSemanticSegmentation):
            print(type(auto.from_config(config)).__name__)
        print(type(AutoImageProcessor.from_pretrained({str(tmp_path)!r})).__name__)
    """)
    lines = out.splitlines()
    assert lines[0] == "modeling imported: False"
    assert lines[1:] == ["True True", "CAiDModel modeling_caid.CAiDModel", "CAiDForPreTraining",
                         "CAiDForImageClassification", "CAiDForSemanticSegmentation",
                         "CAiDImageProcessor"]


def test_stand_in_forwards_to_the_real_class_and_keeps_its_names():
    from caid_hf import CAiDConfig, CAiDModel
    from caid_hf._auto import stand_in

    deferred = stand_in("modeling_caid", "CAiDModel", CAiDConfig)
    assert deferred.__name__ == "CAiDModel" and deferred.__module__ == "caid_hf.modeling_caid"
    assert deferred.config_class is CAiDConfig and isinstance(deferred, type)
    assert deferred.from_pretrained.__func__ is CAiDModel.from_pretrained.__func__
    model = deferred(CAiDConfig(encoder_name="resnet18", image_size=64))
    assert type(model) is CAiDModel
    with pytest.raises(AttributeError):
        deferred.no_such_attribute  # noqa: B018 (the read is the test)


def test_importing_a_class_first_still_registers_everything():
    # the class's own imports load transformers' registries while caid_hf is mid-import
    out = run_python("""
        from caid_hf import CAiDImageProcessor
        from caid_hf.modeling_caid import CAiDModel
        from transformers import AutoModel
        from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING
        from caid_hf import CAiDConfig
        print(IMAGE_PROCESSOR_MAPPING[CAiDConfig]["pil"] is CAiDImageProcessor,
              type(AutoModel.from_config(CAiDConfig(encoder_name="resnet18", image_size=64)))
              is CAiDModel)
    """)
    assert out.split() == ["True", "True"]
