"""utils: atomic writes leave the old file or the whole new one, never a part, and no temp files."""
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
