"""Time to read a full label file: ``read_label_table`` on generated files in the real
layouts, this checkout's code against a baseline checkout's, interleaved in one run.

Files (generated once into --work, seeded):

- CheXpert ``train.csv``: --rows rows (default 200,000): ``Path``, ``Sex``, ``Age``,
  ``Frontal/Lateral``, ``AP/PA`` and the 14 observations (blank, 1.0, 0.0, -1.0 in about
  the real file's shares), frontal and lateral films, 17 frontal films with ``LL`` in
  ``AP/PA`` (read alone, and with ``views`` frontal and lateral: the baseline counted those
  17 as lateral too);
- ChestX-ray14 ``Data_Entry_2017_v2020.csv``: --rows rows, ``Finding Labels`` of one to
  three of the 14 findings or ``No Finding``;
- PadChest's label file: --rows rows of 22 of its columns, ``Labels`` a list literal,
  about 3 % of the reports spanning two to four lines (quoted), as the real file's do.

Each code version runs in a worker process of its own (imported once, ``PYTHONPATH`` its
``src``); the workers take turns, one read at a time, so neither competes with the other.
Each read is timed in the worker's CPU time (``time.process_time``; one thread) and wall
time; the report gives medians over --repeats reads (after one warm-up read) and the ratio
new / baseline. CPU time is the figure to compare on a shared machine.

    git worktree add /tmp/baseline <commit before the change>
    python benchmarks/label_parse.py --baseline /tmp/baseline/src

The first lines name the CPU and the load average while it ran.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_SRC = Path(__file__).resolve().parents[1] / "src"
OBSERVATIONS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]
NIH_FINDINGS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
]
PADCHEST_LABELS = ["normal", "pleural effusion", "cardiomegaly", "nodule", "pneumonia",
                   "aortic elongation", "scoliosis", "chronic changes", "COPD signs",
                   "unchanged", "Chilaiditi sign", "costophrenic angle blunting"]

# The worker: reads "FILE VIEWS" lines on stdin, answers each with the CPU and wall seconds
# of one read_label_table call (JSON), so both versions run the very same calls.
WORKER = r"""
import gc, json, sys, time
from pathlib import Path
import caid_hf.finetuning.label_formats as label_formats
from caid_hf.finetuning.label_formats import read_label_table
print(json.dumps({"module": label_formats.__file__}), flush=True)
for line in sys.stdin:
    name, views = line.split()
    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    table = read_label_table(Path(name), views=None if views == "-" else views.split(","))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    answer = {"cpu": cpu, "wall": wall, "rows": len(table.paths),
              "labels": len(table.label_names)}
    del table
    print(json.dumps(answer), flush=True)
"""


def write_chexpert(path: Path, rows: int, rng: random.Random) -> None:
    quirks = set(rng.sample(range(rows), 17))  # frontal films that say LL / RL in AP/PA
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS])
        for k in range(rows):
            lateral = k % 7 == 6
            view = "view2_lateral" if lateral else "view1_frontal"
            appa = "" if lateral else ("LL" if k in quirks else rng.choice(["AP", "AP", "PA"]))
            cells = rng.choices(["", "1.0", "0.0", "-1.0"], weights=[70, 15, 10, 5],
                                k=len(OBSERVATIONS))
            writer.writerow([f"CheXpert-v1.0-small/train/patient{k // 4 + 1:05d}/study1/"
                             f"{view}.jpg", rng.choice(["Female", "Male"]),
                             str(rng.randint(18, 90)), "Lateral" if lateral else "Frontal",
                             appa, *cells])


def write_nih(path: Path, rows: int, rng: random.Random) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID",
                         "Patient Age", "Patient Gender", "View Position",
                         "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"])
        for k in range(rows):
            found = ("No Finding" if rng.random() < 0.54 else
                     "|".join(rng.sample(NIH_FINDINGS, rng.choice([1, 1, 2, 3]))))
            writer.writerow([f"{k // 3 + 1:08d}_{k % 3:03d}.png", found, str(k % 3),
                             str(k // 3 + 1), str(rng.randint(1, 95)), rng.choice("MF"),
                             rng.choice(["PA", "AP"]), "2500", "2048", "0.168", "0.168"])


def write_padchest(path: Path, rows: int, rng: random.Random) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([
            "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
            "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection",
            "Pediatric", "Modality_DICOM", "PixelRepresentation_DICOM", "BitsStored_DICOM",
            "ReportID", "Report", "MethodLabel", "Labels", "Localizations",
            "LabelsLocalizationsBySentence", "labelCUIS", "LocalizationsCUIS"])
        for k in range(rows):
            labels = repr(rng.sample(PADCHEST_LABELS, rng.choice([1, 1, 2, 3])))
            lines = rng.choice([2, 3, 4]) if rng.random() < 0.03 else 1
            report = "\n".join(f"hallazgo {j} sin cambios significativos" for j in range(lines))
            projection = rng.choice(["PA", "PA", "L", "AP_horizontal"])
            writer.writerow([
                f"21684011136696401281920706111{k:08d}_04-024-184.png", str(k % 50),
                "20100315", f"study{k // 2}", f"patient{k // 3}", "1948.0", rng.choice("MF"),
                "POSTEROANTERIOR", projection, "Manual review of DICOM fields", "No", "CR",
                "0", "12", str(4765777 + k), report, "Physician", labels, "[]",
                f"[{labels}]", "[]", "[]"])


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def start_worker(src: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    worker = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    module = json.loads(worker.stdout.readline())["module"]
    if not Path(module).resolve().is_relative_to(src.resolve()):
        raise RuntimeError(f"the worker for {src} imported {module}")
    return worker


def ask(worker: subprocess.Popen, path: Path, views: str) -> dict:
    worker.stdin.write(f"{path} {views}\n")
    worker.stdin.flush()
    answer = worker.stdout.readline()
    if not answer:
        raise RuntimeError(f"the worker reading {path} stopped (exit {worker.wait()})")
    return json.loads(answer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, default=None,
                        help="src folder of the baseline checkout (git worktree) to compare with")
    parser.add_argument("--rows", type=int, default=200_000, help="Rows of every file.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed reads per file and code.")
    parser.add_argument("--work", type=Path, default=None, help="Folder for the files "
                        "(default: a temporary one).")
    parser.add_argument("--files", nargs="+", default=["chexpert", "chexpert-frontal",
                                                       "chexpert-lateral", "nih", "padchest"])
    a = parser.parse_args()
    print(f"CPU: {cpu_model_name()}; {len(os.sched_getaffinity(0))} cores usable; load "
          f"average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as scratch:
        work = a.work or Path(scratch)
        rng = random.Random(0)
        files = {"chexpert": (work / "CheXpert-v1.0-small" / "train.csv", write_chexpert, "-"),
                 "nih": (work / "Data_Entry_2017_v2020.csv", write_nih, "-"),
                 "padchest": (work / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",
                              write_padchest, "-")}
        files["chexpert-frontal"] = (*files["chexpert"][:2], "frontal")
        files["chexpert-lateral"] = (*files["chexpert"][:2], "lateral")
        for path, writer, _ in files.values():
            if not path.is_file():
                writer(path, a.rows, rng)
        workers = {"new": start_worker(REPO_SRC)}
        if a.baseline is not None:
            workers = {"baseline": start_worker(a.baseline), **workers}
        print(f"{a.rows:,} rows per file; {a.repeats} timed reads each (after one warm-up), "
              f"{' and '.join(workers)} taking turns; medians of CPU seconds (wall seconds)")
        try:
            for name in a.files:
                path, _, views = files[name]
                times = {version: [] for version in workers}
                shape = {}
                for repeat in range(a.repeats + 1):
                    order = list(workers) if repeat % 2 == 0 else list(reversed(workers))
                    for version in order:
                        answer = ask(workers[version], path, views)
                        shape[version] = (answer["rows"], answer["labels"])
                        if repeat:
                            times[version].append((answer["cpu"], answer["wall"]))
                parts = []
                for version, pairs in times.items():
                    cpu = statistics.median(c for c, _ in pairs)
                    wall = statistics.median(w for _, w in pairs)
                    parts.append(f"{version} {cpu:.2f} s ({wall:.2f} s)")
                line = f"{name:>17}: {', '.join(parts)}"
                if "baseline" in times:
                    ratio = (statistics.median(c for c, _ in times["new"])
                             / statistics.median(c for c, _ in times["baseline"]))
                    line += f"; new / baseline {ratio:.2f}"
                rows = ", ".join(f"{v} {r:,} rows x {n} labels" for v, (r, n) in shape.items())
                print(f"{line}  [{rows}]", flush=True)
        finally:
            for worker in workers.values():
                worker.stdin.close()
                worker.wait()
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
