"""int8 weight-only frozen base (core/quantize.py): accuracy, memory, training, artifacts, merge."""

import gc
import weakref

import pytest
import torch
from torch import nn

import leanfit as lf
from leanfit.core.hosts import AdapterHost
from leanfit.core.quantize import Int8Linear, dequantize_base, quantize_base
from leanfit.errors import AdapterError, BaseModelMismatchError, ConfigError
from _nets import perturb, tiny_net, tokens


def tensor_bytes(module):
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("shape", [(16, 32), (128, 256), (768, 768)])
def test_int8_linear_output_close_to_float(shape):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0])
    q = Int8Linear.from_linear(linear)
    x = torch.randn(64, shape[1])
    with torch.no_grad():
        assert rel_err(q(x), linear(x)) < 1e-2
        assert rel_err(q.weight, linear.weight) < 1e-2
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == linear.weight.shape
    assert q.scale.shape == (shape[0],) and torch.equal(q.bias, linear.bias)


def test_int8_linear_is_a_linear_without_parameters():
    q = Int8Linear.from_linear(nn.Linear(8, 4, bias=False))
    assert isinstance(q, nn.Linear) and lf.methods.base.layer_kind(q) == "linear"
    assert (q.in_features, q.out_features) == (8, 4) and q.bias is None
    assert list(q.parameters()) == [] and not isinstance(q.weight, nn.Parameter)
    assert set(q.state_dict()) == {"qweight", "scale"} and "int8" in repr(q)
    x = torch.randn(3, 8)
    assert torch.allclose(q.dequantize()(x), q(x), atol=1e-6)
    with pytest.raises(AdapterError, match="dequantize_base"):
        q.weight.add_(1.0)
    zero = nn.Linear(4, 2)
    with torch.no_grad():
        zero.weight.zero_()
    assert torch.equal(Int8Linear.from_linear(zero).weight, zero.weight)  # all-zero rows: no NaN


def test_memory_of_frozen_linear_weights_drops_about_4x():
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).requires_grad_(False)
    before = tensor_bytes(big)
    old = weakref.ref(big[0].weight)
    assert quantize_base(big) == 2
    gc.collect()
    assert old() is None  # the float weight is really gone
    assert before / tensor_bytes(big) > 3.8  # weights 4x, float bias and scales kept

    m = tiny_net()
    lf.adapt(m, lf.LoRA(rank=2), targets="all-linear")
    layers = [m.block["query"].base_layer, m.block["value"].base_layer]
    before = sum(tensor_bytes(l) for l in layers)
    quantize_base(m)
    after = sum(tensor_bytes(m.block[n].base_layer) for n in ("query", "value"))
    assert before / after > 3.0  # 16 x 32 and 16 x 16: per-row scales weigh more when small


def test_quantize_base_replaces_host_bases_and_bare_frozen_linears_only():
    m = tiny_net()
    x = tokens()
    lf.adapt(m, lf.LoRA(rank=2), targets=["query"])  # block.value stays a bare, frozen Linear
    perturb(m)
    out = m(x)
    head, lora = m.classifier, m.block["query"].adapters["default"]
    assert quantize_base(m) == 2
    assert isinstance(m.block["query"], AdapterHost)
    assert isinstance(m.block["query"].base_layer, Int8Linear) and isinstance(m.block["value"], Int8Linear)
    assert type(m.classifier) is nn.Linear and m.classifier is head  # trainable head kept
    assert m.block["query"].adapters["default"] is lora
    assert rel_err(m(x), out) < 1e-2
    assert quantize_base(m) == 0  # nothing left to quantise


def test_quantize_base_never_touches_trainable_layers_and_checks_names():
    m = tiny_net()
    assert quantize_base(m) == 0  # nothing is frozen before adapt
    m.requires_grad_(False)
    assert quantize_base(m, targets=["value"]) == 1 and isinstance(m.block["value"], Int8Linear)
    with pytest.raises(ConfigError, match="matched no frozen"):
        quantize_base(m, targets=["nope"])


def test_training_on_quantised_base_changes_only_adapters_and_head():
    m = tiny_net()
    x, y = tokens(), torch.tensor([0, 1, 2, 0])
    lf.adapt(m, lf.LoRA(rank=2), targets="all-linear")
    quantize_base(m)
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert set(trainable) == {"block.query.adapters.default.lora_A", "block.query.adapters.default.lora_B",
                              "block.value.adapters.default.lora_A", "block.value.adapters.default.lora_B",
                              "classifier.weight", "classifier.bias"}
    frozen = {n: t.clone() for n, t in [*m.named_parameters(), *m.named_buffers()] if n not in trainable}
    start = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    for step in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        # gradients flow through the int8 base; lora_A's is zero only while lora_B is still zero
        assert all(p.grad is not None and p.grad.abs().sum() > 0
                   for n, p in trainable.items() if step > 0 or not n.endswith("lora_A"))
        opt.step()
    assert all(not torch.equal(p, start[n]) for n, p in trainable.items())
    assert all(torch.equal(t, frozen[n]) for n, t in [*m.named_parameters(), *m.named_buffers()] if n in frozen)


def test_save_on_quantised_base_load_onto_float_base(tmp_path):
    m = tiny_net()
    x, y = tokens(), torch.tensor([0, 1, 2, 0])
    lf.adapt(m, lf.LoRA(rank=2), targets="all-linear", name="q")
    quantize_base(m)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    lf.save(m, tmp_path / "q")  # the manifest keeps the float base's fingerprint, taken at adapt
    trained = m(x).detach()

    float_base = tiny_net()
    assert lf.load(float_base, tmp_path / "q") == "q"
    state = float_base.block["query"].adapters["q"].state_dict()
    assert all(torch.equal(v, m.block["query"].adapters["q"].state_dict()[k]) for k, v in state.items())
    assert rel_err(float_base(x), trained) < 1e-2  # differs only by the base's quantisation error

    assert lf.load(m, tmp_path / "q", name="again") == "again"  # same model: cached fingerprint

    fresh = tiny_net().requires_grad_(False)
    quantize_base(fresh, targets=["query", "value"])
    with pytest.raises(BaseModelMismatchError):  # a freshly quantised base hashes differently
        lf.load(fresh, tmp_path / "q")


def test_merge_refused_on_int8_and_works_after_dequantize_base():
    m = tiny_net()
    x = tokens()
    lf.adapt(m, lf.LoRA(rank=2), targets="all-linear", name="a")
    perturb(m)
    m.eval()
    quantize_base(m)
    out = m(x)
    with pytest.raises(AdapterError, match="dequantize_base"):
        lf.merge(m, "a")
    assert torch.equal(m(x), out) and m.block["query"].merged == []
    assert dequantize_base(m) == 2
    assert type(m.block["query"].base_layer) is nn.Linear and type(m.block["value"].base_layer) is nn.Linear
    assert not any(p.requires_grad for p in m.block["query"].base_layer.parameters())
    assert torch.allclose(m(x), out, atol=1e-6)  # the quantised values, now in float
    lf.merge(m, "a")
    assert torch.allclose(m(x), out, atol=1e-5)
    lf.unmerge(m, "a")
    assert torch.allclose(m(x), out, atol=1e-5)


def test_methods_that_read_the_base_weight_work_on_int8():
    m = tiny_net().requires_grad_(False)
    x = tokens()
    quantize_base(m)
    before = m(x)
    lf.adapt(m, lf.LoRA(rank=2, init="pissa"), targets="all-linear", train_modules=[])
    assert torch.allclose(m(x), before, atol=1e-5)
    lf.adapt(m, lf.IA3(), targets="all-linear", name="ia3", train_modules=[])
    assert torch.allclose(m(x), before, atol=1e-5)


def test_tiny_bert_logits_close_after_quantisation():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 100, (4, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    lf.adapt(model, lf.LoRA(rank=2), targets="all-linear")
    assert quantize_base(model) == 13  # 6 per layer + pooler; the classifier trains
    assert type(model.classifier) is nn.Linear
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() < 0.05 * before.abs().max()  # measured about 1%
