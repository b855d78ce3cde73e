"""Shared by the server tests: a real dlora-server (uvicorn on loopback, in a thread of this process so
a test can check the engine's memory afterwards) and a small word-level tokenizer with a chat template."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from dlora_gpu.server.app import make_app
from dlora_gpu.server.build import build_server
from dlora_sim.core.config import compose

CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}assistant"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tokenizer(folder: Path, vocab: int) -> Path:
    """A word-level tokenizer over `vocab` ids: <unk>=0, <s>=1, </s>=2 (EOS), then w3, w4, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return folder


@contextmanager
def running_server(out: Path, *overrides: str):
    """A started server on a free loopback port: yields (base URL, `Server`); stopped on exit (the
    engine too, unless the test stopped it)."""
    port = free_port()
    cfg = compose(["charts=false", f"server.port={port}", *overrides], "server")
    srv = build_server(cfg, out, "test")
    server = uvicorn.Server(uvicorn.Config(make_app(srv), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            srv.live.stop()
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", srv
    finally:
        server.should_exit = True
        thread.join(30)
        if srv.live.alive:
            srv.live.stop()
