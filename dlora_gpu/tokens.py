"""Every request's token ids, kept by the driver: its prompt and what it has generated so far.

Workers are sent the tokens a step computes (`orders.Feed`) and hold none, so a request continues
on another replica with only its KV moved (or recomputed from these tokens when it is not).
"""
from __future__ import annotations

import numpy as np

from dlora_sim.core.request import Request


class TokenLog:
    """Token ids by request id. Prompts are seeded synthetic ids (traces give lengths, not text);
    `keep` keeps finished requests' tokens (tests, and a server that returns them)."""

    def __init__(self, vocab: int, seed: int, keep: bool = False):
        self.vocab, self.seed, self.keep = vocab, seed, keep
        self._live: dict[int, list[int]] = {}
        self.finished: dict[int, list[int]] = {}

    def __getitem__(self, request: int) -> list[int]:
        return self._live[request]

    def given(self, request: int, prompt: list[int]) -> None:
        """A client's prompt ids, for a request made while serving."""
        self._live[request] = list(prompt)

    def prompt(self, r: Request) -> list[int]:
        """The request's prompt ids, made at its first prefill."""
        toks = self._live.get(r.id)
        if toks is None:
            toks = self._live[r.id] = np.random.default_rng([self.seed, r.id]).integers(
                0, self.vocab, r.prompt_tokens).tolist()
        return toks

    def append(self, requests: list[Request], tokens: list[int] | tuple[int, ...]) -> None:
        for r, t in zip(requests, tokens):
            self._live[r.id].append(t)

    def finish(self, r: Request) -> None:
        toks = self._live.pop(r.id)
        if self.keep:
            self.finished[r.id] = toks

    def drop(self, request: int) -> None:
        """Forget a request's tokens (one abandoned by hand; a finished one goes through `finish`)."""
        self._live.pop(request, None)
