"""The serving engine: one worker thread owns the model; requests arriving together share one batch.

Why a thread and not the event loop: a forward pass blocks for milliseconds to seconds, and adapter
loads change the model's modules, so exactly one thread may touch the model. Request handlers put a
`Job` on a thread-safe queue and await its events on their own asyncio queue (the worker hands them
over with `call_soon_threadsafe`). The worker takes the first job, waits a short window (a few ms)
for more, makes every needed adapter resident (loading and evicting between batches), then runs all
rows in one mixed-adapter forward pass (`core.batching`; generation in serve/generation.py). Loads
and unloads asked for by the API are queued like requests, so they too run between batches and never
fail a running one. A batch that uses a single adapter may run with it merged (`HotAdapter`): every
step of a generation, or from the second batch of that adapter in a row.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.batching import HotAdapter, forward_mixed
from ..core.model import adapters
from ..errors import ConfigError
from .generation import GenerationParams, generate
from .registry import AdapterRegistry

EMBEDDING, CAUSAL_LM = "embedding", "causal-lm"


class EngineStopped(RuntimeError):
    """The engine was stopped before the job ran."""


@dataclass
class Job:
    """One request (or one load/unload command) and the way back to its handler.

    Events are (kind, value): ("started", None) once its adapter is resident, ("delta", (choice, text))
    while generating, ("done", result) or ("error", exception)."""

    kind: str  # "embed" | "generate" | "load" | "unload"
    adapter: str | None
    payload: Any
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def emit(self, kind: str, value=None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Engine:
    """Runs embeddings or generation for a base model plus the adapters of a registry."""

    def __init__(self, model: nn.Module, tokenizer, registry: AdapterRegistry, model_name: str = "base",
                 task: str | None = None, max_batch_size: int = 32, batch_window_s: float = 0.005,
                 max_length: int = 512, on_batch: Callable[[int], None] | None = None, hot_merge: bool = True):
        if adapters(model):
            raise ConfigError(f"The model already holds adapters {sorted(adapters(model))}; pass the bare base "
                              "model and let the registry load adapters.")
        self.model, self.tokenizer, self.registry = model.eval(), tokenizer, registry
        self.model_name = model_name
        self.task = task or (CAUSAL_LM if type(model).__name__.endswith("ForCausalLM") else EMBEDDING)
        self.max_batch_size, self.batch_window_s, self.max_length = max_batch_size, batch_window_s, max_length
        self.on_batch = on_batch  # called with each batch's row count (metrics)
        self.hot = HotAdapter(model) if hot_merge else None
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    # -- life --
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="leanfit-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout)
        self._thread = None

    @property
    def queue_depth(self) -> int:
        return self._jobs.qsize()

    def adapter_of(self, model_field: str) -> str | None:
        """The adapter a request's `model` field names (None: the base model); checks the name only."""
        if model_field == self.model_name:
            return None
        self.registry.path_of(model_field)
        return model_field

    def check_rows(self, rows: list) -> list:
        """Refuse empty rows and token ids outside the vocabulary before they can fail a shared batch."""
        vocab = self.model.get_input_embeddings().num_embeddings
        for row in rows:
            if len(row) == 0:
                raise ConfigError("An input or prompt is empty; send at least one token.")
            if not isinstance(row, str) and not all(0 <= t < vocab for t in row):
                raise ConfigError(f"Token ids must be in [0, {vocab}); check the tokenizer that made them.")
        return rows

    @property
    def input_limit(self) -> int:
        """The most tokens an embedding input may have: the engine's max_length, within the model's positions."""
        positions = getattr(self.model.config, "max_position_embeddings", None)
        return min(self.max_length, positions) if isinstance(positions, int) else self.max_length

    def embedding_rows(self, rows: list) -> list[list[int]]:
        """The inputs as token ids, refused (as OpenAI does) where one is longer than the model reads:
        cut silently it would embed another text, and past the model's positions it fails the batch."""
        self.check_rows(rows)
        ids = [self.tokenizer(r)["input_ids"] if isinstance(r, str) else list(r) for r in rows]
        limit = self.input_limit
        for i, row in enumerate(ids):
            if len(row) > limit:
                raise ConfigError(f"Input {i} is {len(row)} tokens, more than the {limit} this model reads; shorten "
                                  "or split it.")
        return ids

    def generation_params(self, prompts: list[list[int]], max_tokens: int | None, temperature: float = 1.0,
                          top_p: float = 1.0, stop=(), seed: int | None = None, n: int = 1) -> GenerationParams:
        """Checked parameters of one generation request (`prompts`: each prompt `n` times in a row, one per
        choice); max_tokens None: up to 256 within the context."""
        self.check_rows(prompts)
        limit = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        longest = max(len(x) for x in prompts)
        max_tokens = max_tokens or max(1, min(256, limit - longest))
        if longest + max_tokens > limit:
            raise ConfigError(f"The prompt ({longest} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                              f"context of {limit} tokens; shorten the prompt or lower max_tokens.")
        return GenerationParams(prompts, max_tokens, temperature, top_p, list(stop), seed, n)

    def submit(self, kind: str, adapter: str | None, payload=None) -> Job:
        """Queue a job from a coroutine; await `job.events` for its results."""
        job = Job(kind, adapter, payload, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    # -- the worker --
    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return self._drain()
            batch = []
            deadline = time.monotonic() + self.batch_window_s
            while job is not None:
                if job.kind in ("load", "unload"):
                    self._control(job)  # no forward is running: between batches
                else:
                    batch.append(job)
                if len(batch) >= self.max_batch_size:
                    break
                try:
                    job = self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self._jobs.put(None)  # stop after this batch
                    break
            for kind in ("embed", "generate"):
                jobs = [j for j in batch if j.kind == kind and not j.cancelled]
                if jobs:
                    self._run_batch(kind, jobs)

    def _drain(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.emit("error", EngineStopped("The server is shutting down; retry the request."))

    def _control(self, job: Job) -> None:
        try:
            action = self.registry.load if job.kind == "load" else self.registry.unload
            job.emit("done", action(self.model, job.adapter))
        except Exception as err:  # reported to the caller, the worker lives on
            job.emit("error", err)

    def _run_batch(self, kind: str, jobs: list[Job]) -> None:
        errors = self.registry.ensure(self.model, [j.adapter for j in jobs])
        ready = []
        for job in jobs:
            if job.adapter in errors:
                job.emit("error", errors[job.adapter])
            else:
                job.emit("started")
                ready.append(job)
        if not ready:
            return
        try:
            if self.hot is not None:  # merge the adapter of a one-adapter batch, or unmerge for a mixed one
                steps = max(j.payload.max_tokens for j in ready) if kind == "generate" else 1
                self.hot.prepare([j.adapter for j in ready], forwards=steps)
            with torch.inference_mode():
                if kind == "embed":
                    self._embed(ready)
                else:
                    self._generate(ready)
        except Exception as err:  # a bad batch fails its own requests, never the worker
            for job in ready:
                job.emit("error", err)

    # -- embeddings --
    def _embed(self, jobs: list[Job]) -> None:
        """Mean of the last hidden state over the attention mask, L2-normalised (sentence-transformers)."""
        rows = [(job, ids) for job in jobs for ids in self._token_rows(job.payload)]
        vectors: list[torch.Tensor] = []
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start:start + self.max_batch_size]
            if self.on_batch:
                self.on_batch(len(chunk))
            batch = self.tokenizer.pad({"input_ids": [ids for _, ids in chunk]}, return_tensors="pt")
            batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            hidden = forward_mixed(self.model, batch, [job.adapter for job, _ in chunk]).last_hidden_state
            vectors.extend(mean_pool(hidden, batch["attention_mask"]))
        at = 0
        for job in jobs:
            n = len(job.payload)
            tokens = sum(len(ids) for _, ids in rows[at:at + n])
            job.emit("done", {"vectors": [v.tolist() for v in vectors[at:at + n]], "prompt_tokens": tokens})
            at += n

    def _generate(self, jobs: list[Job]) -> None:
        if self.on_batch:
            self.on_batch(sum(len(job.payload.prompts) for job in jobs))
        generate(self.model, self.tokenizer, jobs)

    def _token_rows(self, inputs: list) -> list[list[int]]:
        """Token ids of each input (a route has checked them with embedding_rows; tokenised here otherwise)."""
        return [self.tokenizer(x)["input_ids"] if isinstance(x, str) else list(x) for x in inputs]

def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence-transformers pooling: mean over real tokens, then unit L2 norm."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1)

