"""The LoRA family: LoRA (with rsLoRA scaling and PiSSA-style init), DyLoRA and LoRA-SB.

Factors use PEFT's layouts (lora_A: r x in, lora_B: out x r; embeddings: A r x num, B dim x r), so
import/export is a renaming of keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import (tensor_kwargs, CONV2D, EMBEDDING, LINEAR, AdapterModule, Capabilities, LowRank, MethodConfig,
                   conv_with, in_features, out_features)
from .registry import register

LORA_INITS = ("default", "gaussian", "pissa")


@dataclass
class LoRA(MethodConfig):
    """Config of LoRA. `alpha / rank` scales the update (`alpha / sqrt(rank)` with rsLoRA)."""

    method = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"  # default (Kaiming A, zero B) | gaussian (A ~ N(0, 1/r)) | pissa

    def validate(self) -> None:
        if int(self.rank) < 1:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.rank}.")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}.")
        if self.init not in LORA_INITS:
            raise ConfigError(f"Unknown LoRA init '{self.init}'; choose one of: {', '.join(LORA_INITS)}.")

    def scaling(self, rank: int | None = None) -> float:
        r = rank or self.rank
        return self.alpha / math.sqrt(r) if self.use_rslora else self.alpha / r


def _weight_matrix(base: nn.Module) -> torch.Tensor:
    """The base weight as an (out x in) matrix (embeddings are stored transposed)."""
    w = base.weight.detach().float()
    if isinstance(base, nn.Embedding):
        return w.T
    return w.reshape(w.shape[0], -1)


def _low_rank_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: nn.Module, kind: str,
                    scale: float = 1.0):
    """scale B A x for one layer kind, with `a` (r x in[...]) and `b` (out x r). The scale goes on
    A x (r values a token): on the delta it would be one more pass over the whole output."""
    if kind == LINEAR:
        return F.linear(F.linear(x, a) * scale, b)
    if kind == CONV2D:  # A: a conv with the base's kernel (and padding rule); B: a 1x1 conv
        h = conv_with(base, x, a.view(a.shape[0], *base.weight.shape[1:]))
        return F.conv2d(h * scale, b.view(*b.shape, 1, 1))
    h = F.embedding(x, a.T, base.padding_idx, base.max_norm, base.norm_type,
                    base.scale_grad_by_freq, base.sparse)
    return (h * scale) @ b.T


def _as_base_layout(delta: torch.Tensor, base: nn.Module) -> torch.Tensor:
    """An (out x in) update in the base weight's own layout."""
    if isinstance(base, nn.Embedding):
        return delta.T
    return delta.view(base.weight.shape)


@register
class LoRAModule(AdapterModule):
    """LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021).

    h = W x + (alpha / r) * B A x, with A (r x in) and B (out x r) trained and W frozen. On a Conv2d
    (as in PEFT) A is a convolution with the base's kernel, stride and padding (r x in x kh x kw) and B
    a 1x1 convolution, so B A reshaped is the weight update and merging is exact; grouped
    (depthwise) convolutions are refused. rsLoRA
    (Kalajdzievski, 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA") scales by
    alpha / sqrt(r). The PiSSA init (Meng et al., 2024, "PiSSA: Principal Singular Values and
    Singular Vectors Adaptation") starts A, B at the principal SVD factors of W, U_r S_r^(1/2) and
    S_r^(1/2) V_r^T; instead of rewriting W to its residual, it keeps frozen copies A0, B0 and adds
    -(alpha/r) B0 A0 x, which is the same function and leaves W untouched (so unwrapping stays exact).
    """

    config_class = LoRA
    capabilities = Capabilities(mergeable=True, mixed_batch=True, elastic_rank=False,
                                layer_kinds=(LINEAR, CONV2D, EMBEDDING))

    def __init__(self, base: nn.Module, config: LoRA):
        super().__init__(base, config)
        r = config.rank
        n_in = base.weight[0].numel() if self.kind == CONV2D else in_features(base)
        n_out = out_features(base)
        if self.kind == CONV2D and base.groups != 1:
            # A depthwise kernel is one small filter per channel: no channel-mixing matrix to factor.
            raise ConfigError(f"LoRA cannot adapt a grouped (e.g. depthwise) convolution (groups={base.groups}); "
                              "leave those layers out of the targets ('all-linear' does).")
        factory = tensor_kwargs(base)
        self.lora_A = nn.Parameter(torch.empty(r, n_in, **factory))
        self.lora_B = nn.Parameter(torch.zeros(n_out, r, **factory))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling()
        self._init_factors(base)

    def _init_factors(self, base: nn.Module) -> None:
        init = self.config.init
        with torch.no_grad():
            if self.kind == EMBEDDING and init == "default":
                # PEFT's embedding init: A zero, B normal (the update is zero either way).
                nn.init.zeros_(self.lora_A)
                nn.init.normal_(self.lora_B)
            elif init == "default":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            elif init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.config.rank)
            else:
                self._init_pissa(base)

    def _init_pissa(self, base: nn.Module) -> None:
        u, s, vh = torch.linalg.svd(_weight_matrix(base), full_matrices=False)
        r = self.config.rank
        root = s[:r].sqrt() / math.sqrt(self.scaling)
        a = (root[:, None] * vh[:r]).to(self.lora_A.dtype)
        b = (u[:, :r] * root[None, :]).to(self.lora_B.dtype)
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)
        self.register_buffer("lora_A0", a.clone())
        self.register_buffer("lora_B0", b.clone())

    @property
    def pissa_anchored(self) -> bool:
        """Whether PiSSA's initial factors are kept to subtract (a buffer lookup: `hasattr` on a
        module costs a raised AttributeError, and mixed batches ask once per adapter and layer)."""
        return "lora_A0" in self._buffers

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, scaling) in effect; subclasses narrow or compose them."""
        return self.lora_A, self.lora_B, self.scaling

    def delta(self, x, base_out, base):
        a, b, scaling = self.factors()
        x = self.dropout(x) if self.kind != EMBEDDING else x
        out = _low_rank_delta(x, a, b, base, self.kind, scaling)
        if self.pissa_anchored:
            out = out - _low_rank_delta(x, self.lora_A0, self.lora_B0, base, self.kind, scaling)
        return out

    def delta_weight(self, base):
        a, b, scaling = self.factors()
        delta = b @ a
        if self.pissa_anchored:
            delta = delta - self.lora_B0 @ self.lora_A0
        return _as_base_layout(delta * scaling, base), None

    def batched_form(self, base):
        if self.kind != LINEAR:
            return None
        a, b, scaling = self.factors()
        if self.pissa_anchored:  # B A - B0 A0 is the rank-2r product [B, -B0] [A; A0]
            a, b = torch.cat([a, self.lora_A0]), torch.cat([b, -self.lora_B0], dim=1)
        return LowRank(a, b, scaling)


@dataclass
class DyLoRA(LoRA):
    """Config of DyLoRA: train every rank in [min_rank, rank] at once."""

    method = "dylora"
    min_rank: int = 1

    def validate(self) -> None:
        super().validate()
        if not 1 <= int(self.min_rank) <= int(self.rank):
            raise ConfigError(f"DyLoRA min_rank must be between 1 and rank={self.rank}, got {self.min_rank}.")


@register
class DyLoRAModule(LoRAModule):
    """DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank
    Adaptation (Valipour et al., 2023).

    Each training forward samples b ~ U{min_rank..r} and uses h = W x + (alpha / b) B[:, :b] A[:b] x,
    so every leading sub-factor learns to work alone; after training, any rank b <= r is used by
    truncation (`set_rank`), without retraining. The sample comes from torch's global generator, so
    checkpoints (which save it) resume exactly.
    """

    config_class = DyLoRA
    capabilities = Capabilities(mergeable=True, mixed_batch=True, elastic_rank=True,
                                layer_kinds=(LINEAR, CONV2D, EMBEDDING))

    def __init__(self, base: nn.Module, config: DyLoRA):
        super().__init__(base, config)
        self.eval_rank = config.rank

    def set_rank(self, rank: int) -> None:
        if not isinstance(rank, int) or isinstance(rank, bool):  # 2.5 would fail at the next forward
            raise ConfigError(f"A DyLoRA rank must be a whole number, got {rank!r} ({type(rank).__name__}).")
        if not 1 <= rank <= self.config.rank:
            raise ConfigError(f"Rank {rank} is outside this DyLoRA adapter's range 1..{self.config.rank}.")
        self.eval_rank = rank

    def factors(self):
        if self.training:
            b = int(torch.randint(self.config.min_rank, self.config.rank + 1, (1,)).item())
        else:
            b = self.eval_rank
        return self.lora_A[:b], self.lora_B[:, :b], self.config.scaling(b)


@dataclass
class LoRASB(MethodConfig):
    """Config of LoRA-SB. init: 'svd' of the base weight, or 'gradient' (call `calibrate`)."""

    method = "lora-sb"
    rank: int = 8
    alpha: float = 1.0
    init: str = "svd"

    def validate(self) -> None:
        if int(self.rank) < 1:
            raise ConfigError(f"LoRA-SB rank must be a positive integer, got {self.rank}.")
        if self.init not in ("svd", "gradient"):
            raise ConfigError(f"Unknown LoRA-SB init '{self.init}'; choose 'svd' or 'gradient'.")


@register
class LoRASBModule(AdapterModule):
    """LoRA-SB: Initialization Using Update Approximation is a Silver Bullet for Extreme Efficient
    Low-Rank Fine-Tuning (Ponkshe et al., 2024).

    h = W x + alpha * B R A x, with B (out x r) and A (r x in) frozen and only the r x r core R
    trained (zero at start, so the model is unchanged). B and A span the principal subspace of an
    approximation of the full fine-tuning update: with init='gradient', the top-r singular vectors of
    -grad W on a calibration batch (`calibrate`); with init='svd', those of W itself.
    """

    config_class = LoRASB
    capabilities = Capabilities(mergeable=True, mixed_batch=True, elastic_rank=False,
                                layer_kinds=(LINEAR,))

    def __init__(self, base: nn.Module, config: LoRASB):
        super().__init__(base, config)
        factory = tensor_kwargs(base)
        r = min(config.rank, *base.weight.shape)
        self.register_buffer("lora_A", torch.empty(r, base.in_features, **factory))
        self.register_buffer("lora_B", torch.empty(base.out_features, r, **factory))
        self.lora_R = nn.Parameter(torch.zeros(r, r, **factory))
        self.calibrate(base.weight.detach())

    def calibrate(self, update: torch.Tensor) -> None:
        """Set the frozen factors to the principal subspace of `update` (e.g. -grad W)."""
        u, _, vh = torch.linalg.svd(update.float(), full_matrices=False)
        r = self.lora_R.shape[0]
        with torch.no_grad():
            self.lora_B.copy_(u[:, :r])
            self.lora_A.copy_(vh[:r])

    def delta(self, x, base_out, base):
        return F.linear(F.linear(F.linear(x, self.lora_A), self.lora_R), self.lora_B) * self.config.alpha

    def delta_weight(self, base):
        return self.lora_B @ self.lora_R @ self.lora_A * self.config.alpha, None

    def batched_form(self, base):
        return LowRank(self.lora_R @ self.lora_A, self.lora_B, self.config.alpha)
