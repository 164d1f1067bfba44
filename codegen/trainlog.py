"""What a code-training run writes besides checkpoints (codegen/train.py): log.csv, curves.png, peak memory.

    CsvLog(path, resume_step)      log.csv, one row per logged step (LOG_FIELDS); a resume drops later rows
    read_log(path)                 its rows as dicts
    plot_curves(log, png)          loss (train, valid) and chrF against the step; None without matplotlib
    peak_memory(device)            (bytes, where the number comes from)
"""
import csv
import sys
from pathlib import Path

import torch

LOG_FIELDS = ("step", "epoch", "lr", "train_loss", "valid_loss", "chrf", "tokens_per_s", "elapsed")


class CsvLog:
    """log.csv, one row per logged step; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step=None):
        self.path = path
        rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in LOG_FIELDS} for r in rows)

    def write(self, **row):
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow(
                {k: _fmt(row.get(k)) for k in LOG_FIELDS})


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.8g}"
    return value


def read_log(path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_curves(log_path: Path, png_path: Path):
    """loss (train, valid) and chrF vs step; returns the PNG path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_log(log_path)

    def series(key):
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "valid_loss"):
        ax1.plot(*series(key), label=key, marker="." if key == "valid_loss" else None)
    ax1.set_xlabel("step"), ax1.set_ylabel("loss (nats / code token)"), ax1.legend()
    ax2.plot(*series("chrf"), marker="o")
    ax2.set_xlabel("step"), ax2.set_ylabel("chrF (greedy, validation)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def peak_memory(device) -> tuple:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    try:
        import resource
    except ImportError:  # Windows
        return None, "unavailable"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "resource.getrusage ru_maxrss (process)"

