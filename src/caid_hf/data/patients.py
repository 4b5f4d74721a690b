"""Patient-level splits: one patient's films never land on both sides of a split.

A chest X-ray data set holds several films per patient (follow-ups, frontal and lateral
views). Holding out images at random puts one patient's films in training and validation
alike, and the validation numbers then measure recognising the patient. So wherever a
split or a label fraction is drawn, caid-hf draws *patients* and takes all their films.

``patient_id_from`` says where a film's patient id comes from:

- ``auto`` (the default): the data set's own convention when the source knows one
  (CheXpert: ``patientNNNNN`` in the path; MIMIC-CXR: the ``subject_id`` column; PadChest:
  the ``PatientID`` column); else ChestX-ray14 file names (``00000001_000.png``: the digits
  before ``_``) when every file is named so; else none (every image is its own patient);
- ``filename_prefix``: the file name up to its first ``_`` (``00000001_000.png`` →
  ``00000001``);
- ``column:NAME``: the column ``NAME`` of a CSV or Hugging Face source;
- ``regex:PATTERN``: the first group of ``PATTERN`` (or the whole match) searched in the
  image's path or id, e.g. ``regex:patient(\\d+)``;
- ``none``: image-level splits, as before.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from .options import check_patient_rule

__all__ = [
    "CHESTXRAY14_NAME",
    "check_patient_rule",
    "grouped_hold_out",
    "patient_ids_from_names",
    "patient_ids_of",
    "take_patients",
]

# ChestX-ray14 image names: 8 digits of patient, 3 of follow-up.
CHESTXRAY14_NAME = re.compile(r"^(\d{8})_\d{3}\.[A-Za-z]+$")


def _file_name(image_id: str) -> str:
    return image_id.replace("\\", "/").rsplit("/", 1)[-1]


def patient_ids_from_names(names: Sequence[str], rule: str, where: str) -> list[str] | None:
    """Patient ids of images named ``names`` (paths or ids) by a name rule (``auto``,
    ``filename_prefix``, ``regex:…``, ``none``); ``None`` for image-level splits.

    Raises:
        ValueError: a name the rule cannot read (the first such name is given).
    """
    check_patient_rule(rule)
    if rule == "none" or not names:
        return None
    if rule == "auto":
        matches = [CHESTXRAY14_NAME.match(_file_name(n)) for n in names]
        return [m.group(1) for m in matches] if all(matches) else None
    if rule == "filename_prefix":
        ids = []
        for name in names:
            stem = _file_name(name)
            if "_" not in stem:
                raise ValueError(f"{where}: patient_id_from filename_prefix needs a '_' in every "
                                 f"file name (patient_image.png); {name!r} has none")
            ids.append(stem.split("_", 1)[0])
        return ids
    if rule.startswith("regex:"):
        pattern = re.compile(rule[len("regex:"):])
        ids = []
        for name in names:
            match = pattern.search(name)
            if match is None:
                raise ValueError(f"{where}: patient_id_from {rule!r} does not match image "
                                 f"{name!r}")
            ids.append(match.group(1) if pattern.groups else match.group(0))
        return ids
    raise ValueError(f"{where}: patient_id_from {rule!r} names a column, but this source has "
                     "no columns (use a CSV or Hugging Face source, or filename_prefix / "
                     "regex:PATTERN)")


def patient_ids_of(source, rule: str, where: str | None = None) -> list[str] | None:
    """The patient id of every image of ``source`` under ``rule``, or ``None`` (image-level).

    A source with its own ``patient_ids_for(rule)`` (CSV and Hugging Face sources, which
    have columns and data-set conventions) answers itself; phantoms are all different
    patients; other sources are read by their image ids.
    """
    check_patient_rule(rule)
    if rule == "none":
        return None
    if hasattr(source, "patient_ids_for"):
        return source.patient_ids_for(rule)
    if type(source).__name__ in ("PhantomSource", "PhantomLabelledSource"):
        return None
    names = [source.image_id(i) for i in range(len(source))]
    return patient_ids_from_names(names, rule, where or type(source).__name__)


def _patient_order(indices: Sequence[int], groups: Sequence[str], seed: int
                   ) -> list[list[int]]:
    """The images of ``indices`` grouped by patient (first-seen order), in a seeded random
    order of patients."""
    by_patient: dict[str, list[int]] = {}
    for i in indices:
        by_patient.setdefault(groups[i], []).append(i)
    patients = list(by_patient.values())
    order = torch.randperm(len(patients), generator=torch.Generator().manual_seed(seed)).tolist()
    return [patients[k] for k in order]


def grouped_hold_out(n: int, fraction: float, seed: int, groups: Sequence[str] | None,
                     what: str = "images") -> tuple[list[int], list[int]]:
    """(train, held-out) index lists: about ``fraction`` of the ``n`` images held out, each
    list in the seeded order it was drawn in (sort them where order should not matter).

    Without ``groups``, a seeded permutation of images (round(n·fraction), at least one).
    With ``groups`` (one patient id per image), whole patients in a seeded order are held
    out until their films reach round(n·fraction); no patient is on both sides.

    Raises:
        ValueError: nothing would be left for training (one image, or one patient).
    """
    target = max(1, round(n * fraction))
    if groups is None:
        if n - target < 1:
            raise ValueError(f"validation_fraction={fraction} leaves no training {what} out "
                             f"of {n}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        return order[target:], order[:target]
    if len(groups) != n:
        raise ValueError(f"{len(groups)} patient ids for {n} images")
    patients = _patient_order(range(n), groups, seed)
    if len(patients) < 2:
        raise ValueError(f"validation_fraction={fraction}: all {n} {what} belong to one "
                         "patient, so a patient-level split leaves nothing for training "
                         "(patient_id_from none splits images)")
    held: list[int] = []
    taken = 0
    while len(held) < target and taken < len(patients) - 1:
        held.extend(patients[taken])
        taken += 1
    train = [i for p in patients[taken:] for i in p]
    return train, held


def take_patients(indices: Sequence[int], fraction: float, seed: int,
                  groups: Sequence[str] | None, limit: int | None = None) -> list[int]:
    """A seeded share of ``indices`` (sorted): ceil(len·fraction) images, at most ``limit``.

    With ``groups``, whole patients are taken in a seeded order until their films reach
    that count (so "5 % of the labels" means the films of about 5 % of the patients), then
    cut to ``limit``.
    """
    keep = max(1, math.ceil(len(indices) * fraction))
    if limit is not None:
        keep = min(keep, limit)
    if keep >= len(indices):
        return sorted(indices)
    if groups is None:
        picked = torch.randperm(len(indices),
                                generator=torch.Generator().manual_seed(seed))[:keep].tolist()
        return sorted(indices[k] for k in picked)
    chosen: list[int] = []
    for patient in _patient_order(indices, groups, seed):
        if len(chosen) >= keep:
            break
        chosen.extend(patient)
    if limit is not None:
        chosen = chosen[:limit]
    return sorted(chosen)
