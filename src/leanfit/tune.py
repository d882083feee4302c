"""The main job: load a model and data, adapt, train, evaluate on the test split, save, report.

Used by `leanfit tune` and by the benchmarks, so both measure the same code path. Besides the
registered adapter methods it runs the two references every result is judged against: full
fine-tuning (`full`) and a frozen linear probe (`probe`).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from . import core
from .data import CAUSAL_LM, CLASSIFICATION, IMAGE_CLASSIFICATION, TextDataset, encode, from_files
from .data.splits import rows
from .errors import ConfigError, DataError, TargetError, check_known
from .io import atomic_write_bytes
from .memory import peak_rss_bytes
from .methods import config_from_dict, module_class
from .core.quantize import quantize_base, quantized_params
from .train import Trainer, distributed
from .train.layers import below_top_k, transformer_blocks

BASELINES = ("full", "probe")
# Learning rates that work for each kind of method on the bundled tasks; --lr overrides. AdaLoRA,
# IncreLoRA and HUT start from updates that move slowly (singular values at zero between N(0, 0.02^2)
# factors; an update scaled elementwise by W), so at 1e-3 they barely left the base in 3 epochs on
# bbc-news (validation 58% and 62%); theirs were picked on bbc-news validation accuracy (top 2
# blocks, 3 epochs): AdaLoRA 95.3% at 5e-3, 96.7% at 2e-2; HUT 94.8% at 5e-3, 96.2% at 2e-2;
# IncreLoRA 97.2% at 5e-3 (the only one tried).
DEFAULT_LR = {"full": 5e-5, "probe": 1e-2, "ia3": 3e-3, "ssf": 3e-3, "bitfit": 3e-3, "lora-sb": 2e-3,
              "adalora": 2e-2, "increlora": 5e-3, "hut": 2e-2}
# Full fine-tuning of a CNN wants a larger step than a transformer's 5e-5 (EfficientNet-Lite0 on
# fashion-mnist, 1,000 rows, 1 epoch: 61.4% at 5e-5, 77.8% at 5e-4, 23.8% at 2e-3).
IMAGE_FULL_LR = 5e-4
ADAPTER_LR = 5e-4
TOP_K_LR = 1e-3
# A causal LM's adapters (every block by default): SmolLM2-135M on Austen, 2 epochs, linear decay,
# validation perplexity 38.18 at 1e-3 and 37.30 at 2e-3; at 5e-4 the test perplexity was 39.90
# against peft's 37.51 (docs/lean-training.md). Measured with LoRA; adapters without a default of their
# own take it too.
CAUSAL_LM_LR = 2e-3


# Whole-number options and the least each may be (those in OPTIONAL may also be None: off, or every row).
WHOLE_NUMBERS = {"epochs": 1, "batch_size": 1, "max_length": 2, "seed": 0, "checkpoint_every": 0, "lisa_period": 1,
                 "max_train_rows": 1, "max_eval_rows": 1, "early_stopping_patience": 1, "lisa_layers": 1}
OPTIONAL = ("max_train_rows", "max_eval_rows", "early_stopping_patience", "lisa_layers")
FLAGS = ("resume", "progress", "gradient_checkpointing", "int8_base", "block_dropout")  # true or false, nothing else


@dataclass
class TuneConfig:
    """Everything one run needs; a JSON file of these keys is what `leanfit tune --config` reads."""

    model: str = "minilm"
    data: str = "bbc-news"
    method: str = "lora"
    options: dict = field(default_factory=lambda: {"rank": 8, "alpha": 16.0})
    targets: str | list = "all-linear"
    exclude: list | None = None
    epochs: int = 3
    lr: float | None = None
    batch_size: int = 32
    max_length: int = 128
    seed: int = 0
    output: str = "out/bbc-news-lora"
    text_column: str = "text"
    label_column: str = "label"
    task: str = CLASSIFICATION  # for the user's own data; zoo data sets know their task
    checkpoint_every: int = 0
    resume: bool = False
    early_stopping_patience: int | None = None
    max_train_rows: int | None = None  # a subset for quick runs
    max_eval_rows: int | None = None  # the first N rows of validation and test (stated in the report)
    progress: bool = True
    name: str = "default"
    # Lean training (see docs/lean-training.md): adapt only the top-k blocks; the frozen prefix
    # below them "off" | "eval" | "cache"; LISA sampling; gradient checkpointing; int8 frozen base.
    # "auto": the top third of the blocks, or the top five sixths for a causal LM (top_layers); None / "all": every block
    train_layers: int | str | None = "auto"
    prefix: str = "cache"
    lisa_layers: int | None = None
    lisa_period: int = 20
    gradient_checkpointing: bool = False
    int8_base: bool = False
    # The base's dropout inside the blocks: off by default (faster on CPU, same accuracy measured in
    # docs/lean-training.md); True keeps it, as Hugging Face's training does.
    block_dropout: bool = False
    # "bf16": training steps' matrix products in bfloat16 (train/precision.py); "auto" (default): bf16 where
    # the hardware has native bfloat16, else "fp32" (docs/lean-training.md).
    precision: str = "auto"

    @classmethod
    def from_dict(cls, data: dict) -> "TuneConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"Tune options must be a JSON object of option names and values, got "
                              f"{json.dumps(data)[:60]}; write e.g. {{\"method\": \"lora\", \"epochs\": 3}}.")
        check_known(data, (f.name for f in fields(cls)), "tune option")
        return cls(**data).check_options()

    def check_options(self) -> "TuneConfig":
        if not isinstance(self.options, dict):
            raise ConfigError(f"options must be an object of method options, got {self.options!r}; "
                              "write e.g. {\"rank\": 8}.")
        return self

    def check(self) -> "TuneConfig":
        """Refuse values no run can use before anything loads, each in one sentence (`leanfit tune`,
        `plan` and `search` call it; the trainer and the model check what needs them)."""
        for name, low in WHOLE_NUMBERS.items():
            value = getattr(self, name)
            if value is None and name in OPTIONAL:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be a whole number of at least {low}"
                                  f"{' (or left out)' if name in OPTIONAL else ''}, got {value!r}; fix the option.")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not 0 < self.lr < math.inf):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}; write e.g. 1e-3.")
        for name in FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}; fix the option.")
        for name in ("model", "data", "output", "method", "text_column", "label_column", "task"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{name} must be a non-empty text, got {value!r}; fix the option.")
        from .train.policy import PREFIX_MODES
        from .train.precision import PRECISIONS
        for name, allowed in (("prefix", PREFIX_MODES), ("precision", PRECISIONS)):  # the command line's choices
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}; fix the option.")
        if self.lisa_layers is not None and self.train_layers not in (None, "all"):
            raise ConfigError(f"LISA samples its blocks among all of the model's, but train_layers={self.train_layers!r} "
                              "adapts only the top ones; pass --train-layers all with --lisa-layers.")
        if not self.targets or not isinstance(self.targets, (str, list)):
            raise ConfigError(f"targets must be 'all-linear', layer names or a regular expression, got "
                              f"{self.targets!r}; fix the option.")
        self.check_options()
        if self.method not in BASELINES:
            config_from_dict({"method": self.method, **method_options(self.method, self.options)})  # validates them
        return self

    def learning_rate(self, task: str | None = None) -> float:
        """The --lr given, else the default for this method and task."""
        if self.lr is not None:
            return self.lr
        if self.method == "full" and task == IMAGE_CLASSIFICATION:
            return IMAGE_FULL_LR
        if self.method in DEFAULT_LR:
            return DEFAULT_LR[self.method]
        if task == CAUSAL_LM:
            return CAUSAL_LM_LR
        # Fewer adapted blocks learn best with a larger step (measured on bbc-news: docs/lean-training.md).
        return TOP_K_LR if self.train_layers not in (None, "all") else ADAPTER_LR


def load_data(config: TuneConfig) -> TextDataset:
    from . import zoo
    if config.data in zoo.DATASETS:
        return zoo.dataset(config.data, seed=config.seed)
    return from_files(config.data, task=config.task, text=config.text_column, label=config.label_column,
                      seed=config.seed)


def prepare_model(config: TuneConfig, dataset: TextDataset):
    """(model, tokenizer) with the method applied and only what it trains left trainable."""
    from . import zoo
    labels = len(dataset.labels) if dataset.task in (CLASSIFICATION, IMAGE_CLASSIFICATION) else None
    model, tokenizer = zoo.model(config.model, task=dataset.task, num_labels=labels, seed=config.seed)
    check_fits(model, config)
    apply_method(model, config)
    if config.int8_base and not quantize_base(model):  # else the report says int8 of a base stored in float32
        raise ConfigError(f"--int8-base stores the frozen base's nn.Linear layers in int8, and {config.model} has "
                          "none outside what trains (a CNN's convolutions stay float); leave --int8-base out.")
    return model, tokenizer


# Bytes per trained float32 value: the value, its gradient and AdamW's two moments.
TRAINED_BYTES = 16


def check_fits(model, config: TuneConfig) -> None:
    """Refuse a run whose trained values (with gradients and optimizer state) and what its adapters
    keep for backward in one step need more memory than the machine has free, counted on a
    weight-less copy before anything is allocated: a rank far above the layers' sizes would otherwise
    grow until the kernel kills the process, without a word. Both are lower bounds (the base model's
    own activations are not counted); `leanfit plan` estimates the whole peak."""
    from .budget.exact import meta_adapted
    from .memory import available_bytes, human_bytes
    free = available_bytes()
    if free is None or config.method in BASELINES:
        return
    copy = meta_adapted(model, config, fingerprint="unhashed")
    if copy is None:  # a method whose init needs real values: not counted here
        return
    trained = sum(p.numel() for p in copy.parameters() if p.requires_grad)
    kept = _kept_per_step(copy, config)
    if trained * TRAINED_BYTES + kept > free:
        raise ConfigError(f"{config.method} with these options trains {trained:,} values, whose weights, gradients and "
                          f"optimizer state take {human_bytes(trained * TRAINED_BYTES)}, and its adapters keep at least "
                          f"{human_bytes(kept)} for each step's backward: more than the {human_bytes(free)} this machine "
                          "has free; lower the rank or size, target fewer layers, or lower --batch-size or --max-length.")


def _kept_per_step(copy, config: TuneConfig) -> int:
    """Bytes the adapters keep for backward in one training step, at least: their traced cost per
    token (methods' `cost`) over batch x max_length tokens, as text rows are padded to max_length and
    causal-LM blocks are that long. The last block's layers are left out (a classifier runs part of it
    at one position) and so is every model that does not read tokens."""
    from .core.model import adapter_modules
    from .train.layers import transformer_blocks
    from .train.precision import resolve
    found = transformer_blocks(copy)
    if found is None or getattr(getattr(copy, "config", None), "vocab_size", None) is None:
        return 0
    last = f"{found[0]}.{len(found[1]) - 1}."
    traced, per_token = {}, 0
    for host, module in adapter_modules(copy, config.name).items():
        if host.startswith(last):
            continue
        base = copy.get_submodule(host).base_layer
        shape = (type(module), tuple(base.weight.shape))  # layers of one shape keep the same: trace each once
        if shape not in traced:
            traced[shape] = module.cost(1, base).activation_bytes_per_token
        per_token += traced[shape]
    scale = 0.5 if resolve(config.precision, torch.device("cpu")) == "bf16" else 1.0  # traced in float32
    return int(per_token * config.batch_size * config.max_length * scale)


def apply_method(model, config: TuneConfig) -> None:
    """Adapt a freshly loaded model as `config` says and leave only what it trains trainable (also
    what the cost model builds, on a parameter-free copy, to count exactly what a run trains)."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and config.max_length > positions:  # else a shape error, once training starts
        raise ConfigError(f"max_length {config.max_length} is longer than the {positions} positions {config.model} "
                          f"reads; pass --max-length {positions} or less.")
    if config.method == "full":
        model.requires_grad_(True)
    elif config.method == "probe":
        heads = core.model.task_heads(model)
        if not heads:
            raise ConfigError("A linear probe needs a classification head; use a classification task.")
        model.requires_grad_(False)
        for head in heads:
            model.get_submodule(head).requires_grad_(True)
    else:
        for option, names in (("--targets", config.targets), ("--exclude", config.exclude)):
            if isinstance(names, list):
                _check_names(model, names, option)
        method = config_from_dict({"method": config.method, **config.options})
        try:
            core.adapt(model, method, targets=config.targets, exclude=_exclude(model, config), name=config.name)
        except TargetError:
            k = top_layers(model, config.train_layers)
            if k is None or not _matches(model, config):
                raise
            raise ConfigError(f"Targets {config.targets!r} name only layers below the top {k} blocks, which stay frozen "
                              f"(train_layers={config.train_layers!r}); pass --train-layers all, or target layers of "
                              f"the top {k} blocks.") from None


def _matches(model, config: TuneConfig) -> bool:
    """Whether the targets name any layer when every block may train."""
    try:
        return bool(core.find_targets(model, config.targets, config.exclude))
    except TargetError:
        return False


def top_layers(model, train_layers) -> int | None:
    """How many top blocks to adapt: "auto" is the top third (rounded up), except on a causal LM,
    where it is the top five sixths; None / "all": every block.

    Why causal LMs differ (docs/lean-training.md): on SmolLM2 / Austen the top third reached test
    perplexity 43.8 against 37.5 with every block (and the top half 39.6), while the top 25 of its 30
    blocks came 1.0-1.3% above every block and 0.3-0.6% above peft's on seeds 0, 1 and 2, and trained a
    median 2.06x as many tokens per second as peft in bfloat16 (every block: 1.96x)."""
    if train_layers in (None, "all"):
        return None
    found = transformer_blocks(model)
    if train_layers == "auto":
        if found is None:
            return None
        blocks = len(found[1])
        return -(-blocks * 5 // 6) if _generates(model) else -(-blocks // 3)  # rounded up
    try:
        return int(train_layers)
    except (TypeError, ValueError):
        raise ConfigError(f"train_layers must be a number of blocks, 'auto' or 'all', got {train_layers!r}.") from None


def _generates(model) -> bool:
    """A causal LM (a Hugging Face model with a generation head), not an encoder or a classifier."""
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate and can_generate())


def _exclude(model, config: TuneConfig):
    """The user's exclude list, plus the blocks below the top `train_layers` ones, as one pattern."""
    k = top_layers(model, config.train_layers)
    if k is None:
        return config.exclude
    names = config.exclude or []
    if isinstance(names, str):
        names = [names]
    parts = [below_top_k(model, k)] + [rf"(?:.*\.)?{re.escape(n)}" for n in names]
    return "|".join(f"(?:{p})" for p in parts)


def _check_names(model, names: list, option: str) -> None:
    """Refuse a --targets or --exclude name no layer has: a typo would otherwise leave the layer out, or
    adapted, unnoticed."""
    from .core.inject import candidate_layers
    layers = candidate_layers(model)
    for name in names:
        if not any(layer == name or layer.endswith("." + name) for layer in layers):
            tails = ", ".join(dict.fromkeys(layer.split(".")[-1] for layer in layers))
            raise ConfigError(f"{option} {name!r} names no layer of the model; its layers end in {tails}.")


def method_options(method: str, options: dict) -> dict:
    """Keep only the options the method has (so one `--rank` serves LoRA and ignores IA3)."""
    if method in BASELINES:
        return {}
    valid = {f.name for f in fields(module_class(method).config_class)}
    return {k: v for k, v in options.items() if k in valid}


def run(config: TuneConfig, evaluate_test: bool = True) -> dict:
    """Run the job; returns the report (also written to `<output>/report.json` and `.md`).
    `evaluate_test=False` (a search's trials) never reads the test split: the report's test is None."""
    started = time.perf_counter()
    config.options = method_options(config.method, config.options)
    dataset = load_data(config)
    torch.manual_seed(config.seed)
    model, tokenizer = prepare_model(config, dataset)
    if config.train_layers == "auto" and top_layers(model, "auto") is None:
        config.train_layers = "all"  # no stack of blocks to choose from: every layer, at its learning rate
    if dataset.task == IMAGE_CLASSIFICATION:  # resize only the rows used (all 70k at 64 px: 3.4 GB of floats)
        dataset = dataset.head(config.max_train_rows, config.max_eval_rows)
    tensors = encode(dataset, tokenizer, max_length=config.max_length)
    if config.max_train_rows:
        tensors.train = {k: v[: config.max_train_rows] for k, v in tensors.train.items()}
    if config.max_eval_rows:
        tensors.validation = {k: v[: config.max_eval_rows] for k, v in tensors.validation.items()}
        tensors.test = {k: v[: config.max_eval_rows] for k, v in tensors.test.items()}
    sizes = {name: rows(split) for name, split in (("train", tensors.train), ("validation", tensors.validation),
                                                  ("test", tensors.test))}
    if not all(sizes.values()):  # else training would run, and only then an evaluation fail
        empty = [name for name, n in sizes.items() if not n]
        labels = f", {len(dataset.labels)} labels" if dataset.labels else ""  # a label per row splits no row off
        raise DataError(f"The data {config.data} gives no {' and no '.join(empty)} rows ({sizes['train']} train, "
                        f"{sizes['validation']} validation, {sizes['test']} test after removing duplicates{labels}); "
                        f"give it more rows{' per label' if labels else ''} (10% go to validation and 20% to test) or a "
                        "folder with train, validation and test files.")
    output = Path(config.output)
    lr = config.learning_rate(dataset.task)
    trainer = Trainer(model, tensors, epochs=config.epochs, lr=lr,
                      batch_size=config.batch_size, seed=config.seed, progress=config.progress,
                      checkpoint_dir=_checkpoint_dir(config, output), checkpoint_every=config.checkpoint_every,
                      resume=config.resume, early_stopping_patience=config.early_stopping_patience,
                      metrics_path=str(output / "metrics.jsonl"), prefix=config.prefix,
                      lisa_layers=config.lisa_layers, lisa_period=config.lisa_period,
                      gradient_checkpointing=config.gradient_checkpointing, block_dropout=config.block_dropout,
                      precision=config.precision)
    before = trainer.evaluate("test") if dataset.task == CAUSAL_LM and evaluate_test else None
    if config.method not in BASELINES and not config.resume:
        first = {k: v[: config.batch_size] for k, v in tensors.train.items()}
        core.calibrate(model, first, config.name)  # LoRA-SB's gradient init; a no-op for others
    fit = trainer.fit()
    test = trainer.evaluate("test") if evaluate_test else None
    # What training optimised (LISA ends with only its last period's blocks trainable), out of every
    # value of the model (an int8 base holds its weights as buffers, not parameters).
    trainable = sum(p.numel() for _, p in trainer.trainable)
    total = core.trainable_parameters(model)[1] + quantized_params(model)
    report = {
        "model": config.model, "data": config.data, "task": dataset.task, "method": config.method,
        "options": config.options, "targets": config.targets, "seed": config.seed, "epochs": config.epochs,
        "lr": lr, "batch_size": config.batch_size, "max_length": config.max_length,
        "split_sizes": sizes,
        "data_info": dataset.info,
        "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
        "test": test, "test_before": before, "validation_best": fit.best,
        "train_wall_s": fit.wall_s, "steps": fit.steps, "stopped_early": fit.stopped_early,
        "policy": {"train_layers": top_layers(model, config.train_layers) if config.method not in BASELINES else None, "lisa_layers": config.lisa_layers,
                   "gradient_checkpointing": config.gradient_checkpointing, "int8_base": config.int8_base,
                   **(trainer.policy.info if trainer.policy else {})},
    }
    ranks = {h: r for c in trainer.controllers if hasattr(c, "final_ranks") for h, r in c.final_ranks().items()}
    if ranks:  # AdaLoRA / IncreLoRA: where the budget went
        report["final_ranks"] = ranks
    if not distributed.is_main():  # rank 0 writes the adapter and the report
        return report
    if config.method not in BASELINES:
        report["per_rank"] = _per_rank(model, trainer, config) if evaluate_test else None
        extra = {k: report[k] for k in ("model", "data", "task", "max_length", "test")}
        extra.update(labels=dataset.labels, text_column=config.text_column, label_column=config.label_column,
                     seed=config.seed)  # the splits' seed: eval scores the same test rows
        core.save(model, output / "adapter", name=config.name, extra=extra)
        report["adapter"] = str(output / "adapter")
        report["adapter_bytes"] = (output / "adapter" / "adapter.safetensors").stat().st_size
    report["wall_s"] = time.perf_counter() - started
    report["peak_rss_mb"] = peak_rss_bytes() / 2 ** 20  # MiB, as ru_maxrss / 1024 gave before
    write_report(report, output)
    return report


def _checkpoint_dir(config: TuneConfig, output: Path) -> str | None:
    # Adapter checkpoints are small, so they are on by default (epoch ends); a full fine-tune's are
    # the size of the model and its optimizer state, so only when asked for.
    if config.method == "full" and not (config.checkpoint_every or config.resume):
        return None
    return str(output / "checkpoints")


def _per_rank(model, trainer: Trainer, config: TuneConfig) -> dict | None:
    """Test metrics at each rank of an elastic-rank adapter (DyLoRA): no retraining needed."""
    if not module_class(config.method).capabilities.elastic_rank:
        return None
    results = {}
    rank = config.options.get("rank", 8)
    for r in sorted({1, 2, 4, rank // 2, rank} - {0}):
        if r <= rank:
            core.set_rank(model, r, config.name)
            results[r] = trainer.evaluate("test")
    core.set_rank(model, rank, config.name)
    return results


def write_report(report: dict, output: Path) -> None:
    atomic_write_bytes(output / "report.json", (json.dumps(report, indent=2, default=str) + "\n").encode())
    atomic_write_bytes(output / "report.md", render_markdown(report).encode())


def headline(report: dict) -> str:
    test = report["test"]
    if test is None:
        return (f"test split not evaluated (a search trial), trainable parameters {report['trainable_params']:,} "
                f"({100 * report['trainable_share']:.3f}%), wall time {report['wall_s']:.0f} s")
    score = (f"test accuracy {100 * test['accuracy']:.2f}%" if "accuracy" in test
             else f"test perplexity {test['perplexity']:.2f}")
    if report.get("test_before"):
        score += f" (before training {report['test_before']['perplexity']:.2f})"
    return (f"{score}, trainable parameters {report['trainable_params']:,} "
            f"({100 * report['trainable_share']:.3f}%), wall time {report['wall_s']:.0f} s")


def render_markdown(report: dict) -> str:
    lines = [f"# {report['method']} on {report['data']} / {report['model']}", "", headline(report), "",
             "| key | value |", "|---|---|"]
    for key in ("method", "options", "targets", "epochs", "lr", "batch_size", "max_length", "seed",
                "split_sizes", "trainable_params", "total_params", "train_wall_s", "wall_s", "peak_rss_mb",
                "adapter", "adapter_bytes"):
        if key in report:
            value = report[key]
            shown = f"{value:g}" if key == "lr" else f"{value:.1f}" if isinstance(value, float) else value
            lines.append(f"| {key} | {shown} |")  # seconds and MiB to a tenth; a rate as written (1e-3, not 0.0)
    if report.get("final_ranks"):
        lines += ["", "Final rank per layer (the budget schedule's allocation):", "", "| layer | rank |", "|---|---|"]
        lines += [f"| {layer} | {rank} |" for layer, rank in report["final_ranks"].items()]
    if report.get("per_rank"):
        lines += ["", "| rank | test |", "|---|---|"]
        lines += [f"| {r} | {m} |" for r, m in report["per_rank"].items()]
    return "\n".join(lines) + "\n"


def as_dict(config: TuneConfig) -> dict:
    return asdict(config)
