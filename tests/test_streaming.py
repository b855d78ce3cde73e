"""Large runs write requests.csv while they run and hold only the requests in flight."""
from __future__ import annotations

import pytest

from dlora_sim.des.engine import run_job
from dlora_sim.des.engine import build_simulation
from dlora_sim.core.results import RESULT_FILES, RequestStream

from sim_helpers import compose_cfg

RUN = ["system=dlora", "workload.num_requests=1200", "workload.rate=8", "cluster.num_replicas=2", "charts=false"]


def _simulated(summary):
    """The summary without host wall-clock measurements (solver and simulator wall time)."""
    if isinstance(summary, dict):
        return {k: _simulated(v) for k, v in summary.items()
                if k != "config" and "wall" not in k and not k.startswith("solver_time")}
    if isinstance(summary, list):
        return [_simulated(v) for v in summary]
    return summary


@pytest.mark.parametrize("migrate", [False, True])
def test_streamed_results_match_held_results(tmp_path, migrate):
    extra = ["migration.always=true", "migration.interval_s=5", "router.extra_placements=1"] if migrate else []
    held = run_job(compose_cfg(*RUN, *extra, "stream_requests=false"), tmp_path / "held", "dlora", [])
    streamed = run_job(compose_cfg(*RUN, *extra, "stream_requests=true"), tmp_path / "streamed", "dlora", [])
    assert (tmp_path / "held" / "requests.csv").read_bytes() == (tmp_path / "streamed" / "requests.csv").read_bytes()
    assert _simulated(held) == _simulated(streamed)
    assert not list((tmp_path / "streamed").glob(".*.tmp"))


def test_stream_holds_only_requests_in_flight(tmp_path):
    sim = build_simulation(compose_cfg(*RUN, "stream_requests=true"), out=tmp_path)
    assert sim.cluster.requests is None
    res = sim.run()
    res.streamed.close()
    # the reorder buffer holds requests finished before an older one, never most of the run
    assert 0 < res.streamed.peak_buffered < 1200 // 4
    assert res.stats.num == 1200 and not sim.cluster._live


def test_auto_streams_only_large_runs(tmp_path):
    small = build_simulation(compose_cfg(*RUN), out=tmp_path)
    assert small.stream is None and small.cluster.recorder.keep_iterations
    large = build_simulation(compose_cfg(*RUN[:1], "workload.num_requests=100000", "charts=false"), out=tmp_path)
    assert large.stream is not None and not large.cluster.recorder.keep_iterations
    large.stream.abort()
    with pytest.raises(Exception, match="stream_requests must be true, false or auto"):
        build_simulation(compose_cfg(*RUN, "stream_requests=sometimes"), out=tmp_path)


def test_failed_streamed_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    done = RequestStream.done

    def fail_midway(self, r):
        if self.stats.num >= 500:
            raise RuntimeError("boom")
        done(self, r)

    monkeypatch.setattr(RequestStream, "done", fail_midway)
    with pytest.raises(RuntimeError, match="boom"):
        run_job(compose_cfg(*RUN, "stream_requests=true"), tmp_path, "dlora", [])
    assert not any((tmp_path / n).exists() for n in RESULT_FILES)
    assert not list(tmp_path.glob(".*.tmp"))
