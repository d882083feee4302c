"""The machine and the process around a model: a fresh training process's resident memory before
its first step (measured in a child process), AdamW's speed, and a small op's overhead.

The runtime (interpreter, torch, transformers), the data set, the model and the tokenised splits
take what they take in a real `leanfit tune` process, including what the allocator keeps after
tokenising; counting that from first principles is hopeless, reading it off a child is exact.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from ..train.layers import transformer_blocks
from ..memory import rss_bytes, status_bytes, trim_heap
from .measure import median_time


def process_footprint(source: str | None, config: dict, timeout: float = 900) -> dict:
    """Resident bytes of a fresh `leanfit tune` process before its first step, measured in a child
    process (so this process's state does not count), stage by stage as tune.run goes: the runtime
    (interpreter and libraries), the data set loaded, the model loaded (`source`: a zoo name or
    folder; None: not loadable by name) with its fingerprint computed as `adapt` does, the data
    tokenised, and one small training step (thread pools and kernels a run sets up once).
    Stages that cannot run (data or model not loadable by name) are left out."""
    import json
    import subprocess
    import sys
    code = ("import json, sys; from leanfit.budget.machine import _footprint_child; "
            "print(json.dumps(_footprint_child(*json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps([source, config])],
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"measuring the process footprint failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _footprint_child(source: str | None, config: dict) -> dict:
    import leanfit.tune as tune
    import transformers  # noqa: F401  (what any model load imports, counted in the runtime)
    from ..core.model import base_fingerprint, task_heads
    from ..data import encode
    from ..data.splits import CLASSIFICATION
    torch.set_num_threads(config.pop("threads"))
    stages = {"runtime": rss_bytes()}
    config = tune.TuneConfig.from_dict(config)
    try:
        dataset = tune.load_data(config)
    except Exception:  # not loadable by name: the caller counts the data it holds
        dataset = None
    stages["data"] = rss_bytes()
    if source is None or dataset is None:
        return {"stages": stages, "peak": status_bytes("VmHWM")}
    from .. import zoo
    labels = len(dataset.labels) if dataset.task == CLASSIFICATION else None
    model, tokenizer = zoo.model(source, task=dataset.task, num_labels=labels, seed=config.seed)
    base_fingerprint(model)
    stages["model"] = rss_bytes()
    tensors = encode(dataset, tokenizer, max_length=config.max_length)
    stages["encoded"] = rss_bytes()
    trim_heap()  # as Trainer.fit does before its first step
    batch = {k: v[:1] for k, v in tensors.train.items()}
    model.requires_grad_(False)
    model.train()
    name, blocks = transformer_blocks(model)
    for head in task_heads(model) or [f"{name}.{len(blocks) - 1}"]:
        model.get_submodule(head).requires_grad_(True)
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    stages["warm"] = rss_bytes()
    return {"stages": stages, "peak": status_bytes("VmHWM")}


def optimizer_rates(reps: int = 3) -> dict:
    """Seconds per parameter and per tensor of the trainer's update: clip, AdamW step, zero_grad."""
    def timed(numel: int, count: int) -> float:
        params = [nn.Parameter(torch.randn(numel // count)) for _ in range(count)]
        optimizer = torch.optim.AdamW(params, lr=1e-3)

        def step():
            for p in params:
                p.grad = torch.randn_like(p)
            start = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        step()
        return min(step() for _ in range(reps))

    big, small = 1 << 22, 256
    t_big, t_small = timed(big, 1), timed(small * 64, small)
    per_tensor = max(0.0, (t_small - t_big * small * 64 / big) / small)
    per_param = max(1e-12, (t_big - per_tensor) / big)
    return {"per_param_s": per_param, "per_tensor_s": per_tensor}


def op_seconds(count: int = 2000) -> float:
    """Seconds of one small op from Python (dispatch and call overhead): what each extra op costs
    an adapter beyond its bytes and FLOPs."""
    x = torch.ones(64)

    def run():
        for _ in range(count):
            torch.add(x, x)

    return median_time(run, reps=3) / count


def page_fault_seconds(nbytes: int = 128 << 20, reps: int = 3) -> float:
    """Seconds per byte of touching memory fresh from the OS, beyond writing memory already mapped:
    what a run's first step pays once for its activations (every later step reuses the pages).
    Measured by filling a new buffer and filling it again; stable to a few percent (a step's own
    first-step difference is not: it drifts with whatever else the process did before)."""
    extra = []
    for _ in range(reps):
        trim_heap()
        start = time.perf_counter()
        buffer = torch.empty(nbytes // 4)
        buffer.fill_(1.0)
        fresh = time.perf_counter() - start
        start = time.perf_counter()
        buffer.fill_(2.0)
        extra.append(fresh - (time.perf_counter() - start))
        del buffer
    return max(0.0, statistics.median(extra)) / nbytes
