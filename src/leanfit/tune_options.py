"""The options of a tune run on the command line, shared by every command that takes a run's
configuration (`leanfit tune`, `leanfit plan`, ...), and how they become a `TuneConfig`.

Imports nothing heavy: commands are registered before any of them runs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from .errors import ConfigError


def key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError(f"Option '{text}' is not KEY=VALUE; write e.g. --set dropout=0.1.")
    key, value = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"Option '{text}' has no KEY before '='; write e.g. --set dropout=0.1.")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `leanfit tune`, added to `parser`."""
    parser.add_argument("--config", help="JSON file of tune options (command-line options override it)")
    parser.add_argument("--model", help="zoo name (minilm, smollm2-135m) or a local Hugging Face model folder")
    parser.add_argument("--data", help="zoo name (bbc-news, tweets-sentiment, austen) or CSV / JSON Lines / saved dataset path")
    parser.add_argument("--task", choices=["classification", "causal-lm"], help="task of your own data")
    parser.add_argument("--text-column", dest="text_column")
    parser.add_argument("--label-column", dest="label_column")
    parser.add_argument("--method", help="adapter method (see `leanfit info --methods`), or full / probe")
    parser.add_argument("--targets", help="'all-linear', comma-separated layer names, or a regular expression")
    parser.add_argument("--exclude", help="comma-separated layer names to leave out")
    parser.add_argument("--rank", type=int, help="rank of LoRA-family methods")
    parser.add_argument("--alpha", type=float, help="LoRA alpha")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any method option")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", dest="batch_size", type=int)
    parser.add_argument("--max-length", dest="max_length", type=int)
    parser.add_argument("--max-train-rows", dest="max_train_rows", type=int, help="train on a subset")
    parser.add_argument("--max-eval-rows", dest="max_eval_rows", type=int, help="evaluate on the first N rows")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--output", "-o", help="output directory (adapter, report, checkpoints)")
    parser.add_argument("--checkpoint-every", dest="checkpoint_every", type=int)
    parser.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint")
    parser.add_argument("--early-stopping", dest="early_stopping_patience", type=int, metavar="PATIENCE")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    lean = parser.add_argument_group("lean training")
    lean.add_argument("--train-layers", dest="train_layers", metavar="K",
                      help="adapt only the top K blocks (the rest is a frozen prefix); 'auto' (default): the top "
                           "third, the top five sixths for a causal LM; 'all': every block")
    lean.add_argument("--prefix", choices=["off", "eval", "cache"],
                      help="frozen prefix: off, eval (no dropout below the trained blocks), cache (computed once)")
    lean.add_argument("--lisa-layers", dest="lisa_layers", type=int, metavar="N", help="LISA: train N sampled blocks")
    lean.add_argument("--lisa-period", dest="lisa_period", type=int, metavar="STEPS")
    lean.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None)
    lean.add_argument("--block-dropout", dest="block_dropout", action=argparse.BooleanOptionalAction, default=None,
                      help="keep the base model's dropout inside its blocks while training (off by default: "
                           "faster on CPU at the same accuracy; see docs/lean-training.md)")
    lean.add_argument("--precision", choices=["fp32", "bf16", "auto"],
                      help="training steps' matrix products: auto (default: bf16 where the hardware has it "
                           "natively, else fp32), bf16 (bfloat16 autocast; weights, adapters and evaluation stay "
                           "float32), fp32")
    lean.add_argument("--int8-base", dest="int8_base", action="store_true", default=None,
                      help="store the frozen base's linear weights in int8")


def read_config_file(name: str | None) -> dict:
    """The keys of a --config JSON file ({} without one)."""
    if not name:
        return {}
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"Config file '{path}' does not exist; pass a JSON file of tune options.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"Config file '{path}' is not valid JSON ({err.msg} at line {err.lineno}).") from None
    except UnicodeDecodeError:
        raise ConfigError(f"Config file '{path}' is not UTF-8 text; save it as UTF-8 JSON.") from None


def override(config, args: argparse.Namespace, keys):
    """`config` with every option in `keys` that was given on the command line."""
    for key in keys:
        value = getattr(args, key)
        if value is not None:
            setattr(config, key, value)
    return config


def tune_config(args: argparse.Namespace):
    """The TuneConfig the options ask for: the --config file's keys, overridden by the options given."""
    from .tune import TuneConfig
    base = read_config_file(args.config)
    config = override(TuneConfig.from_dict(base), args, (
        "model", "data", "task", "text_column", "label_column", "method", "epochs", "lr", "batch_size",
        "max_length", "max_train_rows", "max_eval_rows", "seed", "output", "checkpoint_every", "resume",
        "early_stopping_patience", "progress", "train_layers", "prefix", "lisa_layers", "lisa_period",
        "gradient_checkpointing", "int8_base", "block_dropout", "precision"))
    if args.targets is not None:
        config.targets = args.targets if args.targets == "all-linear" or not args.targets.replace(",", "").replace(
            "_", "").replace(".", "").isalnum() else args.targets.split(",")
    if args.exclude:
        config.exclude = args.exclude.split(",")
    options = dict(config.options)
    if args.rank is not None:
        options["rank"] = args.rank
    if args.alpha is not None:
        options["alpha"] = args.alpha
    given = dict(key_value(kv) for kv in args.set)
    for key in ("rank", "alpha"):
        if key in given and getattr(args, key) is not None and given[key] != getattr(args, key):
            raise ConfigError(f"--{key} {getattr(args, key)} and --set {key}={given[key]} disagree; give one of them.")
    config.options = {**options, **given}
    if args.output is None and "output" not in base:
        config.output = f"out/{Path(str(config.data)).stem}-{config.method}"
    given_columns = [f"--{k.replace('_', '-')}" for k in ("task", "text_column", "label_column") if getattr(args, k)]
    if given_columns:
        from .zoo import DATASETS
        if config.data in DATASETS:  # a zoo data set knows its task and columns: the options would be ignored
            raise ConfigError(f"{' and '.join(given_columns)} describe your own data files, but {config.data} is a "
                              "bundled data set that knows its own; leave them out.")
    config.check()
    check_given_options(config.method, given)
    if args.lisa_period is not None and config.lisa_layers is None:
        raise ConfigError("--lisa-period is the period of LISA's sampling, which is off; give --lisa-layers N too.")
    return config


def check_given_options(method: str, given: dict) -> None:
    """Refuse a --set option the method does not have: unlike --rank and --alpha, which serve whichever
    method has them, a --set names an option of this method, and dropping it would hide a typo."""
    from .tune import method_options
    unknown = sorted(set(given) - set(method_options(method, given)))
    if unknown:
        from .methods import module_class
        from .tune import BASELINES
        valid = [] if method in BASELINES else sorted(f.name for f in fields(module_class(method).config_class))
        raise ConfigError(f"Method '{method}' has no option {', '.join(unknown)}; "
                          + (f"its options are {', '.join(valid)}." if valid else "it takes no --set options."))
