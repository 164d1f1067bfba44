"""Tests for codegen/model_setup.py: what a LoRA run trains, and that its merged weights load as a plain Llama."""
import pytest
import torch

from codegen.model_setup import setup_trainable, trainable_parameters
from config import LlamaConfig
from llama import Llama, load_pretrained
from lora import expected_lora_parameters, merged_state_dict

CONFIG = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=8, max_seq_len=256)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# LoRA: trainable parameters and merged checkpoints


SETTINGS = dict(mode="lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, fim=False)


@pytest.mark.parametrize("targets", [["compute_query", "compute_value"], ["compute_key", "compute_output", "w1", "w2", "w3"]])
def test_lora_trainable_parameters_equal_expected(targets):
    model = Llama(LlamaConfig(**CONFIG))
    partial = setup_trainable(model, {**SETTINGS, "lora_targets": targets}, n_words=32000)
    assert partial == []
    assert trainable_parameters(model, partial) == expected_lora_parameters(model.config, 4, targets)


def test_merged_state_dict_loads_into_a_plain_llama_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**CONFIG)).eval()
    setup_trainable(model, {**SETTINGS, "lora_targets": ["compute_query", "w2"]}, n_words=32000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)  # a non-zero update
    state = merged_state_dict(model)
    assert not any("lora" in k or ".base." in k for k in state)
    assert state["output.weight"] is state["tok_embeddings.weight"]  # tied: one tensor in the file
    torch.save({"model_args": {**CONFIG, "norm_type": "layernorm"}, "model": state}, tmp_path / "m.pt")
    plain = load_pretrained(tmp_path / "m.pt").eval()
    tokens = torch.randint(0, 32000, (2, 11))
    with torch.no_grad():
        assert torch.allclose(plain(tokens, targets=tokens)[0], model(tokens, targets=tokens)[0], atol=1e-5)



def test_lora_with_fim_trains_only_the_sentinel_rows_of_the_embedding():
    """With FIM sentinels after the base vocabulary, their (tied) embedding rows train besides the adapters;
    a gradient hook keeps the original rows frozen."""
    model = Llama(LlamaConfig(**{**CONFIG, "vocab_size": 32004}))
    settings = {**SETTINGS, "lora_targets": ["compute_query"], "fim": True}
    partial = setup_trainable(model, settings, n_words=32000)
    assert partial == [(model.tok_embeddings.weight, 32000)]
    lora = expected_lora_parameters(model.config, 4, ["compute_query"])
    assert trainable_parameters(model, partial) == lora + 4 * CONFIG["dim"]
    tokens = torch.tensor([[1, 5, 32000, 32002, 9]])
    model(tokens, targets=tokens)[0].pow(2).mean().backward()
    grad = model.tok_embeddings.weight.grad
    assert (grad[:32000] == 0).all() and (grad[32000:] != 0).any()
