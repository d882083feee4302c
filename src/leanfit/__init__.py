"""leanfit: adapt pretrained networks to new tasks within a budget.

    import leanfit as lf
    lf.adapt(model, lf.LoRA(rank=8), targets="all-linear", name="bbc")
    lf.save(model, "out/bbc"); lf.merge(model, "bbc"); lf.unwrap(model)
"""

import importlib

from .errors import LeanfitError

__version__ = "0.1.0"

# Every public name loads on first use (PEP 562), so `import leanfit` and the command line's help and
# argument errors do not wait ~1.5 s for torch.
_CORE = ("activate", "active", "adapt", "adapters", "calibrate", "deactivate", "delete", "find_targets",
         "fingerprint", "load", "merge", "save", "set_rank", "set_trainable", "trainable_parameters", "unmerge",
         "unwrap")
_METHODS = ("HUT", "AdaLoRA", "IncreLoRA", "IA3", "S2FT", "SFT", "SSF", "WHT", "BitFit", "Bone", "Bottleneck",
            "Compacter", "DyLoRA", "Hydra", "LoRA", "LoRASB", "MethodConfig", "MoS", "PaCA", "config_from_dict",
            "method_names")
_HOMES = {**dict.fromkeys(_CORE, ".core"), **dict.fromkeys(_METHODS, ".methods"), "Trainer": ".train"}
_MODULES = {"zoo": ".zoo", "data": ".data", "peft_format": ".core.peft_format"}

__all__ = ["LeanfitError", *_HOMES, *_MODULES]


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name], __name__)
    else:
        raise AttributeError(f"module 'leanfit' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted({*globals(), *__all__})
