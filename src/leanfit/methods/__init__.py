"""Adaptation methods: one file per family, each registered by name (see registry.py)."""

from . import adapters, adaptive, bone, compacter, hydra, lora, mos, scaling, sparse, spectral  # noqa: F401  (registration)
from .adapters import Bottleneck
from .adaptive import AdaLoRA, IncreLoRA
from .base import AdapterModule, Capabilities, Cost, MethodConfig, layer_kind
from .bone import Bone
from .compacter import Compacter
from .hydra import Hydra
from .lora import LoRA, DyLoRA, LoRASB
from .mos import MoS
from .registry import config_from_dict, method_names, module_class, register
from .scaling import IA3, SSF, BitFit
from .sparse import S2FT, SFT, PaCA
from .spectral import HUT, WHT

__all__ = [
    "AdapterModule", "Capabilities", "Cost", "MethodConfig", "layer_kind",
    "LoRA", "DyLoRA", "LoRASB", "Bottleneck", "IA3", "SSF", "BitFit",
    "AdaLoRA", "IncreLoRA", "Compacter", "Hydra", "Bone", "MoS", "S2FT", "PaCA", "SFT", "HUT", "WHT",
    "config_from_dict", "method_names", "module_class", "register",
]
