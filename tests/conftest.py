"""Shared test helpers: where the reference assets live, and skipping when they don't."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the graded files are plain top-level modules


def asset_dirs():
    """Places setup.sh may have put the assets, most specific first."""
    dirs = []
    if os.environ.get("MINILLAMA_ASSETS"):
        dirs.append(Path(os.environ["MINILLAMA_ASSETS"]))
    dirs += [ROOT.parent / "shared" / "assets", ROOT]
    return dirs


def find_asset(name):
    """Path of an asset such as 'optimizer_test.npy' or 'reference/stories260K.bin', or None."""
    for d in asset_dirs():
        if (d / name).is_file():
            return d / name
    return None


def asset_path(name):
    """Path of an asset, or skip the calling test saying which file is missing."""
    path = find_asset(name)
    if path is None:
        pytest.skip(f"asset {name!r} not found in {[str(d) for d in asset_dirs()]}; run `bash setup.sh`")
    return path


@pytest.fixture
def one_thread():
    """Two noisy cores: one torch thread is faster and steadier for the tiny models of the tests."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
