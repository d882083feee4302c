"""The HTTP face of the engine: an OpenAI-compatible FastAPI app, its metrics, and `run`.

Handlers only translate: they check the key and the adapter name, queue a job on the engine and turn
its events into OpenAI-shaped JSON or server-sent events. Every error body is OpenAI's
`{"error": {"message", "type", "param", "code"}}`, with the status saying whose fault it was: 401 no or
wrong key, 404 unknown adapter, 409 adapter of another base model, 422 malformed body, 400 an option or
endpoint this model cannot serve. /metrics and /health need no key, so a scraper or probe needs none.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import prometheus_client as prom
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import AdapterError, ArtifactError, BaseModelMismatchError, ConfigError
from . import protocol as p
from .engine import CAUSAL_LM, EMBEDDING, Engine, EngineStopped
from .registry import InvalidAdapterNameError, UnknownAdapterError, UnservableAdapterError

UNKNOWN = "<unknown>"  # metrics label of names not in the registry (bounded label cardinality)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.code = status, type_, code


def _api_error(err: Exception) -> ApiError:
    """The HTTP status and OpenAI error type of an exception raised by the engine or the registry."""
    if isinstance(err, ApiError):
        return err
    table = [(InvalidAdapterNameError, 400, "invalid_request_error", "invalid_adapter_name"),
             (UnknownAdapterError, 404, "invalid_request_error", "model_not_found"),
             (BaseModelMismatchError, 409, "invalid_request_error", "base_model_mismatch"),
             (UnservableAdapterError, 400, "invalid_request_error", "adapter_not_servable"),
             (AdapterError, 404, "invalid_request_error", "model_not_found"),
             (ConfigError, 400, "invalid_request_error", None),
             (ArtifactError, 500, "server_error", "adapter_corrupt"),
             (EngineStopped, 503, "server_error", "shutting_down")]
    for kind, status, type_, code in table:
        if isinstance(err, kind):
            return ApiError(status, str(err), type_, code)
    return ApiError(500, f"Internal error ({type(err).__name__}: {err}).", "server_error")


class Metrics:
    """Prometheus metrics in their own registry, so several apps can live in one process (tests)."""

    def __init__(self, engine: Engine):
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("leanfit_requests", "Requests by adapter, endpoint and HTTP status.",
                                     ["adapter", "endpoint", "status"], registry=self.registry)
        self.latency = prom.Histogram("leanfit_request_latency_seconds", "Request latency by adapter.",
                                      ["adapter"], registry=self.registry,
                                      buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.batch_size = prom.Histogram("leanfit_batch_size", "Rows per forward batch.", registry=self.registry,
                                         buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        prom.Gauge("leanfit_queue_depth", "Jobs waiting for the worker.",
                   registry=self.registry).set_function(lambda: engine.queue_depth)
        prom.Gauge("leanfit_resident_adapters", "Adapters loaded in the model.",
                   registry=self.registry).set_function(lambda: len(engine.registry.resident()))
        prom.Gauge("leanfit_resident_adapter_bytes", "Tensor bytes of the loaded adapters.",
                   registry=self.registry).set_function(engine.registry.resident_bytes)
        engine.on_batch = self.batch_size.observe

    def observe(self, adapter: str, endpoint: str, status: int, started: float) -> None:
        self.requests.labels(adapter, endpoint, str(status)).inc()
        self.latency.labels(adapter).observe(time.perf_counter() - started)


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
        where = "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors())
        return JSONResponse(p.error_body(f"Malformed request ({where}).", "invalid_request_error",
                                         "invalid_request"), status_code=422)

    @app.exception_handler(HTTPException)
    async def _on_http(_request, err: HTTPException):
        return JSONResponse(p.error_body(str(err.detail), "invalid_request_error"), status_code=err.status_code)

    async def call(job_kind: str, endpoint: str, body: p._Request, payload) -> tuple[str | None, object]:
        """Queue a job for `body.model` and wait until it has started; errors become ApiError."""
        started = time.perf_counter()
        label = body.model
        try:
            if body.unsupported():
                raise ApiError(400, f"Options {body.unsupported()} are not supported by this server; leave them "
                                    "out.", "invalid_request_error", "unsupported_option")
            wanted = EMBEDDING if job_kind == "embed" else CAUSAL_LM
            if engine.task != wanted:
                raise ApiError(400, f"Model '{engine.model_name}' serves {engine.task}, not {endpoint}; use the "
                                    "matching endpoint.", "invalid_request_error", "wrong_endpoint")
            adapter = engine.adapter_of(body.model)
            job = engine.submit(job_kind, adapter, payload(adapter))
            kind, value = await job.events.get()
            if kind == "error":
                raise value
            return job, started
        except Exception as err:
            api = _api_error(err)
            if api.status == 404 or isinstance(err, InvalidAdapterNameError):
                label = UNKNOWN
            metrics.observe(label, endpoint, api.status, started)
            raise api from None

    async def finish(job, endpoint: str, model: str, started: float):
        """Wait for the job's result, skipping stream deltas."""
        while True:
            kind, value = await job.events.get()
            if kind == "done":
                metrics.observe(model, endpoint, 200, started)
                return value
            if kind == "error":
                api = _api_error(value)
                metrics.observe(model, endpoint, api.status, started)
                raise api

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(prom.generate_latest(metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> p.ModelList:
        resident = set(engine.registry.resident())
        cards = [p.ModelCard(id=engine.model_name)]
        cards += [p.ModelCard(id=n, parent=engine.model_name, resident=n in resident)
                  for n in engine.registry.available()]
        return p.ModelList(data=cards)

    @app.post("/v1/adapters/load", dependencies=[Depends(check_key)])
    async def load_adapter(body: p.AdapterRequest):
        return await control("load", body.name)

    @app.post("/v1/adapters/unload", dependencies=[Depends(check_key)])
    async def unload_adapter(body: p.AdapterRequest):
        return await control("unload", body.name)

    async def control(kind: str, name: str):
        try:
            if name == engine.model_name:
                raise ApiError(400, f"'{name}' is the base model, not an adapter.", "invalid_request_error")
            engine.adapter_of(name)
            job = engine.submit(kind, name)
            event, value = await job.events.get()
            if event == "error":
                raise value
        except Exception as err:
            raise _api_error(err) from None
        return {"object": "adapter", "id": name, "changed": bool(value),
                "resident": name in engine.registry.resident()}

    @app.post("/v1/embeddings", dependencies=[Depends(check_key)])
    async def embeddings(body: p.EmbeddingRequest) -> p.EmbeddingResponse:
        job, started = await call("embed", "embeddings", body, lambda _a: engine.check_rows(body.rows()))
        result = await finish(job, "embeddings", body.model, started)
        data = []
        for i, vector in enumerate(result["vectors"]):
            if body.dimensions is not None and body.dimensions < len(vector):
                head = np.asarray(vector[:body.dimensions], dtype=np.float32)  # Matryoshka-style truncation
                vector = (head / max(float(np.linalg.norm(head)), 1e-12)).tolist()
            if body.encoding_format == "base64":
                vector = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
            data.append(p.Embedding(index=i, embedding=vector))
        usage = p.Usage(prompt_tokens=result["prompt_tokens"], total_tokens=result["prompt_tokens"])
        return p.EmbeddingResponse(data=data, model=body.model, usage=usage)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: p.CompletionRequest):
        def params(_adapter):
            rows = [engine.tokenizer(x)["input_ids"] if isinstance(x, str) else list(x) for x in body.prompts()]
            return engine.generation_params([r for r in rows for _ in range(body.n)], body.max_tokens or 16,
                                            body.temperature, body.top_p, body.stop_list(), body.seed)
        return await respond(body, "completions", params, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: p.ChatCompletionRequest):
        def params(_adapter):
            text = engine.tokenizer.apply_chat_template(body.chat(), tokenize=False, add_generation_prompt=True)
            ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
            return engine.generation_params([ids] * body.n, body.max_completion_tokens or body.max_tokens,
                                            body.temperature, body.top_p, body.stop_list(), body.seed)
        return await respond(body, "chat_completions", params, chat=True)

    async def respond(body, endpoint: str, params, chat: bool):
        job, started = await call("generate", endpoint, body, params)
        if body.stream:
            return StreamingResponse(_sse(job, body, endpoint, chat, metrics, started),
                                     media_type="text/event-stream")
        result = await finish(job, endpoint, body.model, started)
        usage = p.Usage(prompt_tokens=result["prompt_tokens"], completion_tokens=result["completion_tokens"],
                        total_tokens=result["prompt_tokens"] + result["completion_tokens"])
        if chat:
            choices = [p.ChatChoice(index=c["index"], message=p.ChatMessageOut(content=c["text"]),
                                    finish_reason=c["finish_reason"]) for c in result["choices"]]
            return p.ChatCompletionResponse(model=body.model, choices=choices, usage=usage)
        return p.CompletionResponse(model=body.model, usage=usage,
                                    choices=[p.CompletionChoice(**c) for c in result["choices"]])

    return app


async def _sse(job, body, endpoint: str, chat: bool, metrics: Metrics, started: float):
    """Server-sent events: one `data: {json}` per text delta, a last chunk per choice, `data: [DONE]`."""
    chunk = p.StreamChunks(chat, body.model)

    status = 499  # client closed the stream before the end
    try:
        if chat:
            for i in range(body.n):
                yield chunk(i, "", first=True)
        while True:
            kind, value = await job.events.get()
            if kind == "delta":
                yield chunk(value[0], value[1])
            elif kind == "error":
                api = _api_error(value)
                status = api.status
                yield f"data: {json.dumps(p.error_body(str(api), api.type, api.code))}\n\n"
                break
            elif kind == "done":
                for c in value["choices"]:
                    yield chunk(c["index"], None if chat else "", c["finish_reason"])
                options = getattr(body, "stream_options", None)
                if options is not None and options.include_usage:
                    pt, ct = value["prompt_tokens"], value["completion_tokens"]
                    yield chunk(-1, None, usage=p.Usage(prompt_tokens=pt, completion_tokens=ct,
                                                        total_tokens=pt + ct))
                status = 200
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # a client that went away stops its rows at the next step
        metrics.observe(body.model, endpoint, status, started)


def run(model, registry: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
        task: str | None = None, max_adapters: int = 32, max_adapter_bytes: int | None = None,
        max_batch_size: int = 32, batch_window_ms: float = 5.0, log_level: str = "info") -> None:
    """Serve `model` (zoo name, local Hugging Face folder, or a (module, tokenizer) pair) with the
    adapters of directory `registry` until interrupted. `task` is "embedding" or "causal-lm" (default:
    causal-lm for causal LMs, else embedding)."""
    import os

    import uvicorn

    from .registry import AdapterRegistry

    api_key = api_key or os.environ.get("LEANFIT_API_KEY") or None
    adapters = AdapterRegistry(registry, max_adapters=max_adapters, max_bytes=max_adapter_bytes)
    if isinstance(model, tuple):
        network, tokenizer = model
        name = getattr(network.config, "_name_or_path", None) or type(network).__name__
    else:
        from ..zoo.models import model as zoo_model

        task = task or _default_task(str(model))
        network, tokenizer = zoo_model(model, task=task)
        name = Path(str(model)).name
    engine = Engine(network, tokenizer, adapters, model_name=name, task=task, max_batch_size=max_batch_size,
                    batch_window_s=batch_window_ms / 1000)
    uvicorn.run(create_app(engine, api_key), host=host, port=port, log_level=log_level)


def _default_task(model: str) -> str:
    from ..zoo.models import MODELS

    if model in MODELS:
        return CAUSAL_LM if "causal-lm" in MODELS[model].tasks else EMBEDDING
    config = Path(model) / "config.json"
    archs = json.loads(config.read_text()).get("architectures", []) if config.is_file() else []
    return CAUSAL_LM if any(a.endswith("ForCausalLM") for a in archs) else EMBEDDING
