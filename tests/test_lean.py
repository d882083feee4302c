"""Lean training on tiny random transformers: cached frozen prefix (identical losses), partial
back-propagation, top-k layer selection, LISA sampling, gradient checkpointing."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import leanfit as lf
from leanfit.data.splits import CAUSAL_LM, CLASSIFICATION, TensorSplits
from leanfit.errors import ConfigError
from leanfit.train import Trainer
from leanfit.train.layers import LISA, below_top_k, lowest_trainable_block, transformer_blocks
from leanfit.train.prefix_cache import PrefixCache


def tiny_bert(seed=0, layers=4):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config)


def tiny_llama(seed=0, layers=4):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def splits(task, n=(40, 8, 8), seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(rows):
        ids = torch.randint(1, 100, (rows, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[: rows // 2, seq - 3:] = 0  # some padding, so masks matter
        labels = torch.randint(0, 3, (rows,), generator=g) if task == CLASSIFICATION else ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return TensorSplits(task, make(n[0]), make(n[1]), make(n[2]))


def adapted(build, top_k=1, method=None):
    model = build()
    lf.adapt(model, method or lf.LoRA(rank=4, dropout=0.1), targets="all-linear", exclude=below_top_k(model, top_k))
    return model


def run(model, data, **options):
    trainer = Trainer(model, data, epochs=2, batch_size=8, lr=5e-3, progress=False, log_every=1, **options)
    trainer.fit()
    losses = [r["values"]["loss"] for r in trainer.state.history if r["kind"] == "train"]
    return trainer, losses


@pytest.mark.parametrize("build,task", [(tiny_bert, CLASSIFICATION), (tiny_llama, CAUSAL_LM)], ids=["bert", "llama"])
def test_cached_prefix_gives_the_same_losses_as_running_it(build, task):
    data = splits(task)
    plain, plain_losses = run(adapted(build), data, prefix="eval")
    cached, cached_losses = run(adapted(build), data, prefix="cache")
    assert cached.policy.info["boundary"] == 3 and cached.policy.info["cache_bytes"] == 48 * 12 * 32 * 4  # train+validation
    assert cached_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-6)
    for (n, p), (_, q) in zip(plain.trainable, cached.trainable):
        assert torch.allclose(p, q, atol=1e-5), n
    assert cached.evaluate("test") == pytest.approx(plain.evaluate("test"), rel=1e-5)


def test_model_is_untouched_outside_the_trainer():
    data = splits(CLASSIFICATION)
    model = adapted(tiny_bert)
    trainer, _ = run(model, data, prefix="cache")
    inside = trainer.evaluate("test")
    model.eval()
    with torch.inference_mode():
        logits = model(input_ids=data.test["input_ids"], attention_mask=data.test["attention_mask"]).logits
    outside = torch.nn.functional.cross_entropy(logits, data.test["labels"]).item()
    assert outside == pytest.approx(inside["loss"], rel=1e-5)


def test_no_cache_where_a_low_layer_or_the_embeddings_train():
    data = splits(CLASSIFICATION)
    sample = {k: v[:2] for k, v in data.train.items() if k != "labels"}
    everywhere = tiny_bert()
    lf.adapt(everywhere, lf.LoRA(rank=2), targets="all-linear")
    assert lowest_trainable_block(everywhere) == 0 and PrefixCache.plan(everywhere, sample) is None
    embeddings = adapted(tiny_bert)
    embeddings.bert.embeddings.word_embeddings.weight.requires_grad_(True)
    assert PrefixCache.plan(embeddings, sample) is None
    trainer, _ = run(embeddings, data, prefix="cache")
    assert trainer.policy.cache is None  # fell back to running the prefix


def test_backward_stops_at_the_lowest_trainable_block():
    model = adapted(tiny_bert, top_k=2)
    blocks = transformer_blocks(model)[1]
    graph = {}
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda m, a, out, i=i: graph.__setitem__(i, out.grad_fn is not None))
    data = splits(CLASSIFICATION)
    model.train()
    model(**{k: v[:4] for k, v in data.train.items()}).loss.backward()
    assert graph == {0: False, 1: False, 2: True, 3: True}  # nothing recorded (or stored) below block 2
    assert all(p.grad is None for p in blocks[1].parameters())


def test_top_k_selection_adapts_only_the_top_blocks():
    model = adapted(tiny_bert, top_k=1)
    targets = lf.adapters(model)["default"].targets
    assert all(".layer.3." in t or t.startswith("bert.pooler") for t in targets)
    assert "bert.pooler.dense" in targets
    with pytest.raises(lf.errors.ConfigError, match="between 1 and 4"):
        below_top_k(model, 5)


def test_auto_adapts_the_top_third_of_an_encoder_and_five_sixths_of_a_causal_lm():
    from leanfit.tune import top_layers
    assert top_layers(tiny_bert(layers=6), "auto") == 2
    assert top_layers(tiny_bert(layers=30), "auto") == 10
    # the top third costs a causal LM perplexity: it gets the top five sixths, rounded up
    assert top_layers(tiny_llama(layers=30), "auto") == 25 and top_layers(tiny_llama(), "auto") == 4
    assert top_layers(tiny_llama(), 3) == 3 and top_layers(tiny_bert(), "all") is None


def test_default_learning_rates_follow_the_method_the_policy_and_the_task():
    from leanfit.data import IMAGE_CLASSIFICATION
    from leanfit.tune import TuneConfig
    assert TuneConfig(method="full").learning_rate(CLASSIFICATION) == 5e-5
    assert TuneConfig(method="full").learning_rate(IMAGE_CLASSIFICATION) == 5e-4  # CNNs want a larger step
    assert TuneConfig(method="full", lr=0.1).learning_rate(IMAGE_CLASSIFICATION) == 0.1
    assert TuneConfig(method="lora").learning_rate() == 1e-3  # top blocks only
    assert TuneConfig(method="lora").learning_rate(CAUSAL_LM) == 2e-3  # a causal LM
    assert TuneConfig(method="lora", train_layers="all").learning_rate() == 5e-4
    assert TuneConfig(method="adalora").learning_rate() == 2e-2  # slow-starting parametrisations: larger steps


def test_lisa_trains_only_sampled_blocks_and_resamples_deterministically():
    model = adapted(tiny_bert, top_k=4)
    lisa = LISA(model, layers=1, period=2, seed=0)
    first = lisa.sample(0)
    assert len(first) == 1
    trainable_blocks = [i for i, b in enumerate(lisa.blocks) if any(p.requires_grad for p in b.parameters())]
    assert trainable_blocks == first
    assert model.classifier.weight.requires_grad  # the head always trains
    draws = [tuple(lisa.sample(p)) for p in range(12)]
    assert len(set(draws)) > 1 and draws == [tuple(LISA(model, 1, 2, seed=0).sample(p)) for p in range(12)]


def test_lisa_keeps_a_parameter_shared_across_blocks_trainable_when_any_sampled_block_uses_it():
    model = adapted(tiny_bert, top_k=4, method=lf.Compacter(share=True))
    lisa = LISA(model, layers=1, period=1, seed=0)
    shared = [p for p in lisa.owned[0] if any(p is q for q in lisa.owned[3])]
    assert shared  # the rule matrices sit in every block
    for period in range(8):  # whichever single block is drawn, the shared rule matrices train
        lisa.sample(period)
        assert all(p.requires_grad for p in shared)


def test_lisa_run_is_resumable_and_changes_only_sampled_layers(tmp_path):
    data = splits(CLASSIFICATION)
    base = adapted(tiny_bert, top_k=4)
    before = {n: p.detach().clone() for n, p in base.named_parameters() if p.requires_grad}
    trainer = Trainer(base, data, epochs=1, batch_size=8, lr=5e-3, progress=False, lisa_layers=1, lisa_period=10)
    trainer.fit()  # 5 steps, one period: one block (and the head) moved
    moved = {n.split(".layer.")[1].split(".")[0] for n, p in base.named_parameters()
             if n in before and ".layer." in n and not torch.equal(p, before[n])}
    assert len(moved) == 1


def test_lisa_leaves_every_trained_parameter_trainable_after_fit():
    base = adapted(tiny_bert, top_k=4)
    before = [n for n, p in base.named_parameters() if p.requires_grad]
    Trainer(base, splits(CLASSIFICATION), epochs=1, batch_size=8, progress=False, lisa_layers=1, lisa_period=2).fit()
    assert [n for n, p in base.named_parameters() if p.requires_grad] == before  # a second fit trains them all


def test_a_model_whose_head_or_positions_do_not_fit_the_data_is_refused_before_training():
    from dataclasses import replace
    five = replace(splits(CLASSIFICATION), labels=["a", "b", "c", "d", "e"])
    with pytest.raises(ConfigError, match="head has 3 outputs .* data has 5 labels; load the model with num_labels=5"):
        Trainer(adapted(tiny_bert), five, epochs=1, progress=False).fit()  # was an IndexError in the loss
    with pytest.raises(ConfigError, match="rows are 80 tokens long but the model reads at most 64"):
        Trainer(adapted(tiny_bert), splits(CLASSIFICATION, seq=80), epochs=1, progress=False).fit()
    from transformers import LlamaForSequenceClassification
    torch.manual_seed(0)
    decoder = LlamaForSequenceClassification(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=2, num_attention_heads=2,
                                                         num_key_value_heads=2, num_labels=3))
    lf.adapt(decoder, lf.LoRA(rank=2))
    with pytest.raises(ConfigError, match="no pad_token_id, which its classification head needs"):
        Trainer(decoder, splits(CLASSIFICATION), epochs=1, progress=False).fit()  # was transformers' ValueError


def test_gradient_checkpointing_gives_the_same_losses():
    data = splits(CLASSIFICATION)
    _, plain = run(adapted(tiny_bert, top_k=4, method=lf.LoRA(rank=4)), data)
    _, checkpointed = run(adapted(tiny_bert, top_k=4, method=lf.LoRA(rank=4)), data, gradient_checkpointing=True)
    assert checkpointed == pytest.approx(plain, rel=1e-5)


def test_bad_policy_options_say_what_is_wrong():
    with pytest.raises(lf.errors.ConfigError, match="prefix must be one of"):
        Trainer(adapted(tiny_bert), splits(CLASSIFICATION), prefix="always", progress=False).fit()
    with pytest.raises(lf.errors.ConfigError, match="LISA layers"):
        Trainer(adapted(tiny_bert), splits(CLASSIFICATION), lisa_layers=9, progress=False).fit()


def test_the_trainer_hands_freed_heap_back_before_its_first_step(monkeypatch):
    import leanfit.train.trainer as trainer_module
    events = []
    monkeypatch.setattr(trainer_module, "trim_heap", lambda: events.append("trim"))
    step = Trainer._optimizer_step
    monkeypatch.setattr(Trainer, "_optimizer_step", lambda self, group: (events.append("step"), step(self, group))[1])
    run(adapted(tiny_bert), splits(CLASSIFICATION))
    assert events.count("step") == 10  # 2 epochs x 5 batches
    # before the first step, and before each epoch's validation (its tensors would not reuse the steps' heap)
    assert events == ["trim", *["step"] * 5, "trim", *["step"] * 5, "trim"]


def test_a_decoder_trains_and_evaluates_without_its_key_value_cache():
    # generation's cache would hold every layer's keys and values for nothing (250 MB building
    # SmolLM2's prefix cache of 64 rows); the flag comes back after the run
    model = adapted(tiny_llama, top_k=2)
    assert model.config.use_cache
    seen = []
    model.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(model.config.use_cache))
    run(model, splits(CAUSAL_LM), prefix="cache")  # the cache's build, steps and evaluations
    assert seen and not any(seen)
    assert model.config.use_cache
