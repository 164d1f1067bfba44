"""What a code-training run writes besides checkpoints (codegen/train.py): log.csv, curves.png, peak memory.

    CsvLog(path, resume_step)      log.csv, one row per logged step (LOG_FIELDS); a resume drops later rows
    read_log(path)                 its rows as dicts
    plot_curves(log, png)          loss (train, valid) and chrF against the step; None without matplotlib
    peak_memory(device)            (bytes, where the number comes from): under torchrun the largest rank's

The writer and the plot are training.py's, which every training loop of the project shares. Under torchrun
only rank 0 writes log.csv (its rows hold the global numbers, which every rank computes alike).
"""
import sys

import torch

import distributed
import training
from training import read_log  # noqa: F401  (re-exported: callers read the log from here)

LOG_FIELDS = ("step", "epoch", "lr", "train_loss", "valid_loss", "chrf", "tokens_per_s", "elapsed")


class CsvLog(training.CsvLog):
    """training.CsvLog with code training's columns, LOG_FIELDS; written by rank 0 only (elsewhere a no-op)."""

    def __init__(self, path, resume_step=None):
        self.writes = distributed.is_main()
        if self.writes:
            super().__init__(path, LOG_FIELDS, resume_step)

    def write(self, **row):
        if self.writes:
            super().write(**row)


def plot_curves(log_path, png_path):
    """loss (train, valid) and chrF vs step; returns the PNG path, or None without matplotlib."""
    return training.plot_curves(log_path, png_path, [("loss (nats / code token)", ["train_loss", "valid_loss"]),
                                                     ("chrF (greedy, validation)", ["chrf"])])


def peak_memory(device) -> tuple:
    """(peak bytes, where the number comes from); under torchrun the largest of the ranks' peaks (every rank
    must call it then)."""
    peak, source = _own_peak_memory(device)
    if distributed.world_size() > 1 and peak is not None:
        peak, source = int(distributed.all_reduce([peak], "max")[0]), f"{source}, largest of the ranks"
    return peak, source


def _own_peak_memory(device) -> tuple:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    try:
        import resource
    except ImportError:  # Windows
        return None, "unavailable"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "resource.getrusage ru_maxrss (process)"
