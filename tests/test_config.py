"""LlamaConfig: Llama 2's derived sizes, and one clear error for sizes no model can have."""
import pytest

from config import LlamaConfig


def test_defaults_are_the_stories42m_shape():
    c = LlamaConfig()
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.hidden_dim) == (512, 8, 8, 8, 32000, 1376)
    assert c.head_dim == 64


def test_hidden_dim_rounds_two_thirds_of_4dim_up_to_multiple_of():
    assert LlamaConfig(dim=288, multiple_of=32).hidden_dim == 768  # stories15M: int(2 * 1152 / 3) = 768
    assert LlamaConfig(dim=64, multiple_of=4).hidden_dim == 172  # 170 -> 172
    assert LlamaConfig(dim=64, hidden_dim=100).hidden_dim == 100  # given: kept


def test_layer_norm_eps_alias():
    c = LlamaConfig.from_model_args({"dim": 64, "n_heads": 4, "layer_norm_eps": 1e-6})
    assert c.norm_eps == 1e-6


@pytest.mark.parametrize("bad, words", [
    (dict(dim=0), "dim=0"), (dict(n_heads=-4), "n_heads=-4"), (dict(vocab_size=2.5), "vocab_size=2.5"),
    (dict(max_seq_len=True), "max_seq_len=True"), (dict(n_layers="8"), "n_layers='8'"),
    (dict(n_heads=5), "not divisible by n_heads=5"), (dict(n_heads=8, n_kv_heads=3), "n_kv_heads=3"),
    (dict(dim=24, n_heads=8), "head_dim=3 must be even"), (dict(norm_type="batchnorm"), "norm_type='batchnorm'"),
])
def test_invalid_sizes_raise_one_value_error(bad, words):
    with pytest.raises(ValueError, match="invalid LlamaConfig") as info:
        LlamaConfig(**bad)
    assert words in str(info.value)
