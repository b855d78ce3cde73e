"""The optional compiled build (dlora_sim/compiled.py): used only when it matches the sources and this interpreter,
and byte-identical to pure Python. CI sets DLORA_SIM_REQUIRE_COMPILED=1, so a missing or stale build fails there
instead of skipping."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from dlora_sim import compiled

# small runs of the systems and options whose code is compiled: dLoRA's local policy, credits, thresholds and
# router pricing (with migration), fast-forward off, S-LoRA, vLLM's chunked prefill, host adapter tiers with
# prefetch from a cold start, prefix caching, PEFT
CONFIGS = {
    "dlora": ["system=dlora", "cluster.num_replicas=4", "workload.num_requests=1500", "workload.rate=22"],
    "dlora_no_ff": ["system=dlora", "cluster.num_replicas=2", "workload.num_requests=600", "workload.rate=11",
                    "cluster.replica.fast_forward=false"],
    "slora_tiers": ["system=slora", "cluster.num_replicas=2", "workload.num_requests=800", "workload.rate=10",
                    "cluster.replica.host_adapter_cache=6", "cluster.replica.adapter_prefetch=true",
                    "cluster.preload=false"],
    "vllm_chunked_prefix": ["system=vllm", "cluster.num_replicas=2", "workload.num_requests=600", "workload.rate=10",
                            "cluster.replica.chunked_prefill=true", "cluster.replica.prefix_caching=true",
                            "workload.shared_prefix_groups=4", "workload.shared_prefix_tokens=1024"],
    "peft": ["system=peft", "cluster.num_replicas=1", "workload.num_requests=200", "workload.rate=2"],
}

RUN = """
import hashlib, json, sys, tempfile
from pathlib import Path
import dlora_sim
from dlora_sim import compiled
from dlora_sim.api import simulate
configs = json.loads(sys.argv[1])
out = {}
for name, overrides in configs.items():
    folder = Path(tempfile.mkdtemp())
    simulate(overrides[0].split("=", 1)[1], overrides=[*overrides[1:], "keep_iterations=true"], out=folder)
    out[name] = {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in ("requests.csv", "iterations.csv")}
    summary = json.loads((folder / "summary.json").read_text())   # counters too; not the wall times it measured
    out[name]["build"] = summary.pop("sim_build")
    out[name]["summary"] = {k: v for k, v in summary.items() if "wall" not in k
                            and not (k.startswith("solver_time") and k != "solver_time_charged_s")}
out["loaded"] = {m: compiled.loaded(sys.modules[m]) for m in compiled.HOT if m in sys.modules}
print(json.dumps(out))
"""


def _run(pure: bool) -> dict:
    env = {**os.environ, "DLORA_SIM_PURE": "1" if pure else "0"}
    p = subprocess.run([sys.executable, "-c", RUN, json.dumps(CONFIGS)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_compiled_build_gives_byte_identical_results():
    why = compiled.why_not()
    if why is not None:
        msg = f"no usable compiled build: {why or 'none built (make compile)'}"
        if os.environ.get("DLORA_SIM_REQUIRE_COMPILED") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    fast, pure = _run(pure=False), _run(pure=True)
    assert fast.pop("loaded") == dict.fromkeys(compiled.HOT, "compiled"), "the runs did not load every compiled module"
    assert pure.pop("loaded") == dict.fromkeys(compiled.HOT, "pure")
    assert len(fast) == len(CONFIGS)
    for name in CONFIGS:
        assert (fast[name].pop("build"), pure[name].pop("build")) == ("compiled", "pure")   # summary.json says so
        assert fast[name] == pure[name], f"{name}: compiled and pure-Python results differ"


def _fake_build(tmp_path: Path, monkeypatch, **manifest) -> None:
    """A build folder holding a manifest (what `why_not` reads) and, unless told otherwise, a file per module."""
    files = {m: f"{m}{compiled.SUFFIX}" for m in compiled.HOT}
    for rel in files.values():
        (tmp_path / rel).write_bytes(b"")
    base = {"python": sys.version, "suffix": compiled.SUFFIX, "sources": compiled.digests(), "files": files}
    (tmp_path / compiled.MANIFEST).write_text(json.dumps({**base, **manifest}))
    monkeypatch.setattr(compiled, "DIR", tmp_path)


def test_a_build_of_other_sources_is_not_used_and_the_changed_file_is_named(tmp_path, monkeypatch):
    sums = compiled.digests()
    assert "dlora_sim/core/step.py" in sums and "dlora_sim/core/contracts.py" in sums   # what mypyc read too
    _fake_build(tmp_path, monkeypatch, sources={**sums, "dlora_sim/core/contracts.py": "0" * 64})
    assert compiled.why_not() == "dlora_sim/core/contracts.py changed since it was built"
    del sums["dlora_sim/policies/vllm.py"]   # a module added since
    _fake_build(tmp_path, monkeypatch, sources=sums)
    assert compiled.why_not() == "dlora_sim/policies/vllm.py changed since it was built"


def test_a_build_of_another_interpreter_or_with_missing_files_is_not_used(tmp_path, monkeypatch):
    _fake_build(tmp_path, monkeypatch, python="3.99.0 (other)")
    assert compiled.why_not() == f"built by Python 3.99.0, this is {sys.version.split()[0]}"
    _fake_build(tmp_path, monkeypatch, suffix=".other.so")
    assert compiled.why_not().startswith("built as *.other.so")
    _fake_build(tmp_path, monkeypatch, files={m: f"{m}{compiled.SUFFIX}" for m in compiled.HOT[1:]})
    assert compiled.why_not() == f"its manifest lists no module for {sorted(compiled.HOT[:1])[0]}"
    _fake_build(tmp_path, monkeypatch)
    assert compiled.why_not() is None   # the same manifest with every file present is current
    (tmp_path / f"{compiled.HOT[0]}{compiled.SUFFIX}").unlink()
    assert compiled.why_not() == "files listed in its manifest are missing"


def test_no_build_is_silent_and_an_unusable_one_warns(tmp_path, monkeypatch):
    monkeypatch.setattr(compiled, "DIR", tmp_path)
    monkeypatch.setattr(compiled, "_active", False)
    monkeypatch.delenv("DLORA_SIM_PURE", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compiled.install() is False   # nothing built: no warning
    (tmp_path / compiled.MANIFEST).write_text("{not json")
    with pytest.warns(RuntimeWarning, match="unreadable.*running pure Python"):
        assert compiled.install() is False
    monkeypatch.setenv("DLORA_SIM_PURE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compiled.install() is False   # turned off: not even read
