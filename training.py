"""What every training loop shares (pretrain.py, run_llama.py's classifiers, codegen/train.py): the
learning-rate schedule, and log.csv with its plot.

    lr_at(step, total_steps, lr, warmup_steps, schedule, min_lr_ratio)   warm-up, then cosine / linear / constant
    CsvLog(path, fields, resume_step=None)    log.csv, one row per logged step; a resume drops the later rows
    read_log(path)                            its rows as dicts
    plot_curves(log, png, panels, x)          the logged curves as a PNG; None when matplotlib is not installed
    log_path(checkpoint, suffix)              NAME-log.csv / NAME-log.png beside a checkpoint NAME.pt

matplotlib is optional: it is imported only by plot_curves.
"""
import csv
import math
from pathlib import Path

SCHEDULES = ("cosine", "linear", "constant")


def lr_at(step, total_steps: int, lr: float, warmup_steps: int = 0, schedule: str = "cosine",
          min_lr_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based; a fraction is fine): linear warm-up
    lr * (step + 1) / warmup_steps, reaching lr at step warmup_steps - 1; then constant, or a linear /
    cosine decay from lr at step warmup_steps to lr * min_lr_ratio at step total_steps."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    min_lr = lr * min_lr_ratio
    if schedule == "linear":
        return min_lr + (lr - min_lr) * (1.0 - progress)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CsvLog:
    """log.csv with the columns `fields`, one row per logged step. A new run starts the file afresh; a
    resumed one (resume_step: the step it resumes from) keeps the rows up to that step."""

    def __init__(self, path, fields, resume_step=None):
        self.path, self.fields = Path(path), tuple(fields)
        rows = []
        if resume_step is not None and self.path.is_file():
            rows = [r for r in read_log(self.path) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in self.fields} for r in rows)

    def write(self, **row):
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow({k: _fmt(row.get(k)) for k in self.fields})


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.8g}"
    return value


def log_path(checkpoint, suffix: str) -> Path:
    """Where the log of the run writing `checkpoint` (NAME.pt) goes: NAME-log.csv, NAME-log.png beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}-log{suffix}")


def read_log(path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_curves(log_path, png_path, panels, x="step"):
    """One plot per panel, side by side: panels is [(y-axis label, [column, ...])], each column against
    the column x (rows where a column is empty are skipped). Returns png_path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_log(log_path)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (ylabel, keys) in zip(axes[0], panels):
        for key in keys:
            points = [(float(r[x]), float(r[key])) for r in rows if r.get(key) and r.get(x)]
            sparse = len(points) < len(rows) or len(points) < 20  # occasional values: mark each one
            ax.plot([p[0] for p in points], [p[1] for p in points], label=key, marker="." if sparse else None)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        if len(keys) > 1:
            ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
