"""sanity_check.py's exit codes: 0 on a match, 1 on a mismatch, 2 with advice when files are missing."""
import subprocess
import sys

import torch

from conftest import ROOT
from helpers import save_stories_pt
from llama import Llama
from config import LlamaConfig
import sanity_check


def run(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "sanity_check.py"), *args], cwd=cwd, capture_output=True, text=True)


def make_files(tmp_path, norm="rmsnorm"):
    torch.manual_seed(0)
    # vocab must cover the sanity token ids (up to 17953)
    model = Llama(LlamaConfig(dim=16, n_layers=1, n_heads=2, vocab_size=18000, max_seq_len=16, norm_type=norm)).eval()
    save_stories_pt(model, tmp_path / "ckpt.pt")
    with torch.no_grad():
        logits, hidden = model(sanity_check.SENT_IDS)
    torch.save({"logits": logits, "hidden_states": hidden}, tmp_path / "ref.data")


def test_match_exits_0(tmp_path):
    make_files(tmp_path)
    result = run("--checkpoint", "ckpt.pt", "--data", "ref.data", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "max |diff|" in result.stdout and "correct" in result.stdout


def test_mismatch_exits_1(tmp_path):
    make_files(tmp_path)  # reference computed with RMSNorm; checking LayerNorm must fail
    result = run("--checkpoint", "ckpt.pt", "--data", "ref.data", "--norm", "layernorm", cwd=tmp_path)
    assert result.returncode == 1
    assert "MISMATCH" in result.stdout


def test_missing_checkpoint_exits_2_with_advice(tmp_path):
    result = run(cwd=tmp_path)
    assert result.returncode == 2
    assert "stories42M.pt not found" in result.stderr and "setup.sh" in result.stderr
    assert "Traceback" not in result.stderr
