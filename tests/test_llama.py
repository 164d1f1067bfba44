"""Model components against independent references: F.layer_norm, llama2.c's RMSNorm formula,
F.scaled_dot_product_attention, and llama2.c's own logits for the real stories260K checkpoint."""
import pytest
import torch
import torch.nn.functional as F

from config import LlamaConfig
from conftest import asset_path
from course_reference import course_forward
from helpers import model_args, save_stories_pt, tiny_config, tiny_model
from llama import Attention, FeedForward, LayerNorm, Llama, RMSNorm, load_pretrained


def test_layernorm_equals_torch_layer_norm():
    torch.manual_seed(0)
    x, g = torch.randn(3, 5, 48) * 4 + 2, torch.randn(48)
    norm = LayerNorm(48, eps=1e-5)
    norm.weight.data.copy_(g)
    expected = F.layer_norm(x, (48,), weight=g, bias=None, eps=1e-5)
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)


def test_layernorm_eps_goes_under_the_square_root():
    """With a variance as small as eps, where eps sits decides the result: sqrt(var + eps)."""
    torch.manual_seed(0)
    x = torch.randn(2, 48) * 1e-3
    torch.testing.assert_close(LayerNorm(48, eps=1e-5)(x), F.layer_norm(x, (48,), eps=1e-5), atol=1e-5, rtol=1e-5)


def test_rmsnorm_equals_llama2c_formula():
    torch.manual_seed(0)
    x, g = torch.randn(3, 5, 48) * 3, torch.randn(48)
    norm = RMSNorm(48, eps=1e-5)
    norm.weight.data.copy_(g)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g  # llama2.c model.py
    torch.testing.assert_close(norm(x), expected)
    assert not torch.allclose(norm(x), F.layer_norm(x, (48,), weight=g), atol=1e-2)


@pytest.mark.parametrize("norm_class", [LayerNorm, RMSNorm])
def test_norms_gradcheck_in_float64(norm_class):
    torch.manual_seed(0)
    norm = norm_class(6).double()
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(norm, (x,))
    assert torch.autograd.gradcheck(lambda w: norm_class._norm(norm, x) * w, (norm.weight.detach().requires_grad_(),))


def sdpa_reference(attention: Attention, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """The attention block rebuilt from F.scaled_dot_product_attention with explicit KV repetition."""
    from rope import rotate

    b, t, _ = x.shape
    h, kv, d = attention.n_heads, attention.n_kv_heads, attention.head_dim
    q = rotate(attention.compute_query(x).view(b, t, h, d), cos, sin).transpose(1, 2)
    k = rotate(attention.compute_key(x).view(b, t, kv, d), cos, sin).transpose(1, 2)
    v = attention.compute_value(x).view(b, t, kv, d).transpose(1, 2)
    k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attention.compute_output(out.transpose(1, 2).reshape(b, t, h * d))


@pytest.mark.parametrize("n_kv_heads", [8, 4, 1])
def test_attention_equals_scaled_dot_product_attention(n_kv_heads):
    torch.manual_seed(n_kv_heads)
    config = LlamaConfig(dim=64, n_heads=8, n_kv_heads=n_kv_heads, n_layers=1, vocab_size=10, max_seq_len=32)
    attention = Attention(config).eval()
    model = Llama(config)
    x = torch.randn(3, 17, 64)
    cos, sin = model.freqs_cos[:17], model.freqs_sin[:17]
    expected = sdpa_reference(attention, x, cos, sin)
    torch.testing.assert_close(attention(x, cos, sin), expected, atol=1e-5, rtol=1e-5)
    attention.use_sdpa = True  # the fast path gives the same result
    torch.testing.assert_close(attention(x, cos, sin), expected, atol=1e-5, rtol=1e-5)


def test_attention_is_causal():
    model = tiny_model()
    tokens = torch.randint(0, 64, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 64
    with torch.no_grad():
        _, h1 = model(tokens)
        _, h2 = model(changed)
    torch.testing.assert_close(h1[:, :12], h2[:, :12])
    assert not torch.allclose(h1[:, 12:], h2[:, 12:], atol=1e-4)


def test_non_causal_attention_equals_sdpa_without_mask():
    torch.manual_seed(0)
    config = LlamaConfig(dim=64, n_heads=8, n_kv_heads=4, n_layers=1, vocab_size=10, max_seq_len=32, causal=False)
    attention, model = Attention(config).eval(), Llama(config)
    x, cos, sin = torch.randn(3, 17, 64), model.freqs_cos[:17], model.freqs_sin[:17]
    q = attention.compute_query(x).view(3, 17, 8, 8)
    k = attention.compute_key(x).view(3, 17, 4, 8)
    from rope import rotate

    q, k = rotate(q, cos, sin).transpose(1, 2), rotate(k, cos, sin).transpose(1, 2)
    v = attention.compute_value(x).view(3, 17, 4, 8).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))  # no mask
    expected = attention.compute_output(out.transpose(1, 2).reshape(3, 17, 64))
    for use_sdpa in (False, True):
        attention.use_sdpa = use_sdpa
        torch.testing.assert_close(attention(x, cos, sin), expected, atol=1e-5, rtol=1e-5)


SANITY_IDS = torch.tensor([[101, 7592, 2088, 102, 0, 0, 0, 0], [101, 7592, 15756, 2897, 2005, 17953, 2361, 102]])


@pytest.mark.parametrize("norm_type", ["layernorm", "rmsnorm"])
def test_default_load_equals_the_course_forward(tmp_path, norm_type):
    """A stories42M-format checkpoint loads with the course's semantics (no mask: the two sanity rows
    differ from position 0 on, as in sanity_check.data); causal=True gives the causal reference."""
    model = tiny_model(vocab_size=18000, max_seq_len=16, n_heads=4, n_kv_heads=2)
    save_stories_pt(model, tmp_path / "m.pt")
    state = {k: v.double() for k, v in model.state_dict().items()}
    for causal in (False, True):
        overrides = {"norm_type": norm_type, **({"causal": True} if causal else {})}
        loaded = load_pretrained(tmp_path / "m.pt", **overrides).eval()
        with torch.no_grad():
            logits, hidden = loaded(SANITY_IDS)
        ref_logits, ref_hidden = course_forward(state, model_args(model.config), SANITY_IDS, norm_type, causal)
        torch.testing.assert_close(hidden, ref_hidden.float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits, ref_logits.float(), atol=1e-5, rtol=1e-4)
        same_start = torch.allclose(hidden[0, :2], hidden[1, :2], atol=1e-5)
        assert same_start is causal  # rows share tokens 0-1: only a causal model gives them equal states


def test_feedforward_is_swiglu():
    torch.manual_seed(0)
    ff = FeedForward(16, 40, dropout=0.0)
    x = torch.randn(4, 16)
    expected = (F.silu(x @ ff.w1.weight.T) * (x @ ff.w3.weight.T)) @ ff.w2.weight.T
    torch.testing.assert_close(ff(x), expected)


def test_hidden_dim_from_multiple_of():
    assert LlamaConfig(dim=512, multiple_of=32).hidden_dim == 1376  # stories42M
    assert LlamaConfig(dim=64, n_heads=8, multiple_of=4).hidden_dim == 172  # stories260K
    assert LlamaConfig(dim=64, n_heads=8, hidden_dim=100).hidden_dim == 100


def test_config_validation():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(dim=64, n_heads=8, n_kv_heads=3)
    with pytest.raises(ValueError, match="norm_type"):
        LlamaConfig(norm_type="batchnorm")
    with pytest.raises(ValueError, match="causal=1 must be True or False"):
        LlamaConfig(causal=1)


def test_forward_shapes_and_tied_output():
    model = tiny_model()
    tokens = torch.randint(0, 64, (2, 9))
    logits, hidden = model(tokens)
    assert logits.shape == (2, 1, 64) and hidden.shape == (2, 9, 32)
    full, _ = model(tokens, targets=tokens)
    assert full.shape == (2, 9, 64)
    torch.testing.assert_close(full[:, -1:], logits)
    assert model.output.weight is model.tok_embeddings.weight


def test_norm_type_selects_the_norm():
    assert isinstance(Llama(tiny_config()).norm, LayerNorm)
    assert isinstance(Llama(tiny_config(norm_type="rmsnorm")).layers[0].ffn_norm, RMSNorm)


def stories260k():
    model = load_pretrained(asset_path("reference/stories260K.bin"), norm_type="rmsnorm").eval()
    reference = torch.load(asset_path("reference/stories260K_reference.pt"), weights_only=True)
    return model, reference


def test_stories260k_logits_match_llama2c():
    model, reference = stories260k()
    with torch.no_grad():
        logits, _ = model(reference["tokens"], targets=reference["tokens"])
    max_diff = (logits - reference["logits"]).abs().max().item()
    print(f"stories260K max |dlogit| vs llama2.c = {max_diff:.3e}")
    assert max_diff < 2e-4


def test_stories260k_greedy_tokens_match_llama2c():
    model, reference = stories260k()
    expected = reference["greedy_from_bos"]
    out = model.generate(expected[:1][None], max_new_tokens=len(expected) - 1, temperature=0.0)
    assert out[0].tolist() == expected.tolist()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_fp32_and_bf16_match_cpu():
    """GPU paths: fp32 (sdpa) within 1e-4 of the CPU's readable path; bf16 autocast within 5e-2
    (bf16 keeps 8 bits of mantissa) with the same greedy continuation on stories260K."""
    model, reference = stories260k()
    tokens = reference["tokens"]
    with torch.no_grad():
        expected, _ = model(tokens, targets=tokens)
        gpu = model.to("cuda").set_sdpa(True)
        fp32, _ = gpu(tokens.cuda(), targets=tokens.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16, _ = gpu(tokens.cuda(), targets=tokens.cuda())
    assert (fp32.cpu() - expected).abs().max() < 1e-4
    assert (bf16.float().cpu() - expected).abs().max() < 5e-2 * expected.abs().max()
    out = gpu.generate(reference["greedy_from_bos"][:1][None].cuda(), 50, temperature=0.0)
    assert out[0].cpu().tolist() == reference["greedy_from_bos"][:51].tolist()


def test_sdpa_attention_dropout_only_in_training():
    model = tiny_model(dropout=0.5)
    model.set_sdpa(True)
    tokens = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    model.eval()
    torch.testing.assert_close(model(tokens, targets=tokens)[0], model(tokens, targets=tokens)[0], atol=0, rtol=0)
    model.train()
    assert not torch.allclose(model(tokens, targets=tokens)[0], model(tokens, targets=tokens)[0])
