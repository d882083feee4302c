"""Adaptive-rank LoRA: AdaLoRA prunes a rank budget down, IncreLoRA grows one up. Both use AdaLoRA's
delta W = B diag(E) A (PEFT's names and layouts): a rank is a triplet (A[i], E[i], B[:, i]), a layer's
rank a mask over triplets (`rank_mask`, saved with the adapter). Controllers the trainer drives
(train/controllers.py) move the budget across all layers of one adapter. Schedule points (`tinit`,
`tfinal`, `warmup`) below 1 are fractions of the run, others step counts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import tensor_kwargs, LINEAR, AdapterModule, Capabilities, MethodConfig
from .registry import register

RESERVE_E = 1e-5  # the singular value a reserve triplet trains under (IncreLoRA's advance learning)


def _phases(warmup: float, final: float, total: int) -> tuple[int, int]:
    """(last warm-up step, first step of the final phase), squeezed into a run of `total` steps."""
    warmup, final = (int(round(v * total)) if v < 1 else int(v) for v in (warmup, final))
    end = total - min(max(1, final), total)
    return min(warmup, max(end - 1, 0)), end


def _smooth(avg, unc, ipt, beta1: float, beta2: float):
    """AdaLoRA's smoothed sensitivity and uncertainty (eqs. 8-9), in PEFT's arithmetic order."""
    avg = beta1 * avg + (1 - beta1) * ipt
    return avg, beta2 * unc + (1 - beta2) * (ipt - avg).abs()


def _check(config, ranks: str, ranks_ok: bool, interval: int, *points: float) -> None:
    for ok, message in [(ranks_ok, f"it needs {ranks}"), (0 <= config.dropout < 1, "dropout must be in [0, 1)"),
                        (0 < config.beta1 < 1 and 0 < config.beta2 < 1, "beta1 and beta2 must be in (0, 1)"),
                        (min(config.orth_reg_weight, *points) >= 0, "orth_reg_weight and schedule points must "
                         "not be negative"), (int(interval) >= 1, "intervals must be at least 1 step")]:
        if not ok:
            raise ConfigError(f"{type(config).__name__}: {message}; got {config}.")


class _Triplets(AdapterModule):
    """delta W = B diag(singular_values()) A, scaled; PEFT's init A, B ~ N(0, 0.02^2), E = 0."""

    capabilities = Capabilities(mergeable=True, mixed_batch=True, elastic_rank=False, layer_kinds=(LINEAR,))

    def __init__(self, base: nn.Module, config: MethodConfig, rank: int, active: int):
        super().__init__(base, config)
        factory = tensor_kwargs(base)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory).normal_(0.0, 0.02))
        self.lora_E = nn.Parameter(torch.zeros(rank, 1, **factory))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, **factory).normal_(0.0, 0.02))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.register_buffer("rank_mask", (torch.arange(rank)[:, None] < active).to(**factory))  # triplets in use

    @property
    def rank(self) -> int:
        return int(self.rank_mask.sum())

    def singular_values(self) -> torch.Tensor:
        return self.lora_E * self.rank_mask

    def _scaled(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.scaling

    def delta(self, x, base_out, base):
        return self._scaled(F.linear(F.linear(self.dropout(x), self.lora_A * self.singular_values()), self.lora_B))

    def delta_weight(self, base):
        return self._scaled(self.lora_B @ (self.lora_A * self.singular_values())), None


class _Controller:
    """Layers (sorted by name), the orthogonal penalty, state: `saved` attributes and layer buffers."""

    saved = ("avg", "unc")

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = dict(sorted(modules.items()))
        self.config = next(iter(self.modules.values())).config

    def state_dict(self) -> dict:
        return {**{k: dict(getattr(self, k)) for k in self.saved},
                "buffers": {h: {k: b.clone() for k, b in m.named_buffers()} for h, m in self.modules.items()}}

    def load_state_dict(self, state: dict) -> None:
        device = next(iter(self.modules.values())).lora_A.device  # checkpoints are read onto the CPU
        for k in self.saved:
            setattr(self, k, {n: t.to(device) for n, t in state[k].items()})
        for h, m in self.modules.items():
            for k, b in m.named_buffers():
                b.copy_(state["buffers"][h][k])

    def after_backward(self, step: int) -> None:
        """Add the gradient of PEFT's penalty orth_reg_weight * mean(||A A^T - I||_F, ||B^T B - I||_F)."""
        weight = self.config.orth_reg_weight / (2 * len(self.modules))
        for m in self.modules.values():
            if weight <= 0 or not (m.lora_A.requires_grad and m.lora_B.requires_grad):
                continue
            # AdaLoRA penalises every triplet, as PEFT; IncreLoRA those in use (active or reserve)
            rows = (m.rank_mask + m.reserve)[:, 0] > 0 if hasattr(m, "reserve") else slice(None)
            with torch.enable_grad():
                a, b = m.lora_A.detach().requires_grad_(), m.lora_B.detach().requires_grad_()
                sa, sb = a[rows], b[:, rows]
                eye = torch.eye(sa.shape[0], dtype=a.dtype, device=a.device)
                reg = torch.norm(sa @ sa.T - eye, p="fro") + torch.norm(sb.T @ sb - eye, p="fro")
                grads = torch.autograd.grad(reg * weight, (a, b))
            for p, g in zip((m.lora_A, m.lora_B), grads):
                p.grad = g if p.grad is None else p.grad.add_(g)


@dataclass
class AdaLoRA(MethodConfig):
    """Config of AdaLoRA: `init_rank` per layer at the start, `target_rank` x layers in total at the
    end; between the `tinit` warm-up and the last `tfinal` steps, reallocated every `delta_t` steps."""

    method = "adalora"
    init_rank: int = 12
    target_rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    tinit: float = 0.1
    tfinal: float = 0.2
    delta_t: int = 10
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5

    def validate(self) -> None:
        _check(self, "1 <= target_rank <= init_rank", 1 <= int(self.target_rank) <= int(self.init_rank),
               self.delta_t, self.tinit, self.tfinal)


class AdaLoRAController(_Controller):
    """AdaLoRA's budget schedule over all layers of one adapter, as PEFT's RankAllocator runs it."""

    saved = ("avg", "unc", "keep")

    def __init__(self, modules: dict[str, nn.Module], total_steps: int):
        super().__init__(modules)
        self.tinit, self.final_step = _phases(self.config.tinit, self.config.tfinal, total_steps)
        self.init_budget = sum(m.lora_E.shape[0] for m in self.modules.values())
        self.target_budget = self.config.target_rank * len(self.modules)
        self.keep = {h: m.rank_mask[:, 0] > 0 for h, m in self.modules.items()}  # the last allocation
        self._reset_scores()

    def _params(self):
        return [(f"{h}.{k}", getattr(m, k)) for h, m in self.modules.items() for k in ("lora_A", "lora_E", "lora_B")]

    def _reset_scores(self) -> None:
        self.avg, self.unc = ({k: torch.zeros_like(p.detach()) for k, p in self._params()} for _ in range(2))

    def budget(self, step: int) -> int:
        """The total rank allowed at `step`: cubic decay between the warm-up and the final phase."""
        if step <= self.tinit:
            return self.init_budget
        if step >= self.final_step:
            return self.target_budget
        left = 1 - (step - self.tinit) / (self.final_step - self.tinit)
        return int((self.init_budget - self.target_budget) * left ** 3 + self.target_budget)

    def final_ranks(self) -> dict[str, int]:
        return {h: int(k.sum()) for h, k in self.keep.items()}

    @torch.no_grad()
    def after_step(self, step: int, optimizer=None) -> None:
        if step < self.final_step:
            for key, p in self._params():  # as PEFT: the stepped weights times this step's gradient
                if p.grad is not None:
                    self.avg[key], self.unc[key] = _smooth(self.avg[key], self.unc[key], (p * p.grad).abs(),
                                                           self.config.beta1, self.config.beta2)
            if step > self.tinit and step % self.config.delta_t == 0:
                self._mask_to(self.budget(step), final=False)
        elif step == self.final_step:
            self._mask_to(self.target_budget, final=True)
            self._reset_scores()
        else:  # optimizer moments would move masked E: keep them at zero, as PEFT does
            for m in self.modules.values():
                m.lora_E.masked_fill_(m.rank_mask == 0, 0.0)

    def _mask_to(self, budget: int, final: bool) -> None:
        """Keep the `budget` best triplets across layers, E = 0 for the others; the final one is fixed."""
        s = {k: self.avg[k] * self.unc[k] for k in self.avg}
        triplets = [s[f"{h}.lora_E"].view(-1) + (s[f"{h}.lora_A"].mean(1) + s[f"{h}.lora_B"].mean(0))
                    for h in self.modules]
        flat = torch.cat(triplets)
        keep = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, flat.topk(budget).indices, True)
        for (h, m), kept in zip(self.modules.items(), keep.split([len(t) for t in triplets])):
            self.keep[h] = kept
            m.lora_E.masked_fill_(~kept[:, None], 0.0)
            if final:
                m.rank_mask.copy_(kept[:, None])


@register
class AdaLoRAModule(_Triplets):
    """AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al., 2023).

    h = W x + (alpha / r0) * P diag(E * m) Q x: P = lora_B, E = lora_E, Q = lora_A trained, r0 = init_rank
    (`ranknum`, as in PEFT), m the rank mask. After each optimizer step (as PEFT) each entry w of P, E, Q
    gets I = |w * dL/dw|, I_bar <- b1 I_bar + (1 - b1) I, U_bar <- b2 U_bar + (1 - b2) |I - I_bar|,
    s = I_bar * U_bar; triplet i scores S_i = s(E_i) + mean_j s(Q_ij) + mean_j s(P_ji). The budget falls
    from b0 = r0 * L to bT = target_rank * L as b(t) = bT + (b0 - bT) (1 - (t - t_i) / (T - t_f - t_i))^3;
    every delta_t steps the b(t) best triplets of all L layers are kept, E_i = 0 for the others (which
    may grow back, as in PEFT); at t = T - t_f the mask m is fixed. The loss gains orth_reg_weight *
    mean(||P^T P - I||_F, ||Q Q^T - I||_F), whose gradient the controller adds.
    """

    config_class = AdaLoRA
    controller_class = AdaLoRAController

    def __init__(self, base: nn.Module, config: AdaLoRA):
        super().__init__(base, config, config.init_rank, config.init_rank)
        self.register_buffer("ranknum", self.lora_E.new_full((1,), float(config.init_rank)))
        self.scaling = config.alpha if config.alpha > 0 else float(config.init_rank)

    def _scaled(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.scaling / (self.ranknum + 1e-5)  # PEFT's order of operations


@dataclass
class IncreLoRA(MethodConfig):
    """Config of IncreLoRA: `init_rank` per layer at the start, `target_rank` x layers in total (at most
    `max_rank` per layer) by the last `tfinal` steps; after `warmup`, every `grow_every` steps the
    best layers gain `grow_by` ranks each."""

    method = "increlora"
    init_rank: int = 1
    max_rank: int = 8
    target_rank: int = 4
    alpha: float = 16.0
    dropout: float = 0.0
    warmup: float = 0.1
    tfinal: float = 0.2
    grow_every: int = 10
    grow_by: int = 1
    advance_learning: bool = True
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1

    def validate(self) -> None:
        ranks_ok = 1 <= int(self.init_rank) <= int(self.target_rank) <= int(self.max_rank)
        _check(self, "1 <= init_rank <= target_rank <= max_rank", ranks_ok, min(self.grow_every, self.grow_by),
               self.warmup, self.tfinal)


class IncreLoRAController(_Controller):
    """IncreLoRA's growth schedule over all layers of one adapter."""

    def __init__(self, modules: dict[str, nn.Module], total_steps: int):
        super().__init__(modules)
        self.warmup, self.last = _phases(self.config.warmup, self.config.tfinal, total_steps)
        self.budget = self.config.target_rank * len(self.modules)
        self.rounds = [s for s in range(self.warmup + 1, self.last) if s % self.config.grow_every == 0] + [self.last]
        self.avg, self.unc = ({h: m.lora_A.new_zeros(()) for h, m in self.modules.items()} for _ in range(2))
        self._set_tracking()

    def final_ranks(self) -> dict[str, int]:
        return {h: m.rank for h, m in self.modules.items()}

    def total_rank(self) -> int:
        return sum(self.final_ranks().values())

    def _set_tracking(self) -> None:
        growing = self.total_rank() < self.budget
        for m in self.modules.values():
            m.tracking = growing
            if not growing:  # done: drop the reserves left
                m.reserve.zero_()

    def after_backward(self, step: int) -> None:
        super().after_backward(step)
        with torch.no_grad():
            for h, m in self.modules.items():
                if torch.is_tensor(m.grad_delta):  # I = sum |dW * dL/d(dW)| / sqrt(numel), the official score
                    w, cfg = m.delta_weight(None)[0], self.config
                    ipt = (w * m.grad_delta).abs().sum() / math.sqrt(w.numel())
                    self.avg[h], self.unc[h] = _smooth(self.avg[h], self.unc[h], ipt, cfg.beta1, cfg.beta2)
                    m.grad_delta = 0

    @torch.no_grad()
    def after_step(self, step: int, optimizer=None) -> None:
        if step not in self.rounds or self.total_rank() >= self.budget:
            return
        start, i = self.config.init_rank * len(self.modules), self.rounds.index(step) + 1
        amount = start - (-(self.budget - start) * i // len(self.rounds)) - self.total_rank()  # spread evenly
        order = sorted(self.modules, key=lambda h: -float(self.avg[h] * self.unc[h]))
        for _ in range(self.config.max_rank if step == self.last else 1):  # the last round fills up
            for h in order:
                amount -= self.modules[h].grow(min(self.config.grow_by, amount))
        self._set_tracking()

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._set_tracking()


@register
class IncreLoRAModule(_Triplets):
    """IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning
    (Zhang et al., 2023).

    h = W x + (alpha / r_max) * B diag(E * m + eps * v) A x, storage for r_max triplets, m the rank mask
    (init_rank ones at first), v the reserve mask. A layer's importance I = sum |dW * dL/d(dW)| /
    sqrt(out * in) is smoothed as in AdaLoRA into S = I_bar * U_bar. After warm-up, every grow_every
    steps the layers of highest S gain grow_by triplets each, until the total rank is target_rank * L.
    A new triplet enters with E = 0, so outputs do not change. Advance learning: the next grow_by
    triplets train ahead under a fixed E = eps = 1e-5 from B = 0 (so outputs do not change either) and
    keep E = eps when activated; reaching the budget drops the reserves left. The loss gains
    orth_reg_weight * mean(||B^T B - I||_F, ||A A^T - I||_F) over the triplets in use.
    """

    config_class = IncreLoRA
    controller_class = IncreLoRAController

    def __init__(self, base: nn.Module, config: IncreLoRA):
        super().__init__(base, config, config.max_rank, config.init_rank)
        if config.advance_learning:
            self.lora_B.detach()[:, config.init_rank:] = 0.0
        self.register_buffer("reserve", torch.zeros_like(self.rank_mask))
        self.grow(0)  # picks the first reserve
        self.scaling = config.alpha / config.max_rank
        self.tracking, self.grad_delta = False, 0  # the controller's view of dL/d(delta W)

    def singular_values(self) -> torch.Tensor:
        return self.lora_E * self.rank_mask + RESERVE_E * self.reserve

    def delta(self, x, base_out, base):
        if not (self.tracking and self.training and torch.is_grad_enabled()):
            return super().delta(x, base_out, base)
        w = self.delta_weight(base)[0]  # dense, so that backward gives the gradient the score needs
        if w.requires_grad:  # the gradient is summed over the micro-batches of a step
            w.register_hook(lambda g: setattr(self, "grad_delta", g + self.grad_delta))
        return F.linear(self.dropout(x), w)

    @torch.no_grad()
    def grow(self, k: int) -> int:
        """Activate up to `k` more triplets (a reserve keeps E = eps), pick the next reserve; how many."""
        slots = (self.rank_mask[:, 0] == 0).nonzero()[:, 0][:k]
        self.lora_E[slots] = RESERVE_E * self.reserve[slots]
        self.rank_mask[slots] = 1.0
        self.reserve.zero_()
        if self.config.advance_learning:
            self.reserve[(self.rank_mask[:, 0] == 0).nonzero()[:, 0][:self.config.grow_by]] = 1.0
        return len(slots)
