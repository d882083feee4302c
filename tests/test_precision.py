"""bfloat16 mixed precision in training steps (train/precision.py): the step really computes in
bfloat16, everything the trainer hands back stays float32 and untouched, the bfloat16 weight copies
and float32 attention change nothing autocast would not, and the prefix cache stays exact."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import leanfit as lf
from leanfit.data.splits import CAUSAL_LM, CLASSIFICATION
from leanfit.train import Trainer
from leanfit.train.precision import MixedPrecision, autocast, native_bf16, resolve

from test_lean import adapted, run, splits, tiny_bert, tiny_llama


def tied_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def first_loss(model, data, precision):
    trainer = Trainer(model, data, epochs=1, batch_size=8, lr=5e-3, progress=False, log_every=1,
                      precision=precision, max_steps=1)
    trainer.fit()
    return next(r["values"]["loss"] for r in trainer.state.history if r["kind"] == "train")


@pytest.mark.parametrize("build,task", [(tiny_bert, CLASSIFICATION), (tiny_llama, CAUSAL_LM)], ids=["bert", "llama"])
def test_bf16_steps_compute_in_bfloat16_and_train(build, task):
    data = splits(task)
    full = first_loss(adapted(build, top_k=4), data, "fp32")
    low = first_loss(adapted(build, top_k=4), data, "bf16")
    assert low != full  # the products ran in bfloat16 ...
    assert low == pytest.approx(full, rel=2e-2)  # ... to bfloat16's precision
    _, full_curve = run(adapted(build, top_k=4), data)
    trainer, low_curve = run(adapted(build, top_k=4), data, precision="bf16")
    assert low_curve == pytest.approx(full_curve, rel=2e-2)  # training follows float32's, step by step
    assert trainer.policy.info["precision"] == "bf16"


def test_bf16_training_hands_back_float32_weights_and_leaves_the_frozen_ones_untouched():
    model = adapted(tied_llama, top_k=4)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer, _ = run(model, splits(CAUSAL_LM), precision="bf16")
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32, n
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)
    assert trainer.evaluate("test")["loss"] == pytest.approx(  # evaluation is float32: the model's own figure
        Trainer(model, splits(CAUSAL_LM), progress=False).evaluate("test")["loss"], rel=1e-6)


def test_the_step_swaps_in_bfloat16_copies_of_frozen_linear_weights_but_not_a_tied_embedding():
    model = adapted(tied_llama, top_k=4)
    mixed = MixedPrecision(model, "bf16", torch.device("cpu"))
    base = model.model.layers[0].self_attn.q_proj.base_layer.weight
    lora = next(p for n, p in model.named_parameters() if p.requires_grad)
    embedding = model.model.embed_tokens.weight
    assert model.lm_head.weight is embedding
    before, pointer = base.detach().clone(), base.data_ptr()
    with mixed.step():
        assert base.dtype == torch.bfloat16 and torch.equal(base.float(), before.bfloat16().float())
        assert embedding.dtype == torch.float32 and lora.dtype == torch.float32
    assert base.data_ptr() == pointer and torch.equal(base, before)  # the float32 tensor back, not a rounded copy
    with pytest.raises(RuntimeError), mixed.step():
        raise RuntimeError("a step that fails")
    assert base.dtype == torch.float32


def test_bfloat16_weight_copies_and_float32_attention_change_nothing_autocast_would_not():
    """The copies hold what autocast's cast would make; SDPA gets float32 inputs either way here."""
    model = adapted(tiny_llama, top_k=4)
    batch = {k: v[:4] for k, v in splits(CAUSAL_LM).train.items()}
    mixed = MixedPrecision(model, "bf16", torch.device("cpu"))
    with autocast("bf16", torch.device("cpu")):
        plain = model(**batch).loss
    with mixed.step(), mixed.forward():
        swapped = model(**batch).loss
    assert swapped.item() == plain.item()


def test_attention_runs_in_float32_under_cpu_autocast_and_the_function_comes_back():
    original = F.scaled_dot_product_attention
    q = torch.randn(2, 2, 5, 8)
    with autocast("bf16", torch.device("cpu")):
        inside = F.scaled_dot_product_attention
        out = F.scaled_dot_product_attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), is_causal=True)
        assert torch.mm(q[0, 0], q[0, 0].T).dtype == torch.bfloat16  # products are bfloat16 there
    assert out.dtype == torch.float32 and inside is not original
    assert F.scaled_dot_product_attention is original
    expected = original(*(q.bfloat16().float(),) * 3, is_causal=True)
    assert torch.allclose(out, expected)


@pytest.mark.parametrize("build,task", [(tiny_bert, CLASSIFICATION), (tiny_llama, CAUSAL_LM)], ids=["bert", "llama"])
def test_cached_prefix_gives_the_same_losses_in_bf16(build, task):
    data = splits(task)
    _, plain = run(adapted(build), data, prefix="eval", precision="bf16")
    _, cached = run(adapted(build), data, prefix="cache", precision="bf16")
    assert cached == pytest.approx(plain, rel=1e-5, abs=1e-6)


def test_auto_precision_follows_the_hardware_and_bad_values_are_refused():
    cpu = torch.device("cpu")
    assert resolve("auto", cpu) == ("bf16" if native_bf16(cpu) else "fp32")
    assert resolve("fp32", cpu) == "fp32" and resolve("bf16", cpu) == "bf16"
    with pytest.raises(lf.errors.ConfigError, match="precision must be one of fp32, bf16, auto"):
        Trainer(adapted(tiny_bert), splits(CLASSIFICATION), precision="fp16", progress=False)


def test_lisa_with_linear_adapters_never_swaps_an_adapter_weight():
    """LISA freezes unsampled blocks' adapters between steps; a bottleneck adapter's weights are
    nn.Linear weights, and must keep training in float32 with their own values."""
    model = adapted(tiny_bert, top_k=4, method=lf.Bottleneck(size=8))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = Trainer(model, splits(CLASSIFICATION), epochs=2, batch_size=8, lr=5e-3, progress=False,
                      lisa_layers=1, lisa_period=2, precision="bf16")
    trainer.fit()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any(".down." in n or ".up." in n for n in changed)
    with trainer.mixed.step():  # even while LISA has them frozen, adapter weights stay float32 in a step
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in before)
        assert model.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("method", [lf.IA3(), lf.SSF(), lf.BitFit(), lf.LoRA(rank=4)], ids=lambda m: m.method)
def test_an_adapted_layer_keeps_its_base_dtype_under_autocast(method):
    # IA3's l ⊙ h with a float32 l would turn a bfloat16 product float32, and the block after it
    # (slower, twice the saved bytes); the delta joins the base output in the base's dtype, as in PEFT
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(16, 8))
    lf.adapt(layer, method, targets=["0"])
    for p in layer.parameters():  # a trained, non-zero adapter
        if p.requires_grad:
            torch.nn.init.normal_(p, 1.0, 0.1)
    x = torch.randn(4, 16)
    host = layer[0]
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = layer(x)
            base_out = host.base_layer(x)
            (adapter,) = host.adapters.values()
            delta = adapter.delta(x, base_out, host.base_layer)
        full, base = layer(x), host.base_layer(x)
    assert low.dtype == torch.bfloat16
    assert delta.dtype == torch.bfloat16  # computed in it too: no mixed-dtype elementwise ops
    assert torch.allclose(low.float(), full, rtol=5e-2, atol=5e-2)  # the adapter still acts ...
    assert not torch.allclose(full, base, rtol=5e-2, atol=5e-2)  # ... and changes the output
