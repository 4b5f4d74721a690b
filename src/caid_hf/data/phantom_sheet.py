"""The picture sheet of the ChestX-ray14-like phantoms (``docs/images/phantom_sheet.png``).

Two parts: a grid of phantoms at 256 px with their findings, projection and devices
written under each (how varied the films are), and each finding alone at 64 px and at
256 px with its mask outlined (that every finding shows at the benchmark's view size).
``caid-hf phantoms --version cxr14 --sheet PATH`` draws it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .chest_phantoms import (
    FINDINGS,
    LOCALISED_FINDINGS,
    chest_phantom_labels,
    generate_chest_phantom,
)

__all__ = ["draw_phantom_sheet", "first_alone"]

_SHORT = {"Cardiomegaly": "Cardio", "Emphysema": "Emph", "Effusion": "Eff",
          "Consolidation": "Consol", "Pneumothorax": "PTX", "Atelectasis": "Atel",
          "Nodule": "Nod", "Mass": "Mass"}


def first_alone(finding: str, seed: int = 0, skip: int = 0) -> int:
    """The index of the first phantom (after ``skip`` such) whose only finding is
    ``finding``."""
    k = FINDINGS.index(finding)
    for index in range(20000):
        labels = chest_phantom_labels(index, seed)
        if labels[k] and labels.sum() == 1:
            if not skip:
                return index
            skip -= 1
    raise ValueError(f"no phantom with {finding} alone among the first 20000")


def _caption(phantom) -> str:
    findings = ", ".join(_SHORT[name] for name in phantom.finding_names) or "No Finding"
    short = {"ECG leads": "ECG", "central line": "CVC", "endotracheal tube": "ETT"}
    devices = [short.get(d, d.replace("marker ", "")) for d in phantom.devices]
    return f"{findings}\n{phantom.projection}, CTR {phantom.ctr:.2f}" + (
        f", {'+'.join(devices)}" if devices else "")


def draw_phantom_sheet(path: str | Path, seed: int = 0, count: int = 24) -> Path:
    """Draw the sheet to ``path`` (PNG): phantoms ``0..count-1`` of ``seed`` at 256 px and
    each finding alone (the first phantom of ``seed`` with only it) at 64 and 256 px."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 8
    rows = -(-count // columns)
    figure = plt.figure(figsize=(2.4 * 8, 2.9 * rows + 2 * 2.7 + 0.8), dpi=80)
    grid = figure.add_gridspec(rows + 2, 8, height_ratios=[2.75] * rows + [2.6, 2.6],
                               hspace=0.45, wspace=0.05)
    for index in range(count):
        phantom = generate_chest_phantom(index, 256, seed)
        row, column = divmod(index, columns)
        axis = figure.add_subplot(grid[row, column])
        axis.imshow(phantom.image, cmap="gray", vmin=0, vmax=255)
        axis.set_title(f"#{index}", fontsize=8, pad=2)
        axis.set_xlabel(_caption(phantom), fontsize=8, labelpad=2)
        axis.set_xticks([])
        axis.set_yticks([])
    for column, name in enumerate(FINDINGS):
        index = first_alone(name, seed)
        for row, size in enumerate((64, 256)):
            phantom = generate_chest_phantom(index, size, seed)
            axis = figure.add_subplot(grid[rows + row, column])
            extent = (0, 256, 256, 0)
            axis.imshow(phantom.image, cmap="gray", vmin=0, vmax=255, extent=extent,
                        interpolation="nearest")
            if name in LOCALISED_FINDINGS:
                mask = phantom.masks[LOCALISED_FINDINGS.index(name)]
                step = 256 / size
                centres = (np.arange(size) + 0.5) * step
                axis.contour(centres, centres, mask, levels=[0.5], colors="red",
                             linewidths=0.7)
            axis.set_xticks([])
            axis.set_yticks([])
            label = f"{name} alone, {size} px" + (f"\nCTR {phantom.ctr:.2f}" if row else "")
            axis.set_xlabel(label, fontsize=8, labelpad=2)
    figure.suptitle("ChestX-ray14-like phantoms (cxr14): phantoms 0-23 at 256 px; below, each "
                    "finding alone at 64 px (benchmark view size) and 256 px, mask in red",
                    fontsize=10, y=0.915)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight", pad_inches=0.1)
    plt.close(figure)
    return path
