"""Publishing a saved CAiD folder to the Hugging Face Hub.

Credentials are never handled here: ``HfApi`` finds the token itself (``HF_TOKEN`` or the
``hf auth login`` token file), so no token is accepted, printed, logged or written.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id

REQUIRED_FILES = ("config.json", "model.safetensors")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def check_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` if it is a Hub model id of the form ``namespace/name``, else raise."""
    error = None
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        error = str(exc)
    if error or not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise ValueError(
            f"invalid Hub repo id {repo_id!r}: expected 'namespace/name' (your user or "
            f"organisation, a slash, the model name; letters, digits, '-', '_', '.')"
            + (f" ({error})" if error else ""))
    return repo_id


def _is_skipped(relative: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in relative.parts)


def upload_plan(folder: str | Path) -> list[tuple[str, int]]:
    """Every file below ``folder`` that would be uploaded, as ``(relative posix path, bytes)``.

    Sorted by path; hidden files and folders (``.git``, ``.cache`` ...) and ``__pycache__``
    are left out.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    plan = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.is_file() and not _is_skipped(relative):
            plan.append((relative.as_posix(), path.stat().st_size))
    return sorted(plan)


def check_folder(folder: str | Path) -> list[tuple[str, int]]:
    """Upload plan of ``folder``, refusing one that is not a saved CAiD model."""
    plan = upload_plan(folder)
    missing = [name for name in REQUIRED_FILES if name not in dict(plan)]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a saved model: missing {', '.join(missing)} "
            f"(write it with model.save_pretrained(folder) first)")
    return plan


def _format_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def print_plan(repo_id: str, revision: str | None, plan: list[tuple[str, int]]) -> None:
    """Print the target and every file with its size in bytes (and human-readable)."""
    print(f"repo_id: {repo_id}")
    print(f"revision: {revision or 'main'}")
    print(f"files: {len(plan)}, {sum(size for _, size in plan)} bytes in total")
    for path, size in plan:
        print(f"  {path}  {size} bytes ({_format_size(size)})")


PLACEHOLDER_REPO = "org/name"


def update_card(folder: str | Path, repo_id: str, license: str | None = None,
                license_name: str | None = None, license_link: str | None = None,
                datasets: list[str] | None = None) -> Path:
    """Put ``repo_id`` into every snippet of ``folder/README.md`` (where the card says
    ``org/name``) and set the licence and data sets of its metadata when given. The card
    is rewritten whole (temporary file, then rename)."""
    from huggingface_hub import ModelCard

    path = Path(folder) / "README.md"
    card = ModelCard.load(path)
    if license == "other" and not (license_name and license_link):
        raise ValueError("--license other needs --license-name and --license-link")
    if license is not None:
        card.data.license = license
        if license == "other":
            card.data.license_name, card.data.license_link = license_name, license_link
    if datasets:
        card.data.datasets = list(datasets)
    card.text = card.text.replace(f'"{PLACEHOLDER_REPO}"', f'"{repo_id}"')
    tmp = path.with_name(".tmp-README.md")
    card.save(tmp)
    os.replace(tmp, path)
    return path


EXPORT_CARD = """\
# {library} export of [{repo_id}](https://huggingface.co/{repo_id})

The encoder{what} of the CAiD backbone in the parent folder, saved the way {library} saves
models. Load it from a download of this folder:

```python
{snippet}
```

See the parent folder's card for the training, the data and the licence.
"""


def add_exports(folder: str | Path, repo_id: str) -> list[str]:
    """Write ``smp/`` (a ``segmentation_models_pytorch`` U-Net folder) and, when timm is
    installed, ``timm/`` (a timm ResNet folder) inside a saved CAiD backbone folder, each
    with a short card pointing back. ``smp.from_pretrained`` and ``timm.create_model`` read
    a local folder or a repo root, not a repo's subfolder, hence the snippets download the
    subfolder first. Returns the subfolders written."""
    import importlib.util

    from .modeling_caid import CAiDModel

    folder = Path(folder)
    backbone = CAiDModel.from_pretrained(folder)
    backbone.export_smp(folder / "smp")
    _export_card(folder / "smp", repo_id, "segmentation_models_pytorch", " and U-Net decoder",
                 "import segmentation_models_pytorch as smp", "unet = smp.from_pretrained(folder)")
    written = ["smp"]
    name = backbone.config.encoder_name
    if importlib.util.find_spec("timm") is not None and name.startswith(("resnet", "resnext")):
        import timm.models

        timm.models.save_for_hf(backbone.to_timm(num_classes=0), str(folder / "timm"),
                                safe_serialization=True)
        _export_card(folder / "timm", repo_id, "timm", "", "import timm",
                     'model = timm.create_model("local-dir:" + folder, pretrained=True)')
        written.append("timm")
    return written


def _export_card(folder: Path, repo_id: str, library: str, what: str, import_line: str,
                 load_line: str) -> None:
    """The short README.md of an export subfolder: what it is, how to load it, where from."""
    download = (f'folder = snapshot_download("{repo_id}", allow_patterns=["{folder.name}/*"])'
                f' + "/{folder.name}"')
    snippet = "\n".join([import_line, "from huggingface_hub import snapshot_download", download,
                         load_line])
    (folder / "README.md").write_text(EXPORT_CARD.format(library=library, repo_id=repo_id,
                                                         what=what, snippet=snippet))


def _prepare(folder: str | Path, repo_id: str, fill_card: bool, with_exports: bool,
             license: str | None, license_name: str | None, license_link: str | None,
             datasets: list[str] | None, shown_as: str | Path | None = None
             ) -> list[tuple[str, int]]:
    """Fill the card and write the exports in ``folder``; returns the upload plan."""
    if fill_card and (Path(folder) / "README.md").is_file():
        update_card(folder, repo_id, license=license, license_name=license_name,
                    license_link=license_link, datasets=datasets)
    if with_exports:
        for sub in add_exports(folder, repo_id):
            print(f"export: {sub}/ {'would be ' if shown_as else ''}written into "
                  f"{shown_as or folder}")
    return check_folder(folder)


def push_folder(
    folder: str | Path,
    repo_id: str,
    revision: str | None = None,
    private: bool = False,
    dry_run: bool = False,
    commit_message: str = "Upload CAiD backbone",
    license: str | None = None,
    license_name: str | None = None,
    license_link: str | None = None,
    datasets: list[str] | None = None,
    fill_card: bool = True,
    with_exports: bool = False,
) -> list[tuple[str, int]]:
    """Upload a saved CAiD folder (config, weights, processor, card) to a Hub model repo.

    Args:
        folder: holds at least ``config.json`` and ``model.safetensors``.
        repo_id: ``namespace/name``; the repo is created if it does not exist.
        revision: branch to push to (created from ``main`` when missing); default ``main``.
        private: visibility of a newly created repo (an existing repo keeps its own).
        dry_run: only print what would be uploaded; no network access at all, and the
            folder is not changed (card and exports are prepared on a temporary copy).
        commit_message: message of the Hub commit.
        license, license_name, license_link, datasets: set in the card's metadata (see
            :func:`update_card`); unset ones keep the card's.
        with_exports: also write and upload the ``smp/`` and ``timm/`` export folders
            (:func:`add_exports`).
        fill_card: write the repo id into the card's snippets first (the folder's README.md
            is updated; with ``dry_run`` only the copy's).

    Returns:
        The uploaded (or, with ``dry_run``, the planned) files as ``(path, bytes)``.
    """
    check_repo_id(repo_id)
    check_folder(folder)
    if dry_run:  # the same steps on a copy: what would be uploaded, the folder untouched
        with tempfile.TemporaryDirectory(prefix="caid-hf-dry-run-") as scratch:
            copy = Path(scratch) / Path(folder).name
            shutil.copytree(folder, copy)
            plan = _prepare(copy, repo_id, fill_card, with_exports, license, license_name,
                            license_link, datasets, shown_as=folder)
        print_plan(repo_id, revision, plan)
        print(f"dry run: nothing was uploaded and {folder} was not changed (the sizes are "
              "those of the files as they would be uploaded, the card with the repo id "
              "filled in)")
        return plan
    plan = _prepare(folder, repo_id, fill_card, with_exports, license, license_name,
                    license_link, datasets)
    print_plan(repo_id, revision, plan)

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    # Upload exactly the printed plan: glob.escape keeps odd file names literal patterns.
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                      commit_message=commit_message,
                      allow_patterns=[glob.escape(path) for path, _ in plan])
    return plan
