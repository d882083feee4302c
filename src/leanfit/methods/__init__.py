"""Adaptation methods: one file per family, each registered by name (see registry.py)."""

from . import adapters, lora, scaling  # noqa: F401  (registration happens on import)
from .adapters import Bottleneck
from .base import AdapterModule, Capabilities, Cost, MethodConfig, layer_kind
from .lora import LoRA, DyLoRA, LoRASB
from .registry import config_from_dict, method_names, module_class, register
from .scaling import IA3, SSF, BitFit

__all__ = [
    "AdapterModule", "Capabilities", "Cost", "MethodConfig", "layer_kind",
    "LoRA", "DyLoRA", "LoRASB", "Bottleneck", "IA3", "SSF", "BitFit",
    "config_from_dict", "method_names", "module_class", "register",
]
