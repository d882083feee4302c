"""Training-time controllers that methods bring along (AdaLoRA's budget schedule, sparse
fine-tuning's drop-and-regrow, ...), driven by the trainer so a user cannot forget to call them.

A method opts in with a class attribute `controller_class` on its AdapterModule. The trainer builds
one controller per (controller class, adapter name) over all layers holding that adapter and calls:
- `after_backward(step)`: gradients of this step are in place (importance scores);
- `after_step(step, optimizer)`: the optimizer has stepped (prune, grow, regrow; reset optimizer
  state of the entries it changes).
`state_dict()` / `load_state_dict()` (optional) travel in checkpoints.
"""

from __future__ import annotations

from torch import nn

from ..core.hosts import AdapterHost


def build_controllers(model: nn.Module, total_steps: int) -> list:
    groups: dict[tuple, dict[str, nn.Module]] = {}
    for host_name, host in model.named_modules():
        if not isinstance(host, AdapterHost):
            continue
        for name, adapter in host.adapters.items():
            controller = getattr(adapter, "controller_class", None)
            trains = any(p.requires_grad for p in adapter.parameters())
            if controller is not None and trains:
                groups.setdefault((controller, name), {})[host_name] = adapter.method_module
    return [controller(modules, total_steps) for (controller, _), modules in groups.items()]
