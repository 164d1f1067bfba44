"""LoRA properties: a fresh adapter is an exact no-op, merging is invisible, only the adapter (and a
task head) trains, adapters round-trip, and parameter counts match the rank * (in + out) formula."""
import copy
import io

import pytest
import torch
import torch.nn as nn

from helpers import tiny_config, tiny_model
from lora import (LoRALayer, count_parameters, expected_lora_parameters, inject_lora, load_lora_state_dict,
                  lora_state_dict, mark_only_lora_trainable, merge_lora, unload_lora, unmerge_lora)
from quantize import QuantizedLinear, quantize_model, quantized_layers

ALL_TARGETS = ("compute_query", "compute_key", "compute_value", "compute_output", "w1", "w2", "w3")


def tokens(seed=0, batch=2, seqlen=12):
    return torch.randint(0, tiny_config().vocab_size, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def all_logits(model, idx):
    return model(idx, targets=idx)[0]  # with targets, logits cover every position


def randomise_lora_B(model, seed=1):
    """B starts at zero, which would hide any mistake in the LoRA path: fill it with noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALayer):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)


@pytest.mark.parametrize("targets", [("compute_query", "compute_value"), ALL_TARGETS])
def test_fresh_injection_leaves_logits_exactly_unchanged(targets):
    model = tiny_model()
    base = copy.deepcopy(model)
    names = inject_lora(model, rank=4, alpha=8.0, targets=targets)
    assert len(names) == model.config.n_layers * len(targets)
    assert all(isinstance(model.get_submodule(n), LoRALayer) for n in names)
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(all_logits(model, idx), all_logits(base, idx))


def test_lora_layer_matches_formula():
    torch.manual_seed(0)
    linear = nn.Linear(12, 7, bias=True)
    w0, b0 = linear.weight.detach().clone(), linear.bias.detach().clone()
    layer = LoRALayer(linear, rank=3, alpha=6.0)
    assert (layer.in_features, layer.out_features, layer.scaling) == (12, 7, 2.0)
    assert layer.weight is linear.weight and not linear.weight.requires_grad and not linear.bias.requires_grad
    assert layer.lora_A.shape == (3, 12) and layer.lora_A.abs().sum() > 0
    assert layer.lora_B.shape == (7, 3) and not layer.lora_B.any()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 12)
    expected = x @ w0.T + b0 + (6.0 / 3) * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("rank, alpha", [(0, 1.0), (-2, 1.0), (2, 0.0), (2, -1.0)])
def test_lora_layer_rejects_bad_rank_or_alpha(rank, alpha):
    with pytest.raises(ValueError, match="rank|alpha"):
        LoRALayer(nn.Linear(4, 4), rank=rank, alpha=alpha)


def test_merge_equals_unmerged_and_unmerge_restores_base_weight():
    model = tiny_model()
    inject_lora(model, rank=4, alpha=8.0, targets=ALL_TARGETS)
    randomise_lora_B(model)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base.weight")}
    idx = tokens()
    with torch.no_grad():
        unmerged = all_logits(model, idx)
        merge_lora(model)
        merge_lora(model)  # a second merge must not add the update twice
        merged = all_logits(model, idx)
        changed = [n for n, p in model.named_parameters() if n in base_weights and not torch.equal(p, base_weights[n])]
        unmerge_lora(model)
        unmerge_lora(model)
    assert len(changed) == len(base_weights)  # merging really folded the update into every base weight
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        if name in base_weights:
            torch.testing.assert_close(p, base_weights[name], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(all_logits(model, idx), unmerged, atol=1e-5, rtol=0)


def test_only_lora_and_head_receive_gradients():
    model = tiny_model()
    inject_lora(model, rank=2)
    model.classifier_head = nn.Linear(model.config.dim, 3)
    mark_only_lora_trainable(model, extra=("classifier_head",))
    randomise_lora_B(model)  # with B = 0, A would get a zero (but not None) gradient
    model.train()
    idx = tokens()
    _, hidden = model(idx, targets=idx)
    loss = nn.functional.cross_entropy(model.classifier_head(hidden[:, -1]), torch.tensor([0, 2]))
    loss.backward()
    for name, p in model.named_parameters():
        trainable = "lora_" in name or name.startswith("classifier_head")
        assert p.requires_grad == trainable, name
        if trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_adapter_round_trip_and_mismatched_targets_raise():
    model = tiny_model()
    inject_lora(model, rank=4, alpha=8.0)
    randomise_lora_B(model)
    adapter = lora_state_dict(model)
    assert adapter and all(k.endswith(("lora_A", "lora_B")) for k in adapter)
    buffer = io.BytesIO()
    torch.save(adapter, buffer)

    fresh = tiny_model()  # same base weights, new random A and zero B
    inject_lora(fresh, rank=4, alpha=8.0)
    idx = tokens()
    with torch.no_grad():
        assert not torch.equal(all_logits(fresh, idx), all_logits(model, idx))
        load_lora_state_dict(fresh, torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
        assert torch.equal(all_logits(fresh, idx), all_logits(model, idx))

    other = tiny_model()
    inject_lora(other, rank=4, alpha=8.0, targets=("compute_query", "compute_key"))
    with pytest.raises(ValueError, match="missing keys.*compute_key.*unexpected keys.*compute_value"):
        load_lora_state_dict(other, adapter)
    wrong_rank = tiny_model()
    inject_lora(wrong_rank, rank=2, alpha=8.0)
    with pytest.raises(ValueError, match="shape"):
        load_lora_state_dict(wrong_rank, adapter)


def test_adapter_with_head_round_trip():
    model = tiny_model()
    inject_lora(model, rank=2)
    model.classifier_head = nn.Linear(model.config.dim, 3)
    randomise_lora_B(model)
    adapter = lora_state_dict(model, extra=("classifier_head",))
    assert {"classifier_head.weight", "classifier_head.bias"} <= set(adapter)
    head_size = 3 * model.config.dim + 3
    assert sum(v.numel() for v in adapter.values()) == expected_lora_parameters(model.config, 2) + head_size

    fresh = tiny_model()
    inject_lora(fresh, rank=2)
    fresh.classifier_head = nn.Linear(fresh.config.dim, 3)
    load_lora_state_dict(fresh, adapter)
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(fresh.classifier_head(fresh(idx)[1]), model.classifier_head(model(idx)[1]))


def test_loading_into_merged_model_raises():
    model = tiny_model()
    inject_lora(model)
    adapter = {k: v.clone() for k, v in lora_state_dict(model).items()}
    merge_lora(model)
    with pytest.raises(ValueError, match="unmerge"):
        load_lora_state_dict(model, adapter)


@pytest.mark.parametrize("targets", [("compute_query", "compute_value"), ("compute_key",), ("compute_output", "w2"),
                                     ("w1", "w3"), ALL_TARGETS])
@pytest.mark.parametrize("rank", [1, 4])
def test_trainable_count_matches_formula(targets, rank):
    model = tiny_model()
    total = count_parameters(model, trainable_only=False)
    inject_lora(model, rank=rank, targets=targets)
    mark_only_lora_trainable(model)
    c = tiny_config()
    dim, kv_dim, hidden = c.dim, c.n_kv_heads * c.head_dim, c.hidden_dim  # 32, 16, 88
    by_hand = {"compute_query": dim + dim, "compute_key": dim + kv_dim, "compute_value": dim + kv_dim,
               "compute_output": dim + dim, "w1": dim + hidden, "w2": hidden + dim, "w3": dim + hidden}
    expected = c.n_layers * rank * sum(by_hand[t] for t in targets)
    assert count_parameters(model) == expected == expected_lora_parameters(c, rank, targets)
    assert count_parameters(model, trainable_only=False) == total + expected


def test_default_targets_count():
    c = tiny_config()
    kv_dim = c.n_kv_heads * c.head_dim
    assert expected_lora_parameters(c, 8) == c.n_layers * 8 * ((c.dim + c.dim) + (c.dim + kv_dim))


def test_dropout_only_on_lora_path():
    model = tiny_model()
    base = copy.deepcopy(model)
    inject_lora(model, rank=4, alpha=8.0, dropout=0.5)
    model.train(), base.train()  # the tiny config has dropout 0, so the base model stays deterministic
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(all_logits(model, idx), all_logits(base, idx))  # B = 0: dropout must be invisible
        randomise_lora_B(model)
        torch.manual_seed(0)
        first = all_logits(model, idx)
        assert not torch.equal(first, all_logits(model, idx))  # but the LoRA path is dropped in training
        model.eval()
        assert torch.equal(all_logits(model, idx), all_logits(model, idx))


@pytest.mark.parametrize("targets", [("wq",), ("compute_query", "typo"), ()])
def test_unknown_targets_raise(targets):
    model = tiny_model()
    with pytest.raises(ValueError, match="compute_query.*w3|w3.*compute_query") as error:
        inject_lora(model, targets=targets)
    for t in targets:
        assert t in str(error.value)
    assert not any(isinstance(m, LoRALayer) for m in model.modules())  # nothing half-injected


# ----------------------------------------------------------------------------------------------
# QLoRA: LoRA on a quantized base (quantize.py)


def qlora_model(kind="nf4", targets=ALL_TARGETS, seed=0):
    model = tiny_model(seed)
    quantize_model(model, kind)
    inject_lora(model, rank=4, alpha=8.0, targets=targets)
    mark_only_lora_trainable(model)
    return model


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("quantize_first", [True, False])
def test_qlora_with_b_zero_equals_the_quantized_base_exactly(kind, quantize_first):
    """Whether LoRA wraps quantized layers, or the model is quantized after injection (the LoRA layers' bases
    then are), a fresh adapter (B = 0) leaves the quantized model's logits exactly as they were."""
    base = tiny_model()
    quantize_model(base, kind)
    idx = tokens()
    expected = all_logits(base, idx)
    model = tiny_model()
    if quantize_first:
        quantize_model(model, kind)
        inject_lora(model, rank=4, targets=ALL_TARGETS)
    else:
        inject_lora(model, rank=4, targets=ALL_TARGETS)
        quantize_model(model, kind)
    assert all(isinstance(layer.base, QuantizedLinear) for layer in model.modules() if isinstance(layer, LoRALayer))
    torch.testing.assert_close(all_logits(model, idx), expected, rtol=0, atol=0)


def test_qlora_layer_matches_formula():
    model = qlora_model(targets=("w2",))
    randomise_lora_B(model)
    layer = model.layers[0].feed_forward.w2
    x = torch.randn(3, layer.in_features)
    expected = x @ layer.base.dequantize().T + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_qlora_only_lora_parameters_get_gradients():
    model = qlora_model()
    randomise_lora_B(model)
    all_logits(model, tokens()).square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in with_grad)
    assert all(not list(q.parameters()) for q in quantized_layers(model))  # the base holds buffers only


def test_qlora_merge_dequantizes_and_unmerge_restores():
    model = qlora_model()
    randomise_lora_B(model)
    idx = tokens()
    before = all_logits(model, idx)
    packed = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model)
    layer = model.layers[0].attention.compute_query
    torch.testing.assert_close(layer.weight, layer.base.dequantize() + layer.delta_weight(), rtol=0, atol=0)
    torch.testing.assert_close(all_logits(model, idx), before, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    assert layer.merged_weight is None
    assert all(torch.equal(v, packed[k]) for k, v in model.state_dict().items())  # the quantized base untouched
    torch.testing.assert_close(all_logits(model, idx), before, rtol=0, atol=0)


def test_qlora_unload_gives_full_precision_linears():
    model = qlora_model(targets=("compute_query", "compute_value"))
    randomise_lora_B(model)
    idx = tokens()
    before = all_logits(model, idx)
    unload_lora(model)
    query = model.layers[0].attention.compute_query
    assert type(query) is nn.Linear and query.weight.dtype == torch.float32 and query.weight.requires_grad
    assert isinstance(model.layers[0].feed_forward.w1, QuantizedLinear)  # not LoRA'd: still quantized
    torch.testing.assert_close(all_logits(model, idx), before, rtol=1e-5, atol=1e-5)


def test_qlora_adapter_round_trip():
    source, target = qlora_model(), qlora_model()
    randomise_lora_B(source)
    idx = tokens()
    load_lora_state_dict(target, lora_state_dict(source))
    torch.testing.assert_close(all_logits(target, idx), all_logits(source, idx), rtol=0, atol=0)
