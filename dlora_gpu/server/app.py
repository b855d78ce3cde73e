"""The HTTP surface: OpenAI's completions, chat completions and models, vLLM's adapter loading, health
and metrics, in front of a `LiveEngine`.

Handlers never block the event loop: a request is posted to the engine and its tokens come back
through an asyncio queue fed from the engine's thread; adapter loads and metric reads (which wait
for the engine's next look between steps) run in the thread pool. A client that disconnects has its
request cancelled: its KV and batch slot are freed at the engine's next iteration.
"""
from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dlora_gpu.cli import package_version
from dlora_gpu.live import AdapterError, Event, LiveEngine, Ticket
from dlora_gpu.orders import Sampling
from dlora_gpu.server.metrics import Metrics
from dlora_gpu.server.protocol import (ChatRequest, CompletionRequest, DetokenizeBody, LoadAdapter, SamplingFields,
                                       TokenizeBody, UnloadAdapter,
                                       error_body, new_id, now)
from dlora_gpu.server.text import Detokenizer, Text


DISCONNECT_CHECK_S = 0.5   # how often a non-streamed request looks whether its client is still there
# how a request that did not finish ends for its client: (HTTP status, param, code)
ENDED_BADLY = {"rejected": (400, None, None), "unknown": (404, "model", "model_not_found"),
               "cancelled": (503, None, None), "failed": (503, None, None)}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass
class Server:
    """What the app serves: the live engine, the base model's served name, the tokenizer (if any),
    the ids that end a request, the metrics, and what `/dlora/about` tells a load generator."""

    live: LiveEngine
    base: str
    vocab: int
    text: Text | None = None
    eos: int | None = None
    chat_max_tokens: int = 256
    about: dict = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)   # adapter name -> the folder it was loaded from
    metrics: Metrics | None = None
    adapter_updates: bool = True   # serve /v1/load_lora_adapter and /v1/unload_lora_adapter
    max_model_len: int = 4096      # prompt + completion tokens a request may have


def make_app(srv: Server) -> FastAPI:
    app = FastAPI(title="dlora-server", docs_url=None, redoc_url=None)
    live = srv.live

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:   # unknown path, wrong method
        return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code)

    async def engine_gone(_: Request, e: Exception) -> JSONResponse:   # the engine stopped, failed or is stuck
        return JSONResponse(error_body(503, str(e) or type(e).__name__), status_code=503)
    app.add_exception_handler(RuntimeError, engine_gone)
    app.add_exception_handler(TimeoutError, engine_gone)   # a look at the engine that got no answer in time

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":   # its loc is the byte offset, not a field
            at = first.get("loc", (None, "?"))[-1]
            return JSONResponse(error_body(400, f"malformed JSON at character {at}: "
                                           f"{first.get('ctx', {}).get('error', first.get('msg'))}"), status_code=400)
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request")
        return JSONResponse(error_body(400, f"{where}: {msg}" if where else msg, where or None), status_code=400)

    @app.get("/health")
    def health() -> Response:
        ok = live.alive and live.inbox.started.is_set()
        return Response(status_code=200 if ok else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(srv.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models() -> dict:
        names = live.names
        data = [{"id": srv.base, "object": "model", "created": now(), "owned_by": "dlora", "root": srv.base,
                 "parent": None, "max_model_len": srv.max_model_len}]
        data += [{"id": name, "object": "model", "created": now(), "owned_by": "dlora",
                  "root": srv.paths.get(name, name), "parent": srv.base, "max_model_len": srv.max_model_len}
                 for name in sorted(names, key=names.get) if name != srv.base]
        return {"object": "list", "data": data}

    @app.get("/version")
    def version() -> dict:
        return {"version": package_version("dlora")}

    @app.post("/tokenize")
    def tokenize(body: TokenizeBody) -> dict:
        ids = _prompt_ids(srv, body.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": srv.max_model_len}

    @app.post("/detokenize")
    def detokenize(body: DetokenizeBody) -> dict:
        if srv.text is None:
            raise ApiError(400, "detokenize needs a tokenizer and this server has none (set server.tokenizer)")
        return {"prompt": srv.text.decode(body.tokens)}

    @app.get("/dlora/about")
    def about() -> dict:
        return {**srv.about, "base": srv.base, "adapters": {n: a for n, a in live.names.items() if n != srv.base}}

    if srv.adapter_updates:   # off: the endpoints do not exist (404), as in vLLM without runtime updates
        @app.post("/v1/load_lora_adapter")
        def load_adapter(body: LoadAdapter) -> PlainTextResponse:
            path = str(Path(body.lora_path).expanduser().resolve())   # a relative path: the server's folder
            try:
                live.load_adapter(body.lora_name, path)
            except AdapterError as e:
                raise ApiError(e.status, str(e), "lora_path" if e.status == 400 else "lora_name") from None
            srv.paths[body.lora_name] = path
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        def unload_adapter(body: UnloadAdapter) -> PlainTextResponse:
            try:
                live.unload_adapter(body.lora_name)
            except AdapterError as e:
                raise ApiError(e.status, str(e), "lora_name") from None
            srv.paths.pop(body.lora_name, None)
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _serve(srv, body, _prompt_ids(srv, body.prompt), body.max_tokens or 16, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        if srv.text is None or not srv.text.chat:
            raise ApiError(400, "chat needs a tokenizer with a chat template; this server has "
                           + ("no tokenizer (set server.tokenizer)" if srv.text is None else "no chat template")
                           + ": use /v1/completions", "messages")
        try:
            prompt = srv.text.chat_prompt([m.flat() for m in body.messages])
        except Exception as e:   # the template's own checks (roles must alternate, ...) or a part it cannot take
            raise ApiError(400, f"messages: {e}" if not str(e).startswith("messages") else str(e), "messages") from None
        default = max(min(srv.chat_max_tokens, srv.max_model_len - len(prompt)), 1)
        return await _serve(srv, body, prompt, body.max_completion_tokens or body.max_tokens or default, request,
                            chat=True)

    return app


def _prompt_ids(srv: Server, prompt) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]   # a batch of one
    if isinstance(prompt, list) and prompt and not all(isinstance(x, int) for x in prompt):
        raise ApiError(400, "prompt: one prompt per request (a string or a list of token ids)", "prompt")
    if isinstance(prompt, str):
        if srv.text is None:
            raise ApiError(400, "prompt: a text prompt needs a tokenizer and this server has none (its checkpoint "
                           "folder holds none and server.tokenizer is unset); send token ids instead", "prompt")
        prompt = srv.text.encode(prompt)
    if not prompt:
        raise ApiError(400, "prompt: empty", "prompt")
    bad = next((t for t in prompt if not 0 <= t < srv.vocab), None)
    if bad is not None:
        raise ApiError(400, f"prompt: token id {bad} outside the vocabulary 0..{srv.vocab - 1}", "prompt")
    return prompt


def _check(srv: Server, body: SamplingFields, prompt: list[int], max_tokens: int) -> None:
    why = body.unsupported()
    if why:
        raise ApiError(400, why, why.split(":")[0])
    if body.model not in srv.live.names:
        raise ApiError(404, f"The model `{body.model}` does not exist.", "model", "model_not_found")
    if not srv.live.alive:
        raise ApiError(503, "the engine is not running")
    if len(prompt) + max_tokens > srv.max_model_len:   # OpenAI's words for it
        raise ApiError(400, f"This model's maximum context length is {srv.max_model_len} tokens. However, you "
                       f"requested {len(prompt) + max_tokens} tokens ({len(prompt)} in the messages, {max_tokens} in "
                       "the completion). Please reduce the length of the messages or completion.", "max_tokens")
    why = srv.live.why_not(len(prompt), max_tokens)
    if why:
        raise ApiError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}): {why}; a replica holds "
                       f"the KV of {srv.live.kv_tokens} tokens", "max_tokens")
    bad = next((t for t in body.stop_token_ids or () if not 0 <= t < srv.vocab), None)
    if bad is not None:
        raise ApiError(400, f"stop_token_ids: {bad} outside the vocabulary", "stop_token_ids")


async def _serve(srv: Server, body: SamplingFields, prompt: list[int], max_tokens: int, request: Request, *,
                 chat: bool) -> Response:
    _check(srv, body, prompt, max_tokens)
    stop = set(body.stop_token_ids or ())
    if srv.eos is not None and not body.ignore_eos:
        stop.add(srv.eos)
    temperature = 1.0 if body.temperature is None else body.temperature
    sampling = None if temperature == 0 else Sampling(
        temperature, 1.0 if body.top_p is None else body.top_p,
        body.seed if body.seed is not None else random.getrandbits(62))
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def hear(ev: Event) -> None:   # on the engine's thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, ev)
        except RuntimeError:   # the event loop is gone (shutdown)
            pass
    ticket = srv.live.submit(prompt, body.model, max_tokens, hear, sampling=sampling, stop=frozenset(stop))
    reply = _Reply(srv, body.model, len(prompt), chat)
    if body.stream:
        return StreamingResponse(_stream(srv, ticket, events, reply, body.include_usage),
                                 media_type="text/event-stream")
    loop = asyncio.get_running_loop()
    look = loop.time() + DISCONNECT_CHECK_S
    try:
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                ev = None
                if not srv.live.alive and events.empty():   # the engine has ended every request: a last check
                    raise ApiError(503, "the engine is not running")
            if loop.time() >= look:   # however fast tokens come, a client that went away is noticed
                look = loop.time() + DISCONNECT_CHECK_S
                if await request.is_disconnected():
                    srv.live.cancel(ticket)
                    return Response(status_code=499)
            if ev is None:
                continue
            if ev.finish is not None:
                break
            reply.add(ev.token)
    except asyncio.CancelledError:
        srv.live.cancel(ticket)
        raise
    if ev.finish in ENDED_BADLY:
        status, param, code = ENDED_BADLY[ev.finish]
        raise ApiError(status, ev.detail, param, code)
    reply.rest()
    return JSONResponse(reply.whole(ev.finish))


async def _stream(srv: Server, ticket: Ticket, events: asyncio.Queue, reply: "_Reply",
                  usage: bool) -> AsyncIterator[str]:
    ended = False
    try:
        if reply.chat:
            yield _sse(reply.chunk({"role": "assistant", "content": ""}, None))
        while True:
            ev = await events.get()
            if ev.finish is not None:
                ended = True
                break
            delta = reply.add(ev.token)
            yield _sse(reply.chunk(delta, None, [ev.token]))
        if ev.finish in ENDED_BADLY:
            yield _sse(error_body(ENDED_BADLY[ev.finish][0], ev.detail))
        else:
            rest = reply.rest()
            yield _sse(reply.chunk(rest if not reply.chat else ({"content": rest} if rest else {}), ev.finish, []))
            if usage:
                yield _sse({**reply.chunk(None, None), "choices": [], "usage": reply.usage()})
        yield "data: [DONE]\n\n"
    finally:   # the client went away (the generator is closed or cancelled) before the end
        if not ended:
            srv.live.cancel(ticket)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _Reply:
    """One request's answer as it grows: ids, text, and the OpenAI objects built from them."""

    def __init__(self, srv: Server, model: str, prompt_tokens: int, chat: bool):
        self.model, self.prompt_tokens, self.chat = model, prompt_tokens, chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = now()
        self.ids: list[int] = []
        self.detok = Detokenizer(srv.text)
        self.text = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        delta = self.detok.add(token)
        self.text += delta
        return delta

    def rest(self) -> str:
        """The text held back at the end (an incomplete character)."""
        delta = self.detok.rest()
        self.text += delta
        return delta

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.ids),
                "total_tokens": self.prompt_tokens + len(self.ids)}

    def chunk(self, delta, finish: str | None, ids: list[int] | None = None) -> dict:
        if self.chat:
            content = delta if isinstance(delta, dict) else ({"content": delta} if delta is not None else {})
            choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        if ids is not None:
            choice["token_ids"] = ids
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    def whole(self, finish: str) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": self.text}, "logprobs": None,
                      "finish_reason": finish, "token_ids": self.ids}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": self.text, "logprobs": None, "finish_reason": finish, "token_ids": self.ids}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                "usage": self.usage()}
