"""Small helpers shared by the command-line scripts."""
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


# The project's error types, one per kind. Every command line prints `error: <message>` for them and
# exits with status 2, writing nothing; the message says what is wrong and, where it can, what to do.


class UsageError(ValueError):
    """A problem the user can fix: a flag out of range, a path that cannot be used, a bad request."""


class DataError(UsageError):
    """Bad input data; the message names the file and line."""


class CheckpointError(UsageError):
    """A checkpoint that cannot be loaded: truncated, not a checkpoint, or not fitting the model."""


class DeviceError(UsageError):
    """The requested device is not available."""


DEVICES = ("auto", "cpu", "cuda", "mps")  # --device's choices


def pick_device(device=None, use_gpu: bool = False) -> torch.device:
    """--device's choice as a torch.device: "auto" is CUDA, else Apple's MPS, else the CPU; None is
    the CPU; a device asked for by name must be there (a DeviceError says so). use_gpu (the course's
    --use_gpu) means cuda, as does device True."""
    if use_gpu and device not in (None, "auto", "cuda", True):
        raise DeviceError(f"--use_gpu means --device cuda, but --device {device} was given: pass one of them")
    name = "cuda" if use_gpu else {True: "cuda", False: "cpu", None: "cpu"}.get(device, device)
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if name not in DEVICES:
        raise DeviceError(f"--device {name}: choose one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda (or --use_gpu) was given but CUDA is not available; use --device cpu")
    if name == "mps" and not mps:
        raise DeviceError("--device mps was given but Apple's MPS backend is not available; use --device cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed every random number generator a run touches, for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def atomic_write(path, write) -> None:
    """Call write(file_object) on a temporary file beside `path`, then rename it over `path`:
    readers see the old file or the complete new one, never half of it. The file gets the usual
    permissions (0666 less the umask, as open() would give), and temporary files that a killed
    writer of the same path left behind are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a crash cannot leave an empty file there
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temps(path: Path) -> None:
    """Remove `.NAME.PID.*.tmp` files beside path whose writing process no longer exists."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


# --dtype's names: the dtype weights are stored in
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def atomic_save(obj, path) -> None:
    """torch.save, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
