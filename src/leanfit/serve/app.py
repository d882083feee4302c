"""The HTTP face of the engine: an OpenAI-compatible FastAPI app, and `run`, which serves it.

Routes live with their family (routes_inference.py, routes_adapters.py); what they share (errors,
dispatch) is in http.py. /metrics and /health need no key, so a scraper or probe needs none.
"""

from __future__ import annotations

import json
import secrets
import socket
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from ..errors import ConfigError
from . import protocol as p
from .engine import CAUSAL_LM, EMBEDDING, Engine
from .http import ApiError, Dispatch
from .metrics import Metrics
from .routes_adapters import adapter_routes
from .routes_inference import inference_routes

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine`; the engine's worker runs while the app does."""

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="leanfit multi-adapter server", lifespan=lifespan)
    metrics = Metrics(engine)
    app.state.engine, app.state.metrics = engine, metrics

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and secrets.compare_digest(given[7:].encode(), api_key.encode())):
            raise ApiError(401, "Missing or wrong API key; send 'Authorization: Bearer <key>'.",
                           "invalid_request_error", "invalid_api_key")

    @app.exception_handler(ApiError)
    async def _on_api_error(_request, err: ApiError):
        return JSONResponse(p.error_body(str(err), err.type, err.code), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(_request, err: RequestValidationError):
        broken = next((e for e in err.errors() if e.get("type") == "json_invalid"), None)
        if broken is not None:  # pydantic names only "JSON decode error" and the character where it stopped
            message = (f"Malformed request: the body is not valid JSON (it breaks at character {broken['loc'][-1]}); "
                       "send one JSON object, e.g. {\"model\": \"NAME\", \"input\": \"text\"}.")
        else:
            where = "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors())
            message = f"Malformed request ({where})."
        return JSONResponse(p.error_body(message, "invalid_request_error", "invalid_request"), status_code=422)

    @app.exception_handler(HTTPException)
    async def _on_http(_request, err: HTTPException):
        message = str(err.detail)
        if message == "There was an error parsing the body":  # FastAPI's words for a body it cannot decode
            message = "The request body cannot be read: send one JSON object encoded as UTF-8."
        return JSONResponse(p.error_body(message, "invalid_request_error"), status_code=err.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(metrics.exposition(), media_type=metrics.content_type)

    keyed = [Depends(check_key)]
    app.include_router(adapter_routes(engine, keyed))
    app.include_router(inference_routes(Dispatch(engine, metrics), keyed))
    return app


def run(model, registry: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
        task: str | None = None, max_adapters: int = 32, max_adapter_bytes: int | None = None,
        max_batch_size: int = 32, batch_window_ms: float = 5.0, log_level: str = "info",
        hot_merge: bool = True) -> None:
    """Serve `model` (zoo name, local Hugging Face folder, or a (module, tokenizer) pair) with the
    adapters of directory `registry` until interrupted (SIGINT / SIGTERM stop it cleanly). `task` is
    "embedding" or "causal-lm" (default: causal-lm for causal LMs, else embedding). The port is taken
    before the model loads, so a port in use fails at once."""
    import os

    import uvicorn

    from .registry import AdapterRegistry

    if max_batch_size < 1 or batch_window_ms < 0:
        raise ConfigError(f"max_batch_size must be >= 1 and batch_window_ms >= 0, got {max_batch_size} and "
                          f"{batch_window_ms}.")
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"Unknown log level {log_level!r}; use one of {', '.join(LOG_LEVELS)}.")
    if task not in (None, EMBEDDING, CAUSAL_LM):
        raise ConfigError(f"Unknown task {task!r} for serving; use {EMBEDDING} or {CAUSAL_LM}.")
    api_key = api_key or os.environ.get("LEANFIT_API_KEY") or None
    adapters = AdapterRegistry(registry, max_adapters=max_adapters, max_bytes=max_adapter_bytes)
    sock = listen(host, port)
    try:
        if isinstance(model, tuple):
            network, tokenizer = model
            name = getattr(network.config, "_name_or_path", None) or type(network).__name__
        else:
            from ..zoo.models import model as zoo_model

            task = task or _default_task(str(model))
            network, tokenizer = zoo_model(model, task=task)
            name = Path(str(model)).name
        engine = Engine(network, tokenizer, adapters, model_name=name, task=task, max_batch_size=max_batch_size,
                        batch_window_s=batch_window_ms / 1000, hot_merge=hot_merge)
        config = uvicorn.Config(create_app(engine, api_key), log_level=log_level)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; a port in use or a bad address is the user's mistake."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"Port {port} is out of range; use 1-65535 (0 picks a free one).")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as err:
        reason = "it is in use" if getattr(err, "errno", None) == 98 else (err.strerror or str(err))
        raise ConfigError(f"Cannot listen on {host}:{port} ({reason}); pick another --host or --port.") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _default_task(model: str) -> str:
    from ..zoo.models import MODELS

    if model in MODELS:
        return CAUSAL_LM if CAUSAL_LM in MODELS[model].tasks else EMBEDDING
    config = Path(model) / "config.json"
    archs = json.loads(config.read_text()).get("architectures", []) if config.is_file() else []
    return CAUSAL_LM if any(a.endswith("ForCausalLM") for a in archs) else EMBEDDING
