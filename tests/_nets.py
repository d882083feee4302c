"""Tiny randomly initialised networks for fast unit tests of the adapter engine."""

import torch
from torch import nn


class TinyNet(nn.Module):
    """Embedding -> Conv over a 2D view -> two Linears -> classifier head; every layer kind once."""

    def __init__(self, vocab=50, dim=16, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.conv = nn.Conv2d(1, 2, kernel_size=3, padding=1)
        self.block = nn.ModuleDict({"query": nn.Linear(2 * dim, dim), "value": nn.Linear(dim, dim, bias=False)})
        self.classifier = nn.Linear(dim, classes)

    def forward(self, input_ids):
        h = self.embed(input_ids)  # (B, T, D)
        c = self.conv(h.unsqueeze(1))  # (B, 2, T, D)
        h = torch.cat([c[:, 0], c[:, 1]], dim=-1)
        h = torch.relu(self.block["query"](h))
        h = self.block["value"](h)
        return self.classifier(h.mean(1))


def tiny_net(seed=0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def tokens(seed=1, batch=4, length=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (batch, length), generator=g)


def perturb(model, seed=2, scale=0.1):
    """Give every trainable parameter random values, so zero-initialised adapters do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
