"""checkpoint.py's Hugging Face folders, against transformers itself: tiny random LlamaForCausalLMs in
the shapes of Llama 2, Llama 3.2 (tied, GQA, llama3 RoPE scaling) and Code Llama (RoPE base 1e6), saved
with save_pretrained (sharded or not, safetensors or pytorch_model.bin, fp32 or bf16), load with the
same logits and the same greedy tokens; bad folders give one clear error."""
import json
import shutil

import pytest
import torch

from checkpoint import hf_to_ours, load_pretrained
from utils import CheckpointError

transformers = pytest.importorskip("transformers", reason="transformers is the reference for HF folders")
pytest.importorskip("safetensors", reason="HF folders store their weights as safetensors")

SHAPES = {
    "llama2": dict(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
                   max_position_embeddings=128, tie_word_embeddings=False),
    "llama3.2": dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
                     max_position_embeddings=256, tie_word_embeddings=True,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "codellama": dict(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=1e6,
                      max_position_embeddings=128, tie_word_embeddings=False),
}


def hf_model(shape, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**SHAPES[shape], attention_bias=False, mlp_bias=False)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # livelier than the 0.02 init, and norms that are not all ones
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 1 else 1.5 / p.shape[-1] ** 0.5) + (p.dim() == 1))
    return model


def save(model, folder, **kwargs):
    model.save_pretrained(folder, **kwargs)
    return folder


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def hf_greedy(model, tokens, n):
    """Greedy decoding as a plain loop over transformers' forward (its generate stops at or masks EOS)."""
    with torch.no_grad():
        for _ in range(n):
            tokens = torch.cat([tokens, model(tokens).logits[:, -1:].argmax(-1)], dim=1)
    return tokens


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_and_greedy_tokens_equal_transformers(tmp_path, shape):
    reference = hf_model(shape)
    ours = load_pretrained(save(reference, tmp_path / shape)).eval()
    config = ours.config
    assert (config.norm_type, config.causal, config.rope_theta) == ("rmsnorm", True, SHAPES[shape]["rope_theta"])
    assert (ours.output.weight is ours.tok_embeddings.weight) == SHAPES[shape]["tie_word_embeddings"]
    tokens = torch.randint(0, SHAPES[shape]["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = ours(tokens, targets=tokens)
    torch.testing.assert_close(logits, hf_logits(reference, tokens), atol=1e-5, rtol=1e-5)
    prompt = tokens[:1, :8]
    assert torch.equal(ours.generate(prompt, 64, temperature=0.0), hf_greedy(reference, prompt, 64))


@pytest.mark.parametrize("how", ["sharded", "bf16", "pytorch_model.bin"])
def test_sharded_bf16_and_torch_weight_files(tmp_path, how):
    reference = hf_model("llama3.2", seed=2)
    if how == "bf16":
        reference = reference.to(torch.bfloat16)
    folder = save(reference, tmp_path / how, **(dict(max_shard_size="100KB") if how == "sharded" else {}))
    if how == "sharded":
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("model-*.safetensors"))) > 1
    if how == "pytorch_model.bin":  # what older transformers wrote (5.x writes safetensors only)
        (folder / "model.safetensors").unlink()
        torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    ours = load_pretrained(folder).eval()
    assert ours.dtype == torch.float32  # --dtype's default: float32 whatever the file holds
    tokens = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, _ = ours(tokens, targets=tokens)
    # transformers' own reading of the folder, in float32 (a cast of the bf16 module would also have
    # rounded its RoPE frequencies)
    again = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.testing.assert_close(logits, hf_logits(again, tokens), atol=1e-5, rtol=1e-5)
    bf16 = load_pretrained(folder, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.output.weight.dtype == torch.bfloat16


def test_older_config_schema(tmp_path):
    """transformers 4.x wrote rope_theta / rope_scaling at the top level and torch_dtype; 5.x writes
    rope_parameters and dtype. Both load to the same model."""
    reference = hf_model("llama3.2", seed=4)
    folder = save(reference, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    rope = dict(config.pop("rope_parameters", None) or config.pop("rope_scaling"))
    config["rope_theta"] = rope.pop("rope_theta", config.get("rope_theta"))
    config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype", "float32")
    (folder / "config.json").write_text(json.dumps(config))
    ours = load_pretrained(folder).eval()
    assert ours.config.rope_scaling["rope_type"] == "llama3" and ours.config.rope_theta == 500000.0
    tokens = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens, targets=tokens)[0], hf_logits(reference, tokens), atol=1e-5, rtol=1e-5)


def test_linear_rope_scaling(tmp_path):
    torch.manual_seed(6)
    config = transformers.LlamaConfig(**{**SHAPES["llama2"], "rope_scaling": {"rope_type": "linear", "factor": 4.0}})
    reference = transformers.LlamaForCausalLM(config).eval()
    ours = load_pretrained(save(reference, tmp_path / "m")).eval()
    tokens = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens, targets=tokens)[0], hf_logits(reference, tokens), atol=1e-5, rtol=1e-5)


def test_q_k_rows_are_permuted_back_to_adjacent_pairs():
    """HF's row for (head h, half j, index i) is our row (h, 2i + j)."""
    from config import LlamaConfig

    config = LlamaConfig(dim=8, n_heads=2, n_kv_heads=1, n_layers=1, vocab_size=10, multiple_of=4)
    hf = torch.arange(8.0)[:, None].repeat(1, 8)  # row r holds r
    _, ours = hf_to_ours("model.layers.0.self_attn.q_proj.weight", hf, config)
    assert ours[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    _, ours_k = hf_to_ours("model.layers.0.self_attn.k_proj.weight", hf[:4], config)
    assert ours_k[:, 0].tolist() == [0, 2, 1, 3]
    name, same = hf_to_ours("model.layers.0.self_attn.v_proj.weight", hf, config)
    assert name == "layers.0.attention.compute_value.weight" and torch.equal(same, hf)
    assert hf_to_ours("model.rotary_emb.inv_freq", hf, config)[0] is None  # not a weight we keep


def folder_with(tmp_path, edit=None, drop=None):
    folder = save(hf_model("llama2", seed=8), tmp_path / "bad", max_shard_size="100KB")
    if edit:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    if drop:
        (folder / drop).unlink()
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(model_type="mistral"), "model_type 'mistral': only \"llama\""),
    (lambda c: c.update(attention_bias=True), "attention_bias"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act 'gelu'"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}), "rope type 'yarn'"),
    (lambda c: c.update(intermediate_size=100), "shape mismatches"),
    (lambda c: c.pop("hidden_size"), "missing ['hidden_size']"),
])
def test_unsupported_or_inconsistent_configs_are_one_clear_error(tmp_path, edit, message):
    with pytest.raises(CheckpointError, match="config.json|does not fit") as err:
        load_pretrained(folder_with(tmp_path, edit=edit))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_files(tmp_path):
    folder = folder_with(tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard.*{shard.name}.*missing"):
        load_pretrained(folder)
    shutil.rmtree(folder)
    folder.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **SHAPES["llama2"]}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_pretrained(folder)


def test_commands_take_a_hf_folder(tmp_path):
    """--option generate and --option code_generate run on a HF folder with its own tokenizer; the
    temperature-0 text is transformers' greedy continuation."""
    import subprocess
    import sys

    from conftest import ROOT, asset_path

    torch.manual_seed(9)
    config = transformers.LlamaConfig(**{**SHAPES["llama2"], "vocab_size": 32000, "hidden_size": 32,
                                         "intermediate_size": 64, "bos_token_id": 1, "eos_token_id": 2})
    reference = transformers.LlamaForCausalLM(config).eval()
    folder = save(reference, tmp_path / "hf")
    shutil.copy(asset_path("tokenizer.model"), folder / "tokenizer.model")

    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "run_llama.py"), "--pretrained-model-path", str(folder),
                               *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)

    result = run("--option", "generate", "--quiet", "--generated_sentence_low_temp_out", "t0.txt",
                 "--generated_sentence_high_temp_out", "t1.txt")
    assert result.returncode == 0, result.stderr
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    prompt = torch.tensor([[1] + sp.encode("Victor Frankenstein, a young scientist obsessed with uncovering the "
                                           "secrets of life, succeeds in animating a creature assembled from")])
    expected = hf_greedy(reference, prompt, 75)[0].tolist()
    if 2 in expected[prompt.shape[1]:]:
        expected = expected[: expected.index(2, prompt.shape[1]) + 1]
    assert (tmp_path / "t0.txt").read_text() == sp.decode(expected)
    result = run("--option", "code_generate", "--prompt", "def add(a, b):\n", "--max_new_tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "tokens in" in result.stderr
