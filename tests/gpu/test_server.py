"""dlora-server on loopback, driven by the official `openai` client: models, completions and chats
(streamed or not), the same greedy tokens as the in-process runtime, adapters loaded and unloaded
while serving, OpenAI-style errors that leave the server serving, metrics under vLLM's names, and a
bounded load with clients that disconnect mid-stream and leak nothing."""
from __future__ import annotations

import asyncio
import csv
import random
import time

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

import torch  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from runtime_helpers import step  # noqa: E402
from server_helpers import running_server, write_tokenizer  # noqa: E402

from dlora_gpu.adapters import write_peft_adapter  # noqa: E402
from dlora_gpu.cli import build_engine  # noqa: E402
from dlora_gpu.kv_cache import PagedKVCache  # noqa: E402
from dlora_gpu.weights import random_weights  # noqa: E402
from dlora_gpu.model import LlamaConfig  # noqa: E402
from dlora_sim.core.config import compose  # noqa: E402

VOCAB = 512   # the tiny model's


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the tests that only add requests: system=dlora, one replica, a tokenizer."""
    tmp = tmp_path_factory.mktemp("server")
    tok = write_tokenizer(tmp / "tokenizer", VOCAB)
    with running_server(tmp / "run", "system=dlora", f"server.tokenizer={tok}") as (url, srv):
        yield url, srv


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def _metrics(url: str) -> dict[str, float]:
    """Every sample summed over its labels, by sample name."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def _ids(choice) -> list[int]:
    return list(choice.model_extra["token_ids"])


def test_models_completions_and_streams_for_the_base_and_an_adapter(server):
    url, srv = server
    client = _client(url)
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", *(f"adapter-{i}" for i in range(8))}
    assert models["tiny"].model_extra["parent"] is None and models["adapter-3"].model_extra["parent"] == "tiny"
    prompt = [5, 17, 99, 300, 42, 7]
    outs = {}
    for model in ("tiny", "adapter-3"):
        whole = client.completions.create(model=model, prompt=prompt, max_tokens=9, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert whole.usage.prompt_tokens == 6 and whole.usage.completion_tokens == 9
        assert whole.choices[0].finish_reason == "length"
        streamed, finish = [], None
        for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=9, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True}):
            streamed += _ids(chunk.choices[0])
            finish = chunk.choices[0].finish_reason or finish
        assert streamed == _ids(whole.choices[0]) and finish == "length"
        outs[model] = streamed
    assert outs["tiny"] != outs["adapter-3"]   # the adapter changes the model
    # a text prompt through the tokenizer: the text is the tokens' words
    text = client.completions.create(model="adapter-1", prompt="w5 w17 w99", max_tokens=4, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0]
    assert text.text.split() == [f"w{i}" for i in _ids(text) if i > 2]


def test_the_base_model_computes_what_the_model_without_adapters_does(server):
    """The base is served as an adapter whose B is zero: its greedy tokens are the plain model's."""
    url, srv = server
    prompt = [9, 8, 7, 6, 5]
    got = _ids(_client(url).completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                               extra_body={"ignore_eos": True}).choices[0])
    model = random_weights(LlamaConfig.preset("tiny"), 0, torch.float32, torch.device("cpu"))
    kv = PagedKVCache(8, 16, model.cfg, torch.float32, torch.device("cpu"))
    toks = list(prompt)
    logits = step(model, kv, prefills=[(0, toks, -1)])
    want = []
    for _ in range(6):
        want.append(int(logits[0].argmax()))
        logits = step(model, kv, decodes=[(0, want[-1], len(toks) + len(want), -1)])
    assert got == want


def test_greedy_tokens_over_http_equal_the_in_process_runtime(server):
    url, _ = server
    cfg = compose(["charts=false", "system=dlora", "runtime.clock=virtual", "workload.num_requests=3"], "serve")
    engine = build_engine(cfg, keep_tokens=True)
    res = engine.run()
    client = _client(url)
    for r in res.requests:
        prompt = np.random.default_rng([0, r.id]).integers(0, VOCAB, r.prompt_tokens).tolist()
        want = engine.tokens.finished[r.id]
        assert want[:r.prompt_tokens] == prompt
        got = client.completions.create(model=f"adapter-{r.adapter}", prompt=prompt, max_tokens=r.output_tokens,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert _ids(got.choices[0]) == want[r.prompt_tokens:]


def test_sampling_is_seeded_and_eos_ends_a_request(server):
    url, _ = server
    client = _client(url)
    kw = dict(model="adapter-2", prompt=[3, 4, 5], max_tokens=12, temperature=1.5, top_p=0.9,
              extra_body={"ignore_eos": True})
    a, b, c = (_ids(client.completions.create(seed=s, **kw).choices[0]) for s in (7, 7, 8))
    greedy = _ids(client.completions.create(**{**kw, "temperature": 0}).choices[0])
    assert a == b and a != c and a != greedy
    # a stop token ends the request there, the stop token included in its ids
    stop = greedy[4]
    out = client.completions.create(model="adapter-2", prompt=[3, 4, 5], max_tokens=12, temperature=0,
                                    extra_body={"stop_token_ids": [stop]}).choices[0]
    assert out.finish_reason == "stop" and _ids(out) == greedy[:greedy.index(stop) + 1]


def test_chat_completions_through_the_chat_template(server):
    url, _ = server
    client = _client(url)
    messages = [{"role": "user", "content": "w10 w11 w12"}]
    whole = client.chat.completions.create(model="adapter-0", messages=messages, max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens == 5
    # the template renders "user w10 w11 w12 assistant": "user" and "assistant" are unknown words (<unk>)
    assert whole.usage.prompt_tokens == 5
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="adapter-0", messages=messages, max_tokens=5, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if c.choices]
    assert "".join(parts) == whole.choices[0].message.content


def test_adapters_load_and_unload_while_serving(server, tmp_path):
    url, srv = server
    client = _client(url)
    cfg = LlamaConfig.preset("tiny")
    good = write_peft_adapter(tmp_path / "mine", cfg, 8, 16.0, seed=5)
    post = lambda path, **body: httpx.post(url + path, json=body, timeout=60)  # noqa: E731
    r = post("/v1/load_lora_adapter", lora_name="mine", lora_path=str(good))
    assert r.status_code == 200, r.text
    models = {m.id: m for m in client.models.list().data}
    assert models["mine"].model_extra["parent"] == "tiny"
    out = client.completions.create(model="mine", prompt=[1, 2, 3], max_tokens=4, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4
    # refused, each with its status, nothing changed: a second load of the name, a rank above the slots',
    # shapes of another model, a folder that is not an adapter
    wide = write_peft_adapter(tmp_path / "wide", cfg, 16, 32.0, seed=1)
    narrow = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_layers=2, num_heads=4,
                         num_kv_heads=2)
    other = write_peft_adapter(tmp_path / "other", narrow, 8, 16.0, seed=1)
    for name, path, status, words in [("mine", good, 400, "already loaded"), ("wide", wide, 400, "rank 16"),
                                      ("other", other, 400, "shape"), ("none", tmp_path, 400, "adapter_config")]:
        r = post("/v1/load_lora_adapter", lora_name=name, lora_path=str(path))
        assert r.status_code == status and words in r.json()["error"]["message"], r.text
    assert {m.id for m in client.models.list().data} == {"tiny", "mine", *(f"adapter-{i}" for i in range(8))}
    # unloading while a request of it is in flight is refused (409); once it is done, it goes
    stream = client.completions.create(model="mine", prompt=[1, 2, 3], max_tokens=400, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    r = post("/v1/unload_lora_adapter", lora_name="mine")
    assert r.status_code == 409 and "in flight" in r.json()["error"]["message"]
    stream.close()
    for _ in range(100):   # the cancel lands at the engine's next iteration
        r = post("/v1/unload_lora_adapter", lora_name="mine")
        if r.status_code != 409:
            break
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="mine", prompt=[1, 2, 3], max_tokens=4)
    assert post("/v1/unload_lora_adapter", lora_name="mine").status_code == 404
    assert post("/v1/unload_lora_adapter", lora_name="tiny").status_code == 400


def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server):
    url, srv = server
    client = _client(url)
    raw = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="adapter-99", prompt=[1], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="adapter-0", prompt=[1], max_tokens=-3)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 4096 tokens"):   # the tiny model's
        client.completions.create(model="adapter-0", prompt=[1, 2], max_tokens=20_000)
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model="adapter-0", prompt=[1, VOCAB + 5], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="n: only n=1"):
        client.completions.create(model="adapter-0", prompt=[1], max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="stop strings"):
        client.completions.create(model="adapter-0", prompt=[1], max_tokens=2, stop=["w9"])
    assert httpx.get(url + "/health").status_code == 200
    assert client.completions.create(model="adapter-0", prompt=[1, 2], max_tokens=2).usage.completion_tokens == 2


def test_nulls_take_defaults_and_what_is_not_implemented_is_refused(server):
    url, _ = server
    body = {"model": "adapter-0", "prompt": [1, 2], "max_tokens": 3, "temperature": None, "top_p": None, "n": None,
            "stream": None, "seed": None, "stop": None, "ignore_eos": None, "frequency_penalty": 0, "logprobs": None}
    r = httpx.post(url + "/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    for field, value in [("frequency_penalty", 0.5), ("logprobs", 0), ("top_k", 5), ("response_format",
                                                                                      {"type": "json_object"})]:
        r = httpx.post(url + "/v1/completions", json={**body, field: value})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith(field), (field, r.text)


def test_a_router_that_keeps_state_per_adapter_takes_adapters_added_while_serving():
    """Proactive keeps host sets per adapter: an adapter added after placement (the server's base, a
    runtime load) is dispatched, not an IndexError that would end the engine."""
    from dlora_sim.core.request import Request
    from dlora_sim.des.engine import build_simulation
    sim = build_simulation(compose(["charts=false", "system=dlora", "router=proactive", "cluster.num_replicas=2",
                                    "workload=tiny", "profile=cpu", "model=tiny"]))
    sim.cluster.place()
    aid = sim.cluster.add_adapter(8, "new")
    assert sim.cluster.dispatch(Request(10_000, aid, 0, 12, 4), 0) in (0, 1)


def test_the_bench_counts_tokens_of_any_servers_chunks():
    from dlora_bench.replay import _tokens
    assert _tokens({"text": "ab", "token_ids": [4, 5], "finish_reason": None}) == 2       # ours
    assert _tokens({"text": "ab", "token_ids": None, "finish_reason": None}) == 1         # vLLM's
    assert _tokens({"text": "", "finish_reason": "length"}) == 0                          # the last chunk


def test_a_non_streamed_client_that_leaves_is_cancelled(server):
    url, srv = server
    with pytest.raises(httpx.ReadTimeout):   # the client gives up long before 4000 tokens
        httpx.post(url + "/v1/completions", json={"model": "adapter-0", "prompt": [1, 2], "max_tokens": 4000,
                                                  "ignore_eos": True}, timeout=1.0)
    deadline = time.monotonic() + 5
    while srv.live._live and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not srv.live._live   # freed at the server's next look, not after its 4000 tokens


def test_vllms_utility_endpoints_and_errors_for_what_is_not_there(server):
    url, _ = server
    assert httpx.post(url + "/tokenize", json={"prompt": "w5 w9"}).json() == {"tokens": [5, 9], "count": 2,
                                                                            "max_model_len": 4096}
    assert httpx.post(url + "/detokenize", json={"tokens": [5, 9]}).json() == {"prompt": "w5 w9"}
    assert httpx.get(url + "/version").json()["version"]
    assert httpx.get(url + "/v1/models").json()["data"][0]["max_model_len"] == 4096
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"
    r = httpx.post(url + "/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("malformed JSON at character")


def test_metrics_carry_vllms_names_with_what_was_served(server):
    url, srv = server
    client = _client(url)
    before = _metrics(url)
    served = [client.completions.create(model=f"adapter-{i % 3}", prompt=list(range(3, 3 + 4 + i)), max_tokens=5 + i,
                                        temperature=0, extra_body={"ignore_eos": True}) for i in range(4)]
    after = _metrics(url)

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)
    assert delta("vllm:generation_tokens_total") == sum(c.usage.completion_tokens for c in served) == 5 + 6 + 7 + 8
    assert delta("vllm:prompt_tokens_total") == sum(c.usage.prompt_tokens for c in served)
    for h in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds"):
        assert delta(h + "_count") == 4 and delta(h + "_sum") > 0
    # one observation per token after a request's first, as vLLM observes it
    assert delta("vllm:time_per_output_token_seconds_count") == sum(c.usage.completion_tokens - 1 for c in served)
    assert delta("vllm:request_success_total") == 4
    assert after["vllm:num_requests_running"] == after["vllm:num_requests_waiting"] == 0   # all done
    assert after["vllm:gpu_cache_usage_perc"] == after["vllm:kv_cache_usage_perc"] == 0.0
    assert "vllm:lora_requests_info" in after and after["dlora:iterations_total"] > before["dlora:iterations_total"]
    for name in ("dlora:mode_switches_total", "dlora:adapter_loads_total", "dlora:forced_iterations_total",
                 "dlora:migrations_total", "dlora:merged_adapter_info"):
        assert name in after


async def _load(url: str, n: int, clients: int, seed: int = 0) -> tuple[int, int, list[int]]:
    """`n` streamed requests from `clients` concurrent clients; about a quarter disconnect after a few
    tokens. Returns (completed, disconnected, health statuses seen meanwhile)."""
    rng = random.Random(seed)
    plan = [(f"adapter-{rng.randrange(8)}", [rng.randrange(3, VOCAB) for _ in range(rng.randint(4, 40))],
             rng.randint(2, 24), rng.random() < 0.25) for _ in range(n)]
    queue: asyncio.Queue = asyncio.Queue()
    for p in plan:
        queue.put_nowait(p)
    done = {"completed": 0, "left": 0}
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    health: list[int] = []
    stop = asyncio.Event()

    async def one_client() -> None:
        while not queue.empty():
            model, prompt, max_tokens, leave = queue.get_nowait()
            stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens + 4 * leave,
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True})
            got = 0
            async for chunk in stream:
                got += len(_ids(chunk.choices[0]))
                if leave and got >= 2:
                    break
            if leave:
                await stream.close()   # the client goes away mid-stream
                done["left"] += 1
            else:
                assert got == max_tokens
                done["completed"] += 1

    async def watch() -> None:
        async with httpx.AsyncClient() as h:
            while not stop.is_set():
                health.append((await h.get(url + "/health")).status_code)
                await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(one_client() for _ in range(clients)))
    stop.set()
    await watcher
    await client.close()
    return done["completed"], done["left"], health


@pytest.mark.parametrize("replicas", [1, 2])
def test_bounded_load_with_disconnects_leaks_no_kv_or_slot(tmp_path, replicas):
    """200 requests (1 replica; 60 over 2 replicas with co-migration) from 32 clients, a quarter of them
    disconnecting mid-stream: each request completes or is cancelled, /health answers throughout, and at
    the end no KV block, swap block or batch slot is held (the engine's worker-vs-state check passes)."""
    n = 200 if replicas == 1 else 60
    extra = [] if replicas == 1 else ["cluster.num_replicas=2", "runtime.workers=local", "migration.interval_s=0.2"]
    with running_server(tmp_path, "system=dlora", "cluster.replica.max_kv_blocks=64", *extra) as (url, srv):
        # within the model's context but beyond a replica's KV (64 blocks of 16 tokens)
        r = httpx.post(url + "/v1/completions", json={"model": "adapter-0", "prompt": [1, 2], "max_tokens": 1500})
        assert r.status_code == 400 and "KV of 1024 tokens" in r.json()["error"]["message"]
        completed, left, health = asyncio.run(_load(url, n, 32))
        engine = srv.live.engine
        # a client streaming while the server stops hears an error event, not silence
        stream = _client(url).completions.create(model="adapter-1", prompt=[5, 6], max_tokens=400, stream=True,
                                                 extra_body={"ignore_eos": True})
        next(iter(stream))
        res = srv.live.stop()   # raises if the final memory check of any replica fails
        with pytest.raises(openai.APIError, match="shut down"):
            for _ in stream:
                pass
        # and one arriving after it: 503, at once
        r = httpx.post(url + "/v1/completions", json={"model": "adapter-0", "prompt": [1], "max_tokens": 2})
        assert r.status_code == 503 and "not running" in r.json()["error"]["message"]
    assert completed + left == n and left > 0 and health and set(health) == {200}
    assert len(res.stats.lat) >= completed and res.stats.num == n + 1   # finished server-side, plus the cancelled
    assert res.stats.reject_reasons["the server shut down"] == 1   # the stream open at the stop
    assert set(res.stats.reject_reasons) <= {"cancelled by the client", "the server shut down"}
    assert 0 < res.stats.num - len(res.stats.lat) - 1 <= left
    for st in engine.replicas:
        assert not st.queue and not st.running
        assert st.free_blocks == st.total_blocks and st.host_free_blocks == st.host_total_blocks
    assert not engine.tokens._live and not engine.sampling and not engine.stops and not srv.live._live
    res.streamed.close()   # requests.csv, written as requests ended: every request once
    rows = list(csv.DictReader((tmp_path / "requests.csv").open()))
    assert sorted(int(r["id"]) for r in rows) == list(range(n + 1))
    if replicas == 2:
        assert {r["replica"] for r in rows} == {"0", "1"}
