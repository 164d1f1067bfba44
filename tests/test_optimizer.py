import math

import numpy as np
import pytest
import torch

from conftest import asset_path
from optimizer import AdamW


def test_matches_course_reference():
    """The assignment's own optimizer test: 1000 steps on a tiny regression, compared with its saved weights."""
    reference = np.load(asset_path("optimizer_test.npy"))
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2, bias=False)
    opt = AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4, correct_bias=True)
    for _ in range(1000):
        opt.zero_grad()
        x = torch.FloatTensor(rng.uniform(size=[model.in_features]))
        y_hat = model(x)
        y = torch.Tensor([x[0] + x[1], -x[2]])
        loss = ((y - y_hat) ** 2).sum()
        loss.backward()
        opt.step()
    np.testing.assert_allclose(model.weight.detach().numpy(), reference, atol=1e-5, rtol=1e-3)


SHAPES = [(7, 5), (7,), (3, 7), (2, 3, 4)]


def make_params(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]


def loss_fn(params, x):
    """A small MLP plus a 3-d parameter, so each of the first four parameters gets a dense gradient."""
    w1, b1, w2, w3 = params[:4]
    h = torch.tanh(x @ w1.T + b1) @ w2.T  # [batch, 3]
    return (h ** 2).mean() + (torch.sin(w3) * h.mean()).sum() + (w3 ** 2).mean()


def test_tracks_torch_adamw():
    """Same trajectory as torch.optim.AdamW once its hyper-parameters are translated to the course's update rule.

    Ours:  p <- (1 - lr*wd) * (p - lr * sqrt(bc2)/bc1 * m / (sqrt(v) + eps))      with bc_i = 1 - beta_i^t
    torch: p <- (1 - lr'*wd') * p - lr'/bc1 * m / (sqrt(v)/sqrt(bc2) + eps')
               = (1 - lr'*wd') * p - lr' * sqrt(bc2)/bc1 * m / (sqrt(v) + eps' * sqrt(bc2))
    Mapping that makes them equal:
      - torch decays before the update, ours after, so our Adam step is also shrunk by (1 - lr*wd):
        lr' = lr * (1 - lr*wd), and wd' = lr*wd / lr' so torch's decay factor 1 - lr'*wd' stays 1 - lr*wd;
      - torch adds eps to sqrt(v_hat), ours to sqrt(v): eps' = eps / sqrt(bc2), which depends on t, so it is
        set in torch's param group before every step.
    Run in float64 the two differ only by rounding (max 4e-15 here), so the tolerance is rtol=1e-9, atol=1e-12.
    Wrong rules miss by far more: no bias correction 0.9, decay not scaled by lr 1.0, decay before the update 5e-3,
    eps added to sqrt(v_hat) instead of sqrt(v) 7e-5.
    """
    lr, betas, eps, wd = 1e-2, (0.9, 0.999), 1e-6, 0.5
    ours, theirs = make_params(0), make_params(0)
    opt = AdamW(ours, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    lr_t = lr * (1 - lr * wd)
    ref = torch.optim.AdamW(theirs, lr=lr_t, betas=betas, eps=eps, weight_decay=lr * wd / lr_t)
    g = torch.Generator().manual_seed(1)
    for t in range(1, 101):
        x = torch.randn(8, 5, generator=g, dtype=torch.float64)
        for params, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            loss_fn(params, x).backward()
        ref.param_groups[0]["eps"] = eps / math.sqrt(1 - betas[1] ** t)
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _run(params, steps, seed=1, grad_every=None, **kwargs):
    """Train params on loss_fn for a number of steps; grad_every={i: k} gives param i a grad every k-th step only."""
    opt = AdamW(params, **kwargs)
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        x = torch.randn(8, 5, generator=g, dtype=params[0].dtype)
        opt.zero_grad()
        loss_fn(params, x).backward()
        for i, k in (grad_every or {}).items():
            if t % k:
                params[i].grad = None
        opt.step()
    return params[0]


@pytest.mark.parametrize("correct_bias", [True, False])
def test_foreach_is_bit_identical_to_loop(correct_bias):
    """Includes a param that never gets a grad and one with a grad every third step only (so a smaller step count)."""
    results = []
    for foreach in (False, True):
        params = make_params(0, dtype=torch.float32) + [torch.nn.Parameter(torch.ones(5, 5))]
        _run(params, steps=50, grad_every={1: 3}, lr=1e-2, weight_decay=0.1, correct_bias=correct_bias,
             foreach=foreach)
        results.append(params)
    loop, fused = results
    assert loop[-1].grad is None
    for a, b in zip(loop, fused):
        assert torch.equal(a, b)


def test_foreach_optimizer_skips_param_without_grad():
    unused = torch.nn.Parameter(torch.ones(5, 5))
    params = make_params(0, dtype=torch.float32) + [unused]
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True)
    loss_fn(params, torch.randn(8, 5)).backward()
    opt.step()
    assert torch.equal(unused, torch.ones(5, 5))
    assert unused not in opt.state


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1e-3), "learning rate"),
    (dict(betas=(-0.1, 0.999)), "beta parameter at index 0"),
    (dict(betas=(0.9, 1.0)), "beta parameter at index 1"),
    (dict(eps=-1e-8), "epsilon"),
    (dict(weight_decay=-0.1), "weight_decay"),
])
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize("foreach", [False, True])
def test_rejects_sparse_gradients(foreach):
    emb = torch.nn.Embedding(4, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        AdamW(emb.parameters(), foreach=foreach).step()


def test_correct_bias_changes_the_update():
    with_bias = _run(make_params(0), steps=10, lr=1e-2, correct_bias=True)
    without = _run(make_params(0), steps=10, lr=1e-2, correct_bias=False)
    assert not torch.allclose(with_bias, without)


def test_first_step_by_hand():
    """At t=1 m = (1-b1) g and sqrt(v) = sqrt(1-b2) |g|, so the corrected step is lr * sign(g) (up to eps)."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    p.grad = torch.tensor([0.5, -4.0, 2.0], dtype=torch.float64)
    lr, wd = 0.1, 0.2
    AdamW([p], lr=lr, eps=0.0, weight_decay=wd).step()
    expected = (torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64) - lr * torch.sign(p.grad)) * (1 - lr * wd)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)


def test_closure_loss_is_returned():
    params = make_params(0)
    x = torch.randn(8, 5, dtype=torch.float64)
    opt = AdamW(params)

    def closure():
        opt.zero_grad()
        loss = loss_fn(params, x)
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(loss_fn(make_params(0), x).item())
