"""What every route shares: OpenAI-shaped errors with the right status, and queueing a job.

Every error body is OpenAI's `{"error": {"message", "type", "param", "code"}}`, with the status saying
whose fault it was: 401 no or wrong key, 404 unknown adapter, 409 adapter of another base model,
422 malformed body, 400 an option, adapter or endpoint this server cannot serve.
"""

from __future__ import annotations

import asyncio
import time

from ..errors import AdapterError, ArtifactError, BaseModelMismatchError, ConfigError, UnknownAdapterError
from .engine import CAUSAL_LM, EMBEDDING, Engine, EngineStopped
from .metrics import Metrics
from .registry import InvalidAdapterNameError, UnservableAdapterError

UNKNOWN = "<unknown>"  # metrics label of names not in the registry (bounded label cardinality)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.code = status, type_, code


_STATUS = [(InvalidAdapterNameError, 400, "invalid_request_error", "invalid_adapter_name"),
           (UnknownAdapterError, 404, "invalid_request_error", "model_not_found"),
           (BaseModelMismatchError, 409, "invalid_request_error", "base_model_mismatch"),
           (UnservableAdapterError, 400, "invalid_request_error", "adapter_not_servable"),
           (AdapterError, 400, "invalid_request_error", "adapter_not_servable"),
           (ConfigError, 400, "invalid_request_error", None),
           (ArtifactError, 500, "server_error", "adapter_corrupt"),
           (EngineStopped, 503, "server_error", "shutting_down")]


def api_error(err: Exception) -> ApiError:
    """The HTTP status and OpenAI error type of an exception raised by the engine or the registry."""
    if isinstance(err, ApiError):
        return err
    for kind, status, type_, code in _STATUS:
        if isinstance(err, kind):
            return ApiError(status, str(err), type_, code)
    return ApiError(500, f"Internal error ({type(err).__name__}: {err}).", "server_error")


class Dispatch:
    """Queues a request's job on the engine and waits for it, counting every outcome in the metrics."""

    def __init__(self, engine: Engine, metrics: Metrics):
        self.engine, self.metrics = engine, metrics

    async def start(self, job_kind: str, endpoint: str, body, payload, request=None):
        """Queue a job for `body.model` and wait until it has started; returns (job, start time). With the
        `request`, a client that goes away cancels its job (see `next_event`)."""
        engine, started, label = self.engine, time.perf_counter(), body.model
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
            kind, value = await next_event(job, request)
            if kind == "error":
                raise value
            return job, started
        except Exception as err:
            api = api_error(err)
            if api.status == 404 or isinstance(err, InvalidAdapterNameError):
                label = UNKNOWN
            self.metrics.observe(label, endpoint, api.status, started)
            raise api from None

    async def finish(self, job, endpoint: str, model: str, started: float, request=None):
        """Wait for the job's result, skipping stream deltas."""
        while True:
            try:
                kind, value = await next_event(job, request)
            except ApiError as err:  # the client went away
                self.metrics.observe(model, endpoint, err.status, started)
                raise
            if kind == "done":
                self.metrics.observe(model, endpoint, 200, started)
                return value
            if kind == "error":
                api = api_error(value)
                self.metrics.observe(model, endpoint, api.status, started)
                raise api


DISCONNECT_POLL_S = 0.2


async def next_event(job, request=None):
    """The job's next event; if the client of `request` disconnects first, the job is cancelled (its
    rows stop at the next step, or it never runs) and a 499 is raised: otherwise a long generation
    nobody waits for would hold the batch, and every other request behind it."""
    if request is None:
        return await job.events.get()
    event = asyncio.ensure_future(job.events.get())
    try:
        while True:
            done, _ = await asyncio.wait({event}, timeout=DISCONNECT_POLL_S)
            if done:
                return event.result()
            if await request.is_disconnected():
                job.cancelled = True
                raise ApiError(499, "The client closed the request.", "client_closed_request")
    finally:
        event.cancel()
