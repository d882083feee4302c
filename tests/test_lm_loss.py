"""A causal LM's output layer and loss fused chunk by chunk (train/lm_loss.py)."""

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import leanfit as lf
from leanfit.data.splits import CAUSAL_LM
from leanfit.train import Trainer, lm_loss
from leanfit.train.metrics import IGNORE_INDEX, evaluate_split
from leanfit.train.lm_loss import FusedLMLoss, linear_cross_entropy

from _tiny import causal_lm_data, trainable_state


def test_the_fused_loss_and_gradient_equal_cross_entropy_on_the_logits(monkeypatch):
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", 4 * 50 * 7)  # 7 tokens per chunk: several chunks, a ragged last
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(30, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64)
    bias = torch.randn(50, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 50, (30,), generator=g)
    targets[[3, 11, 29]] = IGNORE_INDEX
    for b in (None, bias):
        h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
        expected = F.cross_entropy(F.linear(h1, weight, b), targets, ignore_index=IGNORE_INDEX)
        got = linear_cross_entropy(h2, weight, b, targets)
        (expected * 3).backward()
        (got * 3).backward()
        assert torch.allclose(got, expected, rtol=1e-12)
        assert (h2.grad - h1.grad).abs().max() < 1e-12, (h2.grad - h1.grad).abs().max()
        assert h2.grad[[3, 11, 29]].abs().max() == 0  # ignored tokens get no gradient


def llama(seed=0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    lf.adapt(model, lf.LoRA(rank=4), targets="all-linear")
    return model


def fit(fused_loss: bool, prefix: str = "off"):
    model = llama()
    losses = []
    trainer = Trainer(model, causal_lm_data(), epochs=2, batch_size=8, lr=1e-2, progress=False, log_every=1,
                      fused_loss=fused_loss, prefix=prefix,
                      on_step=lambda t, s: losses.append(t.state.history[-1]["values"]["loss"]))
    trainer.fit()
    return model, trainer, losses


def test_training_with_the_fused_loss_equals_training_on_the_logits():
    for prefix in ("off", "cache"):
        plain, plain_trainer, plain_losses = fit(False, prefix)
        fused, fused_trainer, fused_losses = fit(True, prefix)
        assert fused_trainer.policy.info["fused_loss"] is True and "fused_loss" not in plain_trainer.policy.info
        assert len(fused_losses) == 8
        assert torch.allclose(torch.tensor(fused_losses), torch.tensor(plain_losses), rtol=1e-5)
        for name, value in trainable_state(fused).items():
            assert torch.allclose(value, trainable_state(plain)[name], rtol=1e-4, atol=1e-6), name
        # outside the trainer the model is whole again: logits come back
        assert "forward" not in fused.__dict__
        ids = causal_lm_data().test["input_ids"][:2]
        assert fused(input_ids=ids, labels=ids).logits.shape == (2, 8, 24)


def test_no_fusion_where_the_output_layer_trains_or_is_an_adapter():
    sample = {"input_ids": torch.randint(0, 24, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    assert FusedLMLoss.plan(llama(), sample) is not None
    trained = llama()
    trained.lm_head.weight.requires_grad_(True)
    assert FusedLMLoss.plan(trained, sample) is None
    torch.manual_seed(0)
    adapted = LlamaForCausalLM(LlamaConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    lf.adapt(adapted, lf.LoRA(rank=4), targets=["q_proj", "lm_head"])
    assert FusedLMLoss.plan(adapted, sample) is None


def test_evaluation_inside_the_trainer_gets_the_same_perplexity_without_logits():
    model, trainer, _ = fit(True)
    calls = []
    model.lm_head.register_forward_hook(lambda m, a, out: calls.append(tuple(out.shape)))
    fused = trainer.evaluate("test")
    assert calls == []  # the output layer never ran as a module: no logits tensor
    whole = evaluate_split(model, causal_lm_data().test, CAUSAL_LM, 4)  # outside the trainer: logits
    assert calls and abs(fused["loss"] - whole["loss"]) < 1e-5
    assert abs(fused["perplexity"] - whole["perplexity"]) < 1e-4 * whole["perplexity"]


def test_under_bf16_autocast_the_fused_loss_is_cross_entropy_on_bfloat16_logits_upcast():
    """As a Hugging Face model's loss under autocast: logits made in bfloat16, the loss taken in float32;
    the weight is cast once for all chunks, the gradient comes back float32."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(30, 16, generator=g)
    weight = torch.randn(50, 16, generator=g)
    targets = torch.randint(0, 50, (30,), generator=g)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(F.linear(h1, weight).float(), targets)
        got = linear_cross_entropy(h2, weight, None, targets)
    expected.backward()
    got.backward()
    assert got.dtype == torch.float32 and h2.grad.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=1e-6)
    assert torch.allclose(h2.grad, h1.grad, rtol=2e-2, atol=1e-4)  # the gradient's product is bfloat16 in both
    full = linear_cross_entropy(hidden, weight, None, targets)
    assert not torch.equal(got.detach(), full)  # it did compute in bfloat16
