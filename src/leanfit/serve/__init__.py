"""Serve one base model with many adapters: OpenAI-compatible HTTP, mixed-adapter dynamic batching.

    from leanfit.serve import AdapterRegistry, Engine, create_app, run
    run("minilm", "adapters/", port=8000)          # or: leanfit serve --model minilm --adapters adapters/

FastAPI, uvicorn and prometheus-client are needed only here (the `serve` extra); every name is
imported on first use, so `import leanfit.serve` stays light.
"""

import importlib

from ..errors import UnknownAdapterError

# Each name loads its module on first use (PEP 562): `leanfit serve --help` does not wait for torch.
_HOMES = {"Engine": ".engine", "CAUSAL_LM": ".engine", "EMBEDDING": ".engine", "GenerationParams": ".generation",
          "AdapterRegistry": ".registry", "InvalidAdapterNameError": ".registry",
          "UnservableAdapterError": ".registry", "create_app": ".app", "run": ".app"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'leanfit.serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    globals()[name] = value
    return value


__all__ = ["AdapterRegistry", "Engine", "GenerationParams", "CAUSAL_LM", "EMBEDDING", "create_app", "run",
           "InvalidAdapterNameError", "UnknownAdapterError", "UnservableAdapterError"]
