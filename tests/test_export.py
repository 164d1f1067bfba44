"""`run_llama.py --option export` (checkpoint.py's writers), checked by the tools that read each format:
transformers for hf folders (same logits; a HF folder exported again is the same folder), the gguf
package's reader and llama.cpp itself (llama-cpp-python, when installed) for GGUF files, load_pretrained
for llama2.c files. Every refusal is one `error:` line, exit 2, with nothing written. PEFT adapters:
tests/test_peft.py."""
import dataclasses
import io
import json
import math
import shutil
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import torch

import run_llama
from checkpoint import gguf_rope_factors, load_pretrained, quantize_q8_0
from conftest import asset_path
from helpers import lively_model

LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
SENTINELS = {"<fim_prefix>": 32000, "<fim_suffix>": 32001, "<fim_middle>": 32002, "<fim_end>": 32003}
MODELS = {  # RMSNorm, causal: what transformers and llama.cpp compute
    "llama2": dict(n_kv_heads=4, tied=False),
    "gqa_tied_llama3": dict(n_kv_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3, tied=True),
    "linear_rope": dict(n_kv_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0}, tied=False),
    "fim_sentinels": dict(n_kv_heads=2, vocab_size=32010, tied=False),
}


def our_model(kind, seed=0, **overrides):
    """A lively tiny model of the tokenizer's 32000 pieces (or more); untied output when asked."""
    args = {"norm_type": "rmsnorm", "causal": True, "vocab_size": 32000, "norm_eps": 1e-6, **MODELS[kind], **overrides}
    tied = args.pop("tied")
    model = lively_model(seed, gain=1.0, **args)
    if not tied:
        model.output.weight = torch.nn.Parameter(model.output.weight.detach() + 0.1 * torch.randn_like(model.output.weight))
    return model


def save_pt(model, path, sentinels=None):
    """The checkpoint this project writes: whole model_args (and code training's "codegen" entry)."""
    saved = {"model_args": dataclasses.asdict(model.config), "model": model.state_dict()}
    if sentinels:
        saved["codegen"] = {"sentinels": sentinels, "mode": "full"}
    torch.save(saved, path)
    return path


def run_export(*args):
    """run_llama.main(["--option", "export", ...]) in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = run_llama.main(["--option", "export", *map(str, args)])
    return rc, out.getvalue(), err.getvalue()


def logits(model, tokens):
    with torch.no_grad():
        return model.eval()(tokens, targets=tokens)[0]


def tokens(vocab=32000, shape=(2, 40), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def default_tokenizer(monkeypatch):
    monkeypatch.setenv("MINILLAMA_TOKENIZER", str(asset_path("tokenizer.model")))


# ----------------------------------------------------------------------------------------------
# hf


@pytest.mark.parametrize("kind", list(MODELS))
def test_hf_export_gives_transformers_the_same_logits(tmp_path, kind):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference for HF folders")
    pytest.importorskip("safetensors", reason="HF folders store their weights as safetensors")
    model = our_model(kind)
    src = save_pt(model, tmp_path / "m.pt", SENTINELS if kind == "fim_sentinels" else None)
    rc, out, err = run_export("--pretrained-model-path", src, "--format", "hf", "--out", tmp_path / "hf")
    assert rc == 0, err
    folder = tmp_path / "hf"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.model",
            "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokens(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, logits(model, ids), atol=1e-5, rtol=1e-5)
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == model.config.vocab_size and config["tie_word_embeddings"] == MODELS[kind]["tied"]
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    if kind == "fim_sentinels":
        added = json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"]
        assert {int(i): t["content"] for i, t in added.items()} == {i: name for name, i in SENTINELS.items()}


def test_hf_folder_exported_again_is_the_same_folder(tmp_path):
    """transformers' own folder -> ours -> hf: the same tensors, bit for bit, the same config values,
    and its tokenizer files copied as they are."""
    transformers = pytest.importorskip("transformers", reason="transformers writes the source folder")
    safetensors = pytest.importorskip("safetensors.torch", reason="HF folders store their weights as safetensors")
    torch.manual_seed(3)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rope_theta=500000.0, rope_scaling=LLAMA3, tie_word_embeddings=False,
                                      rms_norm_eps=1e-5)
    source = tmp_path / "source"
    transformers.LlamaForCausalLM(config).save_pretrained(source)
    shutil.copy(asset_path("tokenizer.model"), source / "tokenizer.model")
    (source / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer", "marker": 1}')
    rc, _, err = run_export("--pretrained-model-path", source, "--format", "hf", "--out", tmp_path / "again")
    assert rc == 0, err
    before = safetensors.load_file(source / "model.safetensors")
    after = safetensors.load_file(tmp_path / "again" / "model.safetensors")
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    old, new = (json.loads((folder / "config.json").read_text()) for folder in (source, tmp_path / "again"))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "tie_word_embeddings"):
        assert new[key] == old[key], key
    assert (tmp_path / "again" / "tokenizer_config.json").read_text() == (source / "tokenizer_config.json").read_text()


def test_hf_export_in_bfloat16(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference for HF folders")
    safetensors = pytest.importorskip("safetensors.torch", reason="HF folders store their weights as safetensors")
    model = our_model("llama2")
    rc, _, err = run_export("--pretrained-model-path", save_pt(model, tmp_path / "m.pt"), "--format", "hf",
                            "--out", tmp_path / "hf", "--dtype", "bfloat16")
    assert rc == 0, err
    weights = safetensors.load_file(tmp_path / "hf" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = load_pretrained(tmp_path / "hf")  # the same bf16-rounded weights, read back by us
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, logits(ours, ids), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# gguf


def gguf_field(reader, key):
    field = reader.fields[key]
    if len(field.data) == 1 and key != "tokenizer.ggml.tokens":
        value = field.parts[field.data[0]]
        return bytes(value).decode() if value.dtype == np.uint8 else value[0].item()
    return [bytes(field.parts[i]).decode() if field.parts[i].dtype == np.uint8 else field.parts[i][0].item()
            for i in field.data]


def expected_gguf_names(n_layers, tied, llama3):
    names = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not tied else set())
    names |= {"rope_freqs.weight"} if llama3 else set()
    for i in range(n_layers):
        names |= {f"blk.{i}.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                    "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    return names


@pytest.mark.parametrize("kind", ["gqa_tied_llama3", "fim_sentinels"])
def test_gguf_metadata_tensors_and_padded_vocabulary(tmp_path, kind):
    gguf = pytest.importorskip("gguf", reason="the gguf package writes and reads GGUF files")
    model = our_model(kind)
    src = save_pt(model, tmp_path / "m.pt", SENTINELS if kind == "fim_sentinels" else None)
    rc, _, err = run_export("--pretrained-model-path", src, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert rc == 0, err
    reader, c = gguf.GGUFReader(tmp_path / "m.gguf"), model.config
    assert gguf_field(reader, "general.architecture") == "llama"
    expected = {"llama.context_length": c.max_seq_len, "llama.embedding_length": c.dim, "llama.block_count": c.n_layers,
                "llama.feed_forward_length": c.hidden_dim, "llama.attention.head_count": c.n_heads,
                "llama.attention.head_count_kv": c.n_kv_heads, "llama.rope.dimension_count": c.head_dim,
                "general.file_type": 0, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    assert {k: gguf_field(reader, k) for k in expected} == expected
    assert gguf_field(reader, "llama.rope.freq_base") == pytest.approx(c.rope_theta)
    assert gguf_field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(c.norm_eps)
    assert gguf_field(reader, "tokenizer.ggml.model") == "llama"
    pieces = gguf_field(reader, "tokenizer.ggml.tokens")
    assert len(pieces) == c.vocab_size == len(gguf_field(reader, "tokenizer.ggml.token_type"))
    assert pieces[:3] == ["<unk>", "<s>", "</s>"] and pieces[3] == "<0x00>"
    tied = model.output.weight is model.tok_embeddings.weight
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == expected_gguf_names(c.n_layers, tied, kind == "gqa_tied_llama3")
    # shapes in ggml's order (columns first); the q/k rows in our (Meta's) order, unpermuted
    assert list(tensors["blk.0.attn_k.weight"].shape) == [c.dim, c.n_kv_heads * c.head_dim]
    assert list(tensors["token_embd.weight"].shape) == [c.dim, c.vocab_size]
    state = model.state_dict()
    for ours, theirs in (("layers.1.attention.compute_query.weight", "blk.1.attn_q.weight"),
                         ("layers.0.attention.compute_key.weight", "blk.0.attn_k.weight"),
                         ("layers.0.feed_forward.w1.weight", "blk.0.ffn_gate.weight"),
                         ("tok_embeddings.weight", "token_embd.weight")):
        assert np.array_equal(np.asarray(tensors[theirs].data), state[ours].numpy()), theirs
    if kind == "fim_sentinels":
        assert pieces[32000:32004] == list(SENTINELS) and pieces[32004:] == [f"[PAD{i}]" for i in range(32004, 32010)]
        assert gguf_field(reader, "tokenizer.ggml.fim_pre_token_id") == 32000
        assert gguf_field(reader, "tokenizer.ggml.eot_token_id") == 32003
        assert np.array_equal(np.asarray(tensors["output.weight"].data), state["output.weight"].numpy())
    else:
        factors = np.asarray(tensors["rope_freqs.weight"].data)
        assert np.array_equal(factors, gguf_rope_factors(c).numpy()) and factors[-1] == pytest.approx(32.0)


def llama_cpp_rope_factors(head_dim, theta, scaling):
    """llama.cpp's convert_hf_to_gguf.py's llama3 factors, written out per frequency as it does."""
    old, low, high = (scaling[k] for k in ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor"))
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < old / high:
            factors.append(1.0)
        elif wavelength > old / low:
            factors.append(scaling["factor"])
        else:
            smooth = (old / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    return torch.tensor(factors)


@pytest.mark.parametrize("dim, n_heads", [(32, 4), (64, 1)])
def test_rope_factors_are_llama_cpp_s(dim, n_heads):
    """llama.cpp divides each RoPE frequency by its rope_freqs factor: inv_freq / HF's llama3 frequencies."""
    config = our_model("gqa_tied_llama3", dim=dim, n_heads=n_heads, n_kv_heads=1).config
    expected = llama_cpp_rope_factors(config.head_dim, config.rope_theta, LLAMA3)
    torch.testing.assert_close(gguf_rope_factors(config), expected.float())
    if config.head_dim == 64:  # blended and low frequencies both there
        assert len({round(f, 3) for f in expected.tolist()}) >= 3 and expected[-1] == 32.0
    assert gguf_rope_factors(our_model("llama2").config) is None


@pytest.mark.parametrize("gguf_type, ggml_type, file_type", [("f16", "F16", 1), ("q8_0", "Q8_0", 7), ("bf16", "BF16", 32)])
def test_gguf_tensor_types(tmp_path, gguf_type, ggml_type, file_type):
    gguf = pytest.importorskip("gguf", reason="the gguf package writes and reads GGUF files")
    model = our_model("llama2")
    rc, _, err = run_export("--pretrained-model-path", save_pt(model, tmp_path / "m.pt"), "--format", "gguf",
                            "--out", tmp_path / "m.gguf", "--gguf_type", gguf_type)
    assert rc == 0, err
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert gguf_field(reader, "general.file_type") == file_type
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == ggml_type and types["output.weight"] == ggml_type
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    # every ffn_down row (hidden_dim = 96) is 3 whole Q8_0 blocks
    weight = model.state_dict()["layers.0.feed_forward.w2.weight"].numpy()
    read = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    values = gguf.quants.dequantize(np.asarray(read.data), read.tensor_type)
    np.testing.assert_allclose(values.reshape(weight.shape), weight, atol=np.abs(weight).max() / 100)


def test_q8_0_is_ggml_s():
    gguf = pytest.importorskip("gguf", reason="gguf.quants is the reference Q8_0")
    x = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block
    x[1, :32] = np.linspace(-127, 127, 32) / 50  # values at exact halves of the step
    assert np.array_equal(quantize_q8_0(x), gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0))


def llama_cpp_logits(path, ids):
    """llama.cpp's logits at every position, its KV cache in float32 (its default, float16, rounds K and V).
    Its extra buffer types (weights repacked for the CPU's int8 kernels) are off: with them, the
    llama-cpp-python 0.3.36 built on this project's CI machine crashes (segmentation fault) on Q8_0 files."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python runs the GGUF file")
    low_level = llama_cpp.llama_cpp
    default_params = low_level.llama_model_default_params

    def params_without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params
    low_level.llama_model_default_params = params_without_extra_buffers
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, type_k=0, type_v=0)
    finally:
        low_level.llama_model_default_params = default_params
    llm.eval(ids)
    return llm, torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)


@pytest.mark.parametrize("kind", list(MODELS))
def test_gguf_runs_in_llama_cpp_with_our_logits(tmp_path, kind):
    """The real check of the layout: llama.cpp computes our logits from the f32 file (q/k rows as they
    are, llama3 factors, linear scaling, the padded vocabulary), and tokenizes as SentencePiece does."""
    import sentencepiece

    pytest.importorskip("llama_cpp", reason="llama-cpp-python runs the GGUF file")
    model = our_model(kind)
    rc, _, err = run_export("--pretrained-model-path", save_pt(model, tmp_path / "m.pt"), "--format", "gguf",
                            "--out", tmp_path / "m.gguf")
    assert rc == 0, err
    ids = tokens(shape=(1, 20))[0].tolist()
    llm, theirs = llama_cpp_logits(tmp_path / "m.gguf", ids)
    torch.testing.assert_close(theirs, logits(model, torch.tensor([ids]))[0], atol=1e-4, rtol=1e-4)
    assert llm.n_vocab() == model.config.vocab_size
    sp = sentencepiece.SentencePieceProcessor(model_file=str(asset_path("tokenizer.model")))
    text = "def add(a, b):\n    return a + b  # ünïcode"
    assert llm.tokenize(text.encode(), add_bos=True) == [1] + sp.encode(text)


@pytest.mark.parametrize("gguf_type, bound", [("f16", 0.05), ("bf16", 0.2), ("q8_0", 0.5)])
def test_rounded_gguf_types_run_in_llama_cpp(tmp_path, gguf_type, bound):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python runs the GGUF file")
    model = our_model("fim_sentinels")
    rc, _, err = run_export("--pretrained-model-path", save_pt(model, tmp_path / "m.pt"), "--format", "gguf",
                            "--out", tmp_path / "m.gguf", "--gguf_type", gguf_type)
    assert rc == 0, err
    ids = tokens(shape=(1, 20))[0].tolist()
    theirs = llama_cpp_logits(tmp_path / "m.gguf", ids)[1]
    ours = logits(model, torch.tensor([ids]))[0]
    assert (theirs - ours).abs().max() < bound and torch.equal(theirs.argmax(-1), ours.argmax(-1))


# ----------------------------------------------------------------------------------------------
# llama2c


def test_llama2c_export_reads_back(tmp_path):
    model = our_model("llama2", norm_eps=1e-5, n_kv_heads=2)
    rc, out, err = run_export("--pretrained-model-path", save_pt(model, tmp_path / "m.pt"), "--format", "llama2c",
                              "--out", tmp_path / "m.bin")
    assert rc == 0, err
    assert "wrote" in out
    ids = tokens()
    torch.testing.assert_close(logits(load_pretrained(tmp_path / "m.bin"), ids), logits(model, ids))


# ----------------------------------------------------------------------------------------------
# refusals: one line, exit 2, nothing written


def assert_refused(result, message, out=None):
    rc, stdout, err = result
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    if out is not None:
        assert not out.exists() or (out.is_dir() and not any(out.iterdir()))
        assert not [p for p in out.parent.iterdir() if p.name.endswith((".tmp", ".old"))]


@pytest.mark.parametrize("fmt, out", [("hf", "hf"), ("gguf", "m.gguf"), ("llama2c", "m.bin")])
def test_layernorm_and_non_causal_models_are_refused(tmp_path, fmt, out):
    layernorm = lively_model(0, vocab_size=32000)  # the assignment's LayerNorm
    src = save_pt(layernorm, tmp_path / "ln.pt")
    assert_refused(run_export("--pretrained-model-path", src, "--format", fmt, "--out", tmp_path / out),
                   "layernorm" if fmt != "llama2c" else "RMSNorm", tmp_path / out)
    non_causal = save_pt(our_model("llama2", norm_eps=1e-5, causal=False), tmp_path / "nc.pt")
    assert_refused(run_export("--pretrained-model-path", non_causal, "--format", fmt, "--out", tmp_path / out),
                   "non-causal", tmp_path / out)


def test_bad_flags_and_targets(tmp_path):
    src = save_pt(our_model("llama2"), tmp_path / "m.pt")
    assert_refused(run_export("--pretrained-model-path", src, "--format", "onnx", "--out", tmp_path / "x"),
                   "argument --format: invalid choice: 'onnx'", tmp_path / "x")
    assert_refused(run_export("--pretrained-model-path", src, "--format", "hf"), "required: --out")
    assert_refused(run_export("--pretrained-model-path", src, "--format", "hf", "--out", tmp_path / "x",
                              "--gguf_type", "q8_0"), "--gguf_type applies to --format gguf", tmp_path / "x")
    assert_refused(run_export("--pretrained-model-path", src, "--format", "llama2c", "--out", tmp_path / "m.bin",
                              "--dtype", "float16"), "float32 only", tmp_path / "m.bin")
    assert_refused(run_export("--pretrained-model-path", src, "--format", "peft", "--out", tmp_path / "x"),
                   "no --adapter, and no m_adapter.pt beside", tmp_path / "x")
    assert_refused(run_export("--pretrained-model-path", tmp_path / "none.pt", "--format", "hf", "--out",
                              tmp_path / "x"), "none.pt not found", tmp_path / "x")
    assert_refused(run_export("--pretrained-model-path", src, "--format", "hf", "--out", src), "is a file")


def test_existing_outputs_are_replaced_only_with_overwrite(tmp_path):
    pytest.importorskip("safetensors", reason="HF folders store their weights as safetensors")
    src = save_pt(our_model("llama2"), tmp_path / "m.pt")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert_refused(run_export("--pretrained-model-path", src, "--format", "hf", "--out", full), "not empty")
    assert (full / "keep.txt").read_text() == "mine"
    assert run_export("--pretrained-model-path", src, "--format", "hf", "--out", full, "--overwrite")[0] == 0
    assert (full / "config.json").is_file() and not (full / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_export("--pretrained-model-path", src, "--format", "hf", "--out", empty)[0] == 0
    (tmp_path / "m.bin").write_bytes(b"old")
    assert_refused(run_export("--pretrained-model-path", src, "--format", "llama2c", "--out", tmp_path / "m.bin"),
                   "exists")
    assert (tmp_path / "m.bin").read_bytes() == b"old"


def test_a_tokenizer_json_is_copied_to_hf_and_refused_by_gguf(tmp_path):
    """A byte-level BPE tokenizer.json travels into the hf folder as it is; the GGUF export writes
    SentencePiece vocabularies only and says so."""
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizer.json backend needs `tokenizers`")
    pytest.importorskip("safetensors", reason="HF folders store their weights as safetensors")
    pytest.importorskip("gguf", reason="the gguf package writes GGUF files")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 20, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tk.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    src = save_pt(our_model("llama2", vocab_size=320), tmp_path / "m.pt")
    rc, _, err = run_export("--pretrained-model-path", src, "--tokenizer", tmp_path / "tokenizer.json", "--format",
                            "hf", "--out", tmp_path / "hf")
    assert rc == 0, err
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()
    assert not (tmp_path / "hf" / "tokenizer.model").exists()
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tk.token_to_id("<|end_of_text|>")
    assert_refused(run_export("--pretrained-model-path", src, "--tokenizer", tmp_path / "tokenizer.json", "--format",
                              "gguf", "--out", tmp_path / "m.gguf"), "not a SentencePiece tokenizer", tmp_path / "m.gguf")
    assert_refused(run_export("--pretrained-model-path", save_pt(our_model("llama2", vocab_size=100), tmp_path / "s.pt"),
                              "--format", "gguf", "--out", tmp_path / "s.gguf"), "more than the model's 100",
                   tmp_path / "s.gguf")
