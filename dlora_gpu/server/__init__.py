"""`dlora-server`: the runtime behind the OpenAI API (FastAPI + uvicorn, the `server` extra).

`build` composes a server from a config (engine, live loop, tokenizer, metrics), `app` is its HTTP
surface, `protocol` the request bodies and OpenAI-style errors, `metrics` the Prometheus exposition
under vLLM's names, `text` the tokenizer, `cli` the console script.
"""
