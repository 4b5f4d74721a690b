"""What several test modules share: the tiny pre-training run's flags, files and images built
byte by byte, and reference computations. Test modules import from here, never from each
other."""

from __future__ import annotations

import csv
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from safetensors.torch import load_file

from caid_hf.data.phantoms import generate_phantom
from caid_hf.finetuning.label_formats import CHEXPERT_LABELS
from caid_hf.training.checkpointing import MARKER, safe_torch_load

ROOT = Path(__file__).resolve().parents[1]

# The tiny pre-training run every training test starts from: a ResNet-18 U-Net, 64 px views
# of 96 px phantoms, batches of 8 (4 steps per epoch of 32 phantoms), no loader workers.
TINY_PRETRAINING = {
    "encoder_name": "resnet18", "image_size": 64, "queue_size": 64, "projection_dim": 16,
    "train_source": "phantoms", "num_train_phantoms": 32, "num_validation_phantoms": 8,
    "phantom_size": 96, "per_device_train_batch_size": 8, "dataloader_num_workers": 0,
    "report_to": "none", "logging_steps": 1,
}


def tiny_pretraining_args(**changes) -> list[str]:
    """The tiny run's flags with ``changes`` applied (a value of None drops the flag)."""
    values = {**TINY_PRETRAINING, **changes}
    return [item for name, value in values.items() if value is not None
            for item in (f"--{name}", str(value).lower() if isinstance(value, bool) else str(value))]


TINY = tiny_pretraining_args()


# -- images and files --------------------------------------------------------------------

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int, colour: int, raw: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(raw, 9)) + png_chunk(b"IEND", b""))


def short_data_png(size: int = 64) -> bytes:
    """A well-formed 8-bit grey PNG (every chunk and CRC right) whose image data holds only
    half of the rows: libpng says "Not enough image data"."""
    image = generate_phantom(0, size)[0]
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(size // 2))
    return png_bytes(size, size, 8, 0, raw)


def bomb_png(side: int = 20000) -> bytes:
    """A 1-bit grey PNG of ``side`` x ``side`` pixels (400 M at 20000): a few tens of KB."""
    row = b"\x00" * (1 + (side + 7) // 8)
    return png_bytes(side, side, 1, 0, row * side)


def write_phantom_png(path: Path, index: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(generate_phantom(index, size=32)[0]).save(path)



NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
              "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
              "OriginalImagePixelSpacing[x", "y]"]  # Data_Entry_2017_v2020.csv


def write_nih(root: Path, findings: list[str], views: list[str] | None = None,
              films_per_patient: int = 2, drop: str | None = None, name="Data_Entry_2017_v2020.csv",
              first_patient: int = 1) -> Path:
    """ChestX-ray14's Data_Entry_2017_v2020.csv (one row per film, ``findings[k]`` its
    Finding Labels) with the images in ``images/``."""
    rows = []
    for k, finding in enumerate(findings):
        patient, follow_up = first_patient + k // films_per_patient, k % films_per_patient
        image = f"{patient:08d}_{follow_up:03d}.png"
        write_phantom_png(root / "images" / image, k)
        view = views[k] if views else ("PA", "AP")[k % 2]
        rows.append([image, finding, str(follow_up), str(patient), str(40 + k % 30),
                     "MF"[k % 2], view, "2500", "2048", "0.168", "0.168"])
    keep = [j for j, c in enumerate(NIH_HEADER) if c != drop]
    table = root / name
    with table.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerows([[row[j] for j in keep] for row in [NIH_HEADER, *rows]])
    return table



# -- DICOM ---------------------------------------------------------------------------------

SIDE = 8

def grey_dicom(pixels: np.ndarray, **elements) -> Dataset:
    """An uncompressed grey DICOM (Part 10 file meta included) holding ``pixels``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = elements.pop("PhotometricInterpretation", "MONOCHROME2")
    ds.BitsAllocated = 16
    ds.BitsStored = elements.pop("BitsStored", 16)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


# 12-bit MONOCHROME1 radiograph: displayed value = 2 * stored - 1000, window [1000, 3000].
STORED = np.array([0, 1000, 1250, 1500, 2100, 4095], dtype=np.uint16)


def twelve_bit_monochrome1() -> Dataset:
    pixels = np.resize(STORED, (SIDE, SIDE)).astype(np.uint16)
    return grey_dicom(
        pixels,
        PhotometricInterpretation="MONOCHROME1",
        BitsStored=12,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=2000,
        WindowWidth=2000,
    )



# -- discrimination methods ----------------------------------------------------------------

def random_views(batch: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """(query, key, target, key target) of ``batch`` random 64 px images."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, c, 64, 64, generator=g) for c in (3, 3, 1, 1)]


def reference_projections(model, query: torch.Tensor, key: torch.Tensor):
    """The query's encoder features and both views' projections, computed directly from
    the model's modules (encoder → global average pool → projector), for checking losses."""
    features = model.caid.encoder(query)
    z1 = model.objective.projector(features[-1].mean((2, 3)))
    z2 = model.objective.projector(model.caid.encoder(key)[-1].mean((2, 3)))
    return features, z1, z2


# -- label tables and checkpoints ---------------------------------------------------------

RNG_SEED = 7


def label_cells(rng, n: int, width: int) -> list[list[str]]:
    """CheXpert-style cells: 1.0, 0.0, -1.0 and blank, all four in every column."""
    choices = np.array(["1.0", "0.0", "-1.0", ""])
    cells = rng.choice(choices, size=(n, width), p=[0.3, 0.3, 0.2, 0.2])
    cells[:4] = np.array(["1.0", "0.0", "-1.0", ""])[:, None]  # every value occurs
    cells[4:6] = np.array(["1.0", "0.0"])[:, None]
    return cells.tolist()


def write_chexpert(root: Path, patients: int = 12, seed: int = RNG_SEED) -> Path:
    """CheXpert-v1.0-small/train.csv: 2 studies × (frontal, lateral) per patient."""
    rng = np.random.default_rng(seed)
    folder = root / "CheXpert-v1.0-small"
    rows, k = [], 0
    for p in range(1, patients + 1):
        for study in (1, 2):
            for view, (fl, appa) in enumerate((("Frontal", "AP" if p % 2 else "PA"),
                                               ("Lateral", ""))):
                path = (f"CheXpert-v1.0-small/train/patient{p:05d}/study{study}/"
                        f"view{view + 1}_{fl.lower()}.jpg")
                write_phantom_png(root / path, k)
                rows.append([path, "Female" if p % 2 else "Male", str(40 + p), fl, appa])
                k += 1
    labels = label_cells(rng, len(rows), len(CHEXPERT_LABELS))
    table = folder / "train.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS])
        writer.writerows(r + c for r, c in zip(rows, labels))
    return table


# -- DICOM files -----------------------------------------------------------------------

def write_dicom(path, pixels, *, photometric="MONOCHROME2", bits_stored=12, **elements):
    """A single-frame DICOM file of ``pixels`` ([H, W] grey or [H, W, 3] RGB)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    dataset.Rows, dataset.Columns = pixels.shape[:2]
    dataset.PhotometricInterpretation = photometric
    dataset.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        dataset.PlanarConfiguration = 0
    dataset.BitsAllocated = pixels.dtype.itemsize * 8
    dataset.BitsStored = bits_stored
    dataset.HighBit = bits_stored - 1
    dataset.PixelRepresentation = int(pixels.dtype.kind == "i")
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    dataset.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def final_state(out: Path, step: int = 10) -> tuple[dict, dict]:
    folder = out / "checkpoints" / f"checkpoint_{step}"
    assert (folder / MARKER).is_file()
    return load_file(folder / "model.safetensors"), safe_torch_load(folder / "optimizer.bin")


def assert_identical_runs(a: Path, b: Path, step: int = 10) -> None:
    (weights_a, optim_a), (weights_b, optim_b) = final_state(a, step), final_state(b, step)
    assert weights_a.keys() == weights_b.keys() and "objective.queue" in weights_a
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    assert optim_a["state"].keys() == optim_b["state"].keys()
    for index, slots in optim_a["state"].items():
        for name, value in slots.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(optim_b["state"][index][name]))
