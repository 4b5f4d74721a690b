"""The command-line and YAML side of every caid-hf command: a YAML file of argument values
plus ``--field value`` overrides, parsed into argument dataclasses (one flag per field,
grouped and helped from the fields' metadata), every value checked for its type and range
before anything is built, and every bad one named with the file or flag it came from. The
standard library and PyYAML only: a mistyped flag is answered before torch is loaded."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path

import yaml

from .console import (
    ArgumentParser,
    ConfigurationError,
    joined_mistakes,
    option_strings,
    unknown_flags_message,
)
from .data.options import read_text_file

__all__ = ["VALUE_RULES", "checked_arguments", "value_mistake", "known_fields", "load_yaml_config",
           "parse_config_args", "range_mistakes"]


def known_fields(classes: tuple[type, ...]) -> list[str]:
    return [f.name for cls in classes for f in dataclasses.fields(cls)]


def _type_name(kind) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        kind, getattr(kind, "__name__", str(kind)))


def _coerce(value, annotation):
    """``value`` (from YAML) as the field type ``annotation``; TypeError when it is not one.

    Numbers written like ``1e-3`` arrive from YAML as strings (YAML 1.1) and become floats;
    ``true``/``false`` strings become bools; integers are accepted for float fields."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option)
            except TypeError as error:
                errors.append(error)
        raise errors[0] if errors else TypeError("null")
    if typing.get_origin(annotation) is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise TypeError(f"expected a list of {len(args)}, got {value!r}")
        return tuple(_coerce(v, kind) for v, kind in zip(value, args))
    if typing.get_origin(annotation) is list:
        values = value if isinstance(value, list) else None
        if values is None:
            raise TypeError(f"expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else str) for v in values]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise TypeError(f"expected {_type_name(annotation)}, got {value!r}")


def _flag_value(text: str, kind: type):
    """A flag's text as ``kind`` (argparse's ``type``): ``true``/``false`` for booleans."""
    if kind is bool:
        if text.lower() in ("true", "yes", "1"):
            return True
        if text.lower() in ("false", "no", "0"):
            return False
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return kind(text)


class _TupleAction(argparse.Action):
    """Stores a fixed number of values as a tuple (argparse makes a list)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, tuple(values))


def _add_field(parser: argparse.ArgumentParser, item: dataclasses.Field, annotation) -> None:
    """``--name`` for one dataclass field: ``X | None`` takes an X; ``list[X]`` one or more;
    ``tuple[X, X]`` exactly two; a boolean alone means true, or takes true/false."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        annotation, args = args[0], list(typing.get_args(args[0]))
    options: dict = {"dest": item.name, "default": field_default(item)}
    origin = typing.get_origin(annotation)
    if origin is list:
        options.update(nargs="+", type=args[0])
    elif origin is tuple:
        options.update(nargs=len(args), type=args[0], action=_TupleAction)
    elif annotation is bool:
        options.update(nargs="?", const=True, metavar="true|false",
                       type=lambda text: _flag_value(text, bool))
    else:
        options["type"] = annotation
    parser.add_argument(f"--{item.name}", **options)


def _field_types(classes: tuple[type, ...]) -> dict[str, object]:
    return {name: hint for cls in classes
            for name, hint in typing.get_type_hints(cls).items()
            if name in {f.name for f in dataclasses.fields(cls)}}


def load_yaml_config(path: str | Path, classes: tuple[type, ...]) -> dict:
    """Read a flat YAML mapping of argument names (fields of ``classes``). Unknown names
    raise with a suggestion, values of the wrong type with the expected one, syntax errors
    with the line; every message names the file. An empty file is refused (it would start
    a run of every default)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(read_text_file(path))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ValueError(f"{path}{where}: invalid YAML: {problem}") from None
    if values is None:
        raise ValueError(f"{path} is empty: write the run's settings as 'name: value' lines "
                         "(configs/demo.yaml is an example)")
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values")
    names = known_fields(classes)
    types_by_name = _field_types(classes)
    checked = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{path}: unknown key {key!r}{hint}")
        try:
            checked[key] = _coerce(value, types_by_name[key])
        except TypeError as error:
            raise ValueError(f"{path}: {key}: {error}") from None
    return checked


def _at_least(low: float, *also: object):
    text = f">= {low:g}" + "".join(f" or {a}" for a in also)
    return (lambda v: v in also or v >= low), text


def _between(low: float, high: float, low_open: bool = False, high_open: bool = False):
    text = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return (lambda v: (low < v if low_open else low <= v) and (v < high if high_open else v <= high),
            text)


# The range of every numeric argument of pre-training and fine-tuning (None always allowed
# where the type allows it), checked by each argument class (:func:`checked_arguments`)
# before any model is built. The model's settings are checked by CAiDConfig itself.
VALUE_RULES = {
    **dict.fromkeys(("num_train_epochs", "per_device_train_batch_size",
                     "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps",
                     "max_consecutive_nonfinite_steps", "dataloader_prefetch_factor",
                     "num_train_phantoms", "num_validation_phantoms", "num_test_phantoms",
                     "max_train_samples", "num_labels", "probe_num_images"), _at_least(1)),
    **dict.fromkeys(("warmup_steps", "save_steps", "save_total_limit", "probe_steps", "seed",
                     "streaming_shuffle_buffer", "streaming_validation_images",
                     "dataloader_num_workers", "eval_steps", "early_stopping_patience",
                     "bootstrap_resamples", "phantom_seed", "weight_decay",
                     "early_stopping_threshold"), _at_least(0)),
    "max_steps": _at_least(1, -1),
    "early_stopping_min_steps": _at_least(0, -1),
    "learning_rate": _between(0, 10, low_open=True),
    "sgd_momentum": _between(0, 1, high_open=True),
    # fine-tuning's copies of two model settings (the model's own are CAiDConfig's checks)
    "segmentation_dice_weight": _at_least(0),
    "classifier_dropout": _between(0, 1, high_open=True),
    "max_bad_fraction": _between(0, 1),
    "validation_fraction": _between(0, 1, high_open=True),
    "label_fraction": _between(0, 1, low_open=True),
    **dict.fromkeys(("crop_scale_min", "crop_scale_max"), _between(0, 1, low_open=True)),
    "confidence_level": _between(0, 1, low_open=True, high_open=True),
    "phantom_size": _at_least(32),
    "bits_stored": _between(1, 32),
    # numbers of the hand-written subcommands only (console.ArgumentParser checks them)
    **dict.fromkeys(("num_phantoms", "k", "batch_size", "num_proc", "chunk_size", "shards"),
                    _at_least(1)),
    "folds": _at_least(2),
}


def value_mistake(name: str, value, flag: str | None = None) -> str | None:
    """The message for ``value`` of the field or flag destination ``name`` out of its range
    (:data:`VALUE_RULES`; an ``image_size`` not a multiple of 32), starting with ``flag``
    (default: the name); None when it is fine or has no rule."""
    if value is None or isinstance(value, (bool, str, list, tuple)):
        return None
    if name == "image_size":
        from .model_settings import check_image_size

        try:
            check_image_size(value, flag or name)
        except ValueError as error:
            return str(error)
        return None
    rule = VALUE_RULES.get(name)
    if rule is None or rule[0](value):
        return None
    return f"{flag or name} must be {rule[1]}, got {value!r}"


def range_mistakes(instance) -> list[str]:
    """A message per field of the dataclass ``instance`` out of its range
    (:data:`VALUE_RULES`), each starting with the field's name."""
    mistakes = []
    for item in dataclasses.fields(instance):
        if item.name in VALUE_RULES:
            mistake = value_mistake(item.name, getattr(instance, item.name))
            if mistake:
                mistakes.append(mistake)
    return mistakes


def _field_of(message: str) -> str:
    match = re.match(r"\w+", message)
    return match[0] if match else ""


def checked_arguments(cls: type) -> type:
    """Class decorator of the argument dataclasses, written below ``@dataclass`` (so the
    generated ``__init__`` calls the ``__post_init__`` it sets, whether or not the class has
    one): ``__post_init__`` checks every field's range (:data:`VALUE_RULES`) and then the
    class's own checks, and raises one ``ValueError`` with every mistake, a line each
    starting with the field's name. The same checks whatever builds the object: YAML,
    flags or Python."""
    own = getattr(cls, "__post_init__", None)  # its own, or a base class's checks

    def __post_init__(self) -> None:
        mistakes = range_mistakes(self)
        if own is not None:
            try:
                own(self)
            except ValueError as error:
                named = {_field_of(m) for m in mistakes}
                mistakes += [m for m in str(error).splitlines() if _field_of(m) not in named]
        if mistakes:
            raise ValueError("\n".join(mistakes))

    __post_init__.__doc__ = own.__doc__ if own is not None else None
    cls.__post_init__ = __post_init__
    return cls


def _where(message: str, given: set[str], yaml_values: dict, config_path: str | None) -> str:
    """``message`` (starting with a field name) prefixed with where the value came from:
    ``--name`` on the command line, or the YAML file."""
    name = _field_of(message)
    if name in given:
        return f"--{message}"
    if config_path and name in yaml_values:
        return f"{config_path}: {message}"
    return message


def _build(kind: type, namespace: argparse.Namespace) -> tuple[object | None, list[str]]:
    """``kind`` from the parsed values, or None and the mistakes its checks found."""
    names = {f.name for f in dataclasses.fields(kind) if f.init}
    try:
        return kind(**{k: v for k, v in vars(namespace).items() if k in names}), []
    except ValueError as error:
        return None, str(error).splitlines()


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    end = re.search(r"\.\s+(?=[A-Z'])", text)  # not at "e.g. 12"
    return text if end is None else text[:end.start() + 1]


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return "(unset)" if value is None else str(value)


def field_default(item: dataclasses.Field):
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return None if item.default is dataclasses.MISSING else item.default


def grouped_help(classes: tuple[type, ...], usage: str, description: str | None,
                 group_of: Callable[[type, str], str] | None = None,
                 group_order: tuple[str, ...] = ()) -> str:
    """``--help``: the options in groups (``group_of(class, field)``, else one group per
    class, titled by its docstring's first line; in ``group_order``, then as met), one line
    each: the flag with its default value, then the first sentence of its help."""
    groups: dict[str, list[str]] = {}
    for kind in classes:
        title = (kind.__doc__ or kind.__name__).strip().split("\n")[0]
        title = re.sub(r"\s*\(see [^)]*\)", "", title).rstrip(".:")
        for item in dataclasses.fields(kind):
            if not item.init:
                continue
            group = group_of(kind, item.name) if group_of else title
            line = (f"  --{item.name} {_shown(field_default(item))}  "
                    f"{_first_sentence(item.metadata.get('help', ''))}")
            groups.setdefault(group, []).append(line)
    lines = [f"usage: {usage}", ""]
    if description:
        lines += [description, ""]
    lines += ["Each option with its default. --config FILE.yaml holds 'name: value' lines; "
              "flags override them.", "Flags are --snake_case (--kebab-case works too); "
              "booleans take true or false.", ""]
    ranked = sorted(groups, key=lambda g: group_order.index(g) if g in group_order else len(group_order))
    for title in ranked:
        lines += [f"{title}:", *groups[title], ""]
    return "\n".join(lines).rstrip() + "\n"


def parse_config_args(classes: tuple[type, ...], argv: list[str] | None = None,
                      prog: str | None = None, description: str | None = None,
                      group_of: Callable[[type, str], str] | None = None,
                      group_order: tuple[str, ...] = ()) -> tuple:
    """Parse ``[--config FILE.yaml] [--field value ...]`` into one instance of each of
    ``classes`` (dataclass defaults < YAML file < command line).

    Flags are accepted as ``--snake_case`` and ``--kebab-case``. A value of the wrong type
    stops at once with argparse's message. Every other mistake is reported together, before
    anything is built, in one message (exit status 2): flags no field takes (with "did you
    mean", as for an unknown YAML key), each argument object's own check (``__post_init__``:
    one per object) and every value out of its range, each named with the file (or flag) it
    came from."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    prog = prog or Path(sys.argv[0]).name
    usage = f"{prog} [--config FILE.yaml] [--field value ...] (--help lists every field)"
    if "-h" in rest or "--help" in rest:
        print(grouped_help(classes, usage, description, group_of, group_order), end="")
        raise SystemExit(0)
    # the generated usage would list every field (60 lines): too long above an error message
    parser = ArgumentParser(prog=prog, description=description, usage=usage)
    types_by_name = _field_types(classes)
    for kind in classes:
        for item in dataclasses.fields(kind):
            if item.init:
                _add_field(parser, item, types_by_name[item.name])
    parser.add_argument("--config", default=None, help="YAML file of argument values.")
    yaml_values = load_yaml_config(known.config, classes) if known.config else {}
    parser.set_defaults(**yaml_values)
    namespace, remaining = parser.parse_known_args(args=rest)
    mistakes = [unknown_flags_message(remaining, option_strings(parser))] if remaining else []
    given = {token[2:].split("=", 1)[0].replace("-", "_") for token in rest
             if token.startswith("--")}
    outputs = []
    for kind in classes:
        output, found = _build(kind, namespace)
        outputs.append(output)
        mistakes += [_where(m, given, yaml_values, known.config) for m in found]
    if remaining and len(mistakes) == 1:
        parser.error(mistakes[0])  # argparse's usage line above the flag and its suggestion
    if mistakes:
        raise ConfigurationError(joined_mistakes(mistakes))
    return tuple(outputs)
