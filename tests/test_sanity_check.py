"""sanity_check.py's exit codes: 0 on a match, 1 on a mismatch, 2 with advice when files are missing or unusable."""
import subprocess
import sys

import torch

from conftest import ROOT
from course_reference import course_forward
from helpers import model_args, save_stories_pt
from llama import Llama
from config import LlamaConfig
import sanity_check


def run(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "sanity_check.py"), *args], cwd=cwd, capture_output=True, text=True)


def make_files(tmp_path, norm="rmsnorm", causal=False):
    """A random stories42M-format checkpoint (the vocabulary covers the sanity token ids, up to 17953)
    and reference tensors computed from it by the independent course re-implementation."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=16, n_layers=2, n_heads=2, vocab_size=18000, max_seq_len=16)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    save_stories_pt(model, tmp_path / "ckpt.pt")
    state = {k: v.double() for k, v in model.state_dict().items()}
    logits, hidden = course_forward(state, model_args(model.config), sanity_check.SENT_IDS, norm, causal)
    torch.save({"logits": logits.float(), "hidden_states": hidden.float()}, tmp_path / "ref.data")


def test_match_exits_0(tmp_path):
    make_files(tmp_path)  # the course's setting: RMSNorm (the course's file), no causal mask
    result = run("--pretrained-model-path", "ckpt.pt", "--data", "ref.data", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "max |diff|" in result.stdout and "correct" in result.stdout


def test_course_sanity_check_logic_passes_on_a_default_load(tmp_path):
    """The course's sanity_check.py: load_pretrained(checkpoint) with no arguments, llama(sent_ids),
    logits and hidden states within atol 1e-5 of a reference computed with the course's semantics
    (this variant's LayerNorm, no mask)."""
    make_files(tmp_path, norm="layernorm")
    from llama import load_pretrained

    reference = torch.load(tmp_path / "ref.data", weights_only=True)
    llama = load_pretrained(str(tmp_path / "ckpt.pt"))
    with torch.no_grad():
        logits, hidden_states = llama(sanity_check.SENT_IDS)
    assert torch.allclose(reference["logits"], logits, atol=1e-5, rtol=1e-3)
    assert torch.allclose(reference["hidden_states"], hidden_states, atol=1e-5, rtol=1e-3)


def test_mismatch_exits_1_and_names_the_setting_that_matches(tmp_path):
    make_files(tmp_path, norm="layernorm", causal=True)
    result = run("--checkpoint", "ckpt.pt", "--data", "ref.data", cwd=tmp_path)
    assert result.returncode == 1
    assert "MISMATCH" in result.stdout
    assert "matches this checkpoint with --norm layernorm --causal " in result.stdout


def test_mismatch_that_no_setting_explains(tmp_path, capsys):
    make_files(tmp_path)
    reference = torch.load(tmp_path / "ref.data", weights_only=True)
    reference["logits"] = reference["logits"] + 0.1
    torch.save(reference, tmp_path / "ref.data")
    assert sanity_check.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--data", str(tmp_path / "ref.data")]) == 1
    assert "no setting of --norm and --causal matches" in capsys.readouterr().out


def test_missing_checkpoint_exits_2_with_advice(tmp_path):
    result = run(cwd=tmp_path)
    assert result.returncode == 2
    assert "stories42M.pt not found" in result.stderr and "setup.sh" in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_reference_data_exits_2(tmp_path, capsys):
    make_files(tmp_path)
    (tmp_path / "ref.data").write_bytes(b"not a torch file")
    assert sanity_check.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--data", str(tmp_path / "ref.data")]) == 2
    assert "ref.data: not a readable reference file" in capsys.readouterr().err


def test_reference_without_the_expected_tensors_exits_2(tmp_path, capsys):
    make_files(tmp_path)
    torch.save({"logits": torch.zeros(1)}, tmp_path / "ref.data")
    assert sanity_check.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--data", str(tmp_path / "ref.data")]) == 2
    assert "expected a dict of tensors ('logits', 'hidden_states')" in capsys.readouterr().err


def test_corrupt_checkpoint_exits_2(tmp_path, capsys):
    make_files(tmp_path)
    (tmp_path / "ckpt.pt").write_bytes(b"\x00" * 100)
    assert sanity_check.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--data", str(tmp_path / "ref.data")]) == 2
    assert "ckpt.pt: not a readable PyTorch checkpoint" in capsys.readouterr().err


def test_checkpoint_of_another_shape_exits_2(tmp_path, capsys):
    make_files(tmp_path)  # reference from dim 16; a dim-32 model gives hidden states of another shape
    model = Llama(LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=18000, max_seq_len=16))
    save_stories_pt(model, tmp_path / "other.pt")
    assert sanity_check.main(["--checkpoint", str(tmp_path / "other.pt"), "--data", str(tmp_path / "ref.data")]) == 2
    err = capsys.readouterr().err
    assert "other.pt: hidden_states of shape (2, 8, 32), but" in err and "(2, 8, 16)" in err


def test_checkpoint_with_too_small_a_vocabulary_exits_2(tmp_path, capsys):
    make_files(tmp_path)
    save_stories_pt(Llama(LlamaConfig(dim=16, n_layers=1, n_heads=2, vocab_size=512, max_seq_len=16)), tmp_path / "small.pt")
    assert sanity_check.main(["--checkpoint", str(tmp_path / "small.pt"), "--data", str(tmp_path / "ref.data")]) == 2
    assert "small.pt: vocab_size 512 is too small for the sanity-check tokens (they need 17954)" in capsys.readouterr().err
