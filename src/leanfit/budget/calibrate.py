"""A short calibration of a base model on this machine, cached so estimates and searches are cheap.

What it measures (measure.py), at the run's sequence length and a calibration batch of `rows` rows
(as many as a forward of about CALIBRATION_FLOPS allows, at most the batch size; times and
activation memory scale linearly in rows):
- an eval-mode forward of the whole model: seconds of the entry (embeddings), one block, the head;
- the rest as the trainer runs the model, with its exact rewrites applied where they plan (the final
  block cut to the positions the head reads, a causal LM's loss fused with its output layer), the
  final block timed apart from the others;
- training steps with the top 1 and the top 3 blocks learning through frozen weights (as adapters
  make them): seconds per trained block and of the head with its loss, the bytes autograd keeps per
  block, and the rise of peak RSS (the two steps' difference is the peak per trained block);
- the same top-3 step and an all-block forward with a reference adapter (LoRA r=8 on every linear
  layer), which turn the adapters' traced cost (`AdapterModule.cost`: FLOPs, bytes moved, bytes
  kept) into seconds and resident bytes on this machine;
- a full fine-tuning step, an evaluation batch, AdamW's seconds per parameter and per tensor,
  and what a byte of memory fresh from the OS costs to touch (a run's first step faults in its
  activations);
- every timed part (the forward, the steps, the evaluation) twice more, later in the calibration,
  keeping each time's median over the three passes (`timing_passes` holds them): one pass takes a
  few seconds, and a slow spell of the machine in it moved the step estimates by up to 26%;
- per data set, on first use: a fresh `leanfit tune` process's resident bytes before its first step
  (machine.py, a child process).

The cache is one JSON file per key: base model fingerprint and class, labels, task, batch shape,
thread count and torch version; written atomically; a file whose key differs is measured again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..io import atomic_write_bytes
from ..train.kv_cache import NoKVCache
from . import machine, measure

VERSION = 10  # bumped when what a calibration holds changes
CALIBRATION_FLOPS = 1.6e11  # matmul FLOPs of one forward at the calibration batch (~2 s on 2 cores)
TRAINED_BLOCKS = (1, 3)  # the two training steps whose difference gives the per-block peak
REFERENCE_RANK = 8


def default_dir() -> Path:
    return Path(os.environ.get("LEANFIT_CACHE", Path.home() / ".cache" / "leanfit")) / "calibration"


@dataclass
class Calibration:
    """Measured costs of one base model at one batch shape on this machine (see the module doc)."""

    key: dict
    values: dict
    path: Path | None = None
    measured_now: bool = field(default=False, compare=False)  # False: read from the cache

    def footprint(self, config, source: str | None) -> dict:
        """Resident bytes of a fresh tune process for `config`'s data, by stage; measured once per data set."""
        fields = ("data", "task", "text_column", "label_column", "seed", "max_length")
        key = json.dumps({k: getattr(config, k) for k in fields}, sort_keys=True, default=str)
        table = self.values.setdefault("footprints", {})
        if key not in table:
            child = {k: getattr(config, k) for k in fields} | {"model": config.model,
                                                                 "threads": self.key["threads"]}
            table[key] = machine.process_footprint(source, child)
            self.save()
        return table[key]

    def save(self) -> None:
        if self.path is not None:
            data = {"key": self.key, "values": self.values}
            atomic_write_bytes(self.path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def model_fingerprint(model: nn.Module) -> str:
    """The base model's fingerprint, hashed again only when a weight was replaced or changed in place
    (a search estimates hundreds of configurations on one model)."""
    from ..core.model import base_fingerprint
    stamp = tuple((id(p), p._version) for p in model.parameters())
    cached = _FINGERPRINTS.get(model)
    if cached is None or cached[0] != stamp:
        cached = (stamp, base_fingerprint(model))
        _FINGERPRINTS[model] = cached
    return cached[1]


def calibration_key(model: nn.Module, batch_size: int, seq_len: int, task: str, precision: str = "fp32") -> dict:
    # a float32 calibration's key has no precision, as before there was a choice (its cache stays valid)
    return {"version": VERSION, "fingerprint": model_fingerprint(model), "model_class": type(model).__name__,
            "num_labels": getattr(getattr(model, "config", None), "num_labels", None), "task": task,
            "batch_size": int(batch_size), "seq_len": int(seq_len), "threads": torch.get_num_threads(),
            "torch": torch.__version__, **({"precision": precision} if precision != "fp32" else {})}


def cache_path(key: dict, cache_dir: str | Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir or default_dir()) / f"{digest}.json"


def calibrate(model: nn.Module, batch_size: int, seq_len: int, task: str, *,
              cache_dir: str | Path | None = None, refresh: bool = False, precision: str = "fp32",
              on_measure: Callable[[], None] | None = None) -> Calibration:
    """The calibration of `model` (a base model without adapters) at `batch_size` x `seq_len`: from
    the cache when its key matches, else measured now (tens of seconds) and cached in `cache_dir`
    (default ~/.cache/leanfit/calibration, or $LEANFIT_CACHE/calibration). `precision` ("fp32" or
    "bf16", resolved): what the training steps are measured in; evaluation and inference are float32.
    `on_measure` is called just before a measurement starts (not when the cache answers)."""
    if model.__dict__.get("leanfit_adapters"):
        raise ConfigError("Calibrate the base model, without adapters; load a fresh one from the zoo.")
    key = calibration_key(model, batch_size, seq_len, task, precision)
    path = cache_path(key, cache_dir)
    try:  # before measuring: a cache folder that cannot be made would otherwise fail a minute later
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as err:
        raise ConfigError(f"Cannot use '{path.parent}' as the calibration cache ({err.strerror.lower()}); give a "
                          "folder you can write (leanfit plan --calibration-dir, or $LEANFIT_CACHE).") from None
    if path.is_file() and not refresh:
        try:
            data = json.loads(path.read_text())
            if data.get("key") == key:
                return Calibration(key, data["values"], path)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError):
            pass  # a damaged cache file is measured again and replaced
    check_calibratable(model)  # before the notice: a model it cannot measure is refused at once
    if on_measure is not None:
        on_measure()
    calibration = Calibration(key, measure_model(model, batch_size, seq_len, task, key["fingerprint"], precision),
                              path, True)
    calibration.save()
    return calibration


def check_calibratable(model: nn.Module):
    """The model's stack of blocks; refuses a model the calibration cannot measure."""
    from ..train.layers import transformer_blocks
    found = transformer_blocks(model)
    if found is None:
        raise ConfigError("The cost model needs a network built as a stack of repeated blocks (a transformer); "
                          "this model has none.")
    if getattr(getattr(model, "config", None), "vocab_size", None) is None:
        raise ConfigError("The cost model calibrates language models (token inputs); this model takes no token "
                          "ids, so `leanfit plan` cannot estimate it yet.")
    return found


def measure_model(model: nn.Module, batch_size: int, seq_len: int, task: str, fingerprint: str,
                  precision: str = "fp32") -> dict:
    """Run the measurements; the model's weights, flags, mode and the caller's RNG are left as they were."""
    found = check_calibratable(model)
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]):  # dropout, adapter inits and test tensors draw from a fork
            values = _measure(model, found, batch_size, seq_len, task, fingerprint, precision)
    finally:
        model.train(was_training)
    values["rates"] = _rates(values, found[0])
    return values


def _measure(model: nn.Module, found, batch_size: int, seq_len: int, task: str, fingerprint: str,
             precision: str) -> dict:
    from ..core.model import task_heads
    from ..train.block_dropout import BlockDropoutOff
    blocks = found[1]
    one = measure.synthetic_batch(model, 1, seq_len, task)
    layers = measure.layer_specs(model, one, blocks[0])
    per_row = sum(_linear_flops(s, 1) for s in layers.values())
    rows = max(1, min(int(batch_size), int(CALIBRATION_FLOPS // max(per_row, 1))))
    batch = measure.synthetic_batch(model, rows, seq_len, task)
    heads = task_heads(model)
    low_n, high_n = (min(n, len(blocks)) for n in TRAINED_BLOCKS)
    no_kv_cache = NoKVCache.plan(model)  # the trainer runs a decoder without its key/value cache
    with _applied(_present(no_kv_cache)):  # planned as the trainer plans them, once per fit
        (cut, cut_s), (fused, fused_s) = _trainer_rewrites(model, batch)
    rewrites = _present(cut, fused, no_kv_cache)
    dropout_off = BlockDropoutOff(model)  # `leanfit tune` trains without the blocks' dropout by default
    adapters_run = [*rewrites, dropout_off]
    values = {
        "rows": rows, "blocks": len(blocks), "trained_blocks": [low_n, high_n],
        "block_output_bytes_per_row": _block_output_bytes(model, blocks[-1], one), "layers": layers, "heads": heads,
        "first_read_share": _first_read_share(layers, f"{found[0]}.0."),
        "inference": measure.profile_inference(model, batch),  # the whole model, as it serves
        "trainer_rewrites": [type(part).__name__ for part in _present(cut, fused)],
        # their checks on 2 rows, which the trainer runs before its first step
        "plan_s": {"head_rows": cut_s, "fused_loss": fused_s},
    }

    def timed_parts(memory: bool) -> dict:
        with _applied(adapters_run):  # training with adapters and evaluation, as the trainer runs them
            parts = {
                "train_low": measure.profile_train_step(model, batch, low_n, heads, weights=False,
                                                        precision=precision, memory=memory),
                "train_high": measure.profile_train_step(model, batch, high_n, heads, weights=False,
                                                         precision=precision, memory=memory),
                "evaluation": measure.profile_evaluation(model, batch, task, memory=memory),
            }
        # full fine-tuning trains the output layer: the final block cut, no fused loss
        with _applied(_present(cut, no_kv_cache, dropout_off)):
            parts["full"] = measure.profile_train_step(model, batch, len(blocks), heads, weights=True,
                                                       precision=precision, memory=memory)
        return parts

    values.update(timed_parts(memory=True))
    # what the blocks' dropout adds to each trained block (`--block-dropout`), where the model has any
    values["dropout_block_s"] = 0.0
    if dropout_off.modules:
        with _applied(rewrites):
            on = measure.profile_train_step(model, batch, high_n, heads, weights=False, precision=precision)
        values["dropout_block_s"] = max(0.0, on["step_s"] - values["train_high"]["step_s"]) / high_n
    values["reference"] = _reference(model, batch, high_n, heads, fingerprint, layers, adapters_run, precision)

    def retimed() -> dict:  # times only
        return timed_parts(memory=False) | {"inference": measure.profile_inference(model, batch)}

    # each part timed again, later, twice: one pass takes a few seconds, in one spell of the machine's speed
    later = [retimed()]
    values.update({
        "optimizer": machine.optimizer_rates(), "op_s": machine.op_seconds(),
        "page_fault_s_per_byte": machine.page_fault_seconds(),
        "model_bytes": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
    })
    later.append(retimed())
    values["timing_passes"] = {}
    for part, times in later[0].items():
        readings = [values[part], *(p[part] for p in later)]
        values["timing_passes"][part] = [{k: r[k] for k in times} for r in readings]
        values[part] = measure.median_times(readings)
    return values


def _trainer_rewrites(model: nn.Module, batch: dict) -> list[tuple]:
    """The exact rewrites the trainer plans for this model once adapters have frozen its base (None
    where one does not apply), each with the seconds its plan took: the final block cut to the positions
    the head reads (train/head_rows.py), and a causal LM's loss fused with its output layer (train/lm_loss.py)."""
    from ..train.head_rows import HeadRows
    from ..train.lm_loss import FusedLMLoss
    sample = {k: v[:2] for k, v in batch.items() if k != "labels"}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    try:
        planned = []
        for plan in (HeadRows.plan, FusedLMLoss.plan):
            started = time.perf_counter()
            planned.append((plan(model, sample), time.perf_counter() - started))
        return planned
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def _present(*parts) -> list:
    """The rewrites and switches that apply to this model (None: one that does not)."""
    return [part for part in parts if part is not None]


@contextmanager
def _applied(parts: list):
    with ExitStack() as stack:
        for part in parts:
            stack.enter_context(part.applied())
        yield


def _reference(model: nn.Module, batch: dict, trained: int, heads: list[str], fingerprint: str,
               specs: dict, rewrites: list, precision: str) -> dict:
    """A LoRA r=8 adapter on every linear layer: of the top `trained` blocks in training steps
    (profiled once, then timed against none, alternating), and of all blocks in eval forwards
    against none (alternating); the model is unwrapped after (bit-identical)."""
    from ..core import model as core
    from ..methods import LoRA
    from ..train.layers import below_top_k
    from .cost import layer_costs
    rows = len(batch["input_ids"])

    def traced(name: str) -> dict:
        modules = core.adapter_modules(model, name)
        return layer_costs({n: (m, model.get_submodule(n).base_layer) for n, m in modules.items()}, specs, rows)

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.__dict__["leanfit_fingerprint"] = fingerprint  # spare adapt a second hash of the weights
    try:
        core.adapt(model, LoRA(rank=REFERENCE_RANK), targets="all-linear", exclude=below_top_k(model, trained),
                   name="top")
        with _applied(rewrites):  # the trainer's, as for the plain steps
            step = measure.profile_train_step(model, batch, trained, heads, weights=None, precision=precision)
            plain_step, adapted_step = measure.alternate_steps(model, batch, trained, lambda on: core.activate(
                model, *(["top"] if on else [])), precision=precision)
        cost_top = traced("top")
        core.delete(model, "top")
        core.adapt(model, LoRA(rank=REFERENCE_RANK), targets="all-linear", name="all")
        cost_all = traced("all")
        model.eval()
        plain, adapted = [], []
        with torch.inference_mode():
            for i in range(3):
                for active, times in ((False, plain), (True, adapted)):
                    core.activate(model, *(["all"] if active else []))
                    seconds = measure.median_time(lambda: model(**inputs), reps=1, warmup=0)
                    if i:  # the first round warms up
                        times.append(seconds)
    finally:
        core.unwrap(model)
    return {"step": step, "cost_top": cost_top, "cost_all": cost_all, "plain_step_s": plain_step,
            "adapted_step_s": adapted_step,
            "inference_plain_s": min(plain), "inference_adapted_s": min(adapted)}  # least disturbed runs


def _rates(v: dict, blocks_name: str) -> dict:
    """Machine rates that turn an adapter's traced cost into seconds and resident bytes: FLOP/s of
    the base blocks' matmuls, seconds per op (a small op's dispatch); from the reference adapter,
    seconds per byte moved (train, eval) after its FLOPs and ops are accounted for, and resident bytes per byte its backward moves, beyond the bytes it
    keeps (measured on MiniLM: what LoRA, IA3, SSF and bottleneck adapters keep matches the trace
    exactly, and the rest of their peak tracks their backward traffic within ~0.1 byte per byte)."""
    rows, reference = v["rows"], v["reference"]
    block0 = [s for n, s in v["layers"].items() if n.startswith(f"{blocks_name}.0.")]
    flop_rate = sum(_linear_flops(s, rows) for s in block0) / max(v["inference"]["block_s"], 1e-9)
    top, every = reference["cost_top"], reference["cost_all"]
    op = v["op_s"]
    train_extra = reference["adapted_step_s"] - reference["plain_step_s"]
    train_known = (top["forward_flops"] + top["backward_flops"]) / flop_rate + (top["forward_ops"] + top["backward_ops"]) * op
    infer_extra = reference["inference_adapted_s"] - reference["inference_plain_s"]
    infer_known = every["forward_flops"] / flop_rate + every["forward_ops"] * op
    kept_extra = reference["step"]["peak_bytes"] - v["train_high"]["peak_bytes"]
    return {
        "flops_per_s": flop_rate, "op_s": op,
        "train_s_per_byte": max(0.0, train_extra - train_known) / max(top["forward_bytes"] + top["backward_bytes"], 1),
        "inference_s_per_byte": max(0.0, infer_extra - infer_known) / max(every["forward_bytes"], 1),
        # beyond what adapters keep (counted in full), the allocator's growth during their backward
        "resident_per_backward_byte": max(0.0, kept_extra - top["kept_bytes"]) / max(top["backward_bytes"], 1),
    }


def _first_read_share(layers: dict, prefix: str) -> float:
    """The share of a block's linear FLOPs in the layers that read the block's first input (query, key
    and value, reading the block input or its normalised copy): a forward pass takes as long as the
    backward's input-gradient products of those layers, which the lowest trained block skips."""
    block = {n: s for n, s in layers.items() if n.startswith(prefix)}
    if not block:
        return 0.0
    first = min(block.values(), key=lambda spec: spec["order"])["input_group"]
    total = sum(_linear_flops(s, 1) for s in block.values())
    return sum(_linear_flops(s, 1) for s in block.values() if s["input_group"] == first) / max(total, 1)


def _linear_flops(spec: dict, rows: int) -> int:
    if spec["kind"] != "linear":
        return 0
    return 2 * rows * math.prod(spec["input_per_row"][:-1] or [1]) * spec["inp"] * spec["out"]


def _infer(model: nn.Module, batch: dict) -> None:
    was = model.training
    model.eval()
    with torch.inference_mode():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    model.train(was)


def _block_output_bytes(model: nn.Module, block: nn.Module, batch: dict) -> int:
    """Bytes of one row of a block's output: what the prefix cache stores per row."""
    seen = {}
    handle = block.register_forward_hook(lambda m, a, out: seen.__setitem__("t", measure._first_tensor(out)))
    try:
        _infer(model, batch)
    finally:
        handle.remove()
    t = seen["t"]
    return int(t[0].numel() * t.element_size())
