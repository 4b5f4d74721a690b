"""caid_hf.config_parsing on small dataclasses of its own: YAML values coerced to the fields'
types, unknown keys and flags with suggestions, ranges, and every mistake in one message."""

from __future__ import annotations

import dataclasses

import pytest

from caid_hf.config_parsing import (
    VALUE_RULES,
    _coerce,
    checked_arguments,
    load_yaml_config,
    parse_config_args,
    range_mistakes,
)
from caid_hf.console import ConfigurationError


@dataclasses.dataclass
@checked_arguments
class Model:
    num_labels: int = 64
    label_fraction: float = 0.5
    encoder_name: str = "resnet18"

    def __post_init__(self):
        if self.encoder_name.startswith("vit"):
            raise ValueError(f"encoder_name {self.encoder_name!r} is not a CNN")


@dataclasses.dataclass
@checked_arguments
class Training:
    learning_rate: float = 0.03
    max_steps: int = -1
    use_cpu: bool = False
    label_names: list[str] | None = None


CLASSES = (Model, Training)


@pytest.mark.parametrize("value, annotation, expected", [
    ("1e-3", float, 0.001),          # YAML 1.1 reads 1e-3 as a string
    (3, float, 3.0),
    ("true", bool, True), ("no", bool, False),
    (None, int | None, None), (5, int | None, 5),
    (["a", "b"], list[str], ["a", "b"]),
])
def test_coerce_accepts_what_yaml_writes(value, annotation, expected):
    result = _coerce(value, annotation)
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize("value, annotation, message", [
    (True, int, "expected an integer, got True"), ("x", float, "expected a number, got 'x'"),
    ("maybe", bool, "expected true or false"), ("a", list[str], "expected a list"),
    (1.5, int, "expected an integer, got 1.5"),
])
def test_coerce_refuses_other_types(value, annotation, message):
    with pytest.raises(TypeError, match=message):
        _coerce(value, annotation)


def test_yaml_keys_and_types_are_checked_with_the_file_named(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("num_labels: 128\nlearning_rate: 1e-2\nuse_cpu: yes\n")
    assert load_yaml_config(good, CLASSES) == {"num_labels": 128, "learning_rate": 0.01,
                                               "use_cpu": True}
    typo = tmp_path / "typo.yaml"
    typo.write_text("learnig_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"typo.yaml: unknown key 'learnig_rate'; "
                                         r"did you mean 'learning_rate'\?"):
        load_yaml_config(typo, CLASSES)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("num_labels: many\n")
    with pytest.raises(ValueError, match="wrong.yaml: num_labels: expected an integer"):
        load_yaml_config(wrong, CLASSES)
    broken = tmp_path / "broken.yaml"
    broken.write_text("num_labels: [1,\n")
    with pytest.raises(ValueError, match=r"broken.yaml:\d+:\d+: invalid YAML"):
        load_yaml_config(broken, CLASSES)
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ValueError, match="empty.yaml is empty"):
        load_yaml_config(tmp_path / "empty.yaml", CLASSES)


def test_precedence_defaults_then_yaml_then_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("num_labels: 128\nlearning_rate: 0.1\n")
    model, training = parse_config_args(CLASSES, ["--config", str(config),
                                                  "--learning-rate", "0.2"])
    assert (model.num_labels, model.label_fraction) == (128, 0.5)  # YAML, default
    assert training.learning_rate == 0.2  # the flag (kebab-case too) wins over the YAML


def test_ranges_are_checked_by_the_class_whatever_builds_it():
    good = Model()
    good.num_labels, good.label_fraction = 0, 1.5
    assert range_mistakes(good) == ["num_labels must be >= 1, got 0",
                                    "label_fraction must be in (0, 1], got 1.5"]
    with pytest.raises(ValueError) as error:  # the Python API: every mistake, a line each
        Model(num_labels=0, label_fraction=1.5, encoder_name="vit_b")
    assert str(error.value).splitlines() == ["num_labels must be >= 1, got 0",
                                             "label_fraction must be in (0, 1], got 1.5",
                                             "encoder_name 'vit_b' is not a CNN"]
    with pytest.raises(ValueError, match=r"^learning_rate must be in \(0, 10\], got 20$"):
        Training(learning_rate=20)  # a class without checks of its own still checks ranges
    accept, text = VALUE_RULES["max_steps"]
    assert (accept(-1), accept(0), accept(5), text) == (True, False, True, ">= 1 or -1")


def test_every_mistake_of_one_command_is_reported_together(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("label_fraction: 2\nnum_labels: 128\n")
    with pytest.raises(ConfigurationError) as error:
        parse_config_args(CLASSES, ["--config", str(config), "--num_labels", "0",
                                    "--encoder_name", "vit_b", "--learnig_rate", "1"])
    assert str(error.value).splitlines() == [
        "4 mistakes:",
        "  1. unknown flag '--learnig_rate'; did you mean '--learning_rate'?",
        "  2. --num_labels must be >= 1, got 0",  # the flag overrides the file's 128
        f"  3. {config}: label_fraction must be in (0, 1], got 2.0",
        "  4. --encoder_name 'vit_b' is not a CNN"]


def test_help_lists_every_field_once_in_groups_with_its_default(capsys):
    from caid_hf.training.arguments import ARGUMENT_CLASSES, parse_pretraining_args

    with pytest.raises(SystemExit) as done:
        parse_pretraining_args(["--help"], prog="caid-hf pretrain")
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) <= 150
    options = [line.strip().split("  ", 1) for line in lines if line.startswith("  --")]
    names = [flag.split()[0][2:] for flag, _ in options]
    fields = [f.name for kind in ARGUMENT_CLASSES for f in dataclasses.fields(kind)]
    assert sorted(names) == sorted(fields)  # each once, in one spelling
    assert all(len(flag.split()) >= 2 and text for flag, text in options)  # default and help
    assert dict(options)["--queue_size 65536"].startswith("MoCo queue length K")
    assert dict(options)["--distort_key_view true"].startswith("Distort the second (key) view")
    titles = [line[:-1] for line in lines if line.endswith(":") and not line.startswith(" ")]
    assert titles == ["model (CAiDConfig)", "data", "augmentation", "optimisation",
                      "speed and devices", "output and checkpoints", "online probe",
                      "publishing to the Hub"]


def _out_of_range(kind: type, name: str):
    """A value of field ``name``'s type that its VALUE_RULES range refuses."""
    accept, _ = VALUE_RULES[name]
    is_int = any(f.name == name and "int" in str(f.type) for f in dataclasses.fields(kind))
    candidates = [-2, -1, 0, 16, 40] if is_int else [-0.5, 0.0, 1.0, 1.5, 11.0]
    return next(v for v in candidates if not accept(v))


MODEL_MISTAKES = {  # CAiDConfig's own checks: field → a value it refuses
    "queue_size": 0, "momentum": 1.0, "contrastive_temperature": 0.0, "projection_dim": 0,
    "shuffle_bn_splits": 0, "encoder_depth": 4, "in_channels": 0, "image_size": 100,
    "barlow_off_diagonal_weight": -1.0, "simsiam_predictor_hidden_dim": 0,
    "contrastive_weight": -1.0, "reconstruction_weight": -1.0, "classifier_dropout": 1.0,
    "segmentation_dice_weight": -1.0, "projection_head": "deep", "reconstruct_views": "all",
    "discrimination_method": "byol", "reconstruction_activation": "tanh",
}


AUGMENTATION_MISTAKES = {  # AugmentationConfig's own checks (DataArguments inherits them)
    "hue": 0.7, "brightness": -1.0, "color_jitter_p": 1.5, "blur_p": -0.5, "flip_p": 2.0,
    "max_boxes": 0, "margin": -1, "reference_size": 0,
}


def _walk(classes, parse, tmp_path):
    """(field, its Python-API message, the flag's message, the YAML file's message)."""
    from caid_hf import CAiDConfig
    from caid_hf.data.augmentation_config import AugmentationConfig

    cases = []
    for kind in classes:
        for item in dataclasses.fields(kind):
            name = item.name
            if name in VALUE_RULES and not (kind.__name__ == "ModelArguments"):
                bad, build = _out_of_range(kind, name), kind
            elif kind.__name__ == "ModelArguments" and name in MODEL_MISTAKES:
                bad, build = MODEL_MISTAKES[name], CAiDConfig
            elif kind.__name__ == "DataArguments" and name in AUGMENTATION_MISTAKES:
                bad, build = AUGMENTATION_MISTAKES[name], AugmentationConfig
            else:
                continue
            with pytest.raises(ValueError) as python:
                build(**{name: bad})
            line = next(m for m in str(python.value).splitlines() if m.startswith(name))
            config = tmp_path / f"{name}.yaml"
            config.write_text(f"{name}: {bad}\n")
            messages = []
            for argv in ([f"--{name}", str(bad)], ["--config", str(config)]):
                with pytest.raises(ConfigurationError) as error:
                    parse(argv)
                messages.append(str(error.value))
            cases.append((name, line, *messages))
    return cases


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_every_checked_field_is_refused_alike_by_python_flags_and_yaml(command, tmp_path):
    if command == "pretrain":
        from caid_hf.training.arguments import ARGUMENT_CLASSES
        from caid_hf.training.arguments import parse_pretraining_args as parse
    else:
        from caid_hf.finetuning.arguments import ARGUMENT_CLASSES
        from caid_hf.finetuning.arguments import parse_finetuning_args as parse
    cases = _walk(ARGUMENT_CLASSES, parse, tmp_path)
    assert len(cases) >= (43 if command == "pretrain" else 25)
    for name, line, flag_message, yaml_message in cases:
        assert f"--{line}" in flag_message, name
        assert f"{tmp_path / name}.yaml: {line}" in yaml_message, name


def test_the_papers_defaults_are_written_once_in_src():
    """224 px, a queue of 65,536 and momentum 0.999 appear as numbers only where
    model_settings.py defines them; everything else refers to those names."""
    import ast
    from pathlib import Path

    import caid_hf
    from caid_hf import CAiDConfig
    from caid_hf.model_settings import DEFAULT_IMAGE_SIZE, DEFAULT_MOMENTUM, DEFAULT_QUEUE_SIZE

    defaults = {224, 65536, 0.999}
    found = []
    for path in Path(caid_hf.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Constant) and type(node.value) in (int, float)
                    and node.value in defaults):
                found.append((path.name, node.lineno, node.value))
    assert sorted(v for name, _, v in found if name == "model_settings.py") == [0.999, 224, 65536]
    assert [f for f in found if f[0] != "model_settings.py"] == []
    config = CAiDConfig()
    assert (config.image_size, config.queue_size, config.momentum) == (
        DEFAULT_IMAGE_SIZE, DEFAULT_QUEUE_SIZE, DEFAULT_MOMENTUM)


@dataclasses.dataclass
class Shapes:
    sigma: tuple[float, float] = (0.1, 2.0)
    flip: bool = True
    channels_last: bool | None = None
    dims: list[int] = dataclasses.field(default_factory=lambda: [8, 8])


def test_flags_follow_the_field_types():
    parsed, = parse_config_args((Shapes,), ["--sigma", "0.5", "1.5", "--flip", "false",
                                            "--channels-last", "--dims", "4", "2", "1"])
    assert parsed == Shapes(sigma=(0.5, 1.5), flip=False, channels_last=True, dims=[4, 2, 1])
    assert parse_config_args((Shapes,), [])[0] == Shapes()
    for wrong in (["--sigma", "0.5"], ["--flip", "maybe"], ["--dims", "a"]):
        with pytest.raises(SystemExit):  # argparse's message and usage, status 2
            parse_config_args((Shapes,), wrong)


def test_yaml_pairs_become_tuples(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("sigma: [0.2, 3]\n")
    assert load_yaml_config(config, (Shapes,)) == {"sigma": (0.2, 3.0)}
    config.write_text("sigma: [0.2, 3, 4]\n")
    with pytest.raises(ValueError, match=r"run.yaml: sigma: expected a list of 2"):
        load_yaml_config(config, (Shapes,))


def test_command_arguments_are_parsed_and_refused_without_torch(tmp_path):
    """Both commands' settings (model, augmentation, data, training) are read and checked
    with the standard library and PyYAML only, so a mistake is answered before torch (or
    transformers, which loads it) is imported."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from caid_hf.cli import main\n"
        "from caid_hf.training.arguments import parse_pretraining_args\n"
        "from caid_hf.finetuning.arguments import parse_finetuning_args\n"
        "model, data, _ = parse_pretraining_args(['--config', 'configs/demo.yaml'])\n"
        "assert (model.image_size, data.color_jitter_p) == (64, 0.8), (model, data)\n"
        "parse_finetuning_args(['--config', 'configs/finetune_phantoms_classification.yaml'])\n"
        "for command in ('pretrain', 'finetune'):\n"
        "    try:\n"
        "        main([command, '--learnig_rate', '1'])\n"
        "    except SystemExit as stop:\n"
        "        assert stop.code == 2, stop.code\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert done.stderr.count("did you mean '--learning_rate'?") == 2


@pytest.mark.parametrize("argv, mistakes", [
    (["evaluate-features", "random", "--out", "x", "--max-bad-fraction", "2",
      "--bits-stored", "40", "--folds", "1", "--image-size", "100", "--k", "0"],
     ["--image-size must be a positive multiple of 32 (the U-Net halves it 5 times), got 100; "
      "use 96 or 128", "--k must be >= 1, got 0", "--folds must be >= 2, got 1",
      "--max-bad-fraction must be in [0, 1], got 2.0", "--bits-stored must be in [1, 32], got 40"]),
    (["prepare-data", "phantoms", "--out", "x", "--num-proc", "0", "--shards", "0"],
     ["--num-proc must be >= 1, got 0", "--shards must be >= 1, got 0"]),
])
def test_subcommand_options_are_checked_by_the_argument_classes_rules(argv, mistakes, capsys):
    """The hand-written subcommands refuse an out-of-range option with the words the argument
    dataclasses use for the field of the same name, every mistake at once, before any work."""
    from caid_hf.cli import main
    from caid_hf.finetuning.arguments import FinetuneDataArguments

    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"{len(mistakes)} mistakes:" in error
    assert [line.split(". ", 1)[1] for line in error.splitlines() if line[:5].strip()[:1].isdigit()
            ] == mistakes
    with pytest.raises(ValueError) as dataclass_error:  # the same field's own check
        FinetuneDataArguments(max_bad_fraction=2.0)
    assert str(dataclass_error.value) == "max_bad_fraction must be in [0, 1], got 2.0"
