"""Metrics as JSONL (one record per update) and PNG curves of reward and sampled accuracy."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np


class MetricsLog:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def read(self) -> List[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate(self, last_update: int):
        """Keep the records of updates <= last_update (-1: none), e.g. when resuming."""
        keep = [r for r in self.read() if r.get("update", 0) <= last_update]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def write(self, record: dict):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def series(records: List[dict], key: str):
    pts = [(r["update"], r[key]) for r in records if key in r and r[key] is not None]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)


def trailing_mean(y: np.ndarray, k: int) -> np.ndarray:
    """Mean of the last k values at each point (fewer at the start)."""
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(1, len(y) + 1)
    lo = np.maximum(0, i - k)
    return (c[i] - c[lo]) / (i - lo)


def plot_curves(runs: Dict[str, List[List[dict]]], path: str, title: Optional[str] = None):
    """One line per mode (mean over its runs, shaded min-max): training reward and sampled eval accuracy."""
    plot_panels(runs, path, (("reward", "training reward (mean outcome)", True),
                             ("eval_accuracy", "sampled accuracy, held-out prompts", False)), title)


def plot_panels(runs: Dict[str, List[List[dict]]], path: str, panels, title: Optional[str] = None):
    """One panel per ``(metric key, title, smooth)``; in each, one line per mode (mean over its runs, shaded
    min-max, one colour per mode across panels). ``smooth``: trailing mean over ~1/15 of the updates (for
    per-update metrics, which are noisy)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (key, label, smooth) in zip(axes[0], panels):
        for i, (mode, recs) in enumerate(runs.items()):
            curves = [series(r, key) for r in recs]
            curves = [cv for cv in curves if len(cv[0])]
            if not curves:
                continue
            n = min(len(cv[0]) for cv in curves)
            x = curves[0][0][:n]
            ys = np.stack([cv[1][:n] for cv in curves])
            if smooth and n > 8:
                ys = np.stack([trailing_mean(y, max(1, n // 15)) for y in ys])
            line, = ax.plot(x, ys.mean(0), label=f"{mode} (n={len(ys)})", color=f"C{i}")
            if len(ys) > 1:
                ax.fill_between(x, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
        ax.set_xlabel("update")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
