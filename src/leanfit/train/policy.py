"""Lean-training policies the trainer applies: frozen-prefix eval mode and cache, the final block
cut to the positions the head reads, a causal LM's loss fused with its output layer, the blocks'
dropout off, LISA layer sampling, gradient checkpointing. Partial back-propagation needs no code:
autograd records nothing below the lowest module with a trainable parameter, as long as nothing
there asks for input gradients, which leanfit never does (HF's `enable_input_require_grads` would).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from ..data.splits import INPUT_KEYS, rows
from ..errors import ConfigError
from ..memory import trim_heap
from .block_dropout import BlockDropoutOff
from .head_rows import HeadRows
from .kv_cache import NoKVCache
from .layers import LISA
from .lm_loss import FusedLMLoss
from .prefix_cache import PrefixCache
from .precision import MixedPrecision

PREFIX_MODES = ("off", "eval", "cache")


class LeanPolicy:
    def __init__(self, model: nn.Module, prefix: str = "off", lisa_layers: int | None = None,
                 lisa_period: int = 20, gradient_checkpointing: bool = False, seed: int = 0,
                 head_rows: bool = True, block_dropout: bool = True, fused_loss: bool = True,
                 mixed: MixedPrecision | None = None):
        if prefix not in PREFIX_MODES:
            raise ConfigError(f"prefix must be one of {', '.join(PREFIX_MODES)}, got {prefix!r}.")
        self.model, self.prefix = model, prefix
        self.lisa = LISA(model, lisa_layers, lisa_period, seed) if lisa_layers else None
        self.gradient_checkpointing, self.want_head_rows = gradient_checkpointing, head_rows
        self.head_rows: HeadRows | None = None
        self.want_fused_loss, self.fused_loss = fused_loss, None
        self.dropout_off = None if block_dropout else BlockDropoutOff(model)
        self.no_kv_cache = NoKVCache.plan(model)
        self.cache: PrefixCache | None = None
        self.plan = None
        self._depth = 0
        self.mixed = mixed  # the training steps' precision (train/precision.py); None: float32
        self.info: dict = {"prefix": prefix, "block_dropout": block_dropout,
                           "precision": mixed.precision if mixed else "fp32"}

    def start(self, data, eval_batch_size: int, spill_dir: str | None = None) -> None:
        """Decide the frozen prefix and, in cache mode, compute it for every split once."""
        if self.gradient_checkpointing:
            enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers 5's name
            if enable is None:
                raise ConfigError("gradient checkpointing needs a Hugging Face model; turn it off for this one.")
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        with self._without_kv_cache():  # the plans' forwards as the trainer's will run
            self._plan(data, eval_batch_size, spill_dir)

    def _plan(self, data, eval_batch_size: int, spill_dir: str | None) -> None:
        device = next(self.model.parameters()).device
        sample = {k: v[:2].to(device) for k, v in data.train.items() if k in INPUT_KEYS}
        if self.want_head_rows:
            self.head_rows = HeadRows.plan(self.model, sample)
            self.info["head_rows"] = self.head_rows.n if self.head_rows else None
        if self.want_fused_loss:
            self.fused_loss = FusedLMLoss.plan(self.model, sample)
            self.info["fused_loss"] = self.fused_loss is not None
        if self.prefix == "off":
            return
        self.plan = PrefixCache.plan(self.model, sample)
        self.info["boundary"] = self.plan.boundary if self.plan else None
        if self.plan is None or self.prefix != "cache":
            return
        self.cache = PrefixCache(self.model, self.plan)
        self._splits = {"train": data.train, "validation": data.validation, "test": data.test}
        self._build_args = (eval_batch_size, spill_dir)
        self.ensure("train")

    def ensure(self, split: str) -> None:
        """Compute a split's prefix on first use (the test split's only if it is evaluated)."""
        if self.cache is None or self.cache.has(split) or rows(self._splits[split]) == 0:
            return
        attached = self.cache.attached
        if attached:
            self.cache.detach()
        # The train split's prefix stands for the lower part of training forwards: computed as they are.
        mixed = self.mixed if split == "train" and self.mixed is not None else MixedPrecision(self.model, "fp32", None)
        trim_heap()  # what loading, tokenising and planning freed: the build's tensors would not reuse it
        with mixed.step(), mixed.forward(), self._without_kv_cache():
            self.cache.build({split: self._splits[split]}, *self._build_args)
        if attached:
            self.cache.attach()
        self.info["cache_bytes"] = self.cache.nbytes()

    def _without_kv_cache(self):
        return self.no_kv_cache.applied() if self.no_kv_cache else nullcontext()

    @contextmanager
    def active(self):
        """Apply the cache replay, the final-block cut, the fused loss, the blocks' dropout switch and
        the key/value cache switch inside the `with` block only, so the model outside the trainer is untouched."""
        if self._depth:  # evaluation inside fit: already active
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        parts = [p for p in (self.cache, self.head_rows, self.fused_loss, self.dropout_off, self.no_kv_cache)
                 if p is not None]
        for part in parts:
            part.attach()
        self._depth = 1
        try:
            yield
        finally:
            self._depth = 0
            for part in parts:
                part.detach()

    def train_mode(self) -> None:
        """After `model.train()`: the frozen prefix stays in eval mode (no dropout below it)."""
        if self.plan is not None:
            for module in self.plan.prefix:
                module.eval()

    def before_forward(self, split: str, index: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.select(split, index)

    def before_step(self, step: int) -> None:
        if self.lisa is not None:
            self.lisa.before_step(step)

    def close(self) -> None:
        """Free the cache and drop the cut and the fused loss (evaluation then runs the whole model)."""
        self.cache = self.head_rows = self.fused_loss = None
