import pytest
import torch

from conftest import asset_path
from rope import apply_rotary_emb, rope_frequencies


def complex_rope(x, theta=10000.0, start=0):
    """Independent reference: pairs as complex numbers times e^{i m theta_i} (Llama's original code path)."""
    _, seqlen, _, head_dim = x.shape
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(start, start + seqlen, dtype=torch.float64), inv_freq)
    rotation = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    as_complex = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(as_complex * rotation).flatten(-2).float()


def test_matches_course_reference():
    expected_q, expected_k = torch.load(asset_path("rotary_embedding_actual.data"), weights_only=True)
    query, key = 2 * torch.ones([1, 2, 2, 4]), 3 * torch.ones([1, 2, 2, 4])
    q, k = apply_rotary_emb(query, key, head_dim=4, max_seq_len=20)
    torch.testing.assert_close(q, expected_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(k, expected_k, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape,start", [((2, 7, 3, 8), 0), ((1, 33, 4, 64), 0), ((3, 5, 2, 16), 11), ((2, 1, 1, 2), 40)])
def test_matches_complex_multiplication(shape, start):
    torch.manual_seed(sum(shape))
    q, k = torch.randn(shape), torch.randn(shape)
    rq, rk = apply_rotary_emb(q, k, shape[-1], max_seq_len=64, start_pos=start)
    torch.testing.assert_close(rq, complex_rope(q, start=start), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rk, complex_rope(k, start=start), atol=1e-5, rtol=1e-5)


def test_preserves_norms_and_position_zero():
    torch.manual_seed(0)
    q, k = torch.randn(2, 9, 3, 16), torch.randn(2, 9, 3, 16)
    rq, rk = apply_rotary_emb(q, k, 16, 32)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(rk.norm(dim=-1), k.norm(dim=-1))
    torch.testing.assert_close(rq[:, 0], q[:, 0])  # position 0 is rotated by angle 0


def test_dot_product_depends_only_on_relative_position():
    torch.manual_seed(1)
    q, k = torch.randn(16), torch.randn(16)

    def score(m, n):  # query at position m, key at position n
        seq = 24
        qs, ks = torch.zeros(1, seq, 1, 16), torch.zeros(1, seq, 1, 16)
        qs[0, m, 0], ks[0, n, 0] = q, k
        rq, rk = apply_rotary_emb(qs, ks, 16, seq)
        return rq[0, m, 0] @ rk[0, n, 0]

    for m, n, shift in [(5, 2, 7), (10, 10, 3), (0, 4, 15)]:
        torch.testing.assert_close(score(m, n), score(m + shift, n + shift), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)


def test_offset_equals_slice_of_full_sequence():
    torch.manual_seed(2)
    q, k = torch.randn(1, 12, 2, 8), torch.randn(1, 12, 2, 8)
    full_q, full_k = apply_rotary_emb(q, k, 8, 12)
    tail_q, tail_k = apply_rotary_emb(q[:, 7:], k[:, 7:], 8, 12, start_pos=7)
    torch.testing.assert_close(tail_q, full_q[:, 7:])
    torch.testing.assert_close(tail_k, full_k[:, 7:])


def test_rejects_positions_beyond_max_seq_len():
    with pytest.raises(ValueError, match="max_seq_len"):
        apply_rotary_emb(torch.zeros(1, 5, 1, 4), torch.zeros(1, 5, 1, 4), 4, max_seq_len=4)


def test_frequency_table_shape():
    cos, sin = rope_frequencies(8, 10)
    assert cos.shape == sin.shape == (10, 4)
    torch.testing.assert_close(cos**2 + sin**2, torch.ones(10, 4))
