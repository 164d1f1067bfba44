"""LoRA adapters across the project's edge, against peft itself: a PEFT adapter folded into our model
(load_pretrained(adapter=), --adapter) gives PEFT's logits; `--option export --format peft` writes
adapters PEFT applies with the same logits, a LoRA code training's included (best_adapter.pt beside
best.pt, onto the hf export of its base); what our LoRA cannot compute is refused in one line."""
import dataclasses
import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

import run_llama
from checkpoint import CodeTrainingState, apply_adapter, load_pretrained, read_adapter, training_adapter_path
from codegen import cli
from conftest import asset_path
from utils import CheckpointError

transformers = pytest.importorskip("transformers", reason="transformers is the reference Llama for PEFT")
peft = pytest.importorskip("peft", reason="peft is the reference LoRA implementation")
safetensors = pytest.importorskip("safetensors.torch", reason="PEFT adapters store their weights as safetensors")

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OUR_TARGETS = "compute_query,compute_key,compute_value,compute_output,w1,w2,w3"
SHAPES = {
    "llama2": dict(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=False),
    "llama3.2": dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=True,
                     rope_theta=500000.0,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


def hf_base(shape, seed=0, **extra):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**SHAPES[shape], **extra}, attention_bias=False, mlp_bias=False)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # livelier than the 0.02 init, and norms that are not all ones
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 1 else 1.0 / p.shape[-1] ** 0.5) + (p.dim() == 1))
    return model


def peft_adapter(base, folder, seed=1, **config):
    """Wrap `base` (in place) with a rank-4 LoRA on every projection, A and B random and non-zero, and save it.
    (A modest update: PEFT computes W x + s B A x where we fold s B A into W, and float32 rounds the two
    apart, as it does PEFT's own merge_and_unload; with these sizes by under 1e-5.)"""
    settings = dict(r=4, lora_alpha=8, target_modules=HF_TARGETS, lora_dropout=0.0, **config)
    model = peft.get_peft_model(base, peft.LoraConfig(**settings)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    model.save_pretrained(folder)
    return model


@pytest.fixture(params=list(SHAPES))
def base_and_adapter(request, tmp_path):
    """(HF base folder, PEFT adapter folder, the PEFT model) for one shape."""
    base = hf_base(request.param)
    base.save_pretrained(tmp_path / "base")
    model = peft_adapter(base, tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter", model


def vocab_of(folder):
    return json.loads((folder / "config.json").read_text())["vocab_size"]


def tokens(vocab, shape=(2, 30), seed=2):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def our_logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids, targets=ids)[0]


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def run_main(main, *args):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------------------------
# PEFT -> ours


def test_peft_adapter_folded_in_gives_peft_s_logits(base_and_adapter):
    base, adapter, reference = base_and_adapter
    ours = load_pretrained(base, adapter=adapter)
    assert not any("lora" in name for name in ours.state_dict())  # folded in: a plain Llama again
    ids = tokens(vocab_of(base))
    expected = hf_logits(reference, ids)
    torch.testing.assert_close(our_logits(ours, ids), expected, atol=1e-5, rtol=1e-5)
    plain = load_pretrained(base)
    assert (our_logits(plain, ids) - expected).abs().max() > 1e-2  # the adapter matters
    bf16 = load_pretrained(base, dtype=torch.bfloat16, adapter=adapter)
    assert bf16.dtype == torch.bfloat16


def test_rslora_scales_by_alpha_over_sqrt_r(tmp_path):
    base = hf_base("llama3.2", seed=3)
    base.save_pretrained(tmp_path / "base")
    reference = peft_adapter(base, tmp_path / "adapter", use_rslora=True)
    assert read_adapter(tmp_path / "adapter", load_pretrained(tmp_path / "base").config).alpha == pytest.approx(16.0)
    ids = tokens(300)
    torch.testing.assert_close(our_logits(load_pretrained(tmp_path / "base", adapter=tmp_path / "adapter"), ids),
                               hf_logits(reference, ids), atol=1e-5, rtol=1e-5)


def test_code_options_take_an_adapter(base_and_adapter, tmp_path):
    """codegen.common.load_code_model (what every code option loads through) folds --adapter in, and
    --option code_generate runs with it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from codegen.common import load_code_model
    from utils import CheckpointError

    base, adapter, reference = base_and_adapter
    with pytest.raises(CheckpointError, match="fewer than the tokenizer's 32000"):  # 32000 pieces, a tiny vocabulary
        load_code_model(base, "cpu", str(asset_path("tokenizer.model")), adapter=adapter)
    words = {f"w{i}": i for i in range(vocab_of(base) - 2)} | {"<s>": vocab_of(base) - 2, "</s>": vocab_of(base) - 1}
    small = Tokenizer(models.WordLevel(words, unk_token="w0"))
    small.pre_tokenizer = pre_tokenizers.Whitespace()
    small.save(str(tmp_path / "tokenizer.json"))   # a tokenizer that fits the base's vocabulary
    model, _ = load_code_model(base, "cpu", str(tmp_path / "tokenizer.json"), adapter=adapter)
    ids = tokens(vocab_of(base))
    torch.testing.assert_close(our_logits(model, ids), hf_logits(reference, ids), atol=1e-5, rtol=1e-5)


def test_generate_takes_an_adapter(tmp_path):
    """--option generate --adapter: the temperature-0 text is PEFT's greedy continuation; code_generate runs."""
    import sentencepiece

    base = hf_base("llama2", seed=4, vocab_size=32000, hidden_size=32, intermediate_size=64, bos_token_id=1,
                   eos_token_id=2)
    base.save_pretrained(tmp_path / "hf")
    shutil.copy(asset_path("tokenizer.model"), tmp_path / "hf" / "tokenizer.model")
    reference = peft_adapter(base, tmp_path / "adapter")
    rc, _, err = run_main(run_llama.main, "--option", "generate", "--pretrained-model-path", tmp_path / "hf",
                          "--adapter", tmp_path / "adapter", "--quiet", "--generated_sentence_low_temp_out",
                          tmp_path / "t0.txt", "--generated_sentence_high_temp_out", tmp_path / "t1.txt")
    assert rc == 0, err
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "hf" / "tokenizer.model"))
    ids = torch.tensor([[1] + sp.encode(run_llama.GENERATE_PROMPT)])
    with torch.no_grad():
        for _ in range(75):
            ids = torch.cat([ids, reference(ids).logits[:, -1:].argmax(-1)], dim=1)
    expected = ids[0].tolist()
    if 2 in expected[-75:]:
        expected = expected[: expected.index(2, len(expected) - 75) + 1]
    assert (tmp_path / "t0.txt").read_text() == sp.decode(expected)
    rc, _, err = run_main(cli.main, "--option", "code_generate", "--pretrained-model-path", tmp_path / "hf",
                          "--adapter", tmp_path / "adapter", "--prompt", "def add(a, b):\n", "--max_new_tokens", "4")
    assert rc == 0, err
    with pytest.raises(SystemExit):  # argparse's usage error: --adapter is for generate and the code options
        run_main(run_llama.main, "--option", "prompt", "--adapter", tmp_path / "adapter")


# ----------------------------------------------------------------------------------------------
# ours -> PEFT


def test_export_peft_round_trips_and_applies_in_peft(base_and_adapter, tmp_path):
    base, adapter, reference = base_and_adapter
    rc, _, err = run_main(run_llama.main, "--option", "export", "--pretrained-model-path", base, "--adapter", adapter,
                          "--format", "peft", "--out", tmp_path / "again")
    assert rc == 0, err
    before = safetensors.load_file(adapter / "adapter_model.safetensors")
    after = safetensors.load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    settings = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert (settings["r"], settings["lora_alpha"], sorted(settings["target_modules"])) == (4, 8, sorted(HF_TARGETS))
    fresh = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    applied = peft.PeftModel.from_pretrained(fresh, tmp_path / "again").eval()
    ids = tokens(vocab_of(base))
    torch.testing.assert_close(hf_logits(applied, ids), hf_logits(reference, ids), atol=1e-5, rtol=1e-5)


def rmsnorm_base(path, seed=0):
    """A tiny causal RMSNorm checkpoint of the tokenizer's 32000 pieces (what hf and peft can carry)."""
    from config import LlamaConfig
    from llama import Llama

    torch.manual_seed(seed)
    config = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=8,
                         max_seq_len=256, norm_type="rmsnorm", causal=True)
    torch.save({"model_args": dataclasses.asdict(config), "model": Llama(config).state_dict()}, path)
    return path


def train_lora(work, out, *extra):
    pairs = [{"prompt": f'def add_{k}(x):\n    """Return x plus {k}."""\n', "code": f"    return x + {k}\n",
              "path": f"m{k % 3}.py"} for k in range(12)]
    (work / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[:9]))
    (work / "valid.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[9:]))
    rc, _, err = run_main(cli.main, "--option", "codegen", "--pretrained-model-path", work / "base.pt", "--tokenizer",
                          asset_path("tokenizer.model"), "--train_data", work / "train.jsonl", "--valid_data",
                          work / "valid.jsonl", "--out_dir", out, "--mode", "lora", "--lora_rank", "4",
                          "--lora_targets", OUR_TARGETS, "--batch_size", "3", "--max_len", "64", "--eval_samples", "0",
                          "--lr", "3e-2", "--max_steps", "4", "--eval_every", "2", "--quiet", *extra)
    assert rc == 0, err


@pytest.mark.usefixtures("one_thread")
def test_lora_code_training_exports_as_a_peft_adapter_of_its_base(tmp_path, monkeypatch):
    """best_adapter.pt beside best.pt: `--pretrained-model-path best.pt --format peft` finds it, and PEFT
    applies the result on the hf export of the base with best.pt's logits; --adapter best_adapter.pt
    onto the base gives them too; a best.pt with its adapter again is refused (it would count twice)."""
    monkeypatch.setenv("MINILLAMA_TOKENIZER", str(asset_path("tokenizer.model")))
    rmsnorm_base(tmp_path / "base.pt")
    train_lora(tmp_path, tmp_path / "run")
    best, adapter = tmp_path / "run" / "best.pt", tmp_path / "run" / "best_adapter.pt"
    assert training_adapter_path(best) == adapter and adapter.is_file()
    assert tuple(torch.load(best, weights_only=True)) == CodeTrainingState.BEST_KEYS  # best.pt as before
    for args in (("--pretrained-model-path", tmp_path / "base.pt", "--format", "hf", "--out", tmp_path / "hf"),
                 ("--pretrained-model-path", best, "--format", "peft", "--out", tmp_path / "peft")):
        rc, _, err = run_main(run_llama.main, "--option", "export", *args)
        assert rc == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    applied = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    ids = tokens(32000)
    expected = our_logits(load_pretrained(best), ids)
    assert (expected - our_logits(load_pretrained(tmp_path / "base.pt"), ids)).abs().max() > 1e-3  # it trained
    torch.testing.assert_close(hf_logits(applied, ids), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_logits(load_pretrained(tmp_path / "base.pt", adapter=adapter), ids), expected,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointError, match="already has its adapters merged"):
        load_pretrained(best, adapter=adapter)


def test_sentinel_rows_trained_with_lora_are_not_a_peft_adapter(tmp_path):
    """LoRA with FIM trains the sentinel rows of the embedding too, which a PEFT LoRA adapter cannot carry."""
    from codegen.model_setup import setup_trainable
    from config import LlamaConfig
    from llama import Llama

    model = Llama(LlamaConfig(dim=32, n_layers=1, n_heads=4, vocab_size=32004, multiple_of=8, norm_type="rmsnorm"))
    settings = dict(mode="lora", lora_rank=2, lora_alpha=4.0, lora_dropout=0.0, lora_targets=["compute_query"], fim=True)
    setup_trainable(model, settings, 32000)
    CodeTrainingState(settings=settings, codegen={"base_checkpoint": "base.pt"}, step=3).save_best(tmp_path / "best.pt",
                                                                                                 model)
    rc, _, err = run_main(run_llama.main, "--option", "export", "--pretrained-model-path", tmp_path / "best.pt",
                          "--format", "peft", "--out", tmp_path / "peft")
    assert rc == 2 and "FIM sentinel rows" in err and err.count("\n") == 1
    assert not (tmp_path / "peft").exists()


# ----------------------------------------------------------------------------------------------
# what our LoRA does not compute: one line


def edited(folder, **changes):
    settings = json.loads((folder / "adapter_config.json").read_text())
    settings.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return folder


@pytest.mark.parametrize("changes, message", [
    (dict(use_dora=True), "use_dora=True: DoRA"),
    (dict(bias="all"), "bias='all': trained biases"),
    (dict(bias="lora_only"), "bias='lora_only'"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
    (dict(peft_type="IA3"), "only LoRA adapters"),
])
def test_adapters_we_cannot_compute_are_refused(tmp_path, changes, message):
    base = hf_base("llama2")
    base.save_pretrained(tmp_path / "base")
    peft_adapter(base, tmp_path / "adapter")
    adapter = edited(tmp_path / "adapter", **changes)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(tmp_path / "base", adapter=adapter)
    assert message in str(err.value) and "\n" not in str(err.value)
    rc, _, stderr = run_main(run_llama.main, "--option", "export", "--pretrained-model-path", tmp_path / "base",
                             "--adapter", adapter, "--format", "peft", "--out", tmp_path / "out")
    assert rc == 2 and message in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_adapters_that_do_not_fit_are_refused(tmp_path):
    base = hf_base("llama2")
    base.save_pretrained(tmp_path / "base")
    peft_adapter(base, tmp_path / "some_layers", layers_to_transform=[0])
    other = hf_base("llama2", hidden_size=32, intermediate_size=64)
    peft_adapter(other, tmp_path / "other_shape")
    config = load_pretrained(tmp_path / "base").config
    with pytest.raises(CheckpointError, match="does not fit the base model.*missing.*layers.1"):
        read_adapter(tmp_path / "some_layers", config)
    with pytest.raises(CheckpointError, match="does not fit the base model.*instead of"):
        read_adapter(tmp_path / "other_shape", config)
    with pytest.raises(FileNotFoundError, match="adapter .*nowhere not found"):
        read_adapter(tmp_path / "nowhere", config)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        read_adapter(tmp_path / "empty", config)
    rc, _, err = run_main(run_llama.main, "--option", "export", "--pretrained-model-path", tmp_path / "base",
                          "--adapter", tmp_path / "some_layers", "--format", "hf", "--out", tmp_path / "hf")
    assert rc == 2 and err.count("\n") == 1 and "does not fit" in err
    assert not (tmp_path / "hf").exists()


def test_apply_adapter_is_lora_inject_then_fold():
    """apply_adapter computes W + (alpha / r) B A with B's q/k rows in our order (lora.inject_lora's layers)."""
    from checkpoint import Adapter
    from config import LlamaConfig
    from llama import Llama

    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=16, n_layers=1, n_heads=2, vocab_size=10, multiple_of=8, norm_type="rmsnorm"))
    a, b = torch.randn(2, 16), torch.randn(16, 2)
    before = model.layers[0].attention.compute_query.weight.detach().clone()
    apply_adapter(model, Adapter(2, 6.0, ("compute_query",), {"layers.0.attention.compute_query.lora_A": a,
                                                              "layers.0.attention.compute_query.lora_B": b}, "test"))
    assert type(model.layers[0].attention.compute_query) is torch.nn.Linear
    torch.testing.assert_close(model.layers[0].attention.compute_query.weight, before + 3.0 * b @ a)
