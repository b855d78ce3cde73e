"""The open-loop client: every request is sent at its arrival time whatever the server's backlog
(a closed loop would slow down with the server and hide its queueing), streamed, and timed.

Prompts are token ids, seeded per request exactly as the runtime seeds a trace's synthetic prompts
(`dlora_gpu.tokens.TokenLog`), so a request has the same prompt here as in `dlora-serve`; each asks
for its trace output length with `ignore_eos`, so it generates exactly that many tokens.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import httpx
import numpy as np

from dlora_sim.core.request import NS, Request, State
from dlora_sim.core.workload import Workload


@dataclass
class Sent:
    """What the client saw of one request (ns since the replay's start)."""

    index: int
    adapter: int
    scheduled: int              # the trace's arrival
    prompt_tokens: int
    max_tokens: int
    sent: int = -1
    first_token: int = -1
    finish: int = -1
    tokens: int = 0
    ended: bool = False         # the stream said it was over ([DONE] or a finish_reason)
    error: str = ""

    def request(self) -> Request:
        """As a results row: `finished`, or `rejected` with why (an HTTP error, a dropped stream)."""
        r = Request(self.index, self.adapter, self.sent, self.prompt_tokens, self.tokens or self.max_tokens,
                    generated=self.tokens, dispatch=self.sent)
        if not self.error and self.ended and self.finish >= 0 and self.tokens > 0:
            r.state, r.first_token, r.finish = State.FINISHED, self.first_token, self.finish
            r.first_scheduled = self.sent   # the client cannot see when the server first scheduled it
        else:
            r.state, r.reject_reason = State.REJECTED, self.error or "no tokens"
        return r


def prompt_ids(seed: int, index: int, length: int, vocab: int) -> list[int]:
    """Request `index`'s prompt: the runtime's synthetic prompt for the same seed and id."""
    return np.random.default_rng([seed, index]).integers(0, vocab, length).tolist()


@dataclass
class Replay:
    """`workload` against `url` (its `/v1/completions`); adapter i is the model `names[i]`."""

    url: str
    workload: Workload
    names: Sequence[str]
    vocab: int
    seed: int = 0
    timeout_s: float = 600.0
    api_key: str | None = None
    on_done: Callable[[Sent], None] = lambda s: None
    sent: list[Sent] = field(default_factory=list)

    async def run(self) -> list[Sent]:
        """Send every request at its time; returns what each saw. Cancelled (Ctrl-C), the requests in
        flight end as rejected ("interrupted") and `self.sent` holds every request sent so far."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        async with httpx.AsyncClient(base_url=self.url.rstrip("/"), headers=headers, limits=limits,
                                     timeout=httpx.Timeout(self.timeout_s, connect=30.0)) as client:
            t0 = time.perf_counter_ns()
            tasks = []
            try:
                for i, spec in enumerate(self.workload.requests):
                    due = round(spec.arrival_s * NS)
                    delay = (due - (time.perf_counter_ns() - t0)) / NS
                    if delay > 0:
                        await asyncio.sleep(delay)
                    s = Sent(i, spec.adapter, due, spec.prompt_tokens, spec.output_tokens)
                    self.sent.append(s)
                    tasks.append(asyncio.create_task(self._one(client, s, t0)))
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return self.sent

    async def _one(self, client: httpx.AsyncClient, s: Sent, t0: int) -> None:
        body = {"model": self.names[s.adapter], "prompt": prompt_ids(self.seed, s.index, s.prompt_tokens, self.vocab),
                "max_tokens": s.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        s.sent = time.perf_counter_ns() - t0
        try:
            async with client.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    s.error = f"HTTP {resp.status_code}: {_message(text)}"
                    return
                usage = None
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        s.ended = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        s.error = f"stream error: {_message(data)}"
                        return
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or ():
                        s.tokens += _tokens(choice)
                        if s.tokens and s.first_token < 0:
                            s.first_token = time.perf_counter_ns() - t0
                        s.ended |= choice.get("finish_reason") is not None
                s.finish = time.perf_counter_ns() - t0
                if not s.ended:
                    s.error = "the stream ended before the server said it was over"
                if usage and usage.get("completion_tokens") is not None:
                    s.tokens = int(usage["completion_tokens"])   # the server's count: a chunk may hold several
        except asyncio.CancelledError:
            s.error = "interrupted (Ctrl-C) before it finished"
            raise
        except Exception as e:   # noqa: BLE001 - one request's failure (HTTP, a malformed chunk) is its row's
            s.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        finally:
            self.on_done(s)


def _tokens(choice: dict) -> int:
    """Tokens one streamed choice carries: its `token_ids` when the server gives them (ours), else one
    per chunk with text or no finish yet (vLLM sends `token_ids: null`); the final usage overrides."""
    ids = choice.get("token_ids")
    if ids is not None:
        return len(ids)
    return 1 if choice.get("finish_reason") is None or choice.get("text") or choice.get("delta") else 0


def _message(text: str) -> str:
    """An OpenAI-style error body's message, or the text itself (short)."""
    try:
        body = json.loads(text)
        err = body.get("error", body)
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except (ValueError, AttributeError):
        return text[:300]
