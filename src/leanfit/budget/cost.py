"""The cost model: what a `leanfit tune` configuration will cost, before any training.

`estimate(config, model=None, calibration=None) -> CostEstimate`.

Exact (exact.py): trainable parameters and adapter bytes, from the adapter built as `leanfit tune`
builds it, on a copy of the model without weights.

Estimated: memory and time add up measured parts (calibrate.py) in the shape the run takes:
- step time = entry + frozen prefix (skipped when cached) + trained blocks x (forward + backward),
  the final block at its own measured cost (the trainer may cut it to the positions the head reads),
  + head and loss, scaled from the calibration batch to the batch size; plus the adapters' traced
  work (`AdapterModule.cost`) at the machine's measured rates; plus AdamW over the trainable tensors;
- run time = prefix cache build + steps + the first step's page faults + a validation pass per epoch;
- peak memory = the larger of the training phase (the fresh process, prefix cache, gradients +
  AdamW state, activations: measured peak per trained block, what adapters keep, the allocator's
  share of their backward) and the evaluation phase;
- inference latency ratio = (base forward + the adapters' traced eval work) / base forward.
See docs/budget.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..train.precision import copy_bytes, resolve
from . import exact

EVAL_BATCH_SIZE = 64  # the trainer's default, which `leanfit tune` keeps


@dataclass
class CostEstimate:
    """Exact counts and estimated memory / time of one tune configuration.

    Bytes are bytes, seconds are seconds. `train_peak_bytes` is an RSS-like peak of the whole training
    process (runtime, weights, data, prefix cache, gradients, AdamW state, activations).
    """

    trainable_params: int  # exact: what `leanfit tune` reports
    total_params: int  # exact: every parameter of the adapted model (PEFT's "all params")
    adapter_bytes: int  # exact: bytes of adapter.safetensors (trained tensors for full / probe)
    train_peak_bytes: int  # estimated peak resident memory of the training process
    step_seconds: float  # estimated seconds per optimizer step (forward, backward, AdamW)
    train_seconds: float  # estimated whole fit: planning + prefix cache build + epochs x steps + validations
    inference_latency_ratio: float  # estimated forward time with the unmerged adapter / base model's
    steps: int = 0  # optimizer steps of the run
    breakdown: dict = field(default_factory=dict)  # the parts each estimate adds up from

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def as_dict(self) -> dict:
        return {**asdict(self), "trainable_share": self.trainable_share}


def estimate(config, model: nn.Module | None = None, calibration=None, *, data=None, tokenizer=None,
             cache_dir=None, recalibrate: bool = False, on_calibrate=None) -> CostEstimate:
    """Cost of `leanfit tune` with `config` (a `leanfit.tune.TuneConfig`).

    `model`: the base model as `leanfit.zoo.model` loads it for this config's task and labels (never
    modified; pass it when you already have it), else it is loaded. `calibration`: a `Calibration`
    for this model and batch shape, else the cached one (measured on first use, in `cache_dir`).
    `data`: the run's `TensorSplits` (as `leanfit.data.encode` makes them) when you have them, else
    the data set is loaded (a causal-LM data set is tokenised to count its blocks, with `tokenizer`).
    `recalibrate`: measure this machine again even if a calibration is cached; `on_calibrate` is
    called just before a calibration is measured (not when the cache answers).
    """
    from ..data.splits import CLASSIFICATION
    from ..tune import load_data, method_options
    from .calibrate import calibrate, model_fingerprint
    config.check()  # what `leanfit plan` checks: epochs 0, batch_size 0, precision "fp8" ... in one sentence
    config = dataclasses.replace(config, options=method_options(config.method, dict(config.options)))
    dataset = load_data(config) if data is None else None
    source_of_labels = dataset if dataset is not None else data
    task, labels = source_of_labels.task, source_of_labels.labels
    if model is None:
        from .. import zoo
        model, tokenizer = zoo.model(config.model, task=task, seed=config.seed,
                                     num_labels=len(labels) if task == CLASSIFICATION and labels else None)
    elif model.__dict__.get("leanfit_adapters"):
        raise ConfigError("Pass the base model to estimate, without adapters; the configuration adds its own.")
    shape = run_shape(config, data, dataset, tokenizer)
    # built first: a configuration the model refuses (targets, options) is refused before a calibration
    built = exact.build(model, config, calibration.key["fingerprint"] if calibration else model_fingerprint(model))
    if calibration is None:
        calibration = calibrate(model, config.batch_size, config.max_length, shape["task"], cache_dir=cache_dir,
                                refresh=recalibrate, precision=resolve(config.precision, torch.device("cpu")),
                                on_measure=on_calibrate)
    return compose(config, shape, built, calibration, _source(config.model))


def run_shape(config, data=None, dataset=None, tokenizer=None) -> dict:
    """Task, label count, rows per split (after max_train_rows / max_eval_rows) and data bytes, from
    the run's TensorSplits `data`, else from its TextDataset (loaded if not given; a causal-LM data
    set is tokenised with `tokenizer` to count its blocks, loading the model's if not given)."""
    from ..data import encode
    from ..data.splits import CLASSIFICATION
    from ..tune import load_data
    text_bytes = 0
    if data is None:
        dataset = dataset or load_data(config)
        text_bytes = sum(len(t if isinstance(t, str) else t[0]) for split in (dataset.train, dataset.validation,
                                                                               dataset.test) for t in split)
        if dataset.task == CLASSIFICATION:
            rows = dataset.sizes()
            data_bytes = sum(rows.values()) * (2 * config.max_length + 1) * 8
        else:
            if tokenizer is None:
                from .. import zoo
                _, tokenizer = zoo.model(config.model, task=dataset.task, seed=config.seed)
            data = encode(dataset, tokenizer, max_length=config.max_length)
        task, labels = dataset.task, dataset.labels
    if data is not None:
        splits = {"train": data.train, "validation": data.validation, "test": data.test}
        rows = {k: int(v["input_ids"].shape[0]) if "input_ids" in v else 0 for k, v in splits.items()}
        data_bytes = sum(t.numel() * t.element_size() for v in splits.values() for t in v.values())
        task, labels = data.task, data.labels
    if config.max_train_rows:
        rows["train"] = min(rows["train"], config.max_train_rows)
    if config.max_eval_rows:
        rows["validation"] = min(rows["validation"], config.max_eval_rows)
        rows["test"] = min(rows["test"], config.max_eval_rows)
    return {"task": task, "num_labels": len(labels) if task == CLASSIFICATION and labels else None,
            "rows": rows, "data_bytes": data_bytes + text_bytes}


def _source(name: str) -> str | None:
    """The zoo name or local folder a child process can load the model from."""
    from pathlib import Path
    from ..zoo.models import MODELS
    return name if name in MODELS or Path(name).is_dir() else None


# -- the estimated part ----------------------------------------------------------------------------

COST_FIELDS = ("forward_flops", "forward_bytes", "forward_ops", "backward_flops", "backward_bytes", "backward_ops",
               "kept_bytes")


def layer_costs(layers: dict, specs: dict, rows: int) -> dict:
    """Summed traced cost (`AdapterModule.cost`) of adapted layers {name: (adapter, base layer)} at
    `rows` rows: forward / backward FLOPs, bytes moved and ops run, and bytes kept for backward, where an
    input that several adapters keep (query, key and value read one tensor) counts once."""
    totals, inputs, seen = dict.fromkeys(COST_FIELDS, 0), {}, {}
    for name, (module, base) in layers.items():
        spec = specs[name]
        tokens = _tokens(spec, rows)
        shape = json.dumps({k: x for k, x in spec.items() if k not in ("input_group", "order")}, sort_keys=True)
        key = (json.dumps(module.config.to_dict(), sort_keys=True, default=str), shape, tokens)
        if key not in seen:  # layers of one shape cost the same: trace each shape once
            seen[key] = module.cost(tokens, base)
        cost = seen[key]
        totals["forward_flops"] += cost.extra_flops_per_token * tokens
        totals["forward_bytes"] += cost.extra_bytes_per_token * tokens
        totals["backward_flops"] += cost.backward_flops_per_token * tokens
        totals["backward_bytes"] += cost.backward_bytes_per_token * tokens
        totals["forward_ops"] += cost.forward_ops
        totals["backward_ops"] += cost.backward_ops
        totals["kept_bytes"] += cost.activation_bytes_per_token * tokens
        if cost.saves_input:
            inputs[spec["input_group"]] = rows * math.prod(spec["input_per_row"]) * 4
    totals["kept_bytes"] += sum(inputs.values())
    return totals


def _tokens(spec: dict, rows: int) -> int:
    """Positions `rows` rows put through a layer (sequence positions, or pixels of a convolution)."""
    shape = spec["input_per_row"]
    if spec["kind"] == "embedding":
        return rows * math.prod(shape)
    if spec["kind"] == "conv2d":
        return rows * math.prod(shape[1:])
    return rows * math.prod(shape[:-1])


def compose(config, shape: dict, built: dict, calibration, source: str | None) -> CostEstimate:
    from ..core.inject import hosts
    from ..train.layers import lowest_trainable_block
    v, rates = calibration.values, calibration.values["rates"]
    adapted, trainable = built["model"], built["trainable"]
    params = sum(p.numel() for _, p in trainable)
    blocks, rows = v["blocks"], shape["rows"]
    scale = config.batch_size / v["rows"]  # calibration batch -> this batch
    lowest = lowest_trainable_block(adapted)
    in_blocks = 0 if lowest is None else blocks - lowest  # blocks from the lowest trainable one up
    layers = {n: (h.adapters[config.name], h.base_layer) for n, h in hosts(adapted).items() if config.name in h.adapters}
    below_learns = any(v["layers"].get(n, {}).get("before_blocks") for n in layers)  # an adapter below the blocks
    cached = config.prefix == "cache" and config.method != "full" and lowest not in (None, 0) and not below_learns
    if config.lisa_layers and config.lisa_layers > blocks:  # as the trainer's LISA refuses it
        raise ConfigError(f"LISA layers must be between 1 and {blocks}, got {config.lisa_layers}.")
    depth = _lisa_depth(blocks, in_blocks, config.lisa_layers) if config.lisa_layers else in_blocks
    inference, high = v["inference"], v["train_high"]
    precision = calibration.key.get("precision", "fp32")  # the steps' (a float32 key names none)
    # a block of the frozen prefix in a training step: an eval forward, float32 as inference runs it;
    # in a bf16 calibration, as measured below the trained blocks of its bfloat16 steps (where it had any)
    frozen_block_s = inference["block_s"]
    if precision == "bf16" and high["prefix_block_s"]:
        frozen_block_s = high["prefix_block_s"]

    # one optimizer step
    work = layer_costs(layers, v["layers"], config.batch_size)
    graph_share = depth / in_blocks if in_blocks else 1.0  # LISA: the unsampled blocks run without a graph
    adapters_train = adapter_seconds(work, rates, "train", graph_share)
    adapters_infer = adapter_seconds(work, rates, "inference")
    # calibrated without the blocks' dropout (tune's default); `--block-dropout` adds its masks per trained block
    dropout_s = v["dropout_block_s"] if config.block_dropout else 0.0
    if config.method == "full":
        passes = scale * (v["full"]["step_s"] + blocks * dropout_s)
    else:
        # the profiled step's parts, rescaled to the median of several such steps (less noise)
        steady = v["reference"]["plain_step_s"] / high["step_s"]
        frozen = (0 if cached else blocks - in_blocks) + (in_blocks - depth)  # blocks run without a graph
        # the final block apart: the trainer may run it at the head's positions only (train/head_rows.py)
        below_final = max(0.0, depth - 1)
        trained_s = below_final * high["block_s"] + (high["final_block_s"] if depth else 0.0)
        recompute = (below_final * high["block_forward_s"] + (high["final_block_forward_s"] if depth else 0.0)
                     if config.gradient_checkpointing else 0.0)
        profiled = v["trained_blocks"][1]  # autograd's start-up and the rest of the profiled step:
        other = high["step_s"] - high["entry_s"] - high["prefix_block_s"] * (blocks - profiled) \
            - high["block_s"] * (profiled - 1) - high["final_block_s"] - high["head_s"]
        # nothing below the lowest trained block learns, so the layers reading its input (query, key, value)
        # skip their input-gradient products, which the profile, its blocks learning through their inputs, ran
        input_grad = 0.0 if below_learns or not depth else v["first_read_share"] * (
            high["block_forward_s"] if depth > 1 else high["final_block_forward_s"])
        passes = scale * (steady * (high["entry_s"] + trained_s - input_grad + recompute + high["head_s"]
                                    + depth * dropout_s + max(0.0, other)) + frozen * frozen_block_s)
    optimizer = v["optimizer"]["per_param_s"] * params + v["optimizer"]["per_tensor_s"] * len(trainable)
    step = passes + adapters_train + optimizer

    # the fit: prefix cache build, steps, a validation pass per epoch
    steps = config.epochs * math.ceil(rows["train"] / config.batch_size)

    def prefix_row(block_s: float) -> float:
        return (inference["entry_s"] + (lowest or 0) * block_s) / v["rows"]

    # the train split's prefix is computed in the steps' precision, the validation split's in float32
    build_s = prefix_row(frozen_block_s) * rows["train"] + prefix_row(inference["block_s"]) * rows["validation"] \
        if cached else 0.0
    run_blocks = blocks - (lowest if cached else 0)  # the evaluation replays the cached prefix too
    evaluation = v["evaluation"]  # measured as the trainer evaluates, the final block perhaps cut
    eval_row = ((inference["entry_s"] + (run_blocks - 1) * inference["block_s"] + evaluation["final_block_s"]
                 + evaluation["head_s"]) / v["rows"]
                + adapters_infer / config.batch_size)
    validation_s = config.epochs * rows["validation"] * eval_row
    # a bf16 run's bfloat16 copies of the frozen Linear weights, held while it trains (train/precision.py)
    copies = copy_bytes(adapted, [p for _, p in trainable]) if precision == "bf16" else 0
    memory = _memory(config, shape, calibration, source, params, len(trainable) and trainable[0][1].element_size(),
                     depth, cached, work["kept_bytes"], work["backward_bytes"] * graph_share, scale, copies)
    first_step = memory["activations_bytes"] * v["page_fault_s_per_byte"]  # faults in new memory, once
    # before it builds the cache, the trainer plans: its exact rewrites check themselves on 2 rows (timed in
    # the calibration; the fused loss only while the output layer is frozen), and a prefix is located by two
    # 2-row forwards stopping at blocks 0 and k (train/prefix_cache.py)
    locate_s = (2 * inference["entry_s"] + lowest * inference["block_s"]) * 2 / v["rows"] \
        if config.prefix != "off" and lowest else 0.0
    plan_s = v["plan_s"]["head_rows"] + (v["plan_s"]["fused_loss"] if config.method != "full" else 0.0) + locate_s
    train_s = plan_s + build_s + steps * step + first_step + validation_s

    base_forward = scale * (inference["entry_s"] + blocks * inference["block_s"] + inference["head_s"])
    ratio = (base_forward + adapters_infer) / base_forward
    breakdown = {
        "step": {"passes_s": passes, "adapters_s": adapters_train, "optimizer_s": optimizer},
        "run": {"plan_s": plan_s, "prefix_cache_build_s": build_s, "steps_s": steps * step,
                "first_step_extra_s": first_step, "validation_s": validation_s,
                "test_eval_s": rows["test"] * eval_row},
        "memory": memory,
        "adapters": work,
        "policy": {"blocks": blocks, "trained_blocks": depth, "prefix_cached": cached, "adapted_layers": len(layers),
                   "trainable_tensors": len(trainable), "calibration_rows": v["rows"], "batch_size": config.batch_size,
                   "seq_len": config.max_length, "rows": rows,
                   "precision": precision},
        "calibration": str(calibration.path) if calibration.path else None,
    }
    return CostEstimate(params, built["total_params"], built["adapter_bytes"], int(memory["peak_bytes"]), step,
                        train_s, ratio, steps, breakdown)


def adapter_seconds(work: dict, rates: dict, mode: str, backward_share: float = 1.0) -> float:
    """Seconds adapters add, from their traced work: FLOPs at the base's matmul rate, a fixed
    overhead per op, and the bytes their ops move at the rate measured for the reference adapter.
    `mode` "train": forward and (a `backward_share` of) backward; "inference": eval forward."""
    share = backward_share if mode == "train" else 0.0
    flops = work["forward_flops"] + share * work["backward_flops"]
    ops = work["forward_ops"] + share * work["backward_ops"]
    moved = work["forward_bytes"] + share * work["backward_bytes"]
    return flops / rates["flops_per_s"] + ops * rates["op_s"] + moved * rates[f"{mode}_s_per_byte"]


def _lisa_depth(blocks: int, in_blocks: int, sampled: int) -> float:
    """Expected number of blocks back-propagated when LISA samples `sampled` of `blocks` blocks and
    only the top `in_blocks` hold trainable parameters: sum over d of P(a sampled block in the top d)."""
    total = math.comb(blocks, sampled)
    return sum(1 - math.comb(blocks - d, sampled) / total for d in range(1, in_blocks + 1))


def _memory(config, shape, calibration, source, params, element, depth, cached, adapter_kept, adapter_backward,
            scale, copies=0) -> dict:
    """Peak resident bytes: the largest of the training phase, the evaluation phase and model loading."""
    v, rates = calibration.values, calibration.values["rates"]
    low, high, full = v["train_low"], v["train_high"], v["full"]
    n_low, n_high = v["trained_blocks"]
    rows = shape["rows"]
    stages = calibration.footprint(config, source)["stages"]
    fixed = _fixed_bytes(stages, v, shape)
    if config.int8_base:
        fixed -= _int8_savings(v)
    element = element or 4
    gradients, adam = element * params, 2 * element * params
    if config.lisa_layers:
        gradients *= min(1.0, config.lisa_layers / max(depth, 1))
    per_block = (high["peak_bytes"] - low["peak_bytes"]) / max(n_high - n_low, 1)
    if config.method == "full":
        activations = scale * max(0, full["peak_bytes"] - full["grad_bytes"]) + full["grad_bytes"]
        gradients = 0  # inside the measured peak
    else:
        head = max(0.0, low["peak_bytes"] - per_block * n_low)  # the step's peak with no block trained
        # the fused LM loss works in chunks of a fixed size (train/lm_loss.py): its peak does not grow with rows
        head_scale = 1.0 if "FusedLMLoss" in v["trainer_rewrites"] else scale
        kept = per_block * depth
        if config.gradient_checkpointing and depth:
            kept = per_block + depth * v["block_output_bytes_per_row"] * v["rows"]
        activations = head_scale * head + scale * kept + adapter_kept \
            + rates["resident_per_backward_byte"] * adapter_backward
    cache_row = v["block_output_bytes_per_row"] if cached else 0
    cache_fit = cache_row * (rows["train"] + rows["validation"])
    train_phase = fixed + cache_fit + gradients + adam + activations + copies
    eval_rows = min(EVAL_BATCH_SIZE, max(rows["validation"], rows["test"]))  # the largest evaluation batch
    # the bfloat16 copies are released after the last step, but each epoch's validation runs with them
    eval_phase = fixed + cache_fit + cache_row * rows["test"] + adam + copies \
        + v["evaluation"]["peak_bytes"] * eval_rows / v["rows"]
    return {"peak_bytes": max(train_phase, eval_phase), "train_phase_bytes": train_phase,
            "eval_phase_bytes": eval_phase, "process_bytes": fixed, "prefix_cache_bytes": cache_fit + cache_row * rows["test"],
            "gradients_bytes": gradients, "adam_bytes": adam, "activations_bytes": activations,
            "bf16_copies_bytes": copies}


def _fixed_bytes(stages: dict, v: dict, shape: dict) -> float:
    """The process before its first step: measured by stage in a child; what it could not load by
    name (the model, the data) is counted from the bytes this process holds."""
    if "warm" in stages:
        return stages["warm"]
    return stages["data"] + v["model_bytes"] + (0 if stages["data"] > stages["runtime"] else shape["data_bytes"])


def _int8_savings(v: dict) -> int:
    """Bytes an int8 base saves: 3 of every 4 bytes of the frozen Linear weights, less the scales."""
    return sum(3 * s["inp"] * s["out"] - 4 * s["out"] for s in v["layers"].values() if s["kind"] == "linear")
