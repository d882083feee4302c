"""The measurements behind a calibration: timed forward / backward passes of the base model at a
batch shape, the bytes autograd keeps per block, peak-memory deltas, the optimizer's speed, and the
extra time of one adapted layer. Each returns plain numbers (seconds, bytes); calibrate.py caches them.

Peak memory is read from the operating system (VmHWM, reset through /proc/self/clear_refs, after
handing freed heap back with malloc_trim), so it is what a process's peak RSS sees, not a count of
live tensors. Timings are medians of a few repetitions after a warm-up; `memory=False` re-times a
step without its memory readings, so a calibration can time each part again later (median_times).
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from ..data.splits import CAUSAL_LM
from ..memory import rss_bytes, status_bytes, trim_heap
from ..train.layers import transformer_blocks
from ..train.precision import MixedPrecision

STEADY_REPS = 3  # timed repetitions after a warm-up; their median is kept
PEAK_REPS = 3  # a step's peak memory, read this many times (untimed); their median is kept: on MiniLM
# one reading varied by up to 30% from step to step, and a per-block figure extrapolated to every block


class PeakMeter:
    """Peak resident memory above the level at entry, while the block runs (None where the OS
    cannot tell: no /proc, or a peak that cannot be reset)."""

    def __enter__(self):
        trim_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.start = rss_bytes()
        except OSError:
            self.start = None
        self.bytes = None
        return self

    def __exit__(self, *exc):
        peak = status_bytes("VmHWM")
        if self.start is not None and peak is not None:
            self.bytes = max(0, peak - self.start)
        return False


def median_time(fn, reps: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synthetic_batch(model: nn.Module, rows: int, seq_len: int, task: str, seed: int = 0) -> dict:
    """Random token rows shaped as `leanfit tune` feeds them (full attention masks, labels)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or 100
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == CAUSAL_LM:
        batch["labels"] = ids.clone()
    else:
        labels = getattr(config, "num_labels", 2)
        batch["labels"] = torch.randint(0, labels, (rows,), generator=g)
    return batch


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


class _Stamps:
    """Forward and backward timestamps of the entry module and each block."""

    def __init__(self, blocks: list[nn.Module], entry: nn.Module | None, grad_from: int | None):
        self.t: dict = {}
        self.blocks = blocks
        self.handles = []
        self.grad_from = grad_from  # blocks from here on get an input that requires grad

        def pre(i):
            def hook(module, args, kwargs):
                self.t[("fwd", i, 0)] = time.perf_counter()
                hidden = args[0] if args else next(iter(kwargs.values()))
                if self.grad_from is not None and i == self.grad_from and not hidden.requires_grad:
                    hidden = hidden.detach().requires_grad_()
                    args = (hidden, *args[1:]) if args else args
                    if not args:
                        kwargs = dict(kwargs, **{next(iter(kwargs)): hidden})
                if hidden.requires_grad:
                    hidden.register_hook(lambda g: self.t.__setitem__(("bwd", i), time.perf_counter()))
                return args, kwargs
            return hook

        def post(i):
            def hook(module, args, output):
                self.t[("fwd", i, 1)] = time.perf_counter()
                out = _first_tensor(output)
                if i == len(blocks) - 1 and out is not None and out.requires_grad:
                    out.register_hook(lambda g: self.t.__setitem__(("bwd", i + 1), time.perf_counter()))
            return hook

        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(pre(i), with_kwargs=True))
            self.handles.append(block.register_forward_hook(post(i)))
        if entry is not None:
            self.handles.append(entry.register_forward_pre_hook(
                lambda m, a: self.t.__setitem__(("entry", 0), time.perf_counter())))
            self.handles.append(entry.register_forward_hook(
                lambda m, a, o: self.t.__setitem__(("entry", 1), time.perf_counter())))

    def remove(self):
        for h in self.handles:
            h.remove()

    def forward(self, i: int) -> float:
        return self.t[("fwd", i, 1)] - self.t[("fwd", i, 0)]

    def entry(self) -> float:
        return self.t[("entry", 1)] - self.t[("entry", 0)] if ("entry", 0) in self.t else 0.0


def entry_module(model: nn.Module, blocks: list[nn.Module], batch: dict) -> nn.Module | None:
    """The module whose output feeds block 0 (embeddings), found by running one forward."""
    from ..train.prefix_cache import _execution_order
    sample = {k: v[:1] for k, v in batch.items() if k != "labels"}
    return _execution_order(model, sample, blocks[0])[1]


def _saved_bytes_per_block(model: nn.Module, blocks: list[nn.Module]):
    """A context that counts the bytes autograd keeps, per block (-1: outside any block); a tensor
    counts once, parameters and buffers not at all."""
    owned = {id(t) for t in [*model.parameters(), *model.buffers()]}
    current = {"block": -1}
    seen: dict[int, tuple[int, int]] = {}

    def pack(t):
        root = t
        while root._base is not None:
            root = root._base
        if id(root) not in owned and id(root) not in seen:
            seen[id(root)] = (current["block"], root.untyped_storage().nbytes())
        return t

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__("block", i)))
        handles.append(block.register_forward_hook(lambda m, a, o: current.__setitem__("block", -1)))

    @contextmanager
    def counting():
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                yield seen
        finally:
            for h in handles:
                h.remove()

    return counting()


def profile_train_step(model: nn.Module, batch: dict, trained: int, heads: list[str], weights: bool | None,
                       precision: str = "fp32", memory: bool = True) -> dict:
    """One training step where the top `trained` blocks learn (their weights if `weights`; else only
    input gradients flow, as when adapters sit inside them; None: the trainable flags as they are,
    e.g. with adapters), the task heads learn, and everything below runs as a frozen prefix (eval
    mode, no graph), in `precision` as the trainer runs it (train/precision.py; its bfloat16 weight
    copies are made in the warm-up step, so the peaks do not hold them). Returns per-part seconds
    and, if `memory`, bytes."""
    name, blocks = transformer_blocks(model)
    k = len(blocks) - trained
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    if weights is not None:
        model.requires_grad_(weights and trained == len(blocks))  # full fine-tuning: everything
        for head in heads:
            model.get_submodule(head).requires_grad_(True)
        for block in blocks[k:]:
            block.requires_grad_(weights)
    entry = entry_module(model, blocks, batch)
    model.train()
    for block in blocks[:k]:
        block.eval()
    mixed = _mixed(model, precision)
    try:
        stamps = _Stamps(blocks, entry, k if trained else None)
        try:
            _step(model, batch, mixed)  # warm-up, outside the meters
            if memory:
                with _saved_bytes_per_block(model, blocks) as saved:
                    first = _timed_step(model, batch, stamps, k, mixed)
                peaks = []
                for _ in range(PEAK_REPS):  # on their own steps: trimming the heap before a step slows it
                    with PeakMeter() as peak:
                        _step(model, batch, mixed)
                    peaks.append(peak.bytes)
            steady = [_timed_step(model, batch, stamps, k, mixed) for _ in range(STEADY_REPS)]
        finally:
            stamps.remove()
            mixed.release()
        # the median, as a run's step time is reported (the least of a few runs was 10-20% below it)
        times = {key: statistics.median(r[key] for r in steady) for key in steady[0] if key != "grad_bytes"}
        if not memory:
            return times
        per_block_saved = {}
        for block_index, nbytes in saved.values():
            per_block_saved[block_index] = per_block_saved.get(block_index, 0) + nbytes
        peak_bytes = None if None in peaks else statistics.median(peaks)
        return {**times, "peak_bytes": peak_bytes, "grad_bytes": first["grad_bytes"],
                "block_saved_bytes": _mean([per_block_saved.get(i, 0) for i in range(k, len(blocks))]),
                "other_saved_bytes": per_block_saved.get(-1, 0)}
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def _step(model: nn.Module, batch: dict, mixed: MixedPrecision) -> None:
    _forward_backward(model, batch, mixed)
    for p in model.parameters():
        p.grad = None


def _mixed(model: nn.Module, precision: str) -> MixedPrecision:
    """The trainer's precision contexts for the model as it stands (what requires grad is never swapped)."""
    return MixedPrecision(model, precision, next(model.parameters()).device,
                          [p for p in model.parameters() if p.requires_grad])


def _forward_backward(model: nn.Module, batch: dict, mixed: MixedPrecision) -> None:
    with mixed.step():
        with mixed.forward():
            loss = model(**batch).loss
        loss.backward()


def _timed_step(model: nn.Module, batch: dict, stamps: "_Stamps", k: int, mixed: MixedPrecision) -> dict:
    """One training step, timed by part from the stamps (blocks below k run as a frozen prefix)."""
    top = len(stamps.blocks)
    stamps.t.clear()
    with mixed.step():
        start = time.perf_counter()
        with mixed.forward():
            loss = model(**batch).loss
        forward_end = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    del loss
    for p in model.parameters():
        p.grad = None
    t = stamps.t
    backward = {i: t[("bwd", i)] - t[("bwd", i + 1)] for i in range(k, top) if ("bwd", i) in t and ("bwd", i + 1) in t}
    # the final block apart: the trainer may run it at the head's positions only (train/head_rows.py)
    below_final = range(k, top - 1)
    block_forward = _mean([stamps.forward(i) for i in below_final])
    final_forward = stamps.forward(top - 1)
    block_backward = _mean([backward[i] for i in below_final if i in backward])
    return {"step_s": end - start, "entry_s": stamps.entry(),
            "prefix_block_s": _mean([stamps.forward(i) for i in range(k)]),
            "block_forward_s": block_forward, "block_s": block_forward + block_backward,
            "final_block_forward_s": final_forward, "final_block_s": final_forward + backward.get(top - 1, 0.0),
            "head_s": (forward_end - t[("fwd", top - 1, 1)]) + (t.get(("bwd", top), end) - forward_end),
            "grad_bytes": grads}


def alternate_steps(model: nn.Module, batch: dict, trained: int, switch,
                    rounds: int = STEADY_REPS + 1, precision: str = "fp32") -> tuple[float, float]:
    """Median seconds of a training step with `switch(False)` and with `switch(True)` applied,
    alternating, the first round a warm-up; gradients flow from the top `trained` blocks up, as in
    profile_train_step, whatever is trainable."""
    _, blocks = transformer_blocks(model)
    k = len(blocks) - trained

    def input_grad(module, args, kwargs):
        hidden = args[0] if args else next(iter(kwargs.values()))
        hidden = hidden.detach().requires_grad_()
        return ((hidden, *args[1:]), kwargs) if args else (args, dict(kwargs, **{next(iter(kwargs)): hidden}))

    handle = blocks[k].register_forward_pre_hook(input_grad, with_kwargs=True)
    model.train()
    for block in blocks[:k]:
        block.eval()
    times = {False: [], True: []}
    mixed = _mixed(model, precision)
    try:
        for i in range(rounds):
            for on in (False, True):
                switch(on)
                start = time.perf_counter()
                _forward_backward(model, batch, mixed)
                elapsed = time.perf_counter() - start
                for p in model.parameters():
                    p.grad = None
                if i:
                    times[on].append(elapsed)
    finally:
        handle.remove()
        mixed.release()
    return statistics.median(times[False]), statistics.median(times[True])


def profile_inference(model: nn.Module, batch: dict, reps: int = STEADY_REPS) -> dict:
    """Eval-mode forward without labels, no graph: seconds of the entry, one block, the head."""
    _, blocks = transformer_blocks(model)
    entry = entry_module(model, blocks, batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    was = model.training
    model.eval()
    runs = []
    try:
        with torch.inference_mode():
            model(**inputs)  # warm-up
            for _ in range(reps):
                stamps = _Stamps(blocks, entry, None)
                start = time.perf_counter()
                model(**inputs)
                end = time.perf_counter()
                stamps.remove()
                runs.append({"total_s": end - start, "entry_s": stamps.entry(),
                             "block_s": _mean([stamps.forward(i) for i in range(len(blocks))]),
                             "head_s": end - stamps.t[("fwd", len(blocks) - 1, 1)]})
    finally:
        model.train(was)
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def profile_evaluation(model: nn.Module, batch: dict, task: str, reps: int = STEADY_REPS,
                       memory: bool = True) -> dict:
    """The trainer's evaluation of one batch (forward, loss and metrics from the logits): the median
    seconds of `reps` runs after a warm-up, the head's share (after the last block), the peak (if `memory`)."""
    from ..train.metrics import evaluate_split
    _, blocks = transformer_blocks(model)
    entry = entry_module(model, blocks, batch)
    rows = len(batch["input_ids"])
    evaluate_split(model, batch, task, rows)  # warm-up
    stamps = _Stamps(blocks, entry, None)
    runs, peaks = [], []
    try:
        for _ in range(reps):
            with PeakMeter() if memory else nullcontext() as peak:
                start = time.perf_counter()
                evaluate_split(model, batch, task, rows)
                end = time.perf_counter()
            runs.append({"total_s": end - start, "head_s": end - stamps.t[("fwd", len(blocks) - 1, 1)],
                         "final_block_s": stamps.forward(len(blocks) - 1)})
            peaks.append(peak.bytes if memory else None)
    finally:
        stamps.remove()
    times = {k: statistics.median(r[k] for r in runs) for k in ("total_s", "head_s", "final_block_s")}
    # the first run's peak, on memory just handed back (as a run's first evaluation)
    return {**times, "peak_bytes": peaks[0]} if memory else times


def median_times(passes: list[dict]) -> dict:
    """The first pass's readings with each time (a key ending in `_s`) replaced by its median over
    the passes: one pass takes a few seconds, and this machine's speed drifts by 10-20% over minutes."""
    merged = dict(passes[0])
    for key in passes[0]:
        if key.endswith("_s"):
            merged[key] = statistics.median(p[key] for p in passes)
    return merged


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


# -- one adapted layer --------------------------------------------------------------------------

def layer_specs(model: nn.Module, batch: dict, first_block: nn.Module) -> dict[str, dict]:
    """Every adaptable layer (Linear, Conv2d, Embedding): its shape, its input's shape per row, which
    layers read the very same input tensor (an adapter keeping that input keeps it once), and whether
    it runs before the first block (then no prefix can be cached below an adapter there)."""
    from ..core.inject import candidate_layers
    from ..methods.base import CONV2D, EMBEDDING, layer_kind
    specs, handles, inputs, started = {}, [], {}, []
    rows = len(batch["input_ids"])

    def record(name):
        def hook(module, args):
            x = args[0]
            group = inputs.setdefault(id(x), (name, x))[0]  # x kept alive: ids stay unique
            kind = layer_kind(module)
            spec = {"kind": kind, "input_per_row": list(x.shape[1:]) if x.shape[0] == rows else [int(x.numel() // rows)],
                    "input_group": group, "before_blocks": not started, "order": len(specs)}
            if kind == EMBEDDING:
                spec.update(num=module.num_embeddings, dim=module.embedding_dim, padding_idx=module.padding_idx)
            elif kind == CONV2D:
                spec.update(inp=module.in_channels, out=module.out_channels, kernel=list(module.kernel_size),
                            stride=list(module.stride), padding=module.padding if isinstance(module.padding, str)
                            else list(module.padding), dilation=list(module.dilation), groups=module.groups,
                            bias=module.bias is not None)
            else:
                spec.update(inp=module.in_features, out=module.out_features, bias=module.bias is not None)
            specs[name] = spec
        return hook

    handles.append(first_block.register_forward_pre_hook(lambda m, a: started.append(True)))
    for name, layer in candidate_layers(model).items():
        handles.append(layer.register_forward_pre_hook(record(name)))
    try:
        with torch.inference_mode():
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
    return specs
