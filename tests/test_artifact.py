"""Adapter files: round trip, base-model check, corrupt and truncated files, atomic writes."""

import json

import pytest
import torch

import leanfit as lf
from leanfit.errors import ArtifactError, BaseModelMismatchError
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
