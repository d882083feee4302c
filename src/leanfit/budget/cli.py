"""`leanfit plan`: what a `leanfit tune` run will cost, printed before any training.

Takes the very options of `leanfit tune` (tune_options.py), so a plan and the run it describes
are one command line apart. Nothing heavy is imported until the command runs.
"""

from __future__ import annotations

import json
import sys

from ..memory import human_bytes


def add_commands(subparsers) -> dict:
    from ..tune_options import add_tune_arguments
    p = subparsers.add_parser("plan", help="estimate a tune run's parameters, adapter bytes, memory and time "
                                           "before training")
    add_tune_arguments(p)
    out = p.add_argument_group("plan")
    out.add_argument("--json", action="store_true", help="print the estimate as JSON (machine output)")
    out.add_argument("--calibration-dir", dest="calibration_dir",
                     help="where calibrations are cached (default ~/.cache/leanfit/calibration)")
    out.add_argument("--recalibrate", action="store_true", help="measure this machine again, ignoring the cache")
    return {"plan": _plan}


def _plan(args) -> int:
    from ..tune_options import tune_config
    from .cost import estimate
    config = tune_config(args)

    def notice():  # only when a calibration is measured, after the configuration has been built
        print(f"Calibrating this machine for {config.model} at batch {config.batch_size} x {config.max_length} "
              "tokens (about a minute, once; later plans at this shape read the cache) ...", file=sys.stderr)
    result = estimate(config, cache_dir=args.calibration_dir, recalibrate=args.recalibrate, on_calibrate=notice)
    if args.json:
        print(json.dumps({"config": _config_dict(config), **result.as_dict()}, indent=2, default=str))
    else:
        _print_table(config, result)
    return 0


def _config_dict(config) -> dict:
    from dataclasses import asdict
    return {k: v for k, v in asdict(config).items() if k not in ("progress", "resume")}


def _print_table(config, result) -> None:
    from rich.console import Console
    from rich.table import Table
    b = result.breakdown
    policy, memory, run = b["policy"], b["memory"], b["run"]
    rows = policy["rows"]
    table = Table(title=f"leanfit plan: {config.method} {_options(config)} on {config.data} / {config.model}",
                  caption=f"batch {config.batch_size} x {config.max_length} tokens, {config.epochs} epoch(s) over "
                          f"{rows['train']} rows ({result.steps} steps), validation {rows['validation']} rows; "
                          f"trained blocks {policy['trained_blocks']:g} of {policy['blocks']}, prefix "
                          f"{'cached' if policy['prefix_cached'] else config.prefix}, steps in {policy['precision']}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("how", style="dim")
    table.add_row("trainable parameters", f"{result.trainable_params:,} ({100 * result.trainable_share:.3f}%)",
                  "exact (the adapter built as tune builds it)")
    table.add_row("adapter file", human_bytes(result.adapter_bytes), "exact (adapter.safetensors)")
    table.add_row("peak memory (RSS)", human_bytes(result.train_peak_bytes),
                  f"estimated: process {human_bytes(memory['process_bytes'])}, activations "
                  f"{human_bytes(memory['activations_bytes'])}, grads + AdamW "
                  f"{human_bytes(memory['gradients_bytes'] + memory['adam_bytes'])}, prefix cache "
                  f"{human_bytes(memory['prefix_cache_bytes'])}")
    table.add_row("training step", _seconds(result.step_seconds),
                  f"estimated: passes {_seconds(b['step']['passes_s'])}, adapters {_seconds(b['step']['adapters_s'])}, "
                  f"AdamW {_seconds(b['step']['optimizer_s'])}")
    table.add_row("training run", _seconds(result.train_seconds),
                  f"estimated: prefix cache {_seconds(run['prefix_cache_build_s'])}, steps {_seconds(run['steps_s'])}, "
                  f"validation {_seconds(run['validation_s'])}")
    table.add_row("inference latency", f"{result.inference_latency_ratio:.2f}x base",
                  "estimated: forward with the unmerged adapter / without")
    Console().print(table)


def _options(config) -> str:
    return " ".join(f"{k}={v}" for k, v in config.options.items())


def _seconds(s: float) -> str:
    if s < 1:
        return f"{1000 * s:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"
