"""OpenAI's inference endpoints: /v1/embeddings, /v1/completions, /v1/chat/completions (streaming too).

Handlers only translate: they queue a job on the engine and turn its events into OpenAI-shaped JSON
or server-sent events.
"""

from __future__ import annotations

import base64
import json

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..errors import ConfigError
from . import protocol as p
from .http import Dispatch, api_error


def inference_routes(dispatch: Dispatch, dependencies=()) -> APIRouter:
    engine = dispatch.engine
    router = APIRouter(dependencies=list(dependencies))

    @router.post("/v1/embeddings")
    async def embeddings(body: p.EmbeddingRequest, request: Request) -> p.EmbeddingResponse:
        def check(_adapter):
            size = getattr(engine.model.config, "hidden_size", None)
            if body.dimensions is not None and size and body.dimensions > size:  # OpenAI refuses it too
                raise ConfigError(f"dimensions {body.dimensions} is more than the {size} this model's embeddings have; "
                                  f"ask for at most {size}, or leave it out.")
            return engine.embedding_rows(body.rows())

        job, started = await dispatch.start("embed", "embeddings", body, check, request)
        result = await dispatch.finish(job, "embeddings", body.model, started, request)
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

    @router.post("/v1/completions")
    async def completions(body: p.CompletionRequest, request: Request):
        def params(_adapter):
            rows = [engine.tokenizer(x)["input_ids"] if isinstance(x, str) else list(x) for x in body.prompts()]
            return engine.generation_params([r for r in rows for _ in range(body.n)], body.max_tokens or 16,
                                            body.temperature, body.top_p, body.stop_list(), body.seed, body.n)
        return await respond(body, "completions", params, request, chat=False)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: p.ChatCompletionRequest, request: Request):
        def params(_adapter):
            if not getattr(engine.tokenizer, "chat_template", None):
                raise ConfigError(f"Model '{engine.model_name}' has no chat template to turn messages into a prompt; "
                                  "send a prompt to /v1/completions instead.")
            text = engine.tokenizer.apply_chat_template(body.chat(), tokenize=False, add_generation_prompt=True)
            ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
            return engine.generation_params([ids] * body.n, body.max_completion_tokens or body.max_tokens,
                                            body.temperature, body.top_p, body.stop_list(), body.seed, body.n)
        return await respond(body, "chat_completions", params, request, chat=True)

    async def respond(body, endpoint: str, params, request: Request, chat: bool):
        job, started = await dispatch.start("generate", endpoint, body, params, request)
        if body.stream:
            return StreamingResponse(_sse(job, body, endpoint, chat, dispatch, started),
                                     media_type="text/event-stream")
        result = await dispatch.finish(job, endpoint, body.model, started, request)
        usage = p.Usage(prompt_tokens=result["prompt_tokens"], completion_tokens=result["completion_tokens"],
                        total_tokens=result["prompt_tokens"] + result["completion_tokens"])
        if chat:
            choices = [p.ChatChoice(index=c["index"], message=p.ChatMessageOut(content=c["text"]),
                                    finish_reason=c["finish_reason"]) for c in result["choices"]]
            return p.ChatCompletionResponse(model=body.model, choices=choices, usage=usage)
        return p.CompletionResponse(model=body.model, usage=usage,
                                    choices=[p.CompletionChoice(**c) for c in result["choices"]])

    return router


async def _sse(job, body, endpoint: str, chat: bool, dispatch: Dispatch, started: float):
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
                api = api_error(value)
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
        dispatch.metrics.observe(body.model, endpoint, status, started)
