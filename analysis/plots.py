"""Figures of the analysis (matplotlib, Agg backend: no display needed on a cluster node).

  heatmaps.png     layer x task panels: ARank ratio, cosine (block / attn / MLP), loss when skipped,
                   planned capacity (1 = full layer)
  interaction.png  task x task loss increase when pruned by another task's measurements
  probes.png       per task: loss vs removed compute for depth pruning (3 granularities) and width pruning
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")  # before pyplot: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _heat(ax, values_LT: np.ndarray, tasks: list[str], title: str, fmt: str = "{:.2f}") -> None:
    im = ax.imshow(values_LT, aspect="auto", cmap="viridis")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(values_LT.shape[0]))
    ax.set_ylabel("layer")
    ax.figure.colorbar(im, ax=ax, fraction=0.046)
    if values_LT.size <= 200:  # numbers stay readable only on small grids
        for (r, c), v in np.ndenumerate(values_LT):
            ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=6, color="w")


def layer_task_heatmaps(panels: Mapping[str, Mapping[str, list[float]]], tasks: list[str], path: Path) -> Path:
    """`panels[title][task]` is a per-layer list; one layer x task heat-map per title."""
    n = len(panels)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, per_task) in zip(axes.flat, panels.items()):
        _heat(ax, np.array([per_task[t] for t in tasks]).T, tasks, title)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def interaction_heatmaps(inter: Mapping[str, Any], tasks: list[str], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.4))
    for ax, key, title in ((axes[0], "blocks", f"skip A's {inter['n_layers']} most redundant blocks"),
                           (axes[1], "width", f"prune {inter['width_fraction']:.0%} MLP neurons by A")):
        m = np.array([[inter[key][a][b] for b in tasks] for a in tasks])
        im = ax.imshow(m, cmap="magma")
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xlabel("B (loss measured)")
        ax.set_ylabel("A (pruned by)")
        ax.set_title(f"{title}\nloss increase of B", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
        for (r, c), v in np.ndenumerate(m):
            ax.text(c, r, f"{v:.3f}", ha="center", va="center", fontsize=7, color="c")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def probe_curves(depth: Mapping[str, Any], width: Mapping[str, Any], tasks: list[str], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for kind, rows in depth[task].items():
            ax.plot([0] + [r["removed_compute"] for r in rows], [0] + [r["delta_loss"] for r in rows],
                    marker="o", label=f"drop {kind}")
        rows = width[task]
        ax.plot([0] + [r["removed_compute"] for r in rows], [0] + [r["delta_loss"] for r in rows],
                marker="s", label="MLP width")
        ax.set_title(task)
        ax.set_xlabel("removed forward compute")
        ax.set_ylabel("validation loss increase")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
