"""The training loop: AdamW over the trainable parameters, warmup + decay, clipping, gradient
accumulation, evaluation, early stopping, and checkpoints a killed run resumes from bit-identically.

Bit-identical resume rests on three things: the batch order of epoch `e` comes from its own generator
seeded with `seed * 1000 + e` (so it can be rebuilt at any position), checkpoints are taken only between
optimizer steps, and they carry the global RNG state that dropout draws from.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, NoReturn

import torch

from leanfit.data.splits import CLASSIFICATION, TensorSplits
from leanfit.errors import ConfigError, DataError, TrainingError, check_known
from leanfit.field_types import refuse_wrong_types
from leanfit.memory import trim_heap
from leanfit.train.checkpoint import (check_resumable, data_fingerprint, latest_checkpoint, load_checkpoint,
                                      restore_rng, rng_state, save_checkpoint)
from leanfit.train.metrics import MetricsLog, batch_at, evaluate_split, split_size
from leanfit.train import distributed
from leanfit.train.controllers import build_controllers
from leanfit.train.policy import LeanPolicy
from leanfit.train.precision import PRECISIONS, MixedPrecision, resolve
from leanfit.train.progress import TrainProgress
from leanfit.train.schedule import SCHEDULES, make_scheduler


@dataclass
class TrainConfig:
    """Training options. `max_steps` caps optimizer steps (tests, benchmarks); `checkpoint_every`
    counts steps, 0 meaning checkpoints at epoch ends only (when `checkpoint_dir` is set)."""

    epochs: int = 3
    lr: float = 5e-4
    batch_size: int = 32
    eval_batch_size: int = 64
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    early_stopping_patience: int | None = None  # epochs without improvement on validation
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int = 0
    resume: bool = False
    seed: int = 0
    metrics_path: str | Path | None = None
    log_every: int = 10
    progress: bool = True
    max_steps: int | None = None
    grad_accum: int = 1
    # Lean training (train/policy.py): frozen prefix "off" | "eval" (no dropout below the lowest
    # trainable block) | "cache" (eval, and its output computed once); LISA; gradient checkpointing.
    prefix: str = "off"
    lisa_layers: int | None = None
    lisa_period: int = 20
    gradient_checkpointing: bool = False
    # Run the final block only at the positions the head reads, where that is exact (train/head_rows.py).
    head_rows: bool = True
    # A causal LM's output projection and loss fused, chunk by chunk, so no logits tensor is made (train/lm_loss.py).
    fused_loss: bool = True
    # False: no dropout inside the base model's blocks while training (train/block_dropout.py).
    block_dropout: bool = True
    # "bf16": training forwards under bfloat16 autocast (train/precision.py); "auto": bf16 where the
    # device has native bfloat16 arithmetic; "fp32": none.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        refuse_wrong_types(self, "Training option")  # first: lr="x" would fail in a comparison below
        checks = [
            (min(self.epochs, self.batch_size, self.eval_batch_size, self.grad_accum, self.log_every) >= 1,
             "epochs, batch_size, eval_batch_size, grad_accum and log_every must be at least 1"),
            (self.lr > 0, "lr must be positive"),
            (min(self.weight_decay, self.checkpoint_every, self.max_grad_norm or 0) >= 0,
             "weight_decay, checkpoint_every and max_grad_norm must not be negative"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (all(v is None or v >= 1 for v in (self.early_stopping_patience, self.max_steps)),
             "early_stopping_patience and max_steps must be at least 1, or None to turn them off"),
            (not self.resume or self.checkpoint_dir is not None, "resume needs a checkpoint_dir"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{message}; fix the training option and try again.")


@dataclass
class FitResult:
    """What a run produced: validation metrics (best and final), its length and its logged history."""

    best: dict | None
    final: dict | None
    epochs_run: int
    steps: int
    wall_s: float
    stopped_early: bool
    history: list[dict]
    checkpoint: str | None = None  # the last checkpoint written or resumed from


@dataclass
class LoopState:
    """Where the loop is; saved in checkpoints."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # 0-based epoch in progress
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    best: dict | None = None  # best validation metrics so far
    bad_epochs: int = 0  # epochs since the monitored metric last improved
    stopped_early: bool = False
    window: list = field(default_factory=lambda: [0.0, 0])  # train loss sum, count since last log
    history: list = field(default_factory=list)


def config_with(config: TrainConfig | None, overrides: dict) -> TrainConfig:
    """`config` (or the defaults) with keyword overrides; unknown keys name the valid ones."""
    check_known(overrides, (f.name for f in fields(TrainConfig)), "training option")
    return replace(config or TrainConfig(), **overrides)


def _check_folders(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from, if any; refuses folders a fresh run would write over (an earlier
    run's checkpoints are pruned and its metrics truncated) and paths of the wrong kind, before training."""
    if cfg.checkpoint_dir is not None and Path(cfg.checkpoint_dir).is_file():
        raise ConfigError(f"checkpoint_dir '{cfg.checkpoint_dir}' is a file; give a folder.")
    if cfg.metrics_path is not None and Path(cfg.metrics_path).is_dir():
        raise ConfigError(f"metrics_path '{cfg.metrics_path}' is a folder; give a file path.")
    found = latest_checkpoint(cfg.checkpoint_dir) if cfg.checkpoint_dir is not None else None
    if found is not None and not cfg.resume:
        raise ConfigError(f"checkpoint_dir '{cfg.checkpoint_dir}' holds an earlier run's checkpoints (the latest is "
                          f"{found.name}); pass resume=True to go on from it, or give another checkpoint_dir.")
    metrics = Path(cfg.metrics_path) if cfg.metrics_path is not None else None
    if found is None and metrics is not None and metrics.is_file() and metrics.stat().st_size > 0:
        why = f" (resume found no checkpoint in '{cfg.checkpoint_dir}')" if cfg.resume else ""
        raise ConfigError(f"metrics_path '{metrics}' holds an earlier run's metrics, which a fresh run{why} would "
                          "replace; give another metrics_path or delete that file.")
    return found if cfg.resume else None


def _check_model_reads_data(model: torch.nn.Module, data: TensorSplits) -> None:
    """A Hugging Face model's head and positions against the data, before the first step fails inside
    the model (an IndexError of a target out of bounds, a tensor size mismatch)."""
    from leanfit.core.model import task_heads
    config, found = getattr(model, "config", None), task_heads(model)
    heads, positions = getattr(config, "num_labels", None), getattr(config, "max_position_embeddings", None)
    if data.task == CLASSIFICATION and data.labels and isinstance(heads, int) and found and heads < len(data.labels):
        raise ConfigError(f"The model's head has {heads} outputs (num_labels) but the data has {len(data.labels)} "
                          f"labels; load the model with num_labels={len(data.labels)}.")
    if data.task == CLASSIFICATION and found == ["score"] and getattr(config, "pad_token_id", 0) is None:
        # a decoder's classifier reads each row's last real token, found through the pad id
        raise ConfigError("The model's config has no pad_token_id, which its classification head needs to find each "
                          "row's last token; set model.config.pad_token_id = tokenizer.pad_token_id (encode gives a "
                          "tokenizer without one its EOS).")
    ids = data.train.get("input_ids")
    if isinstance(positions, int) and ids is not None and ids.dim() == 2 and ids.shape[1] > positions:
        raise ConfigError(f"The data's rows are {ids.shape[1]} tokens long but the model reads at most {positions} "
                          f"positions; encode with max_length={positions} or less.")


def _refuse_merged_training(model: torch.nn.Module) -> None:
    """A merged adapter is skipped in forward (its update is in the weights), so its parameters get
    no gradient: training it would run and change nothing."""
    from leanfit.core.inject import hosts
    for host in hosts(model).values():
        for name in host.merged:
            if any(p.requires_grad for p in host.adapters[name].parameters()):
                raise ConfigError(f"Adapter '{name}' is merged into the base weights, so training would not change "
                                  f"it; unmerge it first (leanfit.unmerge(model, '{name}')).")


class Trainer:
    """Fine-tunes the parameters of `model` that require grad on `data`.

    `model(**batch)` takes input_ids and attention_mask (or pixel_values) and labels, and returns an
    object with `.loss` and `.logits` (Hugging Face style). `on_step(trainer, step)`, if given, is
    called after each optimizer step (and after any checkpoint of that step).
    """

    def __init__(self, model: torch.nn.Module, data: TensorSplits, config: TrainConfig | None = None,
                 *, on_step: Callable[["Trainer", int], None] | None = None, **overrides):
        self.config = cfg = config_with(config, overrides)
        if not isinstance(data, TensorSplits):
            raise ConfigError(f"Trainer takes the encoded splits (leanfit.data.encode(dataset, tokenizer)), got "
                              f"{type(data).__name__}.")
        self.model, self.data, self.task, self.on_step = model, data, data.task, on_step
        first = next(model.parameters(), None)
        if first is None:
            raise ConfigError("the model has no parameters; pass the network to fine-tune.")
        self.device = first.device
        self.has_validation = split_size(data.validation) > 0
        self.batches_per_epoch = math.ceil(split_size(data.train) / cfg.batch_size)
        steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.grad_accum)
        self.total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)
        self.trainable: list[tuple[str, torch.nn.Parameter]] = []  # fixed when fit() starts
        self.optimizer: torch.optim.Optimizer | None = None
        self.policy: LeanPolicy | None = None
        self.controllers: list = []
        self.world = distributed.world()[1]
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.monitor = "accuracy" if self.task == CLASSIFICATION else "loss"  # higher / lower is better
        self.state = LoopState()
        self.last_checkpoint: Path | None = None
        self._saved_step: int | None = None
        self._best_weights: dict[str, torch.Tensor] | None = None
        self._metrics = MetricsLog(None)

    def evaluate(self, split: str = "test") -> dict[str, float]:
        """Classification: {"accuracy", "loss"}; causal LM: {"loss", "perplexity"} (token-weighted)."""
        if split not in ("train", "validation", "test"):
            raise ConfigError(f"split {split!r} is unknown; use 'train', 'validation' or 'test'.")
        policy = self.policy
        trim_heap()  # what the training steps freed: evaluation's tensors would not reuse it
        if policy is None:
            return evaluate_split(self.model, self.data.split(split), self.task, self.config.eval_batch_size)
        try:
            policy.ensure(split)
            with policy.active():
                return evaluate_split(self.model, self.data.split(split), self.task, self.config.eval_batch_size,
                                      lambda index: policy.before_forward(split, index))
        finally:
            policy.train_mode()

    def fit(self) -> FitResult:
        """Train to the end (or an early stop); with resume=True, go on from the latest checkpoint."""
        cfg, start = self.config, time.perf_counter()
        resume_from = _check_folders(cfg)
        if self.optimizer is None:
            self._prepare()
        torch.manual_seed(cfg.seed)
        if resume_from is not None:
            self._restore(resume_from)
        self._metrics = MetricsLog(cfg.metrics_path if distributed.is_main() else None,
                                   self.state.step if resume_from is not None else None)
        st = self.state
        self.model.train()
        self.policy.train_mode()
        trim_heap()  # what loading, tokenising and the prefix cache's build freed: the steps would not reuse it
        with self.policy.active(), TrainProgress(self.total_steps, st.step, cfg.progress, cfg.epochs) as bar:
            while st.epoch < cfg.epochs and st.step < self.total_steps and not st.stopped_early:
                self._train_epoch(bar)
                if st.batch_in_epoch < self.batches_per_epoch:
                    break  # max_steps reached inside the epoch
                self._end_epoch()
                if self.on_step is not None:
                    self.on_step(self, st.step)
        self.mixed.release()  # the bfloat16 weight copies serve training steps only
        for _, p in self.trainable:  # LISA leaves the blocks of its last period alone trainable
            p.requires_grad_(True)
        if self.has_validation and not any(r["kind"] == "validation" and r["step"] == st.step for r in st.history):
            self._validate()
        if self._saved_step != st.step:
            self._save()
        if cfg.early_stopping_patience and self._best_weights is not None:
            self._load_weights(self._best_weights)
        final = next((r["values"] for r in reversed(st.history) if r["kind"] == "validation"), None)
        return FitResult(
            best=st.best, final=final, epochs_run=st.epoch + (st.batch_in_epoch > 0), steps=st.step,
            wall_s=time.perf_counter() - start, stopped_early=st.stopped_early, history=list(st.history),
            checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
        )

    def _prepare(self) -> None:
        """Choose what to optimise when training starts, so adapters added after __init__ count and an
        evaluate-only Trainer needs neither trainable parameters nor training data."""
        cfg = self.config
        self.device = next(self.model.parameters()).device  # where the model is now
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self.trainable:
            raise ConfigError("no model parameter requires grad; add an adapter or unfreeze some parameters.")
        _refuse_merged_training(self.model)
        _check_model_reads_data(self.model, self.data)
        if self.total_steps == 0:
            raise DataError("the train split has no rows; give the trainer some training data.")
        if cfg.early_stopping_patience and not self.has_validation:
            raise ConfigError("early stopping needs a validation split; add one or set early_stopping_patience=None.")
        self.optimizer = torch.optim.AdamW([p for _, p in self.trainable], lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, cfg.schedule, self.total_steps, cfg.warmup_ratio)
        self.controllers = build_controllers(self.model, self.total_steps)
        self.mixed = MixedPrecision(self.model, resolve(cfg.precision, self.device), self.device,
                                    [p for _, p in self.trainable])
        self.policy = LeanPolicy(self.model, cfg.prefix, cfg.lisa_layers, cfg.lisa_period,
                                 cfg.gradient_checkpointing, cfg.seed, cfg.head_rows,
                                 cfg.block_dropout, cfg.fused_loss, self.mixed)
        self.policy.start(self.data, cfg.eval_batch_size, cfg.checkpoint_dir)

    def close(self) -> None:
        """Free the prefix cache (evaluation then runs the whole model again)."""
        if self.policy is not None:
            self.policy.close()

    def _train_epoch(self, bar: TrainProgress) -> None:
        cfg, st = self.config, self.state
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + st.epoch)
        batches = torch.randperm(split_size(self.data.train), generator=generator).split(cfg.batch_size)
        while st.batch_in_epoch < len(batches) and st.step < self.total_steps:
            group = batches[st.batch_in_epoch: st.batch_in_epoch + cfg.grad_accum]
            loss, lr = self._optimizer_step(group)
            st.batch_in_epoch += len(group)
            st.step += 1
            st.window = [st.window[0] + loss, st.window[1] + 1]
            if st.step % cfg.log_every == 0:
                self._record("train", {"loss": st.window[0] / st.window[1], "lr": lr})
                st.window = [0.0, 0]
            at_epoch_end = st.batch_in_epoch == len(batches)  # there the checkpoint follows validation
            if cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0 and not at_epoch_end:
                self._save()
            bar.update(st.step, st.epoch, loss, lr)
            if self.on_step is not None and not at_epoch_end:  # else after the epoch's validation and checkpoint
                self.on_step(self, st.step)

    def _optimizer_step(self, group: tuple[torch.Tensor, ...]) -> tuple[float, float]:
        """Forward/backward over the micro-batches of `group`, clip, step. Returns (mean loss, lr used)."""
        total = 0.0
        self.policy.before_step(self.state.step)
        lm = self.task != CLASSIFICATION
        # each micro-batch weighs by what it predicts (rows or tokens), so an epoch's short last one
        # counts as its rows do, and grad_accum=2 at batch 4 equals batch 8
        predicted = [distributed.predicted({"labels": self.data.train["labels"][index]}, lm) for index in group]
        whole = max(sum(predicted), 1)
        with self.mixed.step():
            for index, everyone in zip(group, predicted):
                local = distributed.shard(index)  # all rows when not distributed
                self.policy.before_forward("train", local)
                mine = batch_at(self.data.train, local, self.device)
                # Weight this process's mean loss by its share, so averaged gradients equal one process's.
                share = distributed.predicted(mine, lm) * self.world / max(everyone, 1)
                with self.mixed.forward():
                    loss = self.model(**mine).loss
                value = distributed.global_sum(loss.item() * share / self.world, self.device)
                if not math.isfinite(value):
                    self._diverged("the loss", value)
                (loss * share * (everyone / whole)).backward()
                total += value * everyone / whole
        distributed.average_gradients([p for _, p in self.trainable])
        for controller in self.controllers:
            controller.after_backward(self.state.step)
        if self.config.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable], self.config.max_grad_norm)
            if not math.isfinite(norm.item()):
                self._diverged("the gradient norm", norm.item())
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        for controller in self.controllers:
            controller.after_step(self.state.step, self.optimizer)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, lr

    def _end_epoch(self) -> None:
        cfg, st = self.config, self.state
        if self.has_validation:
            st.bad_epochs = 0 if self._validate() else st.bad_epochs + 1
            st.stopped_early = st.bad_epochs >= (cfg.early_stopping_patience or math.inf)
        st.epoch += 1
        st.batch_in_epoch = 0
        self._save()

    def _validate(self) -> bool:
        """Evaluate on validation, record it, keep it (and the weights) if best. True if it improved."""
        values = self.evaluate("validation")
        self._record("validation", values)
        st, key = self.state, self.monitor
        # at equal accuracy a lower loss is better: a plateau of accuracy must not keep an early, worse model
        improved = st.best is None or (
            (values[key], -values["loss"]) > (st.best[key], -st.best["loss"]) if key == "accuracy"
            else values[key] < st.best[key])
        if improved:
            st.best = values
            if self.config.early_stopping_patience:
                self._best_weights = {n: p.detach().clone() for n, p in self.trainable}
        return improved

    def _record(self, kind: str, values: dict) -> None:
        st = self.state
        epoch = st.epoch + 1 if st.batch_in_epoch > 0 else st.epoch  # 1-based; at a boundary, the one just done
        record = {"step": st.step, "epoch": epoch, "kind": kind, "values": values}
        st.history.append(record)
        self._metrics.write(record)

    def _diverged(self, what: str, value: float) -> NoReturn:
        self.optimizer.zero_grad(set_to_none=True)
        st = self.state
        where = f"{what} is {value} at step {st.step + 1} (epoch {st.epoch + 1})"
        todo = (f"the last good checkpoint is {self.last_checkpoint}: lower lr or max_grad_norm and resume from it"
                if self.last_checkpoint is not None else
                "no checkpoint was written: lower lr or max_grad_norm and start again")
        raise TrainingError(f"{where}; {todo}.")

    def _save(self) -> None:
        """Checkpoint the run as it stands between two optimizer steps (if there is a checkpoint_dir)."""
        if self.config.checkpoint_dir is None or not distributed.is_main():
            self._saved_step = self.state.step
            return
        state = {
            "loop": asdict(self.state),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "controllers": [c.state_dict() if hasattr(c, "state_dict") else None for c in self.controllers],
            "config": {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
                       for k, v in asdict(self.config).items()},
            "data": self._data_fingerprint,
            "base": self._base_fingerprint,
        }
        self.last_checkpoint = save_checkpoint(self.config.checkpoint_dir, self.state.step,
                                               dict(self.trainable), state, self._best_weights)
        self._saved_step = self.state.step

    @cached_property
    def _base_fingerprint(self) -> str:
        """The frozen weights' digest, once a run: resumed onto another base, the adapter would go on
        training against weights it never saw (same shapes, other values: nothing else tells)."""
        from leanfit.core.fingerprint import fingerprint
        return fingerprint(self.model, tuple(n for n, _ in self.trainable))

    @cached_property
    def _data_fingerprint(self) -> str:  # once a run: hashing the rows at every checkpoint would cost a pass
        return data_fingerprint(self.data.split("train"))

    def _restore(self, path: Path) -> None:
        weights, best, state = load_checkpoint(path)
        check_resumable(path, weights, state, {n: tuple(p.shape) for n, p in self.trainable}, asdict(self.config),
                        self._data_fingerprint, self._base_fingerprint)
        self._load_weights(weights)
        self._best_weights = {n: t.to(self.device) for n, t in best.items()} or None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_rates()
        restore_rng(state["rng"])
        for controller, saved in zip(self.controllers, state.get("controllers", [])):
            if saved is not None:
                controller.load_state_dict(saved)
        self.state = LoopState(**state["loop"])
        self.last_checkpoint, self._saved_step = path, self.state.step

    def _apply_rates(self) -> None:
        """This run's lr and weight_decay over the restored optimizer and schedule (the checkpoint holds the
        earlier ones): a run that diverged is resumed with a lower lr, as its error message says."""
        cfg, scheduler = self.config, self.scheduler
        scheduler.base_lrs = [cfg.lr] * len(self.optimizer.param_groups)
        for group, multiplier in zip(self.optimizer.param_groups, scheduler.lr_lambdas):
            group.update(initial_lr=cfg.lr, lr=cfg.lr * multiplier(scheduler.last_epoch),
                         weight_decay=cfg.weight_decay)

    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.trainable:
                p.copy_(weights[n])
