"""Adapter files: round trip, base-model check, corrupt and truncated files, atomic writes."""

import json

import pytest
import torch

import leanfit as lf
from leanfit.errors import ArtifactError, BaseModelMismatchError, ConfigError
from _nets import perturb, tiny_net, tokens


def trained(method=None, seed=0):
    m = tiny_net(seed)
    lf.adapt(m, method or lf.LoRA(rank=2), targets="all-linear", name="a")
    perturb(m)
    return m


@pytest.mark.parametrize("method", [lf.LoRA(rank=2), lf.LoRA(rank=2, init="pissa"), lf.DyLoRA(rank=3),
                                    lf.LoRASB(rank=2), lf.Bottleneck(size=3), lf.IA3(), lf.SSF(), lf.BitFit()])
def test_save_load_round_trip_gives_same_outputs(tmp_path, method):
    m = trained(method)
    m.eval()
    x = tokens()
    out = m(x)
    lf.save(m, tmp_path / "ad", extra={"labels": ["x", "y", "z"]})
    fresh = tiny_net(0)
    assert lf.load(fresh, tmp_path / "ad") == "a"
    fresh.eval()
    assert torch.equal(fresh(x), out)
    manifest = lf.core.read_manifest(tmp_path / "ad")
    assert manifest["method"]["method"] == method.method
    assert manifest["targets"] == ["block.query", "block.value"]
    assert manifest["train_modules"] == ["classifier"]
    assert manifest["extra"]["labels"] == ["x", "y", "z"]


def test_only_adapter_tensors_are_written(tmp_path):
    m = trained()
    lf.save(m, tmp_path / "ad")
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "ad" / "adapter.safetensors"))
    assert keys == {"block.query.lora_A", "block.query.lora_B", "block.value.lora_A", "block.value.lora_B",
                    "classifier.weight", "classifier.bias"}


def test_load_onto_another_base_names_both_fingerprints(tmp_path):
    m = trained()
    lf.save(m, tmp_path / "ad")
    other = tiny_net(seed=5)
    with pytest.raises(BaseModelMismatchError) as err:
        lf.load(other, tmp_path / "ad")
    expected = lf.core.read_manifest(tmp_path / "ad")["base_model"]["fingerprint"]
    actual = lf.fingerprint(other, ("classifier",))
    assert expected in str(err.value) and actual in str(err.value) and expected != actual
    assert not lf.adapters(other)


def test_truncated_and_corrupt_files_are_refused(tmp_path):
    m = trained()
    lf.save(m, tmp_path / "ad")
    tensors = tmp_path / "ad" / "adapter.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        lf.load(tiny_net(0), tmp_path / "ad")
    tensors.write_bytes(data)
    (tmp_path / "ad" / "adapter.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest .* is corrupt"):
        lf.load(tiny_net(0), tmp_path / "ad")
    with pytest.raises(ArtifactError, match="No leanfit adapter"):
        lf.load(tiny_net(0), tmp_path / "missing")


def test_unknown_schema_version_is_refused(tmp_path):
    lf.save(trained(), tmp_path / "ad")
    manifest = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    manifest["schema_version"] = 99
    (tmp_path / "ad" / "adapter.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="schema version 99"):
        lf.load(tiny_net(0), tmp_path / "ad")


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.pop("method"), "'method' is missing"),
    (lambda m: m["method"].pop("method"), "'method.method' is missing"),
    (lambda m: m["method"].update(rank="eight"), "cannot build .*wrong kind"),
    (lambda m: m["method"].update(method="nosuch"), "cannot build .*Unknown method 'nosuch'"),
    (lambda m: m.update(targets="block.query"), "'targets' is not a list"),
    (lambda m: m["tensors"].update(bytes="many"), "'tensors.bytes' is of the wrong kind"),
    (lambda m: m["base_model"].pop("fingerprint"), "'base_model.fingerprint' is missing"),
])
def test_damaged_manifest_is_refused_in_one_sentence(tmp_path, capsys, damage, message):
    from leanfit.cli import main
    lf.save(trained(), tmp_path / "ad")
    manifest = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    damage(manifest)
    (tmp_path / "ad" / "adapter.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        lf.load(tiny_net(0), tmp_path / "ad")
    assert main(["info", str(tmp_path / "ad")]) == 2  # the command line says it, with no traceback
    err = capsys.readouterr().err
    assert err.startswith("leanfit: The manifest") and err.count("\n") == 1


def test_failed_write_keeps_the_previous_adapter(tmp_path, monkeypatch):
    m = trained()
    lf.save(m, tmp_path / "ad")
    before = (tmp_path / "ad" / "adapter.safetensors").read_bytes()
    perturb(m, seed=9)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("leanfit.io.fsync_file", crash)
    with pytest.raises(OSError):
        lf.save(m, tmp_path / "ad")
    assert (tmp_path / "ad" / "adapter.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter.json", "adapter.safetensors"]
    monkeypatch.undo()
    lf.load(tiny_net(0), tmp_path / "ad")


def test_two_adapters_saved_and_loaded_by_name(tmp_path):
    m = trained()
    lf.adapt(m, lf.IA3(), targets=["value"], name="b", train_modules=[])
    perturb(m, seed=3)
    lf.save(m, tmp_path / "a", name="a")
    lf.save(m, tmp_path / "b", name="b")
    x = tokens()
    lf.activate(m, "a", "b")
    out = m(x)
    fresh = tiny_net(0)
    lf.load(fresh, tmp_path / "a")
    lf.load(fresh, tmp_path / "b")
    lf.activate(fresh, "a", "b")
    assert torch.allclose(fresh(x), out)
    with pytest.raises(ArtifactError, match="name the one to save"):
        lf.save(m, tmp_path / "c")


def test_a_save_that_fails_before_writing_keeps_the_previous_adapter_whole(tmp_path):
    m = trained()
    m.eval()
    x = tokens()
    out = m(x)
    lf.save(m, tmp_path / "ad")
    perturb(m, seed=9)
    with pytest.raises(ConfigError, match="extra metadata cannot be saved as JSON"):
        lf.save(m, tmp_path / "ad", extra={"step": torch.tensor(3)})  # fails serialising, before any write
    fresh = tiny_net(0)
    lf.load(fresh, tmp_path / "ad")
    assert torch.equal(fresh.eval()(x), out)
    (tmp_path / "file").write_text("keep")
    with pytest.raises(ArtifactError, match="it is a file"):
        lf.save(m, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "keep"


def test_a_failed_load_leaves_the_model_as_it_was(tmp_path):
    other = tiny_net(0)
    lf.adapt(other, lf.LoRA(rank=2), targets="all-linear", name="a", train_modules=[])
    perturb(other)
    lf.save(other, tmp_path / "ad")
    manifest = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    manifest["method"]["rank"] = 4  # no longer fits the saved tensors
    manifest["name"] = "b"
    (tmp_path / "ad" / "adapter.json").write_text(json.dumps(manifest))
    m = trained(lf.IA3(), seed=0)
    m.eval()
    x = tokens()
    out = m(x)
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    with pytest.raises(ArtifactError, match="does not fit"):
        lf.load(m, tmp_path / "ad")
    assert list(lf.adapters(m)) == ["a"] and lf.active(m) == ["a"]
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert torch.equal(m(x), out)


def test_dylora_rank_in_use_survives_save_and_load(tmp_path):
    m = trained(lf.DyLoRA(rank=4)).eval()
    lf.set_rank(m, 2)
    x = tokens()
    out = m(x)
    lf.save(m, tmp_path / "ad")
    fresh = tiny_net(0)
    lf.load(fresh, tmp_path / "ad")
    assert torch.equal(fresh.eval()(x), out)
    lf.set_rank(fresh, 4)  # the whole adapter is still there
    assert not torch.equal(fresh(x), out)


def test_a_second_adapter_with_its_own_trained_head_is_refused_not_loaded_over_the_first(tmp_path):
    for seed, name in ((0, "x"), (1, "y")):
        m = tiny_net(0)
        lf.adapt(m, lf.LoRA(rank=2), targets="all-linear", name=name)  # trains the classifier head too
        perturb(m, seed=seed + 5)
        lf.save(m, tmp_path / name)
    serve = tiny_net(0).eval()
    lf.load(serve, tmp_path / "x")
    x = tokens()
    out = serve(x)
    with pytest.raises(ArtifactError, match="brings its own trained classifier, which adapter 'x'"):
        lf.load(serve, tmp_path / "y")
    assert torch.equal(serve(x), out) and list(lf.adapters(serve)) == ["x"]


def test_adapters_with_different_trained_modules_load_on_an_identical_base(tmp_path):
    m = tiny_net(0)
    lf.adapt(m, lf.LoRA(rank=2), targets=["query"], name="a", train_modules=[])
    lf.adapt(m, lf.LoRA(rank=2), targets=["conv"], name="b", train_modules=["block.value"])
    perturb(m)
    lf.save(m, tmp_path / "a", name="a")
    lf.save(m, tmp_path / "b", name="b")
    lf.load(tiny_net(0), tmp_path / "b")  # was refused: b recorded the fingerprint taken for a
    holder = tiny_net(0)
    lf.load(holder, tmp_path / "a")
    lf.load(holder, tmp_path / "b")


def test_a_base_in_another_precision_is_named_as_such(tmp_path):
    m = trained()
    lf.save(m, tmp_path / "ad")
    with pytest.raises(BaseModelMismatchError, match="trained on a float32 base model and this one is bfloat16"):
        lf.load(tiny_net(0).to(torch.bfloat16), tmp_path / "ad")
