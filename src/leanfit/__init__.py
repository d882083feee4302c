"""leanfit: adapt pretrained networks to new tasks within a budget.

    import leanfit as lf
    lf.adapt(model, lf.LoRA(rank=8), targets="all-linear", name="bbc")
    lf.save(model, "out/bbc"); lf.merge(model, "bbc"); lf.unwrap(model)
"""

from .core import (activate, active, adapt, adapters, calibrate, deactivate, delete, find_targets,
                   fingerprint, load, merge, save, set_rank, set_trainable, trainable_parameters,
                   unmerge, unwrap)
from .errors import LeanfitError
from .methods import (HUT, AdaLoRA, IncreLoRA, IA3, S2FT, SFT, SSF, WHT, BitFit, Bone, Bottleneck, Compacter, DyLoRA, Hydra, LoRA,
                      LoRASB, MethodConfig, MoS, PaCA, config_from_dict, method_names)

__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavier parts load on first use, so `import leanfit` stays quick.
    if name == "Trainer":
        from .train import Trainer
        return Trainer
    if name in ("zoo", "data", "peft_format"):
        import importlib
        return importlib.import_module(f".{name if name != 'peft_format' else 'core.peft_format'}", __name__)
    raise AttributeError(f"module 'leanfit' has no attribute {name!r}")
