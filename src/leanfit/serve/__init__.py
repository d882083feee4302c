"""Serve one base model with many adapters: OpenAI-compatible HTTP, mixed-adapter dynamic batching.

    from leanfit.serve import AdapterRegistry, Engine, create_app, run
    run("minilm", "adapters/", port=8000)          # or: leanfit serve --model minilm --adapters adapters/

FastAPI, uvicorn and prometheus-client are needed only here (the `serve` extra), so `app` is imported
on first use and `import leanfit.serve` stays light.
"""

from ..errors import UnknownAdapterError
from .engine import CAUSAL_LM, EMBEDDING, Engine
from .generation import GenerationParams
from .registry import AdapterRegistry, InvalidAdapterNameError, UnservableAdapterError


def __getattr__(name: str):
    if name in ("create_app", "run"):
        from . import app
        return getattr(app, name)
    raise AttributeError(f"module 'leanfit.serve' has no attribute {name!r}")


__all__ = ["AdapterRegistry", "Engine", "GenerationParams", "CAUSAL_LM", "EMBEDDING", "create_app", "run",
           "InvalidAdapterNameError", "UnknownAdapterError", "UnservableAdapterError"]
