"""Second contact: the mistakes a new user makes, each run as the user would (the console scripts, in
a fresh folder, with no traces on the machine). Every one stops with a message naming what is wrong,
no traceback, and leaves no folder behind."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
SIM, SERVE, VALIDATE, CALIBRATE, COMPARE, TRACE, SERVER, BENCH = (str(BIN / n) for n in (
    "dlora-sim", "dlora-serve", "dlora-validate", "dlora-calibrate", "dlora-compare", "dlora-trace", "dlora-server",
    "dlora-bench"))

# (name, command, a fragment of the message); {tmp} is a scratch folder outside the run's folder
MISTAKES = [
    ("seed not a number", [SIM, "seed=abc"], "seed must be an integer"),
    ("popularity typo", [SIM, "workload.popularity=zipff"], "workload.popularity: unknown 'zipff'"),
    ("rate not a number", [SIM, "workload.rate=abc"], "workload.rate must be a number"),
    ("negative SLO", [SIM, "slo_s_per_token=-1"], "slo_s_per_token must be a number > 0"),
    ("unknown system", [SIM, "system=foo"], "Could not find 'system/foo'"),
    ("unknown key", [SIM, "foo=1"], "foo"),
    ("no replicas", [SIM, "cluster.num_replicas=0"], "cluster.num_replicas"),
    ("replicas not a number", [SIM, "cluster.num_replicas=x"], "cluster.num_replicas must be an integer"),
    ("zero batch", [SIM, "cluster.replica.max_num_seqs=0"], "cluster.replica.max_num_seqs must be >= 1"),
    ("batch not a number", [SIM, "cluster.replica.max_num_seqs=abc"], "cluster.replica.max_num_seqs must be an integer"),
    ("unknown LoRA path", [SIM, "profile.lora=bogus"], "no 'lora.bogus' cost"),
    ("unknown workload", [SIM, "workload=nonexistent"], "Could not find 'workload/nonexistent'"),
    ("negative requests", [SIM, "workload.num_requests=-5"], "workload.num_requests"),
    ("fractional requests", [SIM, "workload.num_requests=1.5"], "workload.num_requests must be an integer"),
    ("no adapters", [SIM, "workload.num_adapters=0"], "workload.num_adapters"),
    ("unknown model", [SIM, "model=bogus"], "Could not find 'model/bogus'"),
    ("unknown router", [SIM, "router=bogus"], "Could not find 'router/bogus'"),
    ("missing trace file", [SIM, "workload=csv", "workload.path={tmp}/nope.csv"], "not found"),
    ("empty trace", [SIM, "workload=csv", "workload.path={tmp}/empty.csv"], "no requests"),
    ("malformed trace row", [SIM, "workload=csv", "workload.path={tmp}/bad.csv"], "bad.csv:3"),
    ("keep_iterations typo", [SIM, "keep_iterations=maybe"], "keep_iterations must be true, false or auto"),
    ("progress typo", [SIM, "progress=sometimes"], "progress must be true, false or auto"),
    ("chunked prefill typo", [SIM, "cluster.replica.chunked_prefill=maybe"], "chunked_prefill must be true, false or auto"),
    ("unknown merge strategy", [SIM, "cluster.replica.merge=fused"], "cluster.replica.merge must be one of"),
    ("watermark out of range", [SIM, "cluster.replica.watermark=2"], "cluster.replica.watermark must be in [0, 1)"),
    ("zero migration interval", [SIM, "system=dlora", "migration.interval_s=0"], "migration: interval_s"),
    ("missing profile", [SIM, "+profile.path={tmp}/missing.yaml"], "profile not found"),
    ("a run that needs a missing trace", [SIM, "workload=azure_conv"], "trace 'azure_conv' not found"),
    ("a sweep that needs a missing trace", [SIM, "--multirun", "experiment=adapter_scaling"],
     "trace 'azure_conv' not found"),
    ("capacity without its trace", [SIM, "--multirun", "experiment=capacity"], "trace 'azure_conv' not found"),
    ("runtime workers typo", [SERVE, "runtime.workers=threads"], "runtime.workers must be"),
    ("runtime Ray GPUs not a number", [SERVE, "runtime.ray.num_gpus=abc"], "runtime.ray.num_gpus must be a number"),
    ("sweep joining no Ray cluster", [SIM, "--multirun", "hydra/launcher=ray_join", "system=slora,dlora"],
     "no running Ray cluster to join"),
    ("runtime joining nobody", [SERVE, "cluster.num_replicas=2", "runtime.ray.address=127.0.0.1:1"],
     "runtime.ray.address=127.0.0.1:1: no Ray cluster to join there"),
    ("runtime refusal at several replicas", [SERVE, "cluster.num_replicas=2", "cluster.replica.merge=pristine_host"],
     "cluster.replica.merge=pristine_host"),
    ("runtime clock typo", [SERVE, "runtime.clock=bogus"], "runtime.clock must be one of"),
    ("runtime with whole-model copies", [SERVE, "system=vllm"], "cluster.replica.weights=full_copy"),
    ("server not on the real clock", [SERVER, "server.port=0", "runtime.clock=virtual"],
     "a server runs on the real clock"),
    ("server tokenizer folder without one", [SERVER, "server.port=0", "server.tokenizer={tmp}/empty"],
     "holds no tokenizer"),
    ("server with a runtime typo", [SERVER, "server.port=0", "runtime.workers=threads"], "runtime.workers must be"),
    ("server key typo added with +", [SERVER, "+server.prot=1"], "server.prot: no such key"),
    ("server port not a number", [SERVER, "server.port=abc"], "server.port must be an integer in 0..65535"),
    ("bench against nobody", [BENCH, "url=http://127.0.0.1:9"], "cannot reach the server"),
    ("validate a missing folder", [VALIDATE, "--runtime-folder", "{tmp}/missing"], "no summary.json"),
    ("validate a folder with a clock", [VALIDATE, "--runtime-folder", "{tmp}/simulated", "--clock", "measured"],
     "--clock sets the clock of a replay dlora-validate runs itself"),
    ("validate a simulator's folder", [VALIDATE, "--runtime-folder", "{tmp}/simulated"], "a simulator's results"),
    ("refit a missing folder", [CALIBRATE, "--from", "{tmp}/missing"], "not found"),
    ("compare an empty folder", [COMPARE, "{tmp}/empty"], "no summary.json"),
    ("fetch an unknown trace", [TRACE, "fetch", "nope"], "nope"),
    ("fidelity without its trace", [sys.executable, str(REPO / "benchmarks" / "fidelity.py")],
     "trace 'azure_conv' not found"),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("scratch")
    (tmp / "empty").mkdir()
    (tmp / "empty.csv").write_text("arrival_s,adapter,prompt_tokens,output_tokens\n")
    (tmp / "bad.csv").write_text("arrival_s,adapter,prompt_tokens,output_tokens\n0.0,0,10,5\n0.5,1,ten,5\n")
    (tmp / "simulated").mkdir()
    (tmp / "simulated" / "summary.json").write_text('{"system": "slora", "completed": 1}\n')
    return tmp


@pytest.fixture(scope="module")
def outcomes(scratch, tmp_path_factory):
    env = {**os.environ, "DLORA_SHARED_TRACES": "", "XDG_CACHE_HOME": str(scratch / "cache")}
    env.pop("DLORA_TRACE_DIR", None)
    env.pop("HYDRA_FULL_ERROR", None)

    def one(case):
        name, cmd, _ = case
        cwd = tmp_path_factory.mktemp("cwd")
        run = subprocess.run([c.replace("{tmp}", str(scratch)) for c in cmd], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=300)
        return name, (run, sorted(p.name for p in cwd.iterdir()))

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, MISTAKES))


def test_the_list_is_long_enough():
    assert len(MISTAKES) >= 30 and len({m[0] for m in MISTAKES}) == len(MISTAKES)


@pytest.mark.parametrize("name,cmd,fragment", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_mistake_gets_a_message_no_traceback_and_no_folder(outcomes, name, cmd, fragment):
    run, left = outcomes[name]
    err = run.stderr
    assert run.returncode != 0, (run.stdout[-500:], err[-500:])
    assert "Traceback" not in err and "Traceback" not in run.stdout, err[-2000:]
    assert fragment in err, err[-1000:]
    assert left == [], f"left {left} behind"
    ours = [ln for ln in err.splitlines() if ln.startswith(Path(cmd[0]).name.replace(".py", "") + ":")]
    if "Could not" not in fragment and "foo" != fragment:   # Hydra's own errors list the valid options
        assert len(err.strip().splitlines()) == 1 or ours, err
