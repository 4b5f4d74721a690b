"""caid_hf.config_parsing on small dataclasses of its own: YAML values coerced to the fields'
types, unknown keys and flags with suggestions, ranges, and every mistake in one message."""

from __future__ import annotations

import dataclasses

import pytest

from caid_hf.config_parsing import (
    VALUE_RULES,
    _coerce,
    load_yaml_config,
    parse_config_args,
    value_mistakes,
)
from caid_hf.console import ConfigurationError


@dataclasses.dataclass
class Model:
    queue_size: int = 64
    momentum: float = 0.99
    encoder_name: str = "resnet18"

    def __post_init__(self):
        if self.encoder_name.startswith("vit"):
            raise ValueError(f"encoder_name {self.encoder_name!r} is not a CNN")


@dataclasses.dataclass
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
    good.write_text("queue_size: 128\nlearning_rate: 1e-2\nuse_cpu: yes\n")
    assert load_yaml_config(good, CLASSES) == {"queue_size": 128, "learning_rate": 0.01,
                                               "use_cpu": True}
    typo = tmp_path / "typo.yaml"
    typo.write_text("learnig_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"typo.yaml: unknown key 'learnig_rate'; "
                                         r"did you mean 'learning_rate'\?"):
        load_yaml_config(typo, CLASSES)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("queue_size: many\n")
    with pytest.raises(ValueError, match="wrong.yaml: queue_size: expected an integer"):
        load_yaml_config(wrong, CLASSES)
    broken = tmp_path / "broken.yaml"
    broken.write_text("queue_size: [1,\n")
    with pytest.raises(ValueError, match=r"broken.yaml:\d+:\d+: invalid YAML"):
        load_yaml_config(broken, CLASSES)
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ValueError, match="empty.yaml is empty"):
        load_yaml_config(tmp_path / "empty.yaml", CLASSES)


def test_precedence_defaults_then_yaml_then_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("queue_size: 128\nlearning_rate: 0.1\n")
    model, training = parse_config_args(CLASSES, ["--config", str(config),
                                                  "--learning-rate", "0.2"])
    assert (model.queue_size, model.momentum) == (128, 0.99)  # YAML, default
    assert training.learning_rate == 0.2  # the flag (kebab-case too) wins over the YAML


def test_value_rules_name_where_the_value_was_set():
    mistakes = value_mistakes({"queue_size": 0, "momentum": 1.5, "learning_rate": 0.1},
                              {"momentum": 1.5}, "run.yaml")
    assert mistakes == {"queue_size": "--queue_size must be >= 1, got 0",
                        "momentum": "run.yaml: momentum must be in [0, 1], got 1.5"}
    accept, text = VALUE_RULES["max_steps"]
    assert (accept(-1), accept(0), accept(5), text) == (True, False, True, ">= 1 or -1")


def test_every_mistake_of_one_command_is_reported_together(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("momentum: 2\n")
    with pytest.raises(ConfigurationError) as error:
        parse_config_args(CLASSES, ["--config", str(config), "--queue_size", "0",
                                    "--encoder_name", "vit_b", "--learnig_rate", "1"])
    message = str(error.value)
    assert message.startswith("4 mistakes:\n")
    for part in ("1. unknown flag '--learnig_rate'", "--learning_rate",
                 "encoder_name 'vit_b' is not a CNN", "--queue_size must be >= 1, got 0",
                 "run.yaml: momentum must be in [0, 1], got 2"):
        assert part in message, (part, message)


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
