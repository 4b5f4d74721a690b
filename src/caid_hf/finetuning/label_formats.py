"""The label CSV layouts of the public chest X-ray sets, read into one table.

``label_format`` picks the layout (``auto`` detects it from the header):

- ``binary``: an image-path column and label columns of 0/1 (also -1 for uncertain and
  blank for not mentioned, read by the policies below);
- ``names``: one column of ``|``-separated finding names (ChestX-ray14's
  ``Data_Entry_2017.csv``, ``Finding Labels``; ``No Finding`` is no label);
- ``chexpert``: CheXpert's ``train.csv`` / ``valid.csv``: ``Path`` (starting with the
  data set's folder, e.g. ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``),
  ``Frontal/Lateral``, ``AP/PA`` and the 14 observations (1, 0, -1, blank);
- ``mimic``: MIMIC-CXR-JPG's ``mimic-cxr-2.0.0-chexpert.csv`` (or ``-negbio``; one row per
  study: ``subject_id``, ``study_id`` and the 14 observations), joined with
  ``mimic-cxr-2.0.0-metadata.csv`` (one row per image: ``dicom_id``, ``ViewPosition``) found
  next to it or given as ``metadata_csv``; ``.csv.gz`` files are read as they come. Images
  are ``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`` below the CSV's folder. A merged CSV that
  already has ``dicom_id`` (or a ``path`` column) needs no metadata file;
- ``padchest``: PadChest's ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv``:
  ``ImageID``, ``ImageDir``, ``PatientID``, ``Projection`` and ``Labels``, a Python list
  literal per row (``['pneumonia', 'nodule']``; ``normal`` is no label).

Label values (CheXpert's conventions): 1 positive, 0 negative, -1 uncertain, blank not
mentioned. ``uncertain_labels``: ``ignore`` (default; U-Ignore: the entry is left out of
the loss and the metrics), ``ones`` (U-Ones) or ``zeros`` (U-Zeros). ``blank_labels``:
``zeros`` (default: not mentioned = negative, as CheXpert's labeller means it) or
``ignore``. An ignored entry is NaN in ``targets``.

``views`` keeps the films of some views: ``frontal`` (PA, AP and their variants),
``lateral`` (L, LL, RL, LATERAL…) or the layout's own codes (``PA``, ``AP``…), read from
``Frontal/Lateral`` and ``AP/PA`` (CheXpert), ``ViewPosition`` (MIMIC), ``Projection``
(PadChest) or ``view_column``; a CSV of DICOM files without a view column is filtered by
each file's *View Position* header.
"""

from __future__ import annotations

import ast
import csv
import difflib
import gzip
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.sources import read_text_file

__all__ = [
    "BLANK_POLICIES",
    "CHEXPERT_LABELS",
    "LABEL_FORMATS",
    "UNCERTAIN_POLICIES",
    "LabelTable",
    "detect_label_format",
    "read_csv_rows",
    "read_label_table",
    "view_matches",
]

LABEL_FORMATS = ("auto", "binary", "names", "chexpert", "mimic", "padchest")
UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")
BLANK_POLICIES = ("zeros", "ignore")
# The 14 observations of the CheXpert labeller, in CheXpert's and MIMIC-CXR's column order.
CHEXPERT_LABELS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]
FRONTAL_VIEWS = frozenset({
    "frontal", "pa", "ap", "ap axial", "pa axial", "ap lld", "pa lld", "ap rld", "pa rld",
    "ap_horizontal", "ap horizontal", "ap_vertical", "ap vertical", "ap supine", "ap_supine",
})
LATERAL_VIEWS = frozenset({"lateral", "l", "ll", "rl", "xtable lateral", "lateral_decubitus"})
_VIEW_COLUMNS = {"chexpert": ("Frontal/Lateral", "AP/PA"), "mimic": ("ViewPosition",),
                 "padchest": ("Projection",)}
_PATIENT_RULES = {"chexpert": r"regex:(patient\d+)", "mimic": "column:subject_id",
                  "padchest": "column:PatientID"}
_NO_FINDING = {"No Finding", "normal"}
_MIMIC_METADATA = ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-metadata.csv.gz")
_IMAGE_COLUMN_NAMES = ("image", "path", "Path", "image_path", "file", "filename", "Image Index")


def read_csv_rows(csv_file: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV file (``.csv.gz`` decompressed). Raises FileNotFoundError,
    or ValueError for a file without header or rows (naming it)."""
    if not csv_file.is_file():
        raise FileNotFoundError(f"CSV file not found: {csv_file}")
    if csv_file.suffix.lower() == ".gz":
        try:
            text = gzip.decompress(csv_file.read_bytes()).decode("utf-8-sig")
        except (OSError, EOFError, UnicodeDecodeError) as error:
            raise ValueError(f"{csv_file}: not a gzip-compressed UTF-8 CSV ({error})") from None
    else:
        text = read_text_file(csv_file)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = list(reader)
    columns = list(reader.fieldnames or [])
    if not columns or not rows:
        raise ValueError(f"{csv_file}: no header or no rows")
    return columns, rows


def detect_label_format(columns: list[str]) -> str:
    """The layout a header shows (see the module docstring); ``binary`` when none."""
    names = set(columns)
    observations = len(names & set(CHEXPERT_LABELS)) >= 5
    if "Path" in names and ("Frontal/Lateral" in names or observations):
        return "chexpert"
    if {"subject_id", "study_id"} <= names and observations:
        return "mimic"
    if {"ImageID", "Labels"} <= names:
        return "padchest"
    if "Finding Labels" in names:
        return "names"
    return "binary"


def view_matches(value: str, wanted: list[str]) -> bool:
    """Whether a view code (``PA``, ``Lateral``, ``AP_horizontal``…) is one of ``wanted``
    (``frontal``, ``lateral`` or codes, any case)."""
    code = value.strip().lower()
    for want in wanted:
        want = want.strip().lower()
        if (want == "frontal" and code in FRONTAL_VIEWS) or \
                (want == "lateral" and code in LATERAL_VIEWS) or want == code:
            return True
    return False


@dataclass
class LabelTable:
    """What a label CSV holds once read: image paths (relative to ``base``), targets
    float32 [N, L] (NaN = ignored), label names, the rows kept, and the patient rule of
    the layout (``None``: the generic rules)."""

    base: Path
    paths: list[str]
    targets: np.ndarray | None
    label_names: list[str] | None
    rows: list[dict[str, str]]
    label_format: str
    patient_rule: str | None
    dropped_views: int = 0


def _cell_value(text: str | None, where: str, uncertain: str, blank: str) -> float:
    """One label cell → 1.0, 0.0 or NaN (ignored) under the policies."""
    text = (text or "").strip()
    if text == "" or text.lower() == "nan":
        return math.nan if blank == "ignore" else 0.0
    try:
        value = float(text)
    except ValueError:
        value = None
    if value == 1.0 or value == 0.0:
        return value
    if value == -1.0:
        return {"ignore": math.nan, "ones": 1.0, "zeros": 0.0}[uncertain]
    raise ValueError(f"{where}: label must be 1, 0, -1 (uncertain) or blank (not mentioned), "
                     f"got {text!r}")


def _is_label_cell(text: str) -> bool:
    text = text.strip()
    if text == "":
        return True
    try:
        return float(text) in (0.0, 1.0, -1.0)
    except ValueError:
        return False


def _finding_cells(values: list[str], layout: str, where: str, blank: str) -> list[list[str] | None]:
    """Finding names per row (``None``: a blank cell that is ignored)."""
    cells: list[list[str] | None] = []
    for k, value in enumerate(values):
        text = (value or "").strip()
        if layout == "padchest":
            if text == "" or text.lower() == "nan":
                cells.append(None if blank == "ignore" else [])
                continue
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                parsed = None
            if not isinstance(parsed, (list, tuple)) or not all(isinstance(n, str) for n in parsed):
                raise ValueError(f"{where(k)}: Labels must be a list of names like "
                                 f"['pneumonia', 'nodule'], got {text!r}")
            names = [n.strip() for n in parsed]
        else:
            names = [n.strip() for n in text.split("|")]
        cells.append([n for n in names if n and n not in _NO_FINDING])
    return cells


def _names_to_targets(cells: list[list[str] | None], label_names: list[str] | None,
                      what: str) -> tuple[np.ndarray, list[str]]:
    """Multi-hot [N, L] over ``label_names`` (chosen and ordered by the user) or over the
    sorted names seen; an ignored row is all NaN."""
    seen = sorted({n for cell in cells if cell for n in cell})
    if label_names is None:
        if not seen:
            raise ValueError(f"{what}: the label column names no finding")
        names = seen
    else:
        missing = [n for n in label_names if n not in seen]
        if missing:
            hints = {n: difflib.get_close_matches(n, seen, n=1) for n in missing}
            said = ", ".join(f"{n!r}" + (f" (did you mean {h[0]!r}?)" if h else "")
                             for n, h in hints.items())
            raise ValueError(f"{what}: label_names {said} never occur; the findings are "
                             f"{seen[:20]}{' …' if len(seen) > 20 else ''}")
        names = list(label_names)
    index = {n: k for k, n in enumerate(names)}
    targets = np.zeros((len(cells), len(names)), dtype=np.float32)
    for row, cell in enumerate(cells):
        if cell is None:
            targets[row] = np.nan
        else:
            targets[row, [index[n] for n in cell if n in index]] = 1.0
    return targets, names


def _mimic_rows(csv_file: Path, columns: list[str], rows: list[dict[str, str]],
                metadata_csv: str | None) -> tuple[list[str], list[dict[str, str]]]:
    """MIMIC's per-study labels joined with its per-image metadata (one row per image)."""
    if "dicom_id" in columns or any(c in columns for c in ("path", "Path")):
        return columns, rows
    if metadata_csv is None:
        found = [csv_file.parent / n for n in _MIMIC_METADATA if (csv_file.parent / n).is_file()]
        if not found:
            raise ValueError(f"{csv_file}: MIMIC-CXR labels are per study; the image list "
                             f"({_MIMIC_METADATA[0]}[.gz], with dicom_id and ViewPosition) "
                             "was not found next to it; give it as metadata_csv")
        metadata = found[0]
    else:
        metadata = Path(metadata_csv)
    meta_columns, meta_rows = read_csv_rows(metadata)
    for needed in ("dicom_id", "subject_id", "study_id"):
        if needed not in meta_columns:
            raise ValueError(f"{metadata}: no column {needed!r} (columns: {meta_columns})")
    by_study = {(r["subject_id"], r["study_id"]): r for r in rows}
    joined = [{**r, **by_study[(r["subject_id"], r["study_id"])]} for r in meta_rows
              if (r["subject_id"], r["study_id"]) in by_study]
    if not joined:
        raise ValueError(f"{metadata}: no image belongs to a study of {csv_file}")
    return columns + [c for c in meta_columns if c not in columns], joined


def _image_paths(layout: str, csv_file: Path, columns: list[str], rows: list[dict[str, str]],
                 image_column: str | None) -> tuple[list[str], str]:
    """Each row's image path and the column (or rule) it came from."""
    if image_column is None and layout == "padchest":
        return [f"{r['ImageDir']}/{r['ImageID']}" if r.get("ImageDir", "").strip()
                else r["ImageID"] for r in rows], "ImageID"
    if image_column is None and layout == "mimic" and "dicom_id" in columns and \
            not any(c in columns for c in ("path", "Path")):
        return [f"files/p{r['subject_id'][:2]}/p{r['subject_id']}/s{r['study_id']}/"
                f"{r['dicom_id']}.jpg" for r in rows], "dicom_id"
    if image_column is None:
        image_column = next((c for c in _IMAGE_COLUMN_NAMES if c in columns), columns[0])
    if image_column not in columns:
        raise ValueError(f"{csv_file}: no column {image_column!r} (columns: {columns})")
    return [r[image_column] for r in rows], image_column


def _default_base(layout: str, csv_file: Path, paths: list[str]) -> Path:
    """CheXpert's paths start with the data set's folder, which holds the CSV."""
    first = paths[0].replace("\\", "/").split("/", 1)[0] if paths else ""
    if layout == "chexpert" and first == csv_file.parent.name:
        return csv_file.parent.parent
    return csv_file.parent


def _dicom_view(path: Path) -> str:
    """A DICOM file's *View Position* (PA, AP, LL …; empty when it has none), read from the
    header only."""
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["ViewPosition"])
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except Exception as error:  # noqa: BLE001 - any unreadable header: name the file
        raise ValueError(f"cannot read the DICOM header of {path}: {error}") from error
    return str(header.get("ViewPosition", "") or "")


def _keep_views(layout: str, csv_file: Path, columns: list[str], rows: list[dict[str, str]],
                views: list[str], view_column: str | None,
                dicom_paths: list[Path] | None = None) -> list[int]:
    """Indices of the rows whose view is wanted: by the view column, else (every image a
    DICOM file) by the files' *View Position*."""
    wanted_columns = [view_column] if view_column else list(_VIEW_COLUMNS.get(layout, ()))
    present = [c for c in wanted_columns if c in columns]
    if not present and dicom_paths is not None:
        return [k for k, path in enumerate(dicom_paths)
                if view_matches(_dicom_view(path), views)]
    if not present:
        raise ValueError(f"{csv_file}: views={views} needs a view column "
                         f"({wanted_columns or 'view_column'}; columns: {columns}), or DICOM "
                         "images whose headers carry ViewPosition")
    return [k for k, r in enumerate(rows)
            if any(view_matches(r.get(c) or "", views) for c in present)]


def read_label_table(csv_file: Path, images_root: str | None = None,
                     image_column: str | None = None, label_columns: list[str] | None = None,
                     label_names: list[str] | None = None, label_format: str = "auto",
                     uncertain_labels: str = "ignore", blank_labels: str = "zeros",
                     views: list[str] | None = None, view_column: str | None = None,
                     metadata_csv: str | None = None, with_labels: bool = True) -> LabelTable:
    """Read a label CSV of any layout (see the module docstring).

    Raises:
        FileNotFoundError: the CSV (or MIMIC's metadata file) does not exist.
        ValueError: an unknown layout or policy, a missing column (the columns are listed),
            a label cell that is not 1, 0, -1 or blank, an unreadable PadChest list, a view
            filter without a view column, or no row left; messages name file, row, column.
    """
    for name, value, allowed in (("label_format", label_format, LABEL_FORMATS),
                                 ("uncertain_labels", uncertain_labels, UNCERTAIN_POLICIES),
                                 ("blank_labels", blank_labels, BLANK_POLICIES)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    columns, rows = read_csv_rows(csv_file)
    layout = detect_label_format(columns) if label_format == "auto" else label_format
    if layout == "mimic":
        columns, rows = _mimic_rows(csv_file, columns, rows, metadata_csv)
    for name in [*(label_columns or []), *([view_column] if view_column else [])]:
        if name not in columns:
            raise ValueError(f"{csv_file}: no column {name!r} (columns: {columns})")
    paths, path_column = _image_paths(layout, csv_file, columns, rows, image_column)
    base = Path(images_root) if images_root is not None else _default_base(layout, csv_file, paths)
    dropped = 0
    if views:
        dicom = ([base / p for p in paths]
                 if all(p.lower().endswith((".dcm", ".dicom")) for p in paths) else None)
        keep = _keep_views(layout, csv_file, columns, rows, views, view_column, dicom)
        dropped = len(rows) - len(keep)
        rows, paths = [rows[k] for k in keep], [paths[k] for k in keep]
        if not rows:
            raise ValueError(f"{csv_file}: no image has a view in {views}")
    table = LabelTable(base, paths, None, label_names, rows, layout,
                       _PATIENT_RULES.get(layout), dropped)
    if with_labels:
        table.targets, table.label_names = _targets(layout, csv_file, columns, rows, path_column,
                                                    label_columns, label_names,
                                                    uncertain_labels, blank_labels)
    return table


def _targets(layout, csv_file, columns, rows, path_column, label_columns, label_names,
             uncertain, blank) -> tuple[np.ndarray, list[str]]:
    def where(row: int, column: str) -> str:  # row 1 is the header
        return f"{csv_file}:{row + 2} column {column!r}"

    if layout in ("names", "padchest"):
        column = (label_columns or ["Labels" if layout == "padchest" else "Finding Labels"])[0]
        if column not in columns:
            raise ValueError(f"{csv_file}: no column {column!r} (columns: {columns})")
        cells = _finding_cells([r[column] for r in rows], layout,
                               lambda k: where(k, column), blank)
        return _names_to_targets(cells, label_names, f"{csv_file} column {column!r}")
    if label_columns is None and layout in ("chexpert", "mimic"):
        label_columns = [c for c in CHEXPERT_LABELS if c in columns]
    if label_columns is None:
        label_columns = [c for c in columns if c != path_column
                         and all(_is_label_cell(r[c] or "") for r in rows)
                         and any((r[c] or "").strip() for r in rows)]
        if not label_columns:
            text_columns = [c for c in columns if c != path_column]
            if len(text_columns) == 1:  # one column of finding names
                return _targets("names", csv_file, columns, rows, path_column, text_columns,
                                label_names, uncertain, blank)
            raise ValueError(f"{csv_file}: no label column (0/1/-1/blank cells) besides "
                             f"{path_column!r} (columns: {columns}); name them with "
                             "label_columns")
    if len(label_columns) == 1 and not all(_is_label_cell(r[label_columns[0]] or "")
                                           for r in rows):
        return _targets("names", csv_file, columns, rows, path_column, label_columns,
                        label_names, uncertain, blank)
    values = np.zeros((len(rows), len(label_columns)), dtype=np.float32)
    for k, r in enumerate(rows):
        for j, c in enumerate(label_columns):
            values[k, j] = _cell_value(r[c], where(k, c), uncertain, blank)
    if label_names is not None and len(label_names) != len(label_columns):
        raise ValueError(f"{csv_file}: label_names has {len(label_names)} names but the data "
                         f"has {len(label_columns)} labels")
    return values, list(label_names or label_columns)
