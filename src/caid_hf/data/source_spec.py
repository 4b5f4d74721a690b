"""Turn the run configuration's source strings into image sources.

One string names any source (``train_source``, ``validation_source``, ``caid-hf
prepare-data SOURCE``):

- ``phantoms``: the embedded synthetic chest phantoms (the first version);
  ``phantoms:cxr14``: the ChestX-ray14-like phantoms with eight findings
  (:mod:`caid_hf.data.chest_phantoms`); ``phantoms:v1`` names the first version;
- a folder made by ``caid-hf prepare-data`` (it holds ``caid_cache.json``): the
  decode-once cache (Arrow shards: random access or a stream; parquet shards: a stream);
- a folder written by ``datasets``' ``save_to_disk``: that dataset (``split`` picks one
  of a DatasetDict);
- any other folder: every PNG, JPEG and DICOM file below it;
- a ``.parquet`` / ``.arrow`` file or glob (``shards/*.parquet``): that Hugging Face dataset;
- any other file: a ChestX-ray14 style split list, paths relative to ``images_root``
  (default: the list's folder);
- ``hf:NAME``: ``datasets.load_dataset(NAME)`` (a Hub id or a local path;
  ``hf:imagefolder`` reads ``images_root`` with datasets' imagefolder builder).
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset, Subset

from .options import HFOptions
from .sources import ImageFolderSource, PhantomSource, SplitListSource

PHANTOMS = "phantoms"
PHANTOM_SPECS = {"phantoms": "v1", "phantoms:v1": "v1", "phantoms:cxr14": "cxr14"}
HF_PREFIX = "hf:"
_HF_FILES = (".parquet", ".arrow")


def is_hf_spec(spec: str) -> bool:
    """Whether ``spec`` names a Hugging Face dataset (``hf:…``, a saved dataset folder, or a
    parquet/arrow file) rather than files or phantoms."""
    from .cache import is_cache
    from .hf_sources import _is_saved_dataset

    if spec.startswith(HF_PREFIX):
        return True
    path = Path(spec)
    is_glob = any(char in spec for char in "*?[")
    return (path.is_dir() and (_is_saved_dataset(str(path)) or is_cache(path))) or (
        path.suffix.lower() in _HF_FILES and (path.is_file() or is_glob))


def open_hf_spec(spec: str, images_root: str | None, options: HFOptions, streaming: bool = False):
    """The ``datasets`` Dataset (or IterableDataset when ``streaming``) a spec names."""
    from .hf_sources import open_hf_dataset

    name = spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else spec
    data_dir = images_root if name == "imagefolder" else None
    return open_hf_dataset(name, split=options.split, config_name=options.config_name,
                           streaming=streaming, data_dir=data_dir)


def source_from_spec(spec: str, images_root: str | None = None, num_phantoms: int = 1000,
                     phantom_size: int = 256, phantom_seed: int = 0,
                     hf_options: HFOptions | None = None, bits_stored: int | None = None):
    """The map-style image source a spec names (see the module docstring); ``bits_stored``
    sets the bit depth of its 16-bit pixels (files it decodes; a cache is decoded already)."""
    source = _open_source(spec, images_root, num_phantoms, phantom_size, phantom_seed,
                          hf_options)
    if bits_stored is not None and hasattr(source, "bits_stored"):
        source.bits_stored = bits_stored
    return source


def _open_source(spec: str, images_root: str | None, num_phantoms: int, phantom_size: int,
                 phantom_seed: int, hf_options: HFOptions | None):
    from .cache import CachedSource, is_cache

    if spec in PHANTOM_SPECS:
        return PhantomSource(num_phantoms, size=phantom_size, seed=phantom_seed,
                             version=PHANTOM_SPECS[spec])
    options = hf_options or HFOptions()
    path = Path(spec)
    if path.is_dir() and is_cache(path):
        return CachedSource(path)
    if is_hf_spec(spec):
        from .hf_sources import HFImageSource

        dataset = open_hf_spec(spec, images_root, options)
        return HFImageSource(dataset, image_column=options.image_column,
                             id_column=options.id_column, name=spec,
                             patient_column=options.patient_column)
    if path.is_dir():
        return ImageFolderSource(path)
    if path.is_file():
        return SplitListSource(path, images_root if images_root is not None else path.parent)
    raise FileNotFoundError(
        f"data source {spec!r} is neither 'phantoms' ('phantoms:cxr14'), 'hf:NAME', an existing split-list file, "
        "a parquet/arrow file nor a folder"
    )


def hold_out(train: Dataset, validation: Dataset, fraction: float, seed: int,
             patients: list[str] | None = None) -> tuple[Subset, Subset]:
    """Hold out ``fraction`` of the indices with a fixed, seeded permutation.

    ``train`` and ``validation`` are two views of the same images (e.g. random and
    fixed crops); the training subset comes from the first, the held-out one from the second.
    With ``patients`` (one id per image, see :mod:`caid_hf.data.patients`), whole patients
    are held out, so no patient has films on both sides.
    """
    from .patients import grouped_hold_out

    kept, held = grouped_hold_out(len(train), fraction, seed, patients)
    return Subset(train, kept), Subset(validation, held)
