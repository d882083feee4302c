"""`leanfit`: one command for the main jobs: tune, eval, export, info; capabilities add theirs.

A capability (serve, budget, ...) adds subcommands from its own `cli.py` module: a function
`add_commands(subparsers) -> {name: handler}` that imports nothing heavy until a handler runs.

A user's mistake (bad argument, missing file, unknown method) prints one sentence and exits 2;
no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from .errors import ConfigError, LeanfitError
from .tune_options import add_tune_arguments, tune_config

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one sentence instead of argparse's usage dump
        hint = ""
        if message.endswith("expected one argument"):  # e.g. --lr-range -1:1: a value read as an option
            option = message.split()[1].rstrip(":")
            hint = f" (a value that starts with '-' is given as {option}=VALUE)"
        raise ConfigError(f"{message[0].upper()}{message[1:]}{hint}; see `{self.prog} --help`.")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got '{text}'")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="leanfit", description="Adapt pretrained networks to new tasks within a budget.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("tune", help="fine-tune a model with an adapter and report test metrics")
    add_tune_arguments(t)
    t.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in the output folder (its report, metrics, checkpoints and adapter are "
                        "deleted first); without it, tune refuses such a folder unless --resume is given")

    e = sub.add_parser("eval", help="evaluate a saved adapter on a data split")
    e.add_argument("adapter", help="adapter directory written by `leanfit tune`")
    e.add_argument("--data", help="data set (default: the one it was trained on)")
    e.add_argument("--split", default="test", choices=["train", "validation", "test"])
    e.add_argument("--seed", type=int, default=None,
                   help="seed of the data splits (default: the one the adapter was trained with, so its test rows "
                        "are the test rows)")
    e.add_argument("--max-rows", type=_positive, metavar="N", help="evaluate the first N rows of the split only")
    e.add_argument("--text-column", dest="text_column", help="text column of --data (default: the training data's)")
    e.add_argument("--label-column", dest="label_column", help="label column of --data (default: the training data's)")

    x = sub.add_parser("export", help="convert a saved adapter to another format")
    x.add_argument("adapter", help="adapter directory written by `leanfit tune`")
    x.add_argument("--format", required=True, choices=["peft"])
    x.add_argument("--output", "-o", required=True, help="directory to write (a new or empty one)")
    x.add_argument("--overwrite", action="store_true", help="write into a folder that already holds files")

    i = sub.add_parser("info", help="describe a saved adapter, or list methods")
    i.add_argument("adapter", nargs="?", help="adapter directory")
    i.add_argument("--methods", action="store_true", help="list the registered methods")
    for module in CAPABILITIES:
        COMMANDS.update(importlib.import_module(module).add_commands(sub))
    return p


def _tune(args) -> int:
    from .train import distributed
    from . import run_folder
    from .tune import headline, run
    config = tune_config(args)
    replaced = run_folder.to_replace(config.output, config.resume, args.overwrite)
    distributed.init_from_env()  # under torchrun: join the process group
    if replaced and distributed.is_main():
        run_folder.clear(config.output, replaced)
    try:
        report = run(config)
    finally:
        distributed.shutdown()
    if not distributed.is_main():
        return 0
    print(headline(report))
    if report.get("adapter"):
        print(f"adapter and report written to {config.output}")
    else:  # full fine-tuning and a probe write no adapter; their weights live only in checkpoints, if kept
        kept = " (the weights are in its checkpoints)" if Path(config.output, "checkpoints").is_dir() else (
            "; the fine-tuned weights were not kept: pass --checkpoint-every N to keep them")
        print(f"report written to {config.output}{kept}")
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
    from .data.splits import IMAGE_CLASSIFICATION, rows
    from .train import Trainer
    from .tune import TuneConfig, load_data
    model, tokenizer, manifest = _load_adapted(args.adapter)
    extra = manifest["extra"]
    seed = args.seed if args.seed is not None else extra.get("seed", 0)  # another seed splits other rows off as test
    config = TuneConfig(data=args.data or extra["data"], seed=seed, task=extra["task"],
                        text_column=args.text_column or extra.get("text_column", "text"),
                        label_column=args.label_column or extra.get("label_column", "label"))
    dataset = load_data(config)
    if dataset.task != extra["task"]:
        raise ConfigError(f"The data set {config.data} is for {dataset.task} but the adapter was trained for "
                          f"{extra['task']}; evaluate on data of the adapter's task.")
    if dataset.labels and extra.get("labels") and dataset.labels != extra["labels"]:
        raise ConfigError(f"The data's labels {dataset.labels} differ from the adapter's {extra['labels']}; "
                          "evaluate on data with the same label set.")
    if dataset.task == IMAGE_CLASSIFICATION:  # resize only the rows evaluated (all 70k at 64 px: 3.4 GB)
        dataset = dataset.only(args.split, args.max_rows)
    tensors = encode(dataset, tokenizer, max_length=extra.get("max_length", 128))
    split = {k: v[: args.max_rows] for k, v in getattr(tensors, args.split).items()}  # max_rows None: all
    setattr(tensors, args.split, split)
    metrics = Trainer(model, tensors, progress=False, epochs=1, lr=1e-3).evaluate(args.split)
    print(json.dumps({"adapter": args.adapter, "data": config.data, "split": args.split, "rows": rows(split), **metrics}))
    return 0


def _export(args) -> int:
    from .core.peft_format import export_peft
    if not args.output:  # Path("") would be the current folder
        raise ConfigError("The output folder is empty text; pass the folder to write the PEFT adapter to with -o.")
    output = Path(args.output)
    if output.resolve() == Path(args.adapter).resolve():
        raise ConfigError(f"The output folder '{output}' is the adapter's own folder; pass another -o.")
    if output.is_dir() and any(output.iterdir()) and not args.overwrite:
        raise ConfigError(f"The output folder '{output}' already holds files; pass a new or empty folder, or "
                          "--overwrite to write the PEFT adapter among them.")
    model, _, manifest = _load_adapted(args.adapter)
    export_peft(model, args.output, name=manifest["name"])
    print(f"PEFT adapter written to {args.output}")
    return 0


def _info(args) -> int:
    from . import core
    from .methods import method_names, module_class
    if args.methods and args.adapter:
        raise ConfigError("info takes --methods or an adapter folder, not both; run it once for each.")
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
CAPABILITIES: tuple[str, ...] = ("leanfit.budget.cli", "leanfit.budget.search_cli", "leanfit.serve.cli")  # modules with add_commands(subparsers)


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except LeanfitError as err:
        print(f"leanfit: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (FileExistsError, NotADirectoryError) as err:  # an output folder asked for where a file lies
        print(f"leanfit: Cannot make the folder '{err.filename}': a file is in the way; pass another output "
              "folder.", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("leanfit: interrupted; resume with --resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
