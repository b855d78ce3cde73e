"""The console scripts end to end, as a user runs them: `dlora-server` in its own process, `dlora-bench`
replaying a workload against it into a results folder that `dlora-validate --runtime-folder` compares
with the simulator, Ctrl-C on each, and a port already taken."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from server_helpers import free_port  # noqa: E402

from calibration.validate import check_runtime_folder, validate  # noqa: E402

SERVER = [sys.executable, "-m", "dlora_gpu.server.cli"]
# a test run started in the background inherits SIGINT ignored, and so would these: Ctrl-C as a terminal sends it
CTRL_C = dict(preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
BENCH = [sys.executable, "-m", "dlora_bench.cli", "progress=false"]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError("the server never became healthy")


def test_server_bench_and_validate_end_to_end(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    served = tmp_path / "server"
    proc = subprocess.Popen([*SERVER, "system=dlora", f"server.port={port}", f"hydra.run.dir={served}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **CTRL_C)
    try:
        _wait_healthy(url, proc)
        # no tokenizer here: a text prompt and a chat get a 400 that says why
        r = httpx.post(url + "/v1/completions", json={"model": "adapter-0", "prompt": "hello", "max_tokens": 2})
        assert r.status_code == 400 and "tokenizer" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/chat/completions", json={"model": "adapter-0", "max_tokens": 2,
                                                            "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "tokenizer" in r.json()["error"]["message"]
        # a second server on the same port: one line, exit status 2, no folder left
        taken = subprocess.run([*SERVER, f"server.port={port}", "hydra.run.dir=taken"], cwd=tmp_path,
                               capture_output=True, text=True, timeout=120)
        assert taken.returncode == 2 and "cannot listen there" in taken.stderr and "Traceback" not in taken.stderr
        assert not (tmp_path / "taken").exists()

        bench = tmp_path / "bench"
        subprocess.run([*BENCH, f"url={url}", "workload.num_requests=16", f"hydra.run.dir={bench}"], check=True,
                       capture_output=True, text=True, timeout=300)
        summary = json.loads((bench / "summary.json").read_text())
        assert summary["executor"] == "dlora-bench" and summary["system"] == "dlora" and summary["completed"] == 16
        assert summary["runtime"]["kv_blocks"] == 1024
        assert summary["config"]["scheduler"]["_target_"].endswith("DLoRAScheduler")
        assert summary["num_iterations"] > 0 and summary["num_swap_outs"] is None   # from /metrics; not seen
        rows = list(csv.DictReader((bench / "requests.csv").open()))
        assert [int(r["id"]) for r in rows] == list(range(16)) and {r["status"] for r in rows} == {"finished"}
        for r in rows:
            t = [float(r[k]) for k in ("arrival_s", "first_token_s", "finish_s")]
            assert t == sorted(t)
        check_runtime_folder(bench)
        v = validate(bench, tmp_path / "validation")
        assert v["matched_requests"] == 16 and v["counts"]["completed"] == {"runtime": 16, "simulator": 16}
        assert (tmp_path / "validation" / "validation.md").is_file()

        # Ctrl-C on a replay: what was sent is written, and it says so
        cut = tmp_path / "cut"
        p = subprocess.Popen([*BENCH, f"url={url}", "workload.num_requests=400", "workload.rate=40",
                              f"hydra.run.dir={cut}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             **CTRL_C)
        while not (cut / "cli.log").exists():   # the job has started; its replay takes 10 s
            assert p.poll() is None, p.communicate()
            time.sleep(0.1)
        time.sleep(2.5)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        assert "interrupted" in err and "Traceback" not in err
        s = json.loads((cut / "summary.json").read_text())
        rows = list(csv.DictReader((cut / "requests.csv").open()))
        assert s["interrupted"] is True and 0 < len(rows) < 400 and s["completed"] > 0
        # Ctrl-C while a client streams: the engine stops first, so the stream ends with an error event and
        # [DONE], not cut off by uvicorn's graceful-shutdown timeout
        lines: list[str] = []
        first = threading.Event()

        def listen() -> None:
            body = {"model": "adapter-2", "prompt": [3, 4], "max_tokens": 4000, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    first.set()
        listener = threading.Thread(target=listen)
        listener.start()
        assert first.wait(30)
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=120)[0]
    listener.join(30)
    events = [ln for ln in lines if ln.startswith("data:")]
    assert '"error"' in events[-2] and "shut down" in events[-2] and events[-1] == "data: [DONE]"
    assert "Traceback" not in out and "Exception in ASGI" not in out, out[-2000:]
    # Ctrl-C on the server: it stops and writes its results folder
    assert proc.returncode == 0, out
    s = json.loads((served / "summary.json").read_text())
    assert s["executor"] == "dlora_gpu" and s["clock"] == "real" and s["completed"] >= 16
    assert s["completed"] + s["rejected"] == s["num_requests"] and s["reject_reasons"]["the server shut down"] == 1
    assert set(s["reject_reasons"]) <= {"the server shut down", "cancelled by the client"}   # the Ctrl-C'd replay
    assert s["adapter_names"]["0"] == "adapter-0" and s["adapter_names"]["8"] == "tiny"
    rows = list(csv.DictReader((served / "requests.csv").open()))
    assert len(rows) == s["num_requests"] and {r["status"] for r in rows} <= {"finished", "rejected"}
