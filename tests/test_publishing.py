"""Publishing: the upload plan, dry runs, refusals, a live push (when possible) and loading a
published model by repo id from the HF cache without network."""

import hashlib
import os
import shutil
import urllib.error
import urllib.request
import uuid

import pytest
import torch
from huggingface_hub import constants, scan_cache_dir

from caid_hf import CAiDConfig, CAiDModel
from caid_hf.model_card import write_model_card
from caid_hf.publishing import push_folder, upload_plan


@pytest.fixture
def saved_folder(tmp_path):
    """A published folder as training writes it: backbone, card, plus clutter never uploaded."""
    folder = tmp_path / "best"
    CAiDModel(CAiDConfig(encoder_name="resnet18", image_size=64)).save_pretrained(folder)
    write_model_card(folder)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "upload.lock").write_text("x")
    (folder / ".DS_Store").write_text("x")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "x.pyc").write_bytes(b"\0")
    return folder


def expected_files(folder):
    return sorted((p.name, os.stat(p).st_size) for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith("."))


def test_upload_plan_lists_exactly_the_saved_files(saved_folder):
    plan = upload_plan(saved_folder)
    assert [path for path, _ in plan] == ["README.md", "config.json", "configuration_caid.py",
                                          "model.safetensors", "model_settings.py",
                                          "modeling_caid.py"]
    assert plan == expected_files(saved_folder)


def test_upload_plan_includes_subfolders(saved_folder):
    (saved_folder / "extra").mkdir()
    (saved_folder / "extra" / "notes.txt").write_text("hello")
    assert ("extra/notes.txt", 5) in upload_plan(saved_folder)


def test_dry_run_prints_repo_revision_and_every_file(saved_folder, capsys, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a dry run must not touch the Hub")

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", no_network)
    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", no_network)
    plan = push_folder(saved_folder, "org/caid-resnet18", revision="v1", dry_run=True)
    out = capsys.readouterr().out

    on_disk = dict(expected_files(saved_folder))
    assert dict(plan).keys() == on_disk.keys()
    # every file as it is, the card as it would be uploaded (the repo id filled in: longer)
    assert {p: s for p, s in plan if p != "README.md"} == {
        p: s for p, s in on_disk.items() if p != "README.md"}
    assert dict(plan)["README.md"] > on_disk["README.md"]
    assert "repo_id: org/caid-resnet18" in out and "revision: v1" in out
    for path, size in plan:
        assert f"  {path}  {size} bytes" in out
    assert ".DS_Store" not in out and "__pycache__" not in out and ".cache" not in out
    push_folder(saved_folder, "org/caid-resnet18", dry_run=True)
    assert "revision: main" in capsys.readouterr().out


def test_folder_without_weights_is_refused(saved_folder):
    (saved_folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        push_folder(saved_folder, "org/caid", dry_run=True)


@pytest.mark.parametrize("repo_id", ["caid-resnet18", "org/name/extra", "org/bad name",
                                     "/name", "org/", "org/na--me"])
def test_bad_repo_id_is_refused(saved_folder, repo_id):
    with pytest.raises(ValueError, match="invalid Hub repo id"):
        push_folder(saved_folder, repo_id, dry_run=True)


def _why_no_live_push() -> str | None:
    if not os.environ.get("HF_TOKEN"):
        return "HF_TOKEN is not set"
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set (run with HF_HUB_OFFLINE=0 to push)"
    try:
        urllib.request.urlopen(f"{constants.ENDPOINT}/api/models?limit=1", timeout=3)
    except (urllib.error.URLError, OSError) as exc:
        return f"the Hub ({constants.ENDPOINT}) is not reachable: {exc}"
    return None


def test_live_push(saved_folder, capsys):
    reason = _why_no_live_push()
    if reason:
        pytest.skip(f"live push not run: {reason}")
    from huggingface_hub import HfApi

    api = HfApi()
    repo_id = f"{api.whoami()['name']}/caid-hf-test-{uuid.uuid4().hex[:8]}"
    try:
        plan = push_folder(saved_folder, repo_id, revision="test-branch", private=True)
        remote = set(api.list_repo_files(repo_id, revision="test-branch"))
        assert {path for path, _ in plan} <= remote
        assert ".DS_Store" not in remote and "__pycache__/x.pyc" not in remote
        assert os.environ["HF_TOKEN"] not in capsys.readouterr().out
    finally:
        api.delete_repo(repo_id, missing_ok=True)


def _lay_out_hub_cache(cache, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    """Write ``folder`` into ``cache`` as huggingface_hub's downloads do: content-addressed
    blobs, a snapshot of relative symlinks to them, and ``refs/main`` naming the commit
    (https://huggingface.co/docs/huggingface_hub/guides/manage-cache). huggingface_hub has no
    public helper that writes a cache without downloading, hence by hand."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path, _ in upload_plan(folder):
        data = (folder / path).read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / path).symlink_to(f"../../blobs/{blob}")
    return snapshot


def test_offline_load_by_repo_id_from_the_hub_cache(tmp_path, monkeypatch):
    folder = tmp_path / "published"
    model = CAiDModel(CAiDConfig(encoder_name="resnet18", image_size=64))
    model.save_pretrained(folder)
    cache = tmp_path / "hub-cache"
    _lay_out_hub_cache(cache, "org/caid-resnet18", folder)
    shutil.rmtree(folder)  # only the cache is left to load from

    # huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE into `constants` once, at import
    # (conftest sets HF_HUB_OFFLINE=1 before that). Setting the variables now would be
    # ignored, so the test also patches the constants, which huggingface_hub and
    # transformers look up at call time; it then loads once through the defaults (as a user
    # who exported the variables before starting Python does) and once with cache_dir=.
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    cached = scan_cache_dir(cache)  # the layout is one huggingface_hub itself accepts
    assert [r.repo_id for r in cached.repos] == ["org/caid-resnet18"]
    assert {f.file_name for r in cached.repos for rev in r.revisions for f in rev.files} == {
        "config.json", "model.safetensors", "configuration_caid.py", "model_settings.py",
        "modeling_caid.py"}

    expected = model.state_dict()
    for loaded in (CAiDModel.from_pretrained("org/caid-resnet18"),
                   CAiDModel.from_pretrained("org/caid-resnet18", cache_dir=cache)):
        state = loaded.state_dict()
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(state[key], value), key

    with pytest.raises(OSError):  # offline and not cached: a clear failure, no download
        CAiDModel.from_pretrained("org/not-in-the-cache")


def test_cli_push_dry_run_changes_nothing_and_says_so(tmp_path, capsys):
    """A dry run with a card to fill and exports to write: every file keeps its bytes and
    modification time, no file is added, and the output says nothing was uploaded."""
    import os
    import time

    from caid_hf import CAiDConfig, CAiDModel
    from caid_hf.cli import main as cli
    from caid_hf.model_card import write_model_card
    from caid_hf.publishing import update_card

    tmp_path = tmp_path / "best"
    CAiDModel(CAiDConfig(encoder_name="resnet18", image_size=64)).save_pretrained(tmp_path)
    write_model_card(tmp_path)
    assert '"org/name"' in (tmp_path / "README.md").read_text()
    old = time.time() - 3600  # an hour ago: a rewrite would move it to now
    for path in tmp_path.iterdir():
        os.utime(path, (old, old))
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    cli(["push", str(tmp_path), "you/caid-demo", "--dry-run", "--with-exports"])
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    assert after == before
    printed = capsys.readouterr().out
    assert f"dry run: nothing was uploaded and {tmp_path} was not changed" in printed
    listed = dict(line.split()[:2] for line in printed.splitlines()
                  if line.startswith("  ") and " bytes" in line)
    # the card as it would be uploaded: the repo id in place of the placeholder
    filled = tmp_path.parent / "filled"
    filled.mkdir()
    shutil.copy(tmp_path / "README.md", filled / "README.md")
    update_card(filled, "you/caid-demo")
    assert '"you/caid-demo"' in (filled / "README.md").read_text()
    assert int(listed["README.md"]) == (filled / "README.md").stat().st_size
    assert "smp/model.safetensors" in listed and "timm/config.json" in listed


def test_cli_push_dry_run_lists_the_folder(tmp_path, capsys):
    from caid_hf import CAiDConfig, CAiDModel
    from caid_hf.cli import main as cli

    CAiDModel(CAiDConfig(encoder_name="resnet18", image_size=64)).save_pretrained(tmp_path)
    cli(["push", str(tmp_path), "org/caid-demo", "--revision", "dev", "--dry-run"])
    printed = capsys.readouterr().out
    assert "org/caid-demo" in printed and "dev" in printed
    for path in tmp_path.iterdir():
        assert f"{path.name}  {path.stat().st_size} bytes" in printed
