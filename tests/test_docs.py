"""The README's and docs' text: links resolve, and every shell and Python block either runs on
the embedded data or says why not (``<!-- not run: reason -->`` on the line before it).

The runnable blocks are executed (slow tests), one file at a time, top to bottom, in a
scratch folder that holds the repository's ``configs/`` and ``scripts/``. The demo and
phantom fine-tuning configs there are shrunk to a few steps on a few phantoms, so the
commands run verbatim but in seconds. Install prefixes (``python3 -m venv .venv && ... pip
install ... &&``) are dropped: the test runs inside the installed environment.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*DOCUMENTS, ROOT / "benchmarks" / "RESULTS.md", ROOT / "CHANGELOG.md"]
RUNNABLE_LANGUAGES = {"bash", "sh", "python"}
BLOCK = re.compile(r"^(?:<!-- not run: (?P<reason>[^\n]*?) -->\n)?```(?P<lang>[\w-]*)\n"
                   r"(?P<body>.*?)^```\s*$", re.S | re.M)
INSTALL_PREFIX = re.compile(r"^python3 -m venv \.venv && \. \.venv/bin/activate && "
                            r"pip install -e \S+ && ", re.M)
PLACEHOLDERS = ("…", " ...", "[--")

# The shipped configs, shrunk for the scratch folder: same keys, a few steps, a few phantoms.
TINY = {
    "demo.yaml": {"max_steps": 4, "num_train_phantoms": 128, "num_validation_phantoms": 16,
                  "per_device_train_batch_size": 8, "queue_size": 64, "probe_steps": 4,
                  "probe_num_images": 48, "logging_steps": 2},
    "finetune_phantoms_classification.yaml": {"num_train_phantoms": 48,
                                              "num_validation_phantoms": 24,
                                              "num_test_phantoms": 32, "num_train_epochs": 1,
                                              "per_device_train_batch_size": 16},
    "finetune_phantoms_segmentation.yaml": {"num_train_phantoms": 160, "max_steps": 4,
                                            "eval_steps": 2, "num_validation_phantoms": 16,
                                            "num_test_phantoms": 16},
}


@dataclasses.dataclass
class Block:
    path: Path
    line: int
    language: str
    body: str
    reason: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    text = path.read_text()
    return [Block(path, text.count("\n", 0, m.start("lang")) + 1, m["lang"], m["body"],
                  m["reason"]) for m in BLOCK.finditer(text)]


def runnable(path: Path) -> list[Block]:
    return [b for b in code_blocks(path) if b.language in RUNNABLE_LANGUAGES and not b.reason]


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (outside code blocks)."""
    text = BLOCK.sub("", path.read_text())
    anchors = set()
    for title in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower().replace("`", ""))
        anchors.add(slug.replace(" ", "-"))
    return anchors


def test_the_block_parser_reads_fences_reasons_and_languages(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```bash\necho one\n```\n\n<!-- not run: needs a GPU -->\n"
                    "```python\nimport torch\n```\n\n```text\nplain\n```\n")
    blocks = code_blocks(page)
    assert [(b.line, b.language, b.body, b.reason) for b in blocks] == [
        (3, "bash", "echo one\n", None), (8, "python", "import torch\n", "needs a GPU"),
        (12, "text", "plain\n", None)]
    assert [b.body for b in runnable(page)] == ["echo one\n"]


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(path):
    text = BLOCK.sub("", path.read_text())
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            broken.append(f"{target} (no heading '{anchor}')")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {broken}"


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_code_block_runs_or_says_why_not(path):
    blocks = code_blocks(path)
    text = path.read_text()
    assert text.count("```") == 2 * len(blocks), f"{path}: an unclosed or indented fence"
    for block in blocks:
        if not block.language:  # a listing; a command in it would escape this test
            assert not re.match(r"\s*(\$ )?(caid-hf|accelerate|python|import|from) ",
                                block.body), f"{block.where}: a command in a plain fence"
        if block.language in RUNNABLE_LANGUAGES and not block.reason:
            for placeholder in PLACEHOLDERS:
                assert placeholder not in block.body, (
                    f"{block.where}: a runnable block holds the placeholder {placeholder!r}; "
                    "write the real command or mark it <!-- not run: why -->")


def test_the_readme_is_short_and_usage_first():
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 260
    first_python = next(i for i, line in enumerate(lines, 1) if line == "```python")
    assert first_python <= 60
    # the quick start's main command is the demo, after the install
    demo = runnable(ROOT / "README.md")[0]
    assert INSTALL_PREFIX.sub("", demo.body).strip() == "caid-hf pretrain --config configs/demo.yaml"


def _workspace(folder: Path) -> Path:
    """A scratch folder with the repository's configs (shrunk) and scripts."""
    shutil.copytree(ROOT / "configs", folder / "configs")
    for name, changes in TINY.items():
        path = folder / "configs" / name
        config = yaml.safe_load(path.read_text())
        assert set(changes) <= set(config) | {"probe_num_images"}, name
        path.write_text(yaml.safe_dump({**config, **changes}, sort_keys=False))
    (folder / "scripts").symlink_to(ROOT / "scripts")
    (folder / "docs" / "images").mkdir(parents=True)
    return folder


def _environment(cache: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "HF_HUB_OFFLINE": "1", "CAID_HF_CACHE": str(cache), "MPLBACKEND": "Agg",
            "PYTHONPATH": str(ROOT / "src")}


def _run(block: Block, folder: Path, env: dict[str, str]) -> None:
    body = INSTALL_PREFIX.sub("", block.body)
    command = ([sys.executable, "-c", body] if block.language == "python"
               else ["bash", "-euo", "pipefail", "-c", body])
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, (f"{block.where} failed ({done.returncode}):\n{body}\n"
                                  f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n"
                                  f"{done.stderr[-3000:]}")


@pytest.fixture(scope="module")
def demo_workspace(tmp_path_factory):
    """A scratch folder where the (shrunk) quick-start demo has run: outputs/demo exists."""
    folder = _workspace(tmp_path_factory.mktemp("docs_base"))
    env = _environment(tmp_path_factory.mktemp("step_settings"))
    readme_demo = runnable(ROOT / "README.md")[0]
    _run(readme_demo, folder, env)
    return folder, env


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in DOCUMENTS if runnable(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_runnable_blocks_run(path, demo_workspace, tmp_path):
    base, env = demo_workspace
    folder = _workspace(tmp_path / "work")
    shutil.copytree(base / "outputs", folder / "outputs")
    blocks = runnable(path)
    if path.name == "README.md":  # its first block is the demo, which the fixture ran
        blocks = blocks[1:]
    for block in blocks:
        _run(block, folder, env)


def test_every_long_module_says_which_one_idea_it_holds():
    """A module over 500 lines is listed in docs/development.md with the one idea it holds."""
    table = (ROOT / "docs" / "development.md").read_text()
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", table, flags=re.M))
    package = ROOT / "src" / "caid_hf"
    long = {str(p.relative_to(package)) for p in package.rglob("*.py")
            if len(p.read_text().splitlines()) > 500}
    assert long <= listed, f"over 500 lines, not in docs/development.md: {sorted(long - listed)}"
    assert listed <= {str(p.relative_to(package)) for p in package.rglob("*.py")}
