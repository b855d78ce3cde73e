"""The OpenAI request bodies the server takes (with vLLM's extensions it honours) and its error body.

Fields a request may send but this server cannot honour (n > 1, logprobs, echo, stop strings) are
refused with a 400 naming the field, never silently ignored.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


# sampling fields this server does not implement, with the values that leave the answer as it is
NEUTRAL = {"frequency_penalty": (0,), "presence_penalty": (0,), "repetition_penalty": (1,), "min_tokens": (0,),
           "top_k": (-1, 0), "min_p": (0,)}


class SamplingFields(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="allow")   # unknown fields are ignored, as OpenAI's API does

    # a field sent as null takes its default, as OpenAI's API and vLLM take it (clients send nulls)
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)   # None: 1, OpenAI's default
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None   # vLLM's: ids that end a request besides EOS
    ignore_eos: bool | None = None             # vLLM's: generate max_tokens whatever comes
    user: str | None = None

    def unsupported(self) -> str | None:
        """The first field this server cannot honour, with why, or None: a field it does not implement
        is refused when it would change the answer, never silently ignored."""
        if self.n not in (None, 1):
            return "n: only n=1 is served"
        if self.stop:
            return "stop: stop strings are not supported; use stop_token_ids"
        extra = self.model_extra or {}
        for key in ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "functions",
                    "guided_json", "guided_regex", "guided_choice", "structured_outputs"):
            v = extra.get(key)
            if not (v is None or v is False or v in ("", [], {})):
                return f"{key}: not supported by this server"
        for key, neutral in NEUTRAL.items():
            v = extra.get(key)
            if v is not None and v not in neutral:
                return f"{key}: not supported by this server (only {neutral[0]})"
        if extra.get("best_of") not in (None, 1):
            return "best_of: only best_of=1 is served"
        fmt = extra.get("response_format")
        if fmt not in (None, {}) and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            return "response_format: only text is served"
        if extra.get("tool_choice") not in (None, "none"):
            return "tool_choice: tools are not supported by this server"
        return None


    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None

    def flat(self) -> dict:
        """The message for a chat template: content parts joined into one text (as vLLM joins them);
        a part that is not text is refused."""
        content = self.content
        if isinstance(content, list):
            kinds = {p.get("type") for p in content} - {"text"}
            if kinds:
                raise ValueError(f"messages: content parts of type {sorted(map(str, kinds))} are not supported")
            content = "\n".join(str(p.get("text", "")) for p in content)
        return {**self.model_dump(exclude_none=True), "content": content or ""}


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class TokenizeBody(BaseModel):
    model: str | None = None
    prompt: str | list[int]


class DetokenizeBody(BaseModel):
    model: str | None = None
    tokens: list[int]


class LoadAdapter(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapter(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


ErrorType = Literal["invalid_request_error", "not_found_error", "conflict_error", "server_error"]
TYPES: dict[int, ErrorType] = {400: "invalid_request_error", 404: "not_found_error", 409: "conflict_error",
                               500: "server_error", 503: "server_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body (what its clients raise as `BadRequestError`, `NotFoundError`, ...)."""
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
