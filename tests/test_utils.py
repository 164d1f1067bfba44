"""utils: atomic writes leave the old file or the whole new one, never a part, and no temp files."""
import os

import pytest
import torch

from utils import DeviceError, atomic_save, atomic_write, atomic_write_text, pick_device


def test_atomic_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "sub" / "out.txt"  # missing parents are created
    atomic_write_text(path, "first\n")
    atomic_write_text(path, "second\n")
    assert path.read_text() == "second\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]


def test_a_failed_write_keeps_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "old\n")

    def half_then_fail(f):
        f.write(b"half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_save_round_trips(tmp_path):
    atomic_save({"w": torch.arange(3)}, tmp_path / "m.pt")
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], torch.arange(3))


def test_pick_device():
    assert pick_device(False) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError):
            pick_device(True)


def test_stale_temp_files_of_killed_writers_are_removed(tmp_path):
    """A writer SIGKILLed inside atomic_save leaves its temp file; the next save of the same path removes
    it (its pid is gone), but not a live writer's, nor another file's."""
    import subprocess
    import sys

    from utils import atomic_write

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".model.pt.{dead_pid}.abc123.tmp"
    live = tmp_path / f".model.pt.{os.getpid()}.def456.tmp"
    other = tmp_path / f".other.pt.{dead_pid}.ghi789.tmp"
    for f in (stale, live, other):
        f.write_bytes(b"x" * 100)
    atomic_write(tmp_path / "model.pt", lambda f: f.write(b"new"))
    assert not stale.exists() and live.exists() and other.exists()
    assert (tmp_path / "model.pt").read_bytes() == b"new"


def test_written_files_get_the_usual_permissions(tmp_path):
    from utils import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "out.txt", "hello")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644
