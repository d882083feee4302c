"""`leanfit`: one command for the main jobs: tune, eval, export, info.

A user's mistake (bad argument, missing file, unknown method) prints one sentence and exits 2;
no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConfigError, LeanfitError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one sentence instead of argparse's usage dump
        raise ConfigError(f"{message[0].upper()}{message[1:]}; see `{self.prog} --help`.")


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError(f"Option '{text}' is not KEY=VALUE; write e.g. --set dropout=0.1.")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="leanfit", description="Adapt pretrained networks to new tasks within a budget.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("tune", help="fine-tune a model with an adapter and report test metrics")
    t.add_argument("--config", help="JSON file of tune options (command-line options override it)")
    t.add_argument("--model", help="zoo name (minilm, smollm2-135m) or a local Hugging Face model folder")
    t.add_argument("--data", help="zoo name (bbc-news, tweets-sentiment, austen) or CSV / JSON Lines / saved dataset path")
    t.add_argument("--task", choices=["classification", "causal-lm"], help="task of your own data")
    t.add_argument("--text-column", dest="text_column")
    t.add_argument("--label-column", dest="label_column")
    t.add_argument("--method", help="adapter method (see `leanfit info --methods`), or full / probe")
    t.add_argument("--targets", help="'all-linear', comma-separated layer names, or a regular expression")
    t.add_argument("--exclude", help="comma-separated layer names to leave out")
    t.add_argument("--rank", type=int, help="rank of LoRA-family methods")
    t.add_argument("--alpha", type=float, help="LoRA alpha")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any method option")
    t.add_argument("--epochs", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--batch-size", dest="batch_size", type=int)
    t.add_argument("--max-length", dest="max_length", type=int)
    t.add_argument("--max-train-rows", dest="max_train_rows", type=int, help="train on a subset")
    t.add_argument("--max-eval-rows", dest="max_eval_rows", type=int, help="evaluate on the first N rows")
    t.add_argument("--seed", type=int)
    t.add_argument("--output", "-o", help="output directory (adapter, report, checkpoints)")
    t.add_argument("--checkpoint-every", dest="checkpoint_every", type=int)
    t.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint")
    t.add_argument("--early-stopping", dest="early_stopping_patience", type=int, metavar="PATIENCE")
    t.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    lean = t.add_argument_group("lean training")
    lean.add_argument("--train-layers", dest="train_layers", metavar="K",
                      help="adapt only the top K blocks (the rest is a frozen prefix); 'auto' (default): the top "
                           "third; 'all': every block")
    lean.add_argument("--prefix", choices=["off", "eval", "cache"],
                      help="frozen prefix: off, eval (no dropout below the trained blocks), cache (computed once)")
    lean.add_argument("--lisa-layers", dest="lisa_layers", type=int, metavar="N", help="LISA: train N sampled blocks")
    lean.add_argument("--lisa-period", dest="lisa_period", type=int, metavar="STEPS")
    lean.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None)
    lean.add_argument("--int8-base", dest="int8_base", action="store_true", default=None,
                      help="store the frozen base's linear weights in int8")

    e = sub.add_parser("eval", help="evaluate a saved adapter on a data split")
    e.add_argument("adapter", help="adapter directory written by `leanfit tune`")
    e.add_argument("--data", help="data set (default: the one it was trained on)")
    e.add_argument("--split", default="test", choices=["train", "validation", "test"])
    e.add_argument("--seed", type=int, default=0)

    x = sub.add_parser("export", help="convert a saved adapter to another format")
    x.add_argument("adapter", help="adapter directory written by `leanfit tune`")
    x.add_argument("--format", required=True, choices=["peft"])
    x.add_argument("--output", "-o", required=True, help="directory to write")

    i = sub.add_parser("info", help="describe a saved adapter, or list methods")
    i.add_argument("adapter", nargs="?", help="adapter directory")
    i.add_argument("--methods", action="store_true", help="list the registered methods")
    return p


def _tune_config(args: argparse.Namespace):
    from .tune import TuneConfig
    base = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"Config file '{path}' does not exist; pass a JSON file of tune options.")
        try:
            base = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"Config file '{path}' is not valid JSON ({err.msg} at line {err.lineno}).") from None
    config = TuneConfig.from_dict(base)
    for key in ("model", "data", "task", "text_column", "label_column", "method", "epochs", "lr", "batch_size",
                "max_length", "max_train_rows", "max_eval_rows", "seed", "output", "checkpoint_every", "resume",
                "early_stopping_patience", "progress", "train_layers", "prefix", "lisa_layers", "lisa_period",
                "gradient_checkpointing", "int8_base"):
        value = getattr(args, key)
        if value is not None:
            setattr(config, key, value)
    if args.targets:
        config.targets = args.targets if args.targets == "all-linear" or not args.targets.replace(",", "").replace(
            "_", "").replace(".", "").isalnum() else args.targets.split(",")
    if args.exclude:
        config.exclude = args.exclude.split(",")
    options = dict(config.options)
    if args.rank is not None:
        options["rank"] = args.rank
    if args.alpha is not None:
        options["alpha"] = args.alpha
    options.update(_key_value(kv) for kv in args.set)
    config.options = options
    if not args.output and not base.get("output"):
        config.output = f"out/{Path(str(config.data)).stem}-{config.method}"
    return config


def _tune(args) -> int:
    from .train import distributed
    from .tune import headline, run
    config = _tune_config(args)
    distributed.init_from_env()  # under torchrun: join the process group
    try:
        report = run(config)
    finally:
        distributed.shutdown()
    if not distributed.is_main():
        return 0
    print(headline(report))
    print(f"adapter and report written to {config.output}")
    return 0


def _load_adapted(adapter_dir: str, seed: int = 0):
    """The base model named in an adapter's manifest, with the adapter loaded."""
    from . import core, zoo
    manifest = core.read_manifest(adapter_dir)
    extra = manifest.get("extra", {})
    if "model" not in extra:
        raise ConfigError(f"The adapter at '{adapter_dir}' does not say which model it adapts; it was not written by `leanfit tune`.")
    labels = extra.get("labels")
    model, tokenizer = zoo.model(extra["model"], task=extra["task"], num_labels=len(labels) if labels else None, seed=seed)
    core.load(model, adapter_dir)
    return model, tokenizer, manifest


def _eval(args) -> int:
    from .data import encode
    from .train import Trainer
    from .tune import TuneConfig, load_data
    model, tokenizer, manifest = _load_adapted(args.adapter, args.seed)
    extra = manifest["extra"]
    config = TuneConfig(data=args.data or extra["data"], seed=args.seed, task=extra["task"],
                        text_column=extra.get("text_column", "text"), label_column=extra.get("label_column", "label"))
    dataset = load_data(config)
    if dataset.labels and extra.get("labels") and dataset.labels != extra["labels"]:
        raise ConfigError(f"The data's labels {dataset.labels} differ from the adapter's {extra['labels']}; "
                          "evaluate on data with the same label set.")
    tensors = encode(dataset, tokenizer, max_length=extra.get("max_length", 128))
    metrics = Trainer(model, tensors, progress=False, epochs=1, lr=1e-3).evaluate(args.split)
    print(json.dumps({"adapter": args.adapter, "data": config.data, "split": args.split, **metrics}))
    return 0


def _export(args) -> int:
    from .core.peft_format import export_peft
    model, _, manifest = _load_adapted(args.adapter)
    export_peft(model, args.output, name=manifest["name"])
    print(f"PEFT adapter written to {args.output}")
    return 0


def _info(args) -> int:
    from . import core
    from .methods import method_names, module_class
    if args.methods or not args.adapter:
        for name in method_names():
            caps = module_class(name).capabilities
            doc = (module_class(name).__doc__ or "").strip().splitlines()[0]
            print(f"{name:12s} mergeable={caps.mergeable!s:5s} layers={','.join(caps.layer_kinds):25s} {doc}")
        return 0
    manifest = core.read_manifest(args.adapter)
    tensors = core.artifact.read_tensors(args.adapter, manifest)
    params = sum(t.numel() for t in tensors.values())
    print(json.dumps({
        "name": manifest["name"], "method": manifest["method"], "targets": len(manifest["targets"]),
        "train_modules": manifest["train_modules"], "parameters": params, "bytes": manifest["tensors"]["bytes"],
        "base_model": manifest["base_model"], "extra": manifest.get("extra", {}),
    }, indent=2))
    return 0


COMMANDS = {"tune": _tune, "eval": _eval, "export": _export, "info": _info}


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except LeanfitError as err:
        print(f"leanfit: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("leanfit: interrupted; resume with --resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
