"""A server's engine: the runtime's `Engine` on the real clock, in a thread of its own, fed by an inbox.

Whoever takes requests (the HTTP server) never touches the engine's state: it posts commands (a new
request, a cancel, an adapter to load or unload, a look at the queues) that the engine's thread runs
between steps, and hears each request's tokens and its end through the callback it gave, called on
the engine's thread. The serving loop is `dlora-serve`'s real-clock loop; only the requests' source
differs (`Inbox` instead of a trace), so the policies run exactly as they do on a trace.
"""
from __future__ import annotations

import collections
import itertools
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from dlora_gpu.engine import Arrivals, Engine, Listener
from dlora_gpu.orders import Sampling
from dlora_sim.core.replica_config import reject_reason
from dlora_sim.core.request import NS, Request, State
from dlora_sim.core.results import SimResult

CANCELLED = "cancelled by the client"
SHUTDOWN = "the server shut down"


@dataclass(frozen=True, slots=True)
class Event:
    """What a request's client hears: a token, or (last) why it ended: `stop` (a stop token), `length`
    (max_tokens reached), `cancelled`, `rejected` (it cannot be served), `unknown` (its model was
    unloaded meanwhile) or `failed` (the engine stopped or failed); why in `detail`."""

    token: int | None = None
    finish: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class Snapshot:
    """The queues and counters at one instant, per replica (the metrics' gauges)."""

    running: tuple[int, ...]              # requests holding KV on the device, per replica
    waiting: tuple[int, ...]              # the rest of each queue (new, preempted, swapped out)
    kv_usage: tuple[float, ...]           # share of each replica's KV blocks in use
    merged: tuple[str | None, ...]        # the adapter merged into each replica's weights
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]
    max_lora: int                         # adapter slots per replica
    counters: dict[str, int]              # iterations, switches, adapter_loads, migrations, forced_iterations, ...


class AdapterError(ValueError):
    """An adapter command that cannot be done: `status` is the HTTP status a server answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Ticket:
    """A posted request, as its poster holds it: `id` is set once the engine has admitted it (ids
    follow admission, so requests.csv has no gaps; a request refused on arrival never gets one)."""

    id: int | None = None


@dataclass
class _Live:
    request: Request
    name: str
    max_tokens: int
    on_event: Callable[[Event], None]
    last_ns: int = -1   # when its last token came (the engine's clock)


Command = tuple[Callable[[], None], Callable[[str], None]]   # what to run, and what to do if it never runs


class Inbox(Arrivals):
    """The engine's requests as a server gets them: commands posted from any thread, run by the engine's
    thread at its next look (between steps); `wait` sleeps until one is posted. Once the engine has
    stopped (`shut`), a command is dropped instead: its poster hears why at once, never waits forever."""

    poll_s = 0.002   # Ray workers: look at the inbox this often while steps run

    def __init__(self) -> None:
        self._commands: collections.deque[Command] = collections.deque()
        self._lock = threading.Lock()
        self._posted = threading.Event()
        self.started = threading.Event()   # the engine serves (its adapters preloaded, warmed up)
        self.closing = False
        self.gone: str | None = None      # why the engine no longer runs commands

    @property
    def closed(self) -> bool:
        return self.closing and not self._commands

    def post(self, command: Callable[[], None], dropped: Callable[[str], None]) -> None:
        with self._lock:
            if self.gone is None:
                self._commands.append((command, dropped))
                self._posted.set()
                return
        dropped(self.gone)

    def pump(self, now: int) -> None:
        self.started.set()
        while self._commands:
            self._commands.popleft()[0]()

    def shut(self, why: str) -> None:
        """The engine has stopped: drop what is queued and whatever comes later, each with `why`."""
        with self._lock:
            self.gone, left = why, list(self._commands)
            self._commands.clear()
        for _, dropped in left:
            dropped(why)

    def wait(self, timeout_s: float) -> None:
        self._posted.wait(timeout_s)
        self._posted.clear()


class LiveEngine(Listener):
    """`engine` served on the real clock until `stop`; `names` maps served model names to adapter ids.
    The base model is served as an adapter whose B is zero (`base`: its name, which cannot be
    unloaded). Thread-safe: every method may be called from any thread."""

    def __init__(self, engine: Engine, names: dict[str, int], base: str | None = None):
        if engine.clock.stepped:
            raise ValueError(f"a server runs on the real clock, not runtime.clock={engine.clock.kind}")
        self.engine, self.names, self.base = engine, dict(names), base
        self.served: dict[int, str] = {a: n for n, a in names.items()}   # every adapter id ever served, its name
        # a server's metrics: every request that finished, with why (`stop` or `length`), and the time
        # between a request's consecutive tokens (s), as each comes
        self.on_finished: Callable[[Request, str], None] = lambda r, reason: None
        self.on_token_gap: Callable[[float], None] = lambda s: None
        self.inbox = Inbox()
        self._live: dict[int, _Live] = {}
        self._ids = itertools.count(engine.cluster.total)   # used on the engine's thread only
        self.result: SimResult | None = None
        self.error: BaseException | None = None
        cfg, self.kv_cap = engine.cluster.config.replica, engine.cluster.kv_cap
        self._replica_cfg = cfg
        self.kv_tokens = self.kv_cap * cfg.block_size   # the longest request a replica can hold
        engine.listener = self
        self._thread = threading.Thread(target=self._serve, name="dlora-engine", daemon=True)

    def start(self) -> "LiveEngine":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def _serve(self) -> None:
        why = "the server shut down"
        try:
            self.result = self.engine.run(lambda e: self.inbox)
        except BaseException as e:   # noqa: BLE001 - reported to every waiting client and by `stop`
            self.error = e
            why = f"the engine failed: {type(e).__name__}: {e}"
        finally:
            self.inbox.shut(why)
            for live in list(self._live.values()):
                live.on_event(Event(finish="failed", detail=why))
            self._live.clear()

    # --- requests ------------------------------------------------------------------------------------
    def why_not(self, prompt_tokens: int, max_tokens: int) -> str:
        """Why no replica could ever serve such a request ("" if one can): checked before it is posted."""
        probe = Request(-1, 0, 0, prompt_tokens, max_tokens)
        return reject_reason(probe, self._replica_cfg, self.kv_cap)

    def submit(self, prompt: list[int], model: str, max_tokens: int, on_event: Callable[[Event], None], *,
               sampling: Sampling | None = None, stop: frozenset[int] = frozenset()) -> Ticket:
        """Post a request for `model` (a name of `names`); `on_event` hears its tokens and its end."""
        if not self.alive:
            raise RuntimeError("the engine is not running")
        ticket = Ticket()

        def admit() -> None:
            eng = self.engine
            adapter = self.names.get(model, -1)
            if adapter == -1:   # unloaded between the check and now
                on_event(Event(finish="unknown", detail=f"The model `{model}` does not exist."))
                return
            rid = ticket.id = next(self._ids)
            r = Request(rid, adapter, eng.clock.now(), len(prompt), max_tokens)
            self._live[rid] = _Live(r, model, max_tokens, on_event)
            eng.tokens.given(rid, prompt)
            if sampling is not None:
                eng.sampling[rid] = sampling
            if stop:
                eng.stops[rid] = stop
            eng.cluster.admit(r)
            eng.dispatch(r, r.arrival)
        self.inbox.post(admit, lambda why: on_event(Event(finish="failed", detail=why)))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: end the request and free its KV and slot (at once if it waits, after
        its running step otherwise). A request already ended is left alone."""
        def cancel() -> None:   # after its admission: the inbox runs commands in the order posted
            live = self._live.get(ticket.id) if ticket.id is not None else None
            if live is not None:
                self.engine.cancel(live.request, CANCELLED)
        self.inbox.post(cancel, lambda why: None)   # a stopped engine has ended every request already

    # --- Listener: on the engine's thread -------------------------------------------------------------
    def tokens(self, batch: list[Request], tokens: tuple[int, ...]) -> None:
        now = self.engine.clock.now()
        for r, t in zip(batch, tokens):
            live = self._live.get(r.id)
            if live is not None:
                if live.last_ns >= 0:
                    self.on_token_gap((now - live.last_ns) / NS)
                live.last_ns = now
                live.on_event(Event(token=t))

    def ended(self, r: Request) -> None:
        live = self._live.pop(r.id, None)
        if live is None:
            return
        if r.state == State.FINISHED:
            reason = "length" if r.generated >= live.max_tokens else "stop"
            live.on_event(Event(finish=reason))
            self.on_finished(r, reason)
        elif r.reject_reason in (CANCELLED, SHUTDOWN):
            live.on_event(Event(finish="cancelled", detail=r.reject_reason))
        else:
            live.on_event(Event(finish="rejected", detail=r.reject_reason))

    # --- adapters and looks, run on the engine's thread -----------------------------------------------
    def call(self, fn: Callable[[], object], timeout_s: float = 60.0):
        """Run `fn` on the engine's thread between steps; its result (or its exception)."""
        if not self.alive:
            raise RuntimeError("the engine is not running")
        fut: Future = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:   # noqa: BLE001 - handed to the caller
                fut.set_exception(e)
        self.inbox.post(run, lambda why: fut.set_exception(RuntimeError(why)))
        return fut.result(timeout_s)

    def load_adapter(self, name: str, path: str) -> int:
        """Serve the PEFT folder `path` as model `name`: every worker reads and checks it (shapes against
        the model, rank against the slots) before the name is served; its adapter id."""
        def load() -> int:
            if name in self.names:
                raise AdapterError(f"an adapter named {name!r} is already loaded", 400)
            eng = self.engine
            aid = len(eng.cluster.adapters)
            loaded, ranks = [], set()
            try:
                for j in range(len(eng.replicas)):
                    ranks.add(eng.workers.get(eng.workers.call(j, "add_adapter", aid, path)))
                    loaded.append(j)
            except Exception as e:
                for j in loaded:
                    eng.workers.get(eng.workers.call(j, "remove_adapter", aid))
                raise AdapterError(str(e).removeprefix(f"replica {len(loaded)}: "), 400) from None
            got = eng.cluster.add_adapter(ranks.pop(), name)
            assert got == aid
            self.names = {**self.names, name: aid}   # a new dict: other threads read `names` unlocked
            self.served[aid] = name
            return aid
        return self.call(load)

    def unload_adapter(self, name: str) -> None:
        """Stop serving adapter `name`. Refused (409) while requests for it are in flight: unloading
        never cuts a client off; retry once they are done."""
        def unload() -> None:
            aid = self.names.get(name, -1)
            if aid == -1:
                raise AdapterError(f"no adapter named {name!r} is loaded", 404)
            if name == self.base:
                raise AdapterError(f"{name!r} is the base model, not an adapter", 400)
            busy = sum(1 for live in self._live.values() if live.name == name)
            if busy:
                raise AdapterError(f"adapter {name!r} has {busy} request(s) in flight; unload it once they "
                                   "are done", 409)
            self.names = {n: a for n, a in self.names.items() if n != name}
            eng = self.engine
            for j in range(len(eng.replicas)):
                eng.workers.get(eng.workers.call(j, "remove_adapter", aid))
        self.call(unload)

    def snapshot(self, timeout_s: float = 60.0) -> Snapshot:
        """The queues and counters now (run between steps)."""
        return self.call(self._snapshot, timeout_s)

    def _snapshot(self) -> Snapshot:
        eng = self.engine
        by_id = {aid: name for name, aid in self.names.items()}
        running, waiting, usage, merged = [], [], [], []
        run_ads, wait_ads = set(), set()
        for st in eng.replicas:
            flight = {id(r) for r in st.running}
            on = [r for r in st.queue if r.state == State.RESIDENT or id(r) in flight]
            running.append(len(on))
            waiting.append(len(st.queue) - len(on))
            usage.append(1.0 - st.free_blocks / st.total_blocks if st.total_blocks else 0.0)
            merged.append(by_id.get(st.merged) if st.merged is not None else None)
            onset = {id(r) for r in on}
            for r in st.queue:
                name = self._live[r.id].name if r.id in self._live else None
                if name is not None and name != self.base:
                    (run_ads if id(r) in onset else wait_ads).add(name)
        c = eng.recorder.counters
        counters = {"iterations": eng.recorder.num_iterations, "switches": c["switches"],
                    "adapter_loads": c["adapter_loads"], "migrations": c["migrations"],
                    "preemptions": c["preemptions"], "forced_iterations": eng.stats.forced}
        return Snapshot(tuple(running), tuple(waiting), tuple(usage), tuple(merged), tuple(sorted(run_ads)),
                        tuple(sorted(wait_ads)), eng.replicas[0].adapter_slots, counters)

    # --- the end -------------------------------------------------------------------------------------
    def stop(self, timeout_s: float = 60.0) -> SimResult | None:
        """Cancel whatever is in flight, let running steps finish, stop the engine; its result."""
        def close() -> None:
            for live in list(self._live.values()):
                self.engine.cancel(live.request, SHUTDOWN)
            self.inbox.closing = True
        if self._thread.is_alive():
            self.inbox.post(close, lambda why: None)
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise RuntimeError(f"the engine did not stop within {timeout_s:.0f} s")
        self.engine.close()
        if self.error is not None:
            raise self.error
        return self.result
