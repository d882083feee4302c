"""Sparse methods: train a fixed subset of a weight's rows, columns or entries (S2FT, PaCA, SFT).

Each keeps its chosen indices as a persistent buffer (saved with the adapter) and its trained values
as a zero-initialised delta beside the frozen weight, so the model starts unchanged, merging adds the
delta into W exactly and unwrapping gives W back untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import tensor_kwargs, LINEAR, AdapterModule, Capabilities, MethodConfig
from .registry import register

S2FT_SELECT = ("random", "norm")
S2FT_AXES = ("rows", "columns")
SPARSE = Capabilities(mergeable=True, mixed_batch=True, elastic_rank=False, layer_kinds=(LINEAR,))


def _check_fraction(what: str, value: float) -> None:
    if not 0.0 < float(value) <= 1.0:
        raise ConfigError(f"{what} must be in (0, 1], got {value}.")


def _random_indices(n: int, k: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[:k].sort().values.to(device)


def _placed(base: nn.Module, values: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """A zero matrix in W's shape with `values` at rows (dim 0) or columns (dim 1) `index`."""
    return values.new_zeros(base.weight.shape).index_copy(dim, index, values)


def _rows_delta(x: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, n_out: int) -> torch.Tensor:
    """delta_rows x, scattered into output channels `index` (zeros elsewhere)."""
    y = F.linear(x, rows)
    return y.new_zeros(*y.shape[:-1], n_out).index_copy(-1, index, y)


def _columns_delta(x: torch.Tensor, columns: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """delta_cols x[..., index]: only the selected inputs are read."""
    return F.linear(x.index_select(-1, index), columns)


@dataclass
class S2FT(MethodConfig):
    """Config of S2FT: train `k` output rows (or input columns, `axis`) of each weight; `k` wins
    over `fraction` (of rows) when given. `select`: 'random' (with `seed`) or 'norm' (largest)."""

    method = "s2ft"
    fraction: float = 0.1
    k: int | None = None
    select: str = "random"
    axis: str = "rows"
    seed: int = 0

    def validate(self) -> None:
        _check_fraction("S2FT fraction", self.fraction)
        if self.k is not None and int(self.k) < 1:
            raise ConfigError(f"S2FT k must be a positive integer (or None to use fraction), got {self.k}.")
        if self.select not in S2FT_SELECT:
            raise ConfigError(f"Unknown S2FT select '{self.select}'; choose one of: {', '.join(S2FT_SELECT)}.")
        if self.axis not in S2FT_AXES:
            raise ConfigError(f"Unknown S2FT axis '{self.axis}'; choose one of: {', '.join(S2FT_AXES)}.")


@register
class S2FTModule(AdapterModule):
    """S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured Sparsity
    (Yang et al., 2024).

    axis='rows':    W' = W + P_S^T D,  h = W x + scatter_S(D x), with D = delta_rows (k x in) and S
                    the k selected output channels: only those rows are trained, as a dense block.
    axis='columns': W' = W + D P_S,    h = W x + D x_S, with D = delta_cols (out x k).
    D starts at zero. Backward touches only D (and x for earlier layers). The paper picks whole
    attention heads / FFN channels and co-permutes coupled layers; here each layer picks its own.
    """

    config_class = S2FT
    capabilities = SPARSE

    def __init__(self, base: nn.Module, config: S2FT):
        super().__init__(base, config)
        rows = config.axis == "rows"
        n = base.out_features if rows else base.in_features
        k = int(config.k) if config.k is not None else max(1, round(config.fraction * n))
        if k > n:
            raise ConfigError(f"S2FT k={k} exceeds the {n} {config.axis} of a {base.out_features}x"
                              f"{base.in_features} layer; lower k or narrow the targets.")
        if config.select == "random":
            index = _random_indices(n, k, config.seed, base.weight.device)
        else:
            index = base.weight.detach().float().norm(dim=1 if rows else 0).topk(k).indices.sort().values
        self.register_buffer("channels", index)
        factory = tensor_kwargs(base)
        if rows:
            self.delta_rows = nn.Parameter(torch.zeros(k, base.in_features, **factory))
        else:
            self.delta_cols = nn.Parameter(torch.zeros(base.out_features, k, **factory))

    def delta(self, x, base_out, base):
        if self.config.axis == "rows":
            return _rows_delta(x, self.delta_rows, self.channels, base.out_features)
        return _columns_delta(x, self.delta_cols, self.channels)

    def delta_weight(self, base):
        if self.config.axis == "rows":
            return _placed(base, self.delta_rows, self.channels, 0), None
        return _placed(base, self.delta_cols, self.channels, 1), None


@dataclass
class PaCA(MethodConfig):
    """Config of PaCA: train `rank` randomly chosen input columns (seeded by `seed`) of each weight."""

    method = "paca"
    rank: int = 8
    seed: int = 0

    def validate(self) -> None:
        if int(self.rank) < 1:
            raise ConfigError(f"PaCA rank must be a positive integer, got {self.rank}.")


@register
class PaCAModule(AdapterModule):
    """PaCA: Partial Connection Adaptation for Efficient Fine-Tuning (Woo et al., 2025).

    W' = W + D P_C,  h = W x + D x_C, with C r randomly chosen input columns and D = delta_cols
    (out x r, zero at start): the partial connections W[:, C] are what is fine-tuned, and backward
    needs only x_C, so activations for the other inputs need not be kept.
    """

    config_class = PaCA
    capabilities = SPARSE

    def __init__(self, base: nn.Module, config: PaCA):
        super().__init__(base, config)
        if config.rank > base.in_features:
            raise ConfigError(f"PaCA rank={config.rank} exceeds the {base.in_features} input columns "
                              "of a layer; lower rank or narrow the targets.")
        self.register_buffer("columns", _random_indices(base.in_features, config.rank, config.seed,
                                                        base.weight.device))
        self.delta_cols = nn.Parameter(torch.zeros(base.out_features, config.rank, device=base.weight.device,
                                                   dtype=base.weight.dtype))

    def delta(self, x, base_out, base):
        return _columns_delta(x, self.delta_cols, self.columns)

    def delta_weight(self, base):
        return _placed(base, self.delta_cols, self.columns, 1), None


@dataclass
class SFT(MethodConfig):
    """Config of sparse fine-tuning: `density` of each weight's entries trained (seeded by `seed`)."""

    method = "sft"
    density: float = 0.01
    seed: int = 0
    regrow_every: int = 0  # optimizer steps between drop-and-regrow rounds during training; 0: fixed positions
    regrow_fraction: float = 0.1

    def validate(self) -> None:
        _check_fraction("SFT density", self.density)
        _check_fraction("SFT regrow_fraction", self.regrow_fraction)
        if int(self.regrow_every) < 0:
            raise ConfigError(f"SFT regrow_every must be 0 (off) or a number of steps, got {self.regrow_every}.")


class SFTController:
    """Drives SFT's drop-and-regrow from the trainer: every `regrow_every` steps (not in the last
    one), each layer drops its smallest |values| and regrows as many at random free positions from a
    generator seeded by (seed, round), and AdamW's moments of the changed slots are reset."""

    def __init__(self, modules: dict[str, "SFTModule"], total_steps: int):
        self.modules, self.total_steps = modules, total_steps
        self.config = next(iter(modules.values())).config

    def after_backward(self, step: int) -> None:
        pass

    def after_step(self, step: int, optimizer) -> None:
        every = self.config.regrow_every
        done = step + 1
        if not every or done % every or done >= self.total_steps:
            return
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + done // every)
        for module in self.modules.values():
            slots = module.drop_and_regrow(fraction=self.config.regrow_fraction, generator=generator)
            state = optimizer.state.get(module.values, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][slots] = 0


@register
class SFTModule(AdapterModule):
    """Scaling Sparse Fine-Tuning to Large Language Models (Ansell et al., 2024).

    W' = W + S,  h = W x + S x, where S is zero except at k = round(density * out * in) positions:
    `indices` (a buffer of flat indices into W) hold `values` (trained, zero at start). S is built
    dense per forward by a scatter. `drop_and_regrow` moves the budget during training (SpIEL):
    drop the smallest |values|, regrow where the accumulated gradient of W is largest (SpIEL-AG) or at
    random, so k stays fixed. The schedule lives in the trainer.
    """

    config_class = SFT
    capabilities = SPARSE
    controller_class = SFTController

    def __init__(self, base: nn.Module, config: SFT):
        super().__init__(base, config)
        numel = self.weight_numel = base.weight.numel()
        k = max(1, round(config.density * numel))
        self.register_buffer("indices", _random_indices(numel, k, config.seed, base.weight.device))
        self.values = nn.Parameter(torch.zeros(k, device=base.weight.device, dtype=base.weight.dtype))

    def dense(self, base: nn.Module) -> torch.Tensor:
        """S as a matrix in W's shape."""
        return self.values.new_zeros(base.weight.numel()).scatter(0, self.indices, self.values).view(
            base.weight.shape)

    def delta(self, x, base_out, base):
        return F.linear(x, self.dense(base))

    def delta_weight(self, base):
        return self.dense(base), None

    @torch.no_grad()
    def drop_and_regrow(self, grad_weight: torch.Tensor | None = None, fraction: float = 0.1,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Drop the `fraction` of entries with the smallest |value| and regrow as many at unused
        positions: those of largest |grad_weight| (the gradient w.r.t. W, accumulated over steps by
        the caller) if given, else random ones (from `generator`, or torch's global generator).

        Regrown entries start at zero in the dropped slots, in place: `values` stays the same
        Parameter, so optimizers keep their reference. Returns the slots (positions in `values`)
        that changed; the caller must reset the optimizer state there (e.g. AdamW's exp_avg and
        exp_avg_sq), or stale moments move the new entries. Do not call while the adapter is merged.
        """
        _check_fraction("The regrowth fraction", fraction)
        numel, k = self.weight_numel, self.indices.numel()
        n = min(round(fraction * k), numel - k)
        if n <= 0:
            return self.indices.new_zeros(0)
        slots = self.values.abs().topk(n, largest=False).indices
        used = torch.zeros(numel, dtype=torch.bool, device=self.indices.device)
        used[self.indices] = True
        if grad_weight is not None:
            score = grad_weight.detach().abs().flatten().float().masked_fill(used, float("-inf"))
            grown = score.topk(n).indices
        else:
            free = (~used).nonzero().squeeze(1)
            grown = free[torch.randperm(free.numel(), generator=generator)[:n].to(free.device)]
        self.indices[slots] = grown
        self.values[slots] = 0
        return slots


def regrow_all(model: nn.Module, name: str, fraction: float = 0.1, generator: torch.Generator | None = None,
               grads: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Call `drop_and_regrow` on every `sft` module of adapter `name`; `grads` maps host names to
    accumulated weight gradients. Returns host name -> changed slots (reset their optimizer state)."""
    from ..core.model import adapter_modules

    changed = {}
    for host, module in adapter_modules(model, name).items():
        if isinstance(module.method_module, SFTModule):
            module = module.method_module
            changed[host] = module.drop_and_regrow((grads or {}).get(host), fraction, generator)
    return changed
