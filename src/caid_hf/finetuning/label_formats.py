"""The label CSV layouts of the public chest X-ray sets, read into one table.

``label_format`` picks the layout (``auto`` detects it from the header's signature
columns, below):

- ``binary``: an image-path column and label columns of 0/1 (also -1 for uncertain and
  blank for not mentioned, read by the policies below);
- ``names``: one column of ``|``-separated finding names (ChestX-ray14's
  ``Data_Entry_2017.csv``, ``Finding Labels``; ``No Finding`` is no label);
- ``chexpert``: CheXpert's ``train.csv`` / ``valid.csv``: ``Path`` (starting with the
  data set's folder, e.g. ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``),
  ``Sex``, ``Age``, ``Frontal/Lateral``, ``AP/PA`` and the 14 observations (1, 0, -1, blank);
- ``mimic``: MIMIC-CXR-JPG's ``mimic-cxr-2.0.0-chexpert.csv`` (or ``-negbio``; one row per
  study: ``subject_id``, ``study_id`` and the 14 observations), joined with
  ``mimic-cxr-2.0.0-metadata.csv`` (one row per image: ``dicom_id``, ``ViewPosition``) found
  next to it or given as ``metadata_csv``; ``.csv.gz`` files are read as they come. Images
  are ``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`` below the CSV's folder. A merged CSV that
  already has ``dicom_id`` (or a ``path`` column) needs no metadata file;
- ``padchest``: PadChest's ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv``:
  ``ImageID``, ``ImageDir``, ``PatientID``, ``Projection`` and ``Labels``, a Python list
  literal per row (``['pneumonia', 'nodule']``; ``normal`` is no label).

Detection: ``mimic`` by ``subject_id`` + ``study_id`` + five or more observations;
``chexpert`` by five or more observations with ``Path``, ``Frontal/Lateral`` or ``AP/PA``;
``padchest`` by two or more of PadChest's own columns (``ImageID``, ``ImageDir``,
``Projection``, ``MethodProjection``, ``Labels``, ``MethodLabel``, ``Localizations`` …);
``names`` by ``Finding Labels``, or ``Image Index`` with ChestX-ray14's ``Patient ID`` /
``View Position`` / … columns. A file that looks like one of them but lacks a column the
layout needs is refused naming the column: CheXpert's ``Path`` (and, in a file with
CheXpert's own ``Sex``/``Age``/``Frontal/Lateral``/``AP/PA`` columns, each of the 14
observations unless ``label_columns`` picks some), ChestX-ray14's ``Image Index`` and
``Finding Labels``, PadChest's ``ImageID`` and ``Labels``. The image column, whichever it
is, must hold image file names (a known suffix, or an existing file).

Label values (CheXpert's conventions): 1 positive, 0 negative, -1 uncertain, blank not
mentioned. ``uncertain_labels``: ``ignore`` (default; U-Ignore: the entry is left out of
the loss and the metrics), ``ones`` (U-Ones) or ``zeros`` (U-Zeros). ``blank_labels``:
``zeros`` (default: not mentioned = negative, as CheXpert's labeller means it) or
``ignore``. An ignored entry is NaN in ``targets``.

Finding names (ChestX-ray14's ``Finding Labels``, PadChest's ``Labels``) are checked
against the data set's documented findings (:data:`CHESTXRAY14_FINDINGS`,
:data:`PADCHEST_FINDINGS`; PadChest's compared without case), other name columns against
``label_names`` when given: an unknown name (``Effusion|maybe``, ``2.0``, a misspelling) is
an error naming every line it is on, unless ``accept_unknown_findings`` reads it as a
finding of its own. ``label_names`` outside the vocabulary is an error (a typo); a listed
finding that does not occur in the file is a warning and an all-zero column (its AUC is
undefined, NaN).

``views`` keeps the films of some views: ``frontal`` (PA, AP and their variants),
``lateral`` (L, LL, RL, LATERAL…) or the layout's own codes (``PA``, ``AP``…), read from
``ViewPosition`` (MIMIC), ``Projection`` (PadChest), ``View Position`` (ChestX-ray14) or
``view_column``; a CSV of DICOM files without a view column is filtered by each file's
*View Position* header. CheXpert: ``Frontal/Lateral`` decides frontal against lateral, and
``AP/PA`` only refines a frontal film (``--views PA``: frontal films whose ``AP/PA`` is
``PA``); 17 frontal films of the real ``train.csv`` say ``LL`` or ``RL`` there and stay
frontal.

Every message about a row names the file, the physical line the record starts on (a
quoted cell spanning several lines, as PadChest's have, counts all of them) and the
column.
"""

from __future__ import annotations

import ast
import csv
import difflib
import gzip
import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.options import read_text_file
from ..decoding import IMAGE_EXTENSIONS

__all__ = [
    "BLANK_POLICIES",
    "CHESTXRAY14_FINDINGS",
    "CHEXPERT_LABELS",
    "LABEL_FORMATS",
    "PADCHEST_FINDINGS",
    "UNCERTAIN_POLICIES",
    "CSVRecords",
    "LabelTable",
    "detect_label_format",
    "read_csv_records",
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
# The 14 findings of ChestX-ray14, in the column order of the official split lists.
CHESTXRAY14_FINDINGS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
]
# The 193 labels of PadChest's Labels column (radiographic findings, differential
# diagnoses and the study-level 'normal', 'exclude', 'suboptimal study', 'unchanged'), as
# the data set's paper lists them.
PADCHEST_FINDINGS = [
    'abnormal foreign body', 'abscess', 'adenopathy', 'air bronchogram', 'air fluid level',
    'air trapping', 'alveolar pattern', 'aortic aneurysm', 'aortic atheromatosis',
    'aortic button enlargement', 'aortic elongation', 'aortic endoprosthesis',
    'apical pleural thickening', 'artificial aortic heart valve', 'artificial heart valve',
    'artificial mitral heart valve', 'asbestosis signs', 'ascendent aortic elongation',
    'atelectasis', 'atelectasis basal', 'atypical pneumonia', 'axial hyperostosis',
    'azygoesophageal recess shift', 'azygos lobe', 'blastic bone lesion', 'bone cement',
    'bone metastasis', 'breast mass', 'bronchiectasis', 'bronchovascular markings', 'bullas',
    'calcified adenopathy', 'calcified densities', 'calcified fibroadenoma',
    'calcified granuloma', 'calcified mediastinal adenopathy', 'calcified pleural plaques',
    'calcified pleural thickening', 'callus rib fracture', 'cardiomegaly', 'catheter',
    'cavitation', 'central vascular redistribution', 'central venous catheter',
    'central venous catheter via jugular vein', 'central venous catheter via subclavian vein',
    'central venous catheter via umbilical vein', 'cervical rib', 'chest drain tube',
    'Chilaiditi sign', 'chronic changes', 'clavicle fracture', 'consolidation', 'COPD signs',
    'costochondral junction hypertrophy', 'costophrenic angle blunting', 'cyst', 'dai',
    'descendent aortic elongation', 'dextrocardia', 'diaphragmatic eventration',
    'double J stent', 'dual chamber device', 'electrical device', 'emphysema', 'empyema',
    'end on vessel', 'endoprosthesis', 'endotracheal tube', 'esophagic dilatation', 'exclude',
    'external foreign body', 'fibrotic band', 'fissure thickening', 'flattened diaphragm',
    'fracture', 'gastrostomy tube', 'goiter', 'granuloma', 'ground glass pattern',
    'gynecomastia', 'heart insufficiency', 'heart valve calcified', 'hemidiaphragm elevation',
    'hiatal hernia', 'hilar congestion', 'hilar enlargement', 'humeral fracture',
    'humeral prosthesis', 'hydropneumothorax', 'hyperinflated lung', 'hypoexpansion',
    'hypoexpansion basal', 'increased density', 'infiltrates', 'interstitial pattern',
    'kerley lines', 'kyphosis', 'laminar atelectasis', 'lepidic adenocarcinoma', 'lipomatosis',
    'lobar atelectasis', 'loculated fissural effusion', 'loculated pleural effusion',
    'lung metastasis', 'lung vascular paucity', 'lymphangitis carcinomatosa',
    'lytic bone lesion', 'major fissure thickening', 'mammary prosthesis', 'mass',
    'mastectomy', 'mediastinal enlargement', 'mediastinal mass', 'mediastinal shift',
    'mediastinic lipomatosis', 'metal', 'miliary opacities', 'minor fissure thickening',
    'multiple nodules', 'nephrostomy tube', 'nipple shadow', 'nodule',
    'non axial articular degenerative changes', 'normal', 'NSG tube', 'obesity', 'osteopenia',
    'osteoporosis', 'osteosynthesis material', 'pacemaker', 'pectum carinatum',
    'pectum excavatum', 'pericardial effusion', 'pleural effusion', 'pleural mass',
    'pleural plaques', 'pleural thickening', 'pneumomediastinum', 'pneumonia',
    'pneumoperitoneo', 'pneumothorax', 'post radiotherapy changes', 'prosthesis',
    'pseudonodule', 'pulmonary artery enlargement', 'pulmonary artery hypertension',
    'pulmonary edema', 'pulmonary fibrosis', 'pulmonary hypertension', 'pulmonary mass',
    'pulmonary venous hypertension', 'reservoir central venous catheter',
    'respiratory distress', 'reticular interstitial pattern',
    'reticulonodular interstitial pattern', 'rib fracture', 'right sided aortic arch',
    'round atelectasis', 'sclerotic bone lesion', 'scoliosis', 'segmental atelectasis',
    'single chamber device', 'soft tissue mass', 'sternoclavicular junction hypertrophy',
    'sternotomy', 'subacromial space narrowing', 'subcutaneous emphysema', 'suboptimal study',
    'superior mediastinal enlargement', 'supra aortic elongation', 'surgery', 'surgery breast',
    'surgery heart', 'surgery humeral', 'surgery lung', 'surgery neck', 'suture material',
    'thoracic cage deformation', 'total atelectasis', 'tracheal shift', 'tracheostomy tube',
    'tuberculosis', 'tuberculosis sequelae', 'unchanged', 'vascular hilar enlargement',
    'vascular redistribution', 'ventriculoperitoneal drain tube',
    'vertebral anterior compression', 'vertebral compression',
    'vertebral degenerative changes', 'vertebral fracture', 'volume loss'
]
FRONTAL_VIEWS = frozenset({
    "frontal", "pa", "ap", "ap axial", "pa axial", "ap lld", "pa lld", "ap rld", "pa rld",
    "ap_horizontal", "ap horizontal", "ap_vertical", "ap vertical", "ap supine", "ap_supine",
})
LATERAL_VIEWS = frozenset({"lateral", "l", "ll", "rl", "xtable lateral", "lateral_decubitus"})
_VIEW_COLUMNS = {"mimic": "ViewPosition", "padchest": "Projection", "names": "View Position"}
_PATIENT_RULES = {"chexpert": r"regex:(patient\d+)", "mimic": "column:subject_id",
                  "padchest": "column:PatientID"}
_NO_FINDING = {"No Finding", "normal"}
_MIMIC_METADATA = ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-metadata.csv.gz")
_IMAGE_COLUMN_NAMES = ("image", "path", "Path", "image_path", "file", "filename", "Image Index")
# Columns that only the data sets' own files have: what detection goes by.
_CHEXPERT_FILE_COLUMNS = ("Sex", "Age", "Frontal/Lateral", "AP/PA")
_CHESTXRAY14_COLUMNS = ("Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                        "View Position")
_PADCHEST_COLUMNS = frozenset({
    "ImageID", "ImageDir", "Projection", "MethodProjection", "Labels", "MethodLabel",
    "Localizations", "LabelsLocalizationsBySentence", "labelCUIS", "LocalizationsCUIS"})
_LAYOUT_NAMES = {"chexpert": "CheXpert's train.csv / valid.csv",
                 "mimic": "MIMIC-CXR-JPG's label file",
                 "padchest": "PadChest's label file",
                 "names": "ChestX-ray14's Data_Entry_2017.csv"}
_SHOWN = 10  # lines quoted in a message about many rows


@dataclass
class CSVRecords:
    """A CSV file as read: its header, one dict per record, and the physical line each
    record starts on (counting every line of a quoted cell that spans several, and blank
    lines); ``header_line`` is the header's."""

    path: Path
    columns: list[str]
    rows: list[dict[str, str]]
    lines: list[int]
    header_line: int = 1


def read_csv_records(csv_file: Path) -> CSVRecords:
    """Read a CSV file (``.csv.gz`` decompressed) with the physical line of every record.

    Raises:
        FileNotFoundError: no such file.
        ValueError: no header or no rows, a header naming a column twice, a record with
            more or fewer cells than the header has columns (an unquoted separator shifts
            every later cell into the wrong column), or unreadable CSV; the message names
            the file and line.
    """
    csv_file = Path(csv_file)
    if not csv_file.is_file():
        raise FileNotFoundError(f"CSV file not found: {csv_file}")
    if csv_file.suffix.lower() == ".gz":
        try:
            text = gzip.decompress(csv_file.read_bytes()).decode("utf-8-sig")
        except (OSError, EOFError, UnicodeDecodeError) as error:
            raise ValueError(f"{csv_file}: not a gzip-compressed UTF-8 CSV ({error})") from None
    else:
        text = read_text_file(csv_file)
    reader = csv.reader(io.StringIO(text, newline=""))
    columns: list[str] | None = None
    rows: list[dict[str, str]] = []
    lines: list[int] = []
    header_line = width = previous = 0
    try:
        for record in reader:
            start, previous = previous + 1, reader.line_num
            if not record or (len(record) == 1 and not record[0].strip() and width != 1):
                continue  # a blank line
            if columns is None:
                columns, header_line, width = record, start, len(record)
                twice = sorted({c for c in columns if c and columns.count(c) > 1})
                if twice:
                    raise ValueError(f"{csv_file}:{start}: the header names column(s) "
                                     f"{twice} more than once")
                continue
            if len(record) != width:
                raise ValueError(
                    f"{csv_file}:{start}: {len(record)} cells, but the header (line "
                    f"{header_line}) has {width} columns; a cell holding a comma or a line "
                    "break must be quoted")
            rows.append(dict(zip(columns, record)))
            lines.append(start)
    except csv.Error as error:
        raise ValueError(f"{csv_file}:{reader.line_num}: not readable as CSV ({error})") from None
    if not columns or not rows:
        raise ValueError(f"{csv_file}: no header or no rows")
    return CSVRecords(csv_file, columns, rows, lines, header_line)


def read_csv_rows(csv_file: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV file (see :func:`read_csv_records`, which also gives each
    row's line)."""
    records = read_csv_records(csv_file)
    return records.columns, records.rows


def detect_label_format(columns: list[str]) -> str:
    """The layout a header shows by its signature columns (see the module docstring);
    ``binary`` when none."""
    names = set(columns)
    observations = len(names & set(CHEXPERT_LABELS)) >= 5
    if {"subject_id", "study_id"} <= names and observations:
        return "mimic"
    if observations and names & {"Path", "Frontal/Lateral", "AP/PA"}:
        return "chexpert"
    if len(names & _PADCHEST_COLUMNS) >= 2:
        return "padchest"
    if "Finding Labels" in names or ("Image Index" in names
                                     and names & set(_CHESTXRAY14_COLUMNS)):
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
    the layout (``None``: the generic rules).

    ``lines`` are the physical lines of ``csv_file`` the kept rows start on;
    ``image_file`` / ``image_lines`` say where each image is named (MIMIC-CXR: the
    metadata file), ``path_column`` the column (or rule) the paths came from.
    """

    base: Path
    paths: list[str]
    targets: np.ndarray | None
    label_names: list[str] | None
    rows: list[dict[str, str]]
    label_format: str
    patient_rule: str | None
    dropped_views: int = 0
    csv_file: Path | None = None
    lines: list[int] = field(default_factory=list)
    image_file: Path | None = None
    image_lines: list[int] = field(default_factory=list)
    path_column: str | None = None

    def where(self, row: int, column: str) -> str:
        """``FILE:LINE column 'NAME'`` of a kept row's cell."""
        return f"{self.csv_file}:{self.lines[row]} column {column!r}"

    def image_where(self, row: int) -> str:
        """``FILE:LINE`` of the record naming a kept row's image."""
        return f"{self.image_file or self.csv_file}:{(self.image_lines or self.lines)[row]}"

    def select(self, keep: list[int]) -> None:
        """Keep the rows ``keep`` (indices into the current rows), in place."""
        self.paths = [self.paths[k] for k in keep]
        self.rows = [self.rows[k] for k in keep]
        self.lines = [self.lines[k] for k in keep]
        if self.image_lines:
            self.image_lines = [self.image_lines[k] for k in keep]
        if self.targets is not None:
            self.targets = self.targets[np.asarray(keep, dtype=np.int64)]


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


def _column_values(rows: list[dict[str, str]], column: str, where, uncertain: str,
                   blank: str) -> np.ndarray:
    """A label column → float32 [N]; each distinct cell text is read once."""
    read: dict[str, float] = {}
    values = np.empty(len(rows), dtype=np.float32)
    for k, row in enumerate(rows):
        text = row[column]
        value = read.get(text)
        if value is None:
            value = read[text] = _cell_value(text, where(k, column), uncertain, blank)
        values[k] = value
    return values


def _is_label_cell(text: str) -> bool:
    text = text.strip()
    if text == "":
        return True
    try:
        return float(text) in (0.0, 1.0, -1.0)
    except ValueError:
        return False


def _is_label_column(rows: list[dict[str, str]], column: str, some_set: bool = True) -> bool:
    """Every cell 1, 0, -1 or blank (and, with ``some_set``, not all blank)."""
    texts = {row[column] for row in rows}
    return all(_is_label_cell(t) for t in texts) and (not some_set
                                                      or any(t.strip() for t in texts))


def _finding_cells(values: list[str], layout: str, where, blank: str) -> list[list[str] | None]:
    """Finding names per row (``None``: a blank cell that is ignored); each distinct cell
    text is parsed once."""
    parsed_texts: dict[str, list[str] | None] = {}
    cells: list[list[str] | None] = []
    for k, value in enumerate(values):
        if value in parsed_texts:
            cells.append(parsed_texts[value])
            continue
        text = value.strip()
        if text == "" or text.lower() == "nan":
            names = None if blank == "ignore" else []
        elif layout == "padchest":
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                parsed = None
            if not isinstance(parsed, (list, tuple)) or not all(isinstance(n, str) for n in parsed):
                raise ValueError(f"{where(k)}: Labels must be a list of names like "
                                 f"['pneumonia', 'nodule'], got {text!r}")
            names = [n.strip() for n in parsed]
        else:
            names = [n.strip() for n in text.split("|")]
        if names is not None:
            names = [n for n in names if n and n not in _NO_FINDING]
        parsed_texts[value] = names
        cells.append(names)
    return cells


@dataclass(frozen=True)
class _Vocabulary:
    """The finding names a column may hold: a data set's documented list, or the given
    ``label_names``."""

    what: str  # "ChestX-ray14's 14 findings", "label_names" …
    names: tuple[str, ...]
    fold_case: bool

    def key(self, name: str) -> str:
        return name.casefold() if self.fold_case else name

    def canonical(self) -> dict[str, str]:
        return {self.key(n): n for n in self.names}


def _vocabulary(layout: str, column: str, label_names: list[str] | None) -> _Vocabulary | None:
    if column == "Finding Labels":
        return _Vocabulary("ChestX-ray14's 14 findings (and 'No Finding')",
                           tuple(CHESTXRAY14_FINDINGS), False)
    if layout == "padchest" and column == "Labels":
        return _Vocabulary("PadChest's 193 labels", tuple(PADCHEST_FINDINGS), True)
    if label_names is not None:
        return _Vocabulary("label_names", tuple(label_names), False)
    return None


def _names_to_targets(cells: list[list[str] | None], label_names: list[str] | None,
                      vocabulary: _Vocabulary | None, accept_unknown: bool, where,
                      what: str) -> tuple[np.ndarray, list[str]]:
    """Multi-hot [N, L] over ``label_names`` (chosen and ordered by the user) or over the
    sorted names seen; an ignored row is all NaN. Names are checked against
    ``vocabulary`` (see the module docstring)."""
    canonical = vocabulary.canonical() if vocabulary is not None else None
    resolved: dict[str, str | None] = {}  # a name as written → its canonical spelling
    unknown: list[tuple[int, str]] = []
    seen: set[str] = set()
    for row, cell in enumerate(cells):
        for name in cell or ():
            if name not in resolved:
                found = name if canonical is None else canonical.get(vocabulary.key(name))
                resolved[name] = name if found is None and accept_unknown else found
            if resolved[name] is None:
                unknown.append((row, name))
            else:
                seen.add(resolved[name])
    if unknown:
        names = sorted({n for _, n in unknown})
        shown = "\n".join(
            f"  {where(row)}: {name!r}" + _suggestion(name, vocabulary.names)
            for row, name in unknown[:_SHOWN])
        more = f"\n  … and {len(unknown) - _SHOWN} more" if len(unknown) > _SHOWN else ""
        raise ValueError(
            f"{what}: {len(unknown)} finding name(s) {names[:_SHOWN]}"
            f"{' …' if len(names) > _SHOWN else ''} are not among {vocabulary.what}; a "
            f"misspelt finding would be read as absent:\n{shown}{more}\nFix the file, or "
            "pass accept_unknown_findings (--accept_unknown_findings true) to read them as "
            "findings of their own")
    if label_names is None:
        if not seen:
            raise ValueError(f"{what}: the label column names no finding")
        names = sorted(seen)
        index = {n: k for k, n in enumerate(names)}
    else:
        twice = sorted({n for n in label_names if label_names.count(n) > 1})
        if twice:
            raise ValueError(f"{what}: label_names lists {twice} more than once")
        no_finding = [n for n in label_names if n in _NO_FINDING]
        if no_finding:
            raise ValueError(f"{what}: label_names {no_finding}: an image without findings "
                             "has all labels 0; it is not a label of its own")
        columns = []
        for name in label_names:
            found = canonical.get(vocabulary.key(name)) if canonical is not None else name
            if found is None and accept_unknown and name in seen:
                found = name
            if found is None:
                raise ValueError(f"{what}: label_names {name!r} is not among "
                                 f"{vocabulary.what}{_suggestion(name, vocabulary.names)}")
            columns.append(found)
        absent = [n for n, c in zip(label_names, columns) if c not in seen]
        if absent:
            warnings.warn(f"{what}: label_names {absent} occur in none of the {len(cells)} "
                          "rows read; their columns are all 0 and their AUC is undefined "
                          "(reported as NaN)", stacklevel=4)
        names = list(label_names)
        index = {c: k for k, c in enumerate(columns)}
    targets = np.zeros((len(cells), len(names)), dtype=np.float32)
    for row, cell in enumerate(cells):
        if cell is None:
            targets[row] = np.nan
            continue
        for name in cell:
            column = index.get(resolved[name])
            if column is not None:
                targets[row, column] = 1.0
    return targets, names


def _suggestion(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    if not close:
        folded = {n.casefold(): n for n in known}
        close = [folded[c] for c in difflib.get_close_matches(name.casefold(), list(folded),
                                                              n=1)]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_layout_columns(layout: str, detected: bool, records: CSVRecords,
                          image_column: str | None, label_columns: list[str] | None,
                          views: list[str] | None, view_column: str | None,
                          with_labels: bool) -> None:
    """Refuse a file of a known layout that lacks a column the layout needs, naming it."""
    names = set(records.columns)
    needed: list[tuple[str, str]] = []  # (column, what it is for)
    labels = with_labels and label_columns is None
    if layout == "chexpert":
        if image_column is None:
            needed.append(("Path", "the image paths"))
        if labels and names & set(_CHEXPERT_FILE_COLUMNS):
            needed += [(c, "the 14 observations are the labels; label_columns picks some")
                       for c in CHEXPERT_LABELS]
        if views and view_column is None:
            needed.append(("Frontal/Lateral", "it decides frontal against lateral for views"))
    elif layout == "padchest":
        if image_column is None:
            needed.append(("ImageID", "the image file names"))
        if labels:
            needed.append(("Labels", "the findings"))
        if views and view_column is None:
            needed.append(("Projection", "the view of each film, for views"))
    elif layout == "names":
        if image_column is None and names & set(_CHESTXRAY14_COLUMNS):
            needed.append(("Image Index", "the image file names"))
        if labels:
            needed.append(("Finding Labels", "the findings"))
    elif layout == "mimic":
        needed += [("subject_id", "the patients"), ("study_id", "the studies")]
    missing = [(c, why) for c, why in needed if c not in names]
    if not missing:
        return
    said = ", ".join(repr(c) for c, _ in missing)
    reasons = "; ".join(dict.fromkeys(why for _, why in missing))
    how = (f"its header has the signature columns of {_LAYOUT_NAMES[layout]}"
           if detected else f"label_format {layout!r} reads {_LAYOUT_NAMES[layout]}")
    raise ValueError(
        f"{records.path}:{records.header_line}: no column {said} ({reasons}): {how}, which "
        f"has it; columns: {records.columns}"
        + ("; for a table of your own give label_format binary (--label_format binary)"
           if detected else ""))


def _mimic_rows(records: CSVRecords, metadata_csv: str | None
                ) -> tuple[list[str], list[dict[str, str]], list[int], Path, list[int]]:
    """MIMIC's per-study labels joined with its per-image metadata (one row per image):
    columns, rows, each row's line in the labels file, the metadata file and each row's
    line there."""
    csv_file, columns, rows = records.path, records.columns, records.rows
    if "dicom_id" in columns or any(c in columns for c in ("path", "Path")):
        return columns, rows, records.lines, csv_file, records.lines
    if metadata_csv is None:
        found = [csv_file.parent / n for n in _MIMIC_METADATA if (csv_file.parent / n).is_file()]
        if not found:
            raise ValueError(f"{csv_file}: MIMIC-CXR labels are per study; the image list "
                             f"({_MIMIC_METADATA[0]}[.gz], with dicom_id and ViewPosition) "
                             "was not found next to it; give it as metadata_csv")
        metadata = found[0]
    else:
        metadata = Path(metadata_csv)
    meta = read_csv_records(metadata)
    for needed in ("dicom_id", "subject_id", "study_id"):
        if needed not in meta.columns:
            raise ValueError(f"{metadata}:{meta.header_line}: no column {needed!r} "
                             f"(columns: {meta.columns})")
    by_study = {(r["subject_id"], r["study_id"]): (r, line)
                for r, line in zip(rows, records.lines)}
    joined, label_lines, image_lines = [], [], []
    for r, line in zip(meta.rows, meta.lines):
        study = by_study.get((r["subject_id"], r["study_id"]))
        if study is not None:
            joined.append({**r, **study[0]})
            label_lines.append(study[1])
            image_lines.append(line)
    if not joined:
        raise ValueError(f"{metadata}: no image belongs to a study of {csv_file}")
    return (columns + [c for c in meta.columns if c not in columns], joined, label_lines,
            metadata, image_lines)


def _image_paths(layout: str, csv_file: Path, columns: list[str], rows: list[dict[str, str]],
                 image_column: str | None) -> tuple[list[str], str, bool]:
    """Each row's image path, the column (or rule) it came from, and whether that column
    was a guess (the first column, for want of a known name)."""
    if image_column is None and layout == "padchest":
        if "ImageDir" in columns:
            return [f"{r['ImageDir'].strip()}/{r['ImageID']}" if r["ImageDir"].strip()
                    else r["ImageID"] for r in rows], "ImageID", False
        return [r["ImageID"] for r in rows], "ImageID", False
    if image_column is None and layout == "mimic" and "dicom_id" in columns and \
            not any(c in columns for c in ("path", "Path")):
        return [f"files/p{r['subject_id'][:2]}/p{r['subject_id']}/s{r['study_id']}/"
                f"{r['dicom_id']}.jpg" for r in rows], "dicom_id", False
    guessed = False
    if image_column is None:
        image_column = next((c for c in _IMAGE_COLUMN_NAMES if c in columns), None)
        if image_column is None:
            image_column, guessed = columns[0], True
    if image_column not in columns:
        raise ValueError(f"{csv_file}: no column {image_column!r} (columns: {columns})")
    return [r[image_column] for r in rows], image_column, guessed


def _check_image_names(table: LabelTable, guessed: bool) -> None:
    """Refuse an image column that holds no image file names (``'Female'``, ``'Hernia'``):
    none ends in an image suffix and the first is no file (DICOM files may have no
    suffix)."""
    if any(p.strip().lower().endswith(IMAGE_EXTENSIONS) for p in table.paths):
        return
    first = table.paths[0].strip()
    if first and (table.base / first).is_file():
        return
    how = ("no column is named " + "/".join(_IMAGE_COLUMN_NAMES) + ", so the first was taken"
           if guessed else "")
    raise ValueError(
        f"{table.image_where(0)} column {table.path_column!r}: {first!r} is not an image "
        f"file name, and neither is any other cell of the column (none ends in "
        f"{', '.join(IMAGE_EXTENSIONS)}, and {table.base / first} is no file)"
        + (f"; {how}" if how else "") + "; name the image column with image_column "
        "(--image_column)")


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


def _keep_chexpert_views(table: LabelTable, columns: list[str], views: list[str]) -> list[int]:
    """CheXpert: ``Frontal/Lateral`` decides frontal against lateral; a code (``AP``,
    ``PA``) keeps the frontal films whose ``AP/PA`` says it."""
    wanted = {v.strip().lower() for v in views}
    sides = wanted & {"frontal", "lateral"}
    codes = wanted - sides
    lateral_codes = sorted(codes & LATERAL_VIEWS)
    if lateral_codes:
        raise ValueError(
            f"{table.csv_file}: views {lateral_codes}: CheXpert's Frontal/Lateral column decides "
            "which films are lateral, and AP/PA only refines frontal films (a few frontal "
            "films say LL or RL there); use views lateral")
    if codes and "AP/PA" not in columns:
        raise ValueError(f"{table.csv_file}: views {sorted(codes)} are read from column "
                         f"'AP/PA', which this file lacks (columns: {columns})")
    keep = []
    for k, row in enumerate(table.rows):
        side = row["Frontal/Lateral"].strip().lower()
        if side not in ("frontal", "lateral"):
            raise ValueError(f"{table.where(k, 'Frontal/Lateral')}: must be 'Frontal' or "
                             f"'Lateral', got {row['Frontal/Lateral']!r}")
        if side in sides or (side == "frontal" and codes
                             and row["AP/PA"].strip().lower() in codes):
            keep.append(k)
    return keep


def _keep_views(table: LabelTable, columns: list[str], views: list[str],
                view_column: str | None) -> list[int]:
    """Indices of the rows whose view is wanted: by the view column, else (every image a
    DICOM file) by the files' *View Position*."""
    layout = table.label_format
    if view_column is None and layout == "chexpert":
        return _keep_chexpert_views(table, columns, views)
    column = view_column or _VIEW_COLUMNS.get(layout)
    if column is None or column not in columns:
        if all(p.lower().endswith((".dcm", ".dicom")) for p in table.paths):
            return [k for k, path in enumerate(table.paths)
                    if view_matches(_dicom_view(table.base / path), views)]
        raise ValueError(f"{table.csv_file}: views={views} needs a view column "
                         f"({column or 'view_column'}; columns: {columns}), or DICOM "
                         "images whose headers carry ViewPosition")
    decided: dict[str, bool] = {}
    keep = []
    for k, row in enumerate(table.rows):
        value = row[column]
        if value not in decided:
            decided[value] = view_matches(value, views)
        if decided[value]:
            keep.append(k)
    return keep


def read_label_table(csv_file: Path, images_root: str | None = None,
                     image_column: str | None = None, label_columns: list[str] | None = None,
                     label_names: list[str] | None = None, label_format: str = "auto",
                     uncertain_labels: str = "ignore", blank_labels: str = "zeros",
                     views: list[str] | None = None, view_column: str | None = None,
                     metadata_csv: str | None = None, with_labels: bool = True,
                     accept_unknown_findings: bool = False) -> LabelTable:
    """Read a label CSV of any layout (see the module docstring).

    Raises:
        FileNotFoundError: the CSV (or MIMIC's metadata file) does not exist.
        ValueError: an unknown layout or policy, a missing column (a known layout's, or a
            named one; the columns are listed), an image column without image file names,
            a label cell that is not 1, 0, -1 or blank, an unreadable PadChest list, a
            finding name outside the data set's vocabulary (unless
            ``accept_unknown_findings``), a view filter without a view column, or no row
            left; messages name file, physical line and column.

    Warns:
        UserWarning: a ``label_names`` finding occurs in no row (its column is all 0).
    """
    for name, value, allowed in (("label_format", label_format, LABEL_FORMATS),
                                 ("uncertain_labels", uncertain_labels, UNCERTAIN_POLICIES),
                                 ("blank_labels", blank_labels, BLANK_POLICIES)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    csv_file = Path(csv_file)
    records = read_csv_records(csv_file)
    detected = label_format == "auto"
    layout = detect_label_format(records.columns) if detected else label_format
    _check_layout_columns(layout, detected, records, image_column, label_columns, views,
                          view_column, with_labels)
    columns, rows, lines = records.columns, records.rows, records.lines
    image_file, image_lines = csv_file, lines
    if layout == "mimic":
        columns, rows, lines, image_file, image_lines = _mimic_rows(records, metadata_csv)
    for name in [*(label_columns or []), *([view_column] if view_column else [])]:
        if name not in columns:
            raise ValueError(f"{csv_file}:{records.header_line}: no column {name!r} "
                             f"(columns: {columns})")
    paths, path_column, guessed = _image_paths(layout, csv_file, columns, rows, image_column)
    base = Path(images_root) if images_root is not None else _default_base(layout, csv_file, paths)
    table = LabelTable(base, paths, None, label_names, rows, layout,
                       _PATIENT_RULES.get(layout), 0, csv_file, list(lines), image_file,
                       list(image_lines) if image_lines is not lines else [], path_column)
    _check_image_names(table, guessed)
    if views:
        keep = _keep_views(table, columns, views, view_column)
        table.dropped_views = len(table.rows) - len(keep)
        table.select(keep)
        if not table.rows:
            raise ValueError(f"{csv_file}: no image has a view in {views}")
    if with_labels:
        table.targets, table.label_names = _targets(table, columns, label_columns, label_names,
                                                    uncertain_labels, blank_labels,
                                                    accept_unknown_findings)
    return table


def _targets(table: LabelTable, columns: list[str], label_columns: list[str] | None,
             label_names: list[str] | None, uncertain: str, blank: str,
             accept_unknown: bool, layout: str | None = None) -> tuple[np.ndarray, list[str]]:
    layout = layout or table.label_format
    rows, csv_file, where = table.rows, table.csv_file, table.where
    if layout in ("names", "padchest"):
        column = (label_columns or ["Labels" if layout == "padchest" else "Finding Labels"])[0]
        if column not in columns:
            raise ValueError(f"{csv_file}: no column {column!r} (columns: {columns})")
        cells = _finding_cells([r[column] for r in rows], layout,
                               lambda k: where(k, column), blank)
        return _names_to_targets(cells, label_names, _vocabulary(layout, column, label_names),
                                 accept_unknown, lambda k: where(k, column),
                                 f"{csv_file} column {column!r}")
    if label_columns is None and layout in ("chexpert", "mimic"):
        label_columns = [c for c in CHEXPERT_LABELS if c in columns]
    path_column = table.path_column
    if label_columns is None:
        label_columns = [c for c in columns if c != path_column and _is_label_column(rows, c)]
        if not label_columns:
            text_columns = [c for c in columns if c != path_column]
            if len(text_columns) == 1:  # one column of finding names
                return _targets(table, columns, text_columns, label_names, uncertain, blank,
                                accept_unknown, "names")
            raise ValueError(f"{csv_file}: no label column (0/1/-1/blank cells) besides "
                             f"{path_column!r} (columns: {columns}); name them with "
                             "label_columns")
    if len(label_columns) == 1 and not _is_label_column(rows, label_columns[0], False):
        return _targets(table, columns, label_columns, label_names, uncertain, blank,
                        accept_unknown, "names")
    values = np.stack([_column_values(rows, c, where, uncertain, blank) for c in label_columns],
                      axis=1) if rows else np.zeros((0, len(label_columns)), np.float32)
    if label_names is not None and len(label_names) != len(label_columns):
        raise ValueError(f"{csv_file}: label_names has {len(label_names)} names but the data "
                         f"has {len(label_columns)} labels")
    return values, list(label_names or label_columns)
