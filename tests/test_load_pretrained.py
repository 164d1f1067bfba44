"""load_pretrained: both checkpoint formats round-trip bit-identically; bad files raise clear errors."""
import dataclasses

import pytest
import torch

from course_reference import course_forward
from helpers import model_args, save_stories_pt, tiny_model
from llama import CheckpointError, LayerNorm, RMSNorm, load_pretrained, save_llama2c_bin


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    tokens = torch.randint(0, a.config.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(a(tokens, targets=tokens)[0], b(tokens, targets=tokens)[0])


@pytest.mark.parametrize("naming,prefix", [("minllama", ""), ("llama2c", ""), ("llama2c", "_orig_mod.")])
def test_stories_pt_round_trip(tmp_path, naming, prefix):
    model = tiny_model(causal=False)
    save_stories_pt(model, tmp_path / "m.pt", naming=naming, prefix=prefix)
    loaded = load_pretrained(tmp_path / "m.pt").eval()
    assert isinstance(loaded.norm, LayerNorm)  # .pt defaults to the assignment's LayerNorm
    assert loaded.config.causal is False  # and a plain stories42M.pt to the course's unmasked attention
    assert_same_model(model, loaded)


def test_stories_pt_with_rmsnorm_override(tmp_path):
    model = tiny_model(norm_type="rmsnorm", causal=False)
    save_stories_pt(model, tmp_path / "m.pt")
    loaded = load_pretrained(tmp_path / "m.pt", norm_type="rmsnorm").eval()
    assert isinstance(loaded.norm, RMSNorm)
    assert_same_model(model, loaded)


@pytest.mark.parametrize("tied", [True, False])
def test_llama2c_bin_round_trip(tmp_path, tied):
    model = tiny_model(norm_type="rmsnorm")
    if not tied:
        model.output.weight = torch.nn.Parameter(torch.randn_like(model.output.weight))
    save_llama2c_bin(model, tmp_path / "m.bin")
    loaded = load_pretrained(tmp_path / "m.bin").eval()
    assert isinstance(loaded.norm, RMSNorm)  # .bin defaults to llama2.c's RMSNorm
    assert (loaded.output.weight is loaded.tok_embeddings.weight) == tied
    assert_same_model(model, loaded)


@pytest.mark.parametrize("dim", [128, 640])  # int32 dim starting with byte 0x80 (640: 0x80 0x02, like a pickle)
def test_llama2c_bin_whose_header_looks_like_a_pickle(tmp_path, dim):
    model = tiny_model(norm_type="rmsnorm", dim=dim, n_layers=1, n_heads=2, n_kv_heads=2)
    save_llama2c_bin(model, tmp_path / "m.bin")
    assert (tmp_path / "m.bin").read_bytes()[:1] == b"\x80"
    assert_same_model(model, load_pretrained(tmp_path / "m.bin").eval())


def test_legacy_torch_format_is_still_recognised(tmp_path):
    model = tiny_model(causal=False)
    path = tmp_path / "legacy.bin"  # not .pt: recognised by its content
    torch.save({"model_args": model_args(model.config), "model": model.state_dict()}, path,
               _use_new_zipfile_serialization=False)
    assert_same_model(model, load_pretrained(path).eval())


def test_invalid_model_args_are_a_checkpoint_error(tmp_path):
    model = tiny_model()
    for bad in (dict(n_heads=5), dict(dim=-32), dict(vocab_size="many")):  # 32 % 5, negative, not a number
        torch.save({"model_args": {**model_args(model.config), **bad}, "model": model.state_dict()}, tmp_path / "m.pt")
        with pytest.raises(CheckpointError, match="m.pt: its model_args do not make a valid config"):
            load_pretrained(tmp_path / "m.pt")


@pytest.mark.parametrize("kept", ["tok_embeddings.weight", "output.weight"])
def test_a_tied_checkpoint_may_store_either_copy(tmp_path, kept):
    model = tiny_model(causal=False)
    state = {k: v for k, v in model.state_dict().items() if k in (kept,) or k not in ("tok_embeddings.weight",
                                                                                        "output.weight")}
    torch.save({"model_args": model_args(model.config), "model": state}, tmp_path / "m.pt")
    loaded = load_pretrained(tmp_path / "m.pt").eval()
    assert loaded.output.weight is loaded.tok_embeddings.weight
    assert_same_model(model, loaded)


def test_llama2c_export_refuses_what_runc_cannot_compute(tmp_path):
    for overrides in (dict(norm_type="layernorm"), dict(norm_type="rmsnorm", rope_theta=500000.0),
                      dict(norm_type="rmsnorm", norm_eps=1e-6), dict(norm_type="rmsnorm", causal=False)):
        with pytest.raises(ValueError, match="run.c computes causal attention, RMSNorm"):
            save_llama2c_bin(tiny_model(**overrides), tmp_path / "m.bin")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="setup.sh.*--pretrained-model-path"):
        load_pretrained(tmp_path / "stories42M.pt")


def test_truncated_bin(tmp_path):
    save_llama2c_bin(tiny_model(norm_type="rmsnorm"), tmp_path / "m.bin")
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "m.bin").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pretrained(tmp_path / "m.bin")
    (tmp_path / "m.bin").write_bytes(data[:10])
    with pytest.raises(CheckpointError, match="too short"):
        load_pretrained(tmp_path / "m.bin")


def test_truncated_pt(tmp_path):
    save_stories_pt(tiny_model(), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "m.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_pretrained(tmp_path / "m.pt")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pt").write_text("hello, I am not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_pretrained(tmp_path / "notes.pt")
    (tmp_path / "notes.bin").write_bytes(b"\xff" * 4096)
    with pytest.raises(CheckpointError, match="not a llama2.c checkpoint"):
        load_pretrained(tmp_path / "notes.bin")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="model_args"):
        load_pretrained(tmp_path / "other.pt")


def test_missing_unexpected_and_mismatched_keys_listed_together(tmp_path):
    model = tiny_model()
    state = model.state_dict()
    del state["layers.1.attention.compute_key.weight"]
    state["layers.0.extra.weight"] = torch.zeros(2)
    state["layers.0.feed_forward.w1.weight"] = torch.zeros(3, 3)
    torch.save({"model_args": model_args(model.config), "model": state}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_pretrained(tmp_path / "bad.pt")
    message = str(err.value)
    assert "layers.1.attention.compute_key.weight" in message
    assert "layers.0.extra.weight" in message
    assert "layers.0.feed_forward.w1.weight: checkpoint (3, 3)" in message


def test_unknown_model_args(tmp_path):
    model = tiny_model()
    torch.save({"model_args": {**model_args(model.config), "n_experts": 4}, "model": model.state_dict()}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="n_experts"):
        load_pretrained(tmp_path / "m.pt")


def test_overrides_apply(tmp_path):
    save_stories_pt(tiny_model(), tmp_path / "m.pt")
    assert load_pretrained(tmp_path / "m.pt", dropout=0.25).config.dropout == 0.25


def test_which_checkpoints_are_causal(tmp_path):
    model = tiny_model()
    args = model_args(model.config)
    cases = {  # (what the file holds) -> causal
        "plain": ({"model_args": args}, False),  # stories42M.pt as llama2.c wrote it: the course's semantics
        "ours": ({"model_args": dataclasses.asdict(model.config)}, True),  # written by this project
        "ours_noncausal": ({"model_args": {**dataclasses.asdict(model.config), "causal": False}}, False),
        "older_ours": ({"model_args": {**args, "norm_type": "layernorm"}}, True),  # before `causal` existed
        "code": ({"model_args": args, "codegen": {"sentinels": {}}}, True),  # a code-training best.pt
    }
    for name, (content, causal) in cases.items():
        torch.save({**content, "model": model.state_dict()}, tmp_path / f"{name}.pt")
        assert load_pretrained(tmp_path / f"{name}.pt").config.causal is causal, name
        assert load_pretrained(tmp_path / f"{name}.pt", causal=not causal).config.causal is (not causal), name
    save_llama2c_bin(tiny_model(norm_type="rmsnorm"), tmp_path / "m.bin")
    assert load_pretrained(tmp_path / "m.bin").config.causal is True


def test_non_causal_model_attends_to_later_positions(tmp_path):
    model = tiny_model(causal=False)
    tokens = torch.randint(0, 64, (1, 6))
    changed = tokens.clone()
    changed[0, -1] = (tokens[0, -1] + 1) % 64
    with torch.no_grad():
        assert not torch.allclose(model(tokens, targets=tokens)[0][0, 0], model(changed, targets=changed)[0][0, 0])
        causal = tiny_model(causal=True)
        torch.testing.assert_close(causal(tokens, targets=tokens)[0][0, :-1], causal(changed, targets=changed)[0][0, :-1])


def test_layernorm_biases_load(tmp_path):
    model = tiny_model(causal=False)
    state = model.state_dict()
    generator = torch.Generator().manual_seed(3)
    for key in list(state):
        if key.endswith("norm.weight"):
            state[key.replace(".weight", ".bias")] = torch.randn(state[key].shape, generator=generator)
    torch.save({"model_args": model_args(model.config), "model": state}, tmp_path / "m.pt")
    loaded = load_pretrained(tmp_path / "m.pt").eval()
    assert loaded.config.norm_bias and torch.equal(loaded.norm.bias, state["norm.bias"])
    tokens = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        logits, hidden = loaded(tokens)
    ref_logits, ref_hidden = course_forward(state, model_args(model.config), tokens)
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    with pytest.raises(CheckpointError, match="norm_bias=True needs norm_type='layernorm'"):
        load_pretrained(tmp_path / "m.pt", norm_type="rmsnorm")


@pytest.mark.parametrize("header", [(64, 172, 2**31 - 1, 8, 4, 512, 512), (64, 172, 5, 8, 4, 512, 2**31 - 1),
                                    (2**30, 172, 5, 8, 4, 512, 512)])
def test_forged_bin_headers_are_refused_before_allocating(tmp_path, header):
    """A 28-byte .bin declaring 2^31-1 layers, positions or a huge dim: refused from arithmetic alone."""
    import struct
    import time

    (tmp_path / "forged.bin").write_bytes(struct.pack("7i", *header))
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="28 bytes, but a llama2.c checkpoint with this header has"):
        load_pretrained(tmp_path / "forged.bin")
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("args, model, message", [
    (dict(n_layers=10**6), {"layers.0.attention_norm.weight": torch.zeros(32)}, "declares n_layers=1000000"),
    (dict(max_seq_len=2**31 - 1), {"layers.0.x": torch.zeros(32)}, "max_seq_len=2147483647 is beyond"),
    (dict(dim=2**20), {"layers.0.x": torch.zeros(32)}, "declares 13,194,223,419,392 parameters"),
    (dict(), {"layers.0.x": "not a tensor"}, "not tensors: ['layers.0.x (str)']"),
])
def test_forged_pt_sizes_are_refused_before_building(tmp_path, args, model, message):
    import time

    model_args = {**dict(dim=32, n_layers=1, n_heads=4, vocab_size=64, multiple_of=8, max_seq_len=64), **args}
    torch.save({"model_args": model_args, "model": model}, tmp_path / "forged.pt")
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="forged.pt") as err:
        load_pretrained(tmp_path / "forged.pt")
    assert message in str(err.value) and time.perf_counter() - started < 1.0
