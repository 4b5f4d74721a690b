"""The parts of the data settings that are checked before torch is loaded: how a Hugging
Face dataset is read, the patient-id rule (:mod:`caid_hf.data.patients` says what each rule
does), and reading a user's text file (split list, CSV, YAML). Standard library only."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

PATIENT_RULES = "'auto', 'none', 'filename_prefix', 'column:NAME' or 'regex:PATTERN'"


@dataclass
class HFOptions:
    """How to read a Hugging Face dataset source."""

    split: str = "train"
    config_name: str | None = None
    image_column: str | None = None
    id_column: str | None = None
    patient_id_from: str = "auto"  # see caid_hf.data.patients

    @property
    def patient_column(self) -> str | None:
        """The column of patient ids ``patient_id_from`` names, if it names one."""
        kind, _, value = self.patient_id_from.partition(":")
        return value if kind == "column" else None


def check_patient_rule(rule: str) -> str:
    """``rule`` if it is a valid ``patient_id_from`` value; else ValueError saying why."""
    if rule in ("auto", "none", "filename_prefix"):
        return rule
    kind, _, value = rule.partition(":")
    if kind == "column" and value:
        return rule
    if kind == "regex" and value:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"patient_id_from {rule!r}: not a regular expression ({error})"
                             ) from None
        return rule
    raise ValueError(f"patient_id_from must be {PATIENT_RULES}, got {rule!r}")


def read_text_file(path: str | os.PathLike) -> str:
    """A text file (split list, CSV, YAML) as str: UTF-8, with or without a byte-order mark,
    any line ending. Not UTF-8 (a Latin-1 list, say): ValueError naming file, line and byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        start = error.start
        line = data.count(b"\n", 0, start) + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        raise ValueError(
            f"{os.fspath(path)}:{line}: not UTF-8 text (byte 0x{data[start]:02x} at column "
            f"{column}); save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None
