"""Hugging Face PEFT's on-disk LoRA format: export leanfit LoRA adapters, import PEFT LoRA adapters.

A PEFT LoRA adapter is a directory with `adapter_config.json` (a LoraConfig) and
`adapter_model.safetensors`, whose keys (as peft 0.21's get_peft_model_state_dict writes them) are
- `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` for Linear and Conv2d layers,
- `base_model.model.<module>.lora_embedding_A` / `.lora_embedding_B` for Embedding layers,
- `base_model.model.<module>.<key>` for each tensor of a `modules_to_save` module (e.g. the head),
- `base_model.model.<module>.base_layer.weight`: a copy of a targeted embedding's base weight.
Both sides compute h = W x + s B A x with s = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA) and
the same factor layouts, so converting is mostly renaming keys, plus:
- Conv2d factors are 4-D in PEFT (A: r x in x kh x kw, B: out x r x 1 x 1), flattened in leanfit;
- DyLoRA exports at its current eval rank b: A[:b], B[:, :b], r = b;
- PiSSA-init LoRA, s (B A - B0 A0), exports as the exact rank-2r LoRA A' = [A; A0], B' = [B, -B0],
  with lora_alpha rescaled so that s is unchanged;
- LoRA-SB, alpha B R A, exports as the rank-r LoRA A' = R A, B' = B.
peft itself is not imported here; the tests check both directions against the real library.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from ..errors import ArtifactError, ConfigError
from ..io import atomic_write_bytes
from ..methods.base import CONV2D, EMBEDDING, LINEAR, layer_kind
from ..methods.lora import LoRA
from .fingerprint import base_parameters
from .hosts import AdapterHost
from .inject import candidate_layers
from .model import adapt, adapter_modules, adapters, delete, spec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
PREFIX = "base_model.model."
EXPORTABLE = ("lora", "dylora", "lora-sb")
# PEFT adds these to modules_to_save for SEQ_CLS *before* injecting, so they also guard the targets.
SEQ_CLS_HEADS = ["classifier", "score"]
TASK_TYPES = (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
              ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))
# PEFT key tail -> (leanfit factor, layer kinds it belongs to).
LORA_KEYS = {".lora_A.weight": ("A", (LINEAR, CONV2D)), ".lora_B.weight": ("B", (LINEAR, CONV2D)),
             ".lora_embedding_A": ("A", (EMBEDDING,)), ".lora_embedding_B": ("B", (EMBEDDING,))}
# LoraConfig options that change the update beyond plain LoRA (peft marks most as `is_lora_variant`).
VARIANTS = ("use_dora", "velora_config", "alora_invocation_tokens", "monteclora_config", "use_bdlora",
            "arrow_config", "kasa_config", "use_qalora", "lora_bias", "layer_replication",
            "target_parameters", "trainable_token_indices")


# ---------------------------------------------------------------- export

def export_peft(model: nn.Module, path: str | Path, name: str | None = None,
                base_model_name_or_path: str | None = None) -> Path:
    """Write LoRA-family adapter `name` (the only adapter if not given) as a PEFT LoRA adapter
    directory that `peft.PeftModel.from_pretrained(base, path)` loads to the same function."""
    name = name or _only_adapter(model)
    s = spec(model, name)
    if s.config.method not in EXPORTABLE:
        raise ConfigError(f"Adapter '{name}' uses method '{s.config.method}', but only the LoRA family "
                          f"({', '.join(EXPORTABLE)}) exports to PEFT; use it in leanfit's own format (lf.load, leanfit eval / serve).")
    tensors, ranks, alphas, use_rslora = {}, set(), set(), False
    for host, module in adapter_modules(model, name).items():
        base = model.get_submodule(host).base_layer
        a, b, alpha, use_rslora = _peft_factors(module.method_module)
        ranks.add(a.shape[0])
        alphas.add(alpha)
        tensors.update(_peft_layer_tensors(host, base, a, b))
    if len(ranks) > 1 or len(alphas) > 1:
        raise ConfigError(f"Adapter '{name}' has different ranks or scalings per layer ({sorted(ranks)}), which "
                          "this PEFT export does not write yet; use one rank for every layer.")
    for head in s.train_modules:
        for key, t in model.get_submodule(head).state_dict().items():
            tensors[f"{PREFIX}{head}.{key}"] = t
    task_type = _task_type(model)
    guard = list(s.train_modules) + (SEQ_CLS_HEADS if task_type == "SEQ_CLS" else [])
    (alpha,) = alphas
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": str(base_model_name_or_path or _name_or_path(model) or "") or None,
        "r": ranks.pop(),
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": float(getattr(s.config, "dropout", 0.0)),
        "use_rslora": use_rslora,
        "target_modules": _target_modules(model, s.targets, guard),
        "modules_to_save": list(s.train_modules) or None,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    path = Path(path)
    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # both files serialised before either is written: a failure leaves an earlier export whole
    weights, text = safetensors.torch.save(payload), (json.dumps(config, indent=2) + "\n").encode()
    atomic_write_bytes(path / WEIGHTS_FILE, weights)
    atomic_write_bytes(path / CONFIG_FILE, text)
    return path


@torch.no_grad()
def _peft_factors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float, bool]:
    """(A, B, lora_alpha, use_rslora) of a plain LoRA whose update equals this adapter's exactly."""
    config = module.config
    if config.method == "lora-sb":
        r = module.lora_R.shape[0]
        return module.lora_R @ module.lora_A, module.lora_B, config.alpha * r, False
    rank = getattr(module, "eval_rank", config.rank)  # DyLoRA: the rank in use
    a, b = module.lora_A[:rank], module.lora_B[:, :rank]
    if hasattr(module, "lora_A0"):  # PiSSA: s (B A - B0 A0) = s [B, -B0] [A; A0]
        a = torch.cat([a, module.lora_A0])
        b = torch.cat([b, -module.lora_B0], dim=1)
    new_rank = a.shape[0]
    if new_rank == rank:
        alpha = config.alpha
    elif config.use_rslora:
        alpha = config.alpha * math.sqrt(new_rank) / math.sqrt(rank)
    else:
        alpha = config.alpha * new_rank / rank
    return a, b, alpha, config.use_rslora


def _peft_layer_tensors(host: str, base: nn.Module, a: torch.Tensor, b: torch.Tensor) -> dict:
    kind = layer_kind(base)
    if kind == EMBEDDING:
        return {f"{PREFIX}{host}.lora_embedding_A": a, f"{PREFIX}{host}.lora_embedding_B": b}
    if kind == CONV2D:
        if tuple(base.dilation) != (1, 1):
            raise ConfigError(f"Layer '{host}' is a dilated Conv2d, whose LoRA PEFT computes without the "
                              "dilation; exclude it from the targets to export to PEFT.")
        if type(base).forward is not nn.Conv2d.forward:  # e.g. EfficientNet's static "same" padding
            raise ConfigError(f"Layer '{host}' is a {type(base).__name__}, a Conv2d with its own forward, and PEFT "
                              "builds its LoRA factor as that class, which computes something else; exclude it "
                              "from the targets to export to PEFT.")
        a = a.reshape(a.shape[0], *base.weight.shape[1:])
        b = b.reshape(*b.shape, 1, 1)
    return {f"{PREFIX}{host}.lora_A.weight": a, f"{PREFIX}{host}.lora_B.weight": b}


def _module_names(model: nn.Module) -> list[str]:
    """The model's module names as PEFT would see the bare model (a host stands for its base layer)."""
    inside = [n + "." for n, m in model.named_modules() if isinstance(m, AdapterHost)]
    return [n for n, _ in model.named_modules() if not any(n.startswith(h) for h in inside)]


def _peft_selects(names: list[str], target_modules: list[str], modules_to_save: list[str]) -> set[str]:
    """The modules PEFT's check_target_module_exists picks for a list of targets."""
    guards = [re.compile(rf"(^|.*\.){m}($|\..*)") for m in modules_to_save]
    return {key for key in names if not any(g.match(key) for g in guards)
            and (key in target_modules or any(key.endswith("." + t) for t in target_modules))}


def _target_modules(model: nn.Module, targets: list[str], guard: list[str]) -> list[str]:
    """Suffix names (e.g. ["query", "value"]) when they pick exactly `targets` in PEFT, else full names."""
    names = _module_names(model)
    suffixes = sorted({t.rsplit(".", 1)[-1] for t in targets})
    for candidate in (suffixes, sorted(targets)):
        if _peft_selects(names, candidate, guard) == set(targets):
            return candidate
    raise ConfigError("PEFT would not adapt exactly this adapter's layers (some lie inside modules_to_save "
                      f"{guard}); exclude those layers or drop those train_modules to export to PEFT.")


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in TASK_TYPES:
        if cls.endswith(suffix):
            return task
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    return None


def _name_or_path(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def _only_adapter(model: nn.Module) -> str:
    names = list(adapters(model))
    if len(names) != 1:
        raise ConfigError(f"The model has adapters {names or 'none'}; name the one to export.")
    return names[0]


# ---------------------------------------------------------------- import

def import_peft(model: nn.Module, path: str | Path, name: str | None = None) -> str:
    """Add the PEFT LoRA adapter at `path` to `model` (a plain, unwrapped model) as leanfit LoRA adapter
    `name` (default "default"), weights and modules_to_save included; returns the name."""
    path, name = Path(path), name or "default"
    config, config_file = _read_config(path)
    tensors, weights_file = _read_weights(path)
    factors, rest = _split_lora_tensors(tensors, weights_file)
    layers = candidate_layers(model)
    _check_layers(model, layers, factors, weights_file, config)
    rank, alpha = _uniform_rank_alpha(config, list(factors), config_file)
    _check_factor_shapes(layers, factors, rank, weights_file)
    heads = _head_states(model, rest, config, weights_file)
    exact = "|".join(re.escape(t) for t in factors)
    lora = LoRA(rank=rank, alpha=float(alpha), dropout=float(config.get("lora_dropout") or 0.0),
                use_rslora=bool(config.get("use_rslora", False)))
    s = adapt(model, lora, targets=f"(?:{exact})", name=name, train_modules=list(heads))
    if set(s.targets) != set(factors):
        delete(model, name)
        inside = sorted(set(factors) - set(s.targets))
        raise ArtifactError(f"'{weights_file}' adapts layers {inside[:3]} inside its own modules_to_save, which "
                            "leanfit trains in full instead; remove them from the adapter to import it.")
    with torch.no_grad():
        for host, module in adapter_modules(model, name).items():
            module.lora_A.copy_(factors[host]["A"].reshape(module.lora_A.shape))
            module.lora_B.copy_(factors[host]["B"].reshape(module.lora_B.shape))
        for head, state in heads.items():
            model.get_submodule(head).load_state_dict(state)
    return name


def _read_config(path: Path) -> tuple[dict, Path]:
    file = path / CONFIG_FILE
    if not file.is_file():
        hint = " (it looks like a leanfit adapter: use lf.load)" if (path / "adapter.json").exists() else ""
        raise ArtifactError(f"No PEFT adapter at '{path}': {CONFIG_FILE} is missing{hint}; pass a directory "
                            "written by PEFT's save_pretrained.")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"The PEFT config '{file}' is corrupt ({err.__class__.__name__}); "
                            "save the adapter again.") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"The PEFT config '{file}' is not a JSON object; save the adapter again.")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ArtifactError(f"'{file}' describes a PEFT {peft_type} adapter, but only LORA adapters can be "
                            "imported; train a LoRA adapter or load this one with peft.")
    if config.get("use_dora"):
        raise ArtifactError(f"'{file}' is a DoRA adapter (use_dora is true), which leanfit cannot import yet; "
                            "use a plain LoRA adapter or load this one with peft.")
    used = [v for v in VARIANTS if config.get(v)]
    if used:
        raise ArtifactError(f"'{file}' uses the LoRA option(s) {', '.join(used)}, which leanfit cannot import; "
                            "use a plain LoRA adapter or load this one with peft.")
    return config, file


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    file = path / WEIGHTS_FILE
    try:
        if file.is_file():
            return safetensors.torch.load(file.read_bytes()), file
        file = path / PICKLE_WEIGHTS_FILE
        if file.is_file():
            tensors = torch.load(file, map_location="cpu", weights_only=True)
            if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
                raise ValueError("not a dictionary of tensors")
            return tensors, file
    except Exception as err:  # safetensors and torch.load raise their own error types
        raise ArtifactError(f"The PEFT weights '{file}' cannot be read ({err.__class__.__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); save the adapter again.") from None
    raise ArtifactError(f"The PEFT adapter at '{path}' has no {WEIGHTS_FILE} (nor {PICKLE_WEIGHTS_FILE}); "
                        "copy the whole adapter directory.")


def _split_lora_tensors(tensors: dict, file: Path) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """({layer: {"A", "B", "kinds"}}, other tensors), keys without PEFT's `base_model.model.` prefix."""
    factors: dict[str, dict] = {}
    rest = {}
    for key, t in tensors.items():
        key = key.removeprefix(PREFIX)
        tail = next((tail for tail in LORA_KEYS if key.endswith(tail)), None)
        if tail is not None:
            factor, kinds = LORA_KEYS[tail]
            entry = factors.setdefault(key[: -len(tail)], {"kinds": kinds})
            entry[factor] = t
        elif ".lora_" in key:
            raise ArtifactError(f"'{file}' holds '{key}', a tensor of a LoRA variant (DoRA, LoRA bias, ...) that "
                                "leanfit cannot import; use a plain LoRA adapter.")
        else:
            rest[key] = t
    for layer, entry in factors.items():
        if "A" not in entry or "B" not in entry:
            raise ArtifactError(f"'{file}' has only lora_{'B' if 'A' not in entry else 'A'} for layer '{layer}'; "
                                "save the adapter again.")
    if not factors:
        raise ArtifactError(f"'{file}' holds no LoRA weights (lora_A / lora_B); pass a PEFT LoRA adapter.")
    return factors, rest


def _check_layers(model, layers: dict, factors: dict, file: Path, config: dict) -> None:
    for name, entry in factors.items():
        if name not in layers:
            try:
                found = type(model.get_submodule(name)).__name__
            except AttributeError:
                raise ArtifactError(
                    f"'{file}' has LoRA weights for module '{name}', which this model lacks; import it into the "
                    f"base model it was trained on ({config.get('base_model_name_or_path') or 'unnamed'}).") from None
            raise ArtifactError(f"'{file}' adapts '{name}', a {found}, but leanfit adapts only Linear, Conv2d "
                                "and Embedding layers; use a base model with those layers.")
        base = layers[name]
        kind = layer_kind(base)
        if kind not in entry["kinds"]:
            stored = "embedding" if EMBEDDING in entry["kinds"] else "Linear/Conv2d"
            raise ArtifactError(f"'{file}' stores layer '{name}' with {stored} LoRA keys, but it is a "
                                f"{type(base).__name__} in this model; use the base model it was trained on.")
        if kind == CONV2D and (tuple(base.dilation) != (1, 1) or base.groups != 1):
            raise ArtifactError(f"'{file}' adapts '{name}', a dilated or grouped Conv2d, which leanfit cannot "
                                "import from PEFT; remove that layer from the adapter.")


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (utils.other.get_pattern_key)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _uniform_rank_alpha(config: dict, names: list[str], file: Path) -> tuple[int, float]:
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    ranks, alphas = config.get("rank_pattern"), config.get("alpha_pattern")
    pairs = {(_pattern_value(ranks, n, r), _pattern_value(alphas, n, alpha)) for n in names}
    if len(pairs) > 1:
        raise ConfigError(f"'{file}' gives its layers different ranks or alphas (rank_pattern / alpha_pattern), "
                          "and per-layer ranks are not supported yet; use one rank and alpha for every layer.")
    rank, alpha = pairs.pop()
    return int(rank), alpha


def _expected_shapes(base: nn.Module, rank: int) -> tuple[tuple, tuple]:
    kind = layer_kind(base)
    if kind == EMBEDDING:
        return (rank, base.num_embeddings), (base.embedding_dim, rank)
    if kind == CONV2D:
        return (rank, *base.weight.shape[1:]), (base.out_channels, rank, 1, 1)
    return (rank, base.in_features), (base.out_features, rank)


def _check_factor_shapes(layers: dict, factors: dict, rank: int, file: Path) -> None:
    for name, entry in factors.items():
        want_a, want_b = _expected_shapes(layers[name], rank)
        got_a, got_b = tuple(entry["A"].shape), tuple(entry["B"].shape)
        if (got_a, got_b) != (want_a, want_b):
            raise ArtifactError(f"'{file}' has LoRA factors of shapes {got_a} and {got_b} for layer '{name}', but "
                                f"rank {rank} on this model needs {want_a} and {want_b}; use the base model it was "
                                "trained on.")


def _head_states(model: nn.Module, rest: dict, config: dict, file: Path) -> dict[str, dict]:
    """{module_to_save: its state} for the non-LoRA tensors; copies of unchanged base weights are skipped."""
    wanted = list(config.get("modules_to_save") or [])
    owners = [n for n in _module_names(model) if n and any(n == m or n.endswith("." + m) for m in wanted)]
    base = base_parameters(model)
    heads: dict[str, dict] = {}
    for key, t in rest.items():
        owner = next((o for o in owners if key.startswith(o + ".")), None)
        if owner is not None:
            heads.setdefault(owner, {})[key[len(owner) + 1:]] = t
            continue
        original = base.get(key.replace(".base_layer.", "."))
        same = (original is not None and original.shape == t.shape
                and torch.equal(original.detach().cpu(), t.to(original.dtype)))
        if not same:
            raise ArtifactError(f"'{file}' holds '{key}', which is neither a LoRA weight nor part of a "
                                "modules_to_save module of this model (a changed base weight, such as a resized "
                                "embedding?); import it into the base model it was trained on.")
    for head, state in heads.items():
        expected = model.get_submodule(head).state_dict()
        bad = sorted(k for k in set(expected) | set(state)
                     if k not in state or k not in expected or state[k].shape != expected[k].shape)
        if bad:
            raise ArtifactError(f"'{file}' does not fit module '{head}' of this model (tensors {bad[:3]} are "
                                "missing, extra or of another shape); use the base model it was trained on.")
    return heads


__all__ = ["export_peft", "import_peft"]
