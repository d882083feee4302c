"""Request and response bodies of the OpenAI API subset the server speaks.

Field names, defaults and shapes follow the OpenAI API reference, so the official `openai` client
(and anything built on it) works unchanged. Options the server cannot honour (logprobs, echo, penalties,
logit_bias, best_of, suffix, tools, tool_choice, response_format) are refused with a 400 rather than
silently ignored; other unknown fields are ignored, as OpenAI does for forward compatibility.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 4


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)

    def unsupported(self) -> list[str]:
        """Names of options set to something the server does not implement."""
        extra = self.model_extra or {}
        return [name for name, ok in UNSUPPORTED.items() if name in extra and not _means_unused(extra[name], ok)]


# Options the server does not implement, and the values that mean "not used".
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None, ""), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
               "tool_choice": (None, "none"), "function_call": (None, "none"),
               "response_format": (None, {"type": "text"}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0)}


def _means_unused(value, unused: tuple) -> bool:
    # False must be False itself: a completion's logprobs=0 asks for the chosen tokens' logprobs
    return any(value is u if u is None or isinstance(u, bool) else value == u and not isinstance(value, bool)
               for u in unused)


TokenIds = list[int]


class EmbeddingRequest(_Request):
    input: Union[str, list[str], TokenIds, list[TokenIds]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and (not value or any(isinstance(v, (str, list)) and len(v) == 0 for v in value)):
            raise ValueError("input must be a non-empty string or list")
        if value == "":
            raise ValueError("input must not be empty")
        return value

    def rows(self) -> list:
        """The input as a list of rows, each a string or a list of token ids."""
        value = self.input
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            return [value]
        return list(value)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(_Request):
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 64)  # what torch's generators take
    user: str | None = None
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        if isinstance(value, list) and len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop or [] if s]


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], TokenIds, list[TokenIds]]

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must be a non-empty string or list")
        return value

    def prompts(self) -> list:
        value = self.prompt
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            return [value]
        return list(value)


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def chat(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class AdapterRequest(BaseModel):
    name: str = Field(min_length=1)


# -- responses --

class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "leanfit"
    parent: str | None = None
    resident: bool = True


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class StreamChunks:
    """The server-sent events of one streamed (chat) completion: `data: {json}\\n\\n` per chunk."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id, self.created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())

    def __call__(self, index: int, text: str | None, finish: str | None = None, first: bool = False,
                 usage: Usage | None = None) -> str:
        """One chunk for choice `index` (-1: no choice, e.g. the closing usage chunk)."""
        if self.chat:
            delta = ChatDelta(role="assistant" if first else None, content=text)
            choices = [ChatChunkChoice(index=index, delta=delta, finish_reason=finish)] if index >= 0 else []
            body = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices,
                                       usage=usage)
        else:
            choices = [CompletionChoice(index=index, text=text or "", finish_reason=finish)] if index >= 0 else []
            body = CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                      usage=usage)
        return f"data: {body.model_dump_json()}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
