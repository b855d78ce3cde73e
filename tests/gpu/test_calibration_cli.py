"""dlora-calibrate and dlora-validate end to end on the CPU runtime (fields, not numbers: timing on a
shared CI machine says nothing)."""
from __future__ import annotations

import csv
import json

import pytest
import yaml

from calibration import calibrate, validate
from dlora_sim.core.profile import load_profile


def test_calibrate_measures_fits_and_writes_a_valid_measured_profile(tmp_path):
    assert calibrate.main(["--quick", "--replays", "--out", str(tmp_path)]) == 0
    prof = load_profile(tmp_path / "profile.yaml")
    assert prof.provenance.source == "measured" and prof.name == "cpu-tiny"
    report = json.loads((tmp_path / "fit_report.json").read_text())
    assert report["fit_points"] > 0 and report["heldout_points"] > 0
    assert set(report["in_sample"]) == {"n", "mean_abs_rel", "p90_abs_rel", "max_abs_rel"}
    assert len(report["points_csv_sha256"]) == 64 and (tmp_path / "fit_report.md").exists()
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert {"device", "versions", "commit", "load_avg_1min_before"} <= set(meta)
    assert meta["reference"]["scaled"] and meta["reference"]["probes"] > 0   # CPU: drift-scaled
    # the profile keeps the reference its points were scaled to (the measured clock scales to it)
    assert prof.provenance.reference_probe_s == meta["reference"]["session_median_s"] > 0
    assert prof.provenance.reference_probe == meta["reference"]["probe"]
    assert meta["reference"]["probe"].startswith("runtime decode step")
    with (tmp_path / "points.csv").open() as f:
        rows = list(csv.DictReader(f))
    drifts = [float(r["drift"]) for r in rows if r["kind"] not in ("served", "transfer")]
    assert drifts and all(d > 0 for d in drifts)
    # KV moved between two workers: unscaled (not the probe's compute), fitted as a fixed cost + bandwidth
    moves = [r for r in rows if r["kind"] == "transfer"]
    assert len(moves) >= 2 and all(int(r["bytes"]) > 0 and float(r["wall_s"]) > 0 and r["drift"] == "" for r in moves)
    assert prof.transfers.kv_transfer_bytes_per_s > 0 and prof.transfers.kv_transfer_overhead_s >= 0
    assert report["kv_transfer"]["bytes_per_s"] == pytest.approx(prof.transfers.kv_transfer_bytes_per_s, rel=1e-5)
    # --replays: a calibration replay served on the measured clock against the microbenchmarks' fit, its
    # iterations fit points, on other requests than the fidelity cases validate on (another seed)
    (replay,) = meta["replays"]
    assert replay["clock_scaling"]["scaled"] and "seed=101" in replay["overrides"]
    served = [r for r in rows if r["kind"] == "served"]
    assert len(served) == replay["points"] == replay["iterations"] > 0
    assert all(r["split"] == "fit" and float(r["wall_s"]) > 0 for r in served)
    kinds = {(b["kind"], b["split"]) for b in report["by_kind"]}
    assert ("served", "fit") in kinds and ("mixed", "heldout") in kinds
    assert report["fit_points"] == sum(r["split"] == "fit" and r["kind"] in calibrate.COMPUTE_KINDS for r in rows)
    # refitting the same points.csv gives the same profile
    again = tmp_path / "refit"
    assert calibrate.main(["--from", str(tmp_path), "--out", str(again)]) == 0
    assert yaml.safe_load((again / "profile.yaml").read_text()) == yaml.safe_load((tmp_path / "profile.yaml").read_text())
    # so does a recorded profile's <name>.points.csv beside its <name>.metadata.json
    rec = tmp_path / "rec"
    rec.mkdir()
    (rec / "x.points.csv").write_bytes((tmp_path / "points.csv").read_bytes())
    (rec / "x.metadata.json").write_bytes((tmp_path / "metadata.json").read_bytes())
    assert calibrate.main(["--from", str(rec / "x.points.csv"), "--out", str(rec / "out")]) == 0
    assert yaml.safe_load((rec / "out" / "profile.yaml").read_text()) == yaml.safe_load((tmp_path / "profile.yaml").read_text())
    (rec / "x.metadata.json").unlink()
    with pytest.raises(SystemExit) as bad:
        calibrate.main(["--from", str(rec / "x.points.csv"), "--out", str(rec / "bad")])
    assert bad.value.code == 2 and not (rec / "bad").exists()


def test_validate_replays_a_trace_on_both_and_reports(tmp_path):
    assert validate.main(["system=slora", "workload.num_requests=20", "charts=false", "--out", str(tmp_path)]) == 0
    v = json.loads((tmp_path / "validation.json").read_text())
    assert v["matched_requests"] == 20
    assert set(v["relative_error"]) == {k for k, _ in validate.METRICS}
    assert set(v["goals"]) == set(validate.GOALS) and 0 <= v["ks_latency"] <= 1
    assert v["iteration_error"] and {"mode", "batch", "n", "mean_rel_err"} <= set(v["iteration_error"][0])
    # by step kind: every iteration in one kind, each a prefill-only, decode-only or mixed step
    by_kind = v["iteration_error_by_kind"]
    assert {(b["mode"], b["kind"]) for b in by_kind} >= {("unmerged", "prefill"), ("unmerged", "decode")}
    assert sum(b["n"] for b in by_kind) == sum(b["n"] for b in v["iteration_error"]) == \
        v["counts"]["num_iterations"]["runtime"]
    assert {"runtime", "simulator"} == set(v["counts"]["num_iterations"])
    assert (tmp_path / "validation.md").exists() and (tmp_path / "validation.png").exists()
    # the simulator rerun at prices x0.99 and x1.01: cheaper steps, shorter time per token
    sens = v["price_sensitivity"]
    assert set(sens) == {"x0.99", "x1.01"} and all(set(e) == set(v["relative_error"]) for e in sens.values())
    assert sens["x0.99"]["mean_tpot_s"] < v["relative_error"]["mean_tpot_s"] < sens["x1.01"]["mean_tpot_s"]
    assert "| x0.99 |" in (tmp_path / "validation.md").read_text()
    # and at the runtime's price level: the factor that prices its iterations, in the sum, as measured
    steps = validate._iterations(tmp_path / "runtime")
    level = sum(float(r["duration_s"]) for r in steps) / sum(float(r["predicted_s"]) for r in steps)
    matched = v["price_matched"]
    assert matched["factor"] == pytest.approx(level, rel=1e-5) and set(matched["relative_error"]) == set(v["relative_error"])
    moved = matched["relative_error"]["mean_tpot_s"] - v["relative_error"]["mean_tpot_s"]
    assert moved * (level - 1) >= 0   # dearer prices, longer time per token, and the reverse
    assert "the runtime's price level |" in (tmp_path / "validation.md").read_text()
    # a runtime folder brought back from elsewhere is compared without re-running it
    again = validate.validate(tmp_path / "runtime", tmp_path / "again")
    assert again["simulator"] == v["simulator"] and again["runtime"] == v["runtime"]


def test_served_points_refuse_a_folder_that_is_not_a_runtime_replay(tmp_path):
    from calibration.replays import served_points
    path = tmp_path / "iterations.csv"
    path.write_text("replica,start_s,duration_s\n0,0.0,0.001\n")   # a simulation's, without predicted_s
    with pytest.raises(ValueError, match=f"{path}: not a runtime replay"):
        served_points(path)


def test_served_points_carry_the_features_the_step_was_priced_with_and_its_measured_compute(tmp_path):
    """Each column of a runtime replay's iterations.csv lands where the fit reads it: the step's time
    less its mode-change, load and swap phases is the compute the closed form prices."""
    from calibration.calibrate import compute_point
    from calibration.replays import served_points
    path = tmp_path / "iterations.csv"
    cols = {"replica": 0, "start_s": 0.5, "duration_s": 0.010, "compute_s": 0.006, "switch_s": 0.002, "load_s": 0.001,
            "swap_s": 0.0005, "mode": "unmerged", "merged_adapter": "", "batch_size": 5, "prefill_tokens": 40,
            "decode_seqs": 3, "distinct_adapters": 2, "forced": 0, "decode_context": 900, "policy_s": 1e-5,
            "predicted_s": 0.009, "prefill_sq": 820, "rank_sum": 16, "resident_rank_sum": 32, "token_rank": 344,
            "wall_forward_s": 0.0055, "wall_load_s": 0.0009, "wall_s": 0.008, "wall_swap_s": 0.0004, "wall_switch_s": 0.0018,
            "lora_passes": 3}
    path.write_text(",".join(cols) + "\n" + ",".join(str(v) for v in cols.values()) + "\n")
    (row,) = served_points(path, split="heldout")
    assert row["kind"] == "served" and row["split"] == "heldout" and row["mode"] == "unmerged"
    p = compute_point(row)
    assert p.seconds == pytest.approx(0.010 - 0.002 - 0.001 - 0.0005)   # the scaled step less its other phases
    assert p.features == {"prefill_tokens": 40, "prefill_sq": 820, "decodes": 3, "decode_context": 900, "batch": 5,
                          "rank_sum": 16, "token_rank": 344, "resident_rank_sum": 32, "distinct": 2,
                          "passes": 3}
    assert row["prefills"] == 2 and row["distinct"] == "2"


def test_a_replays_sample_keeps_every_prefill_step_and_spaces_the_decode_only_ones_evenly():
    """Prefill steps are few but set a replay's TTFT: a sample keeps them all (evenly spaced if they alone
    are more than the limit), fills the rest with evenly spaced decode-only steps, in replay order."""
    from calibration.replays import sample
    rows = [{"i": i, "prefill_tokens": 64 if i % 10 == 3 else 0} for i in range(100)]   # 10 prefill steps
    kept = sample(rows, 30)
    assert [r["i"] for r in kept] == sorted(r["i"] for r in kept) and len(kept) == 30
    assert [r["i"] for r in kept if r["prefill_tokens"]] == list(range(3, 100, 10))
    decodes = [r["i"] for r in kept if not r["prefill_tokens"]]
    assert len(decodes) == 20 and max(decodes) - min(decodes) > 80   # spread over the whole replay
    assert [r["i"] for r in sample(rows, 5)] == [3, 23, 43, 63, 83]   # prefills alone, evenly spaced
    assert sample(rows, 0) == rows and sample(rows, 100) == rows


def _harness(**bench):
    from calibration.microbench import BenchConfig, Harness
    from dlora_gpu.executor import runtime_config
    from dlora_sim.core.config import build_profile, compose
    cfg = compose([], "serve")
    return Harness(runtime_config(cfg.runtime), build_profile(cfg), BenchConfig(**bench))


def test_cpu_timings_are_scaled_by_the_reference_probe_and_referred_to_the_session_median(monkeypatch):
    from dlora_gpu.drift import DriftScale
    h = _harness()
    assert h.reference_s > 0 and h._scale.probe.model is h.ex.model   # the served model's own step
    probes = iter([0.5, 2.0, 2.0, 3.0])
    scripted = DriftScale(1.0, lambda: next(probes), window=3)
    monkeypatch.setattr(h, "_scale", scripted)
    monkeypatch.setattr(h, "reference_s", 1.0)
    # slow probes scale the next timings down, by the median of the last 3 probes (as the measured clock)
    assert [h.drift(), h.drift(), h.drift(), h.drift()] == [2.0, 0.8, 0.5, 0.5]
    rows = h.rescale([{"wall_s": "0.5", "forward_s": "0.4", "mode_s": "", "drift": "0.5"}])
    # every timing is referred to the session's median probe (2.0), not the start's (1.0)
    assert rows == [{"wall_s": "1.000000000", "forward_s": "0.800000000", "mode_s": "", "drift": "1.0000"}]
    assert h.reference_s == 2.0


def test_timings_are_unscaled_without_the_reference():
    h = _harness(reference=False)
    assert h.drift() == 1.0 and h.reference() == {"scaled": False}
    rows = [{"wall_s": "0.5"}]
    assert h.rescale(rows) == [{"wall_s": "0.5"}]


def test_sweeps_measure_the_same_points_from_the_same_state_and_average_them():
    """Each sweep starts with empty slots, so its points match the first sweep's feature for feature
    (the resident adapters included); the averaged row keeps the mean times and counts every run."""
    from calibration.microbench import BenchConfig, average_sweeps, compute_points
    h = _harness(quick=True, repeats=1, warmup=0)
    b = BenchConfig(quick=True, repeats=1, warmup=0)
    first, second = compute_points(h, b), compute_points(h, b)
    rows = average_sweeps([first, second])
    assert len(rows) == len(first) > 0
    for row, a, c in zip(rows, first, second):
        assert row["wall_s"] == f"{(float(a['wall_s']) + float(c['wall_s'])) / 2:.9f}"
        assert row["repeats"] == 2 and row["resident_rank_sum"] == a["resident_rank_sum"] == c["resident_rank_sum"]
    with pytest.raises(RuntimeError, match="sweeps measured different points"):
        average_sweeps([first, [{**first[0], "batch": 99}, *first[1:]]])


def test_fidelity_report_states_the_cost_models_price_bias_per_run():
    from benchmarks.fidelity import price_errors
    buckets = [{"mode": "unmerged", "batch": "1-1", "n": 10, "mean_rel_err": 0.5, "mean_abs_rel_err": 0.5,
                "measured_mean_s": 0.002, "predicted_mean_s": 0.003},
               {"mode": "merged", "batch": "2-4", "n": 30, "mean_rel_err": -0.25, "mean_abs_rel_err": 0.3,
                "measured_mean_s": 0.004, "predicted_mean_s": 0.003}]
    e = price_errors(buckets)
    # all iterations: (10 x 3 ms + 30 x 3 ms) / (10 x 2 ms + 30 x 4 ms) - 1 = 120 / 140 - 1
    assert e["price_bias"] == f"{120 / 140 - 1:+.1%}" and e["price_mean_abs"] == "35.0%"
    assert e["price_by_batch"] == "u 1-1: +50% (n=10); m 2-4: -25% (n=30)"
    assert price_errors([]) == {"price_bias": "-", "price_by_batch": "-", "price_mean_abs": "-"}


def test_the_session_check_prices_re_timed_microbenchmarks_in_the_profiles_units():
    """A quick sweep of the grid, timed now and brought to the profile's reference probe: every compute
    kind gets a bias, and the report's line names them."""
    from benchmarks.fidelity import session_check, session_text
    check = session_check([], quick=True)
    assert check["scaled"] and check["profile_probe_s"] == load_profile("cpu-tiny").provenance.reference_probe_s
    assert {b["kind"] for b in check["by_kind"]} == {"decode", "prefill", "mixed"}
    assert all(-0.9 < b["sum_bias"] < 9 and b["n"] > 0 for b in check["by_kind"])
    text = session_text(check)
    assert "Session check" in text and "decode " in text and "mixed held out " in text
    assert session_text({"scaled": False, "by_kind": []}) == ""


def test_the_cost_models_bias_by_step_kind_sums_each_kinds_prices_and_times():
    from benchmarks.fidelity import kind_errors
    from calibration.validate import iteration_errors_by_kind

    def it(mode, pre, dec, meas, pred):
        return {"mode": mode, "prefill_tokens": pre, "decode_seqs": dec, "duration_s": meas, "predicted_s": pred}
    rows = [it("unmerged", 0, 4, 0.010, 0.011), it("unmerged", 0, 2, 0.010, 0.010), it("unmerged", 64, 3, 0.020, 0.015),
            it("merged", 128, 0, 0.030, 0.036)]
    by = iteration_errors_by_kind(rows)
    assert by == [{"mode": "merged", "kind": "prefill", "n": 1, "sum_bias": 0.2, "measured_s": 0.03},
                  {"mode": "unmerged", "kind": "decode", "n": 2, "sum_bias": 0.05, "measured_s": 0.02},
                  {"mode": "unmerged", "kind": "mixed", "n": 1, "sum_bias": -0.25, "measured_s": 0.02}]
    assert kind_errors(by) == "m prefill: +20% (n=1); u decode: +5% (n=2); u mixed: -25% (n=1)"
    assert iteration_errors_by_kind([{"mode": "merged", "duration_s": 1}]) == [] and kind_errors([]) == "-"


def test_fidelity_report_states_the_simulators_errors_at_scaled_prices():
    from benchmarks.fidelity import sensitivity_text
    sens = {"x0.99": {"mean_latency_s": -0.039, "p99_latency_s": 0.006, "mean_ttft_s": None},
            "x1.01": {"mean_latency_s": 0.093, "p99_latency_s": 0.45, "mean_ttft_s": 0.37}}
    assert sensitivity_text(sens) == "x0.99: -3.9% / +0.6% / -; x1.01: +9.3% / +45.0% / +37.0%"
    assert sensitivity_text({}) == "-"


def test_fidelity_report_gives_each_cases_median_over_repeats_and_the_spread_of_mean_e2e():
    from benchmarks.fidelity import report
    from calibration.validate import METRICS

    def row(rep: int, e2e: float) -> dict:
        return {"workload": "synthetic", "load": "high", "system": "slora", "repeat": rep, "rate_rps": 40.0,
                **{k: 0.01 * rep for k, _ in METRICS}, "mean_latency_s": e2e, "ks_latency": 0.1 * rep,
                "per_request_mean_abs": 0.2, "iterations_runtime": 100 + rep, "iterations_sim": 90,
                "loadavg_before": 0.1, "loadavg_after": 0.2, "price_bias": f"+{rep}%", "price_by_batch": f"b{rep}",
                "price_mean_abs": "9%", "price_sensitivity": f"s{rep}"}

    measured = {**row(0, 0.04), "clock": "measured"}   # another clock is another case
    text = report([row(0, -0.30), row(1, 0.10), measured, row(2, 0.02)], "CPU", "cpu-tiny", "Profile: test.")
    line = next(ln for ln in text.splitlines() if ln.startswith("| synthetic | high | slora | real"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[5] == "+2.0%"                      # median mean E2E of -30%, +10%, +2%
    assert cells[6] == "+1.0%"                      # P50: median of 0, 1, 2 %
    assert cells[13] == "-30.0% ... +10.0%"         # range of mean E2E
    assert cells[14] == "0.100" and cells[16] == "100/101/102 / 90"
    assert "3 time(s)" in text and "Profile: test." in text and "real and measured clock" in text
    assert "| real | +0%, +1%, +2% | b2 | - | 9%, 9%, 9% | s2 |" in text   # the by-batch detail and price
    # sensitivity of the median repeat (+2%)
    line = next(ln for ln in text.splitlines() if ln.startswith("| synthetic | high | slora | measured"))
    assert line.split("|")[6].strip() == "+4.0%" and "| measured | +0% | b0 | - |" in text


def test_the_price_level_is_measured_over_predicted_time_of_the_priced_iterations():
    steps = [{"duration_s": "2", "predicted_s": "1"}, {"duration_s": "1", "predicted_s": "1"},
             {"duration_s": "5", "predicted_s": ""}]   # an unpriced step does not count
    assert validate.price_level(steps) == pytest.approx(1.5)
    assert validate.price_level([{"duration_s": "1", "predicted_s": ""}]) is None


def test_the_price_matched_simulation_scales_the_prices_by_the_runtimes_level(monkeypatch, tmp_path):
    seen = []

    def sensitivity(summary, cfg, folder, sim_overrides, factors):
        seen.append(factors)
        return {f"x{factors[0]:g}": {"mean_latency_s": 0.01}}

    monkeypatch.setattr(validate, "price_sensitivity", sensitivity)
    steps = [{"duration_s": "3", "predicted_s": "2"}, {"duration_s": "1", "predicted_s": "2"},
             {"duration_s": "2", "predicted_s": "1"}]   # measured 6 s where the model priced 5 s
    assert validate.price_matched({}, None, tmp_path, steps) == \
        {"factor": 1.2, "relative_error": {"mean_latency_s": 0.01}}
    assert seen == [(1.2,)]   # dearer by measured / predicted, not its inverse
    assert validate.price_matched({}, None, tmp_path, [{"duration_s": "1", "predicted_s": ""}]) == {}


def test_fidelity_report_counts_the_cases_at_the_runtimes_price_level_beside_their_errors():
    """The diagnostic at the runtime's price level gets its own verdict column and count; the errors and
    their verdicts stay the simulator's at its own prices."""
    from benchmarks.fidelity import matched_errors, report
    from calibration.validate import METRICS

    def row(system: str, err: float, matched: float) -> dict:
        return {"workload": "synthetic", "load": "high", "system": system, "repeat": 0, "rate_rps": 40.0,
                **{k: err for k, _ in METRICS}, "ks_latency": 0.1, "per_request_mean_abs": 0.2,
                "iterations_runtime": 100, "iterations_sim": 90, "loadavg_before": 0.1, "loadavg_after": 0.2,
                "price_bias": "-5%", "price_by_batch": "b", "price_mean_abs": "9%", "price_sensitivity": "s",
                **matched_errors({"factor": 1.05, "relative_error": {k: matched for k, _ in METRICS}})}

    unpriced = {k: v for k, v in row("vllm", 0.001, 0.0).items() if not k.startswith(("matched_", "price_level"))}
    text = report([row("dlora", -0.20, 0.025), row("slora", 0.001, 0.001), unpriced], "CPU", "cpu-tiny",
                  "Profile: test.")
    assert ("At that level, of 2 cases with a price level, 1 meet every goal, 2 every minimum, 0 miss one "
            "within the runtime's spread and 0 by more.") in text
    assert "| synthetic | high | vllm | real | - | - | - | - | goal | - | - |" in text
    assert "| s | - |" in text   # no price level, no errors at it
    assert "| synthetic | high | dlora | real | - | - | - | - | miss | " in text
    assert text.splitlines()[next(i for i, ln in enumerate(text.splitlines())
                                  if ln.startswith("| synthetic | high | dlora | real | - |"))].endswith("| minimum |")
    assert "| s | x1.050: +2.5% / +2.5% / +2.5% |" in text
    assert matched_errors({}) == {"price_level": None, **{f"matched_{k}": None for k in validate.GOALS}}


def test_fidelity_report_sets_each_cases_errors_against_the_runtimes_own_spread_over_its_repeats():
    """A miss of a minimum no larger than the runtime's own max/min - 1 over the repeats is `noise`; one
    beyond it a `miss`; the summary counts cases by their worst verdict."""
    from benchmarks.fidelity import report, runtime_spread, verdicts
    from calibration.validate import METRICS

    def row(system: str, rep: int, p99_err: float, rt_p99: float) -> dict:
        return {"workload": "synthetic", "load": "high", "system": system, "repeat": rep, "rate_rps": 40.0,
                **{k: 0.001 for k, _ in METRICS}, "p99_latency_s": p99_err,
                **{f"runtime_{k}": 1.0 for k, _ in METRICS}, "runtime_p99_latency_s": rt_p99,
                "ks_latency": 0.1, "per_request_mean_abs": 0.2, "iterations_runtime": 100, "iterations_sim": 90,
                "loadavg_before": 0.1, "loadavg_after": 0.2, "price_bias": "+0%", "price_by_batch": "b",
                "price_mean_abs": "9%", "price_sensitivity": "s"}

    noisy = [row("dlora", 0, 0.20, 1.0), row("dlora", 1, 0.18, 1.25)]   # the runtime's P99 moved 25%
    assert runtime_spread(noisy)["p99_latency_s"] == pytest.approx(0.25)
    assert runtime_spread(noisy[:1])["p99_latency_s"] is None            # one repeat: no spread
    spread = runtime_spread(noisy)
    assert verdicts({"p99_latency_s": 0.19, "mean_latency_s": 0.001}, spread) == \
        {"mean_latency_s": "goal", "p99_latency_s": "noise", "mean_ttft_s": "-", "throughput_rps": "-"}
    assert verdicts({"p99_latency_s": 0.30}, spread)["p99_latency_s"] == "miss"
    assert verdicts({"p99_latency_s": 0.07}, spread)["p99_latency_s"] == "minimum"
    rows = [*noisy, row("slora", 0, 0.30, 1.0), row("slora", 1, 0.30, 1.1), row("vllm", 0, 0.0, 1.0)]
    text = report(rows, "CPU", "cpu-tiny", "Profile: test.")
    assert "Of 3 cases (their median errors), 1 meet every goal, 1 every minimum, 1 miss a minimum by no more " \
           "than the runtime's own spread over the repeats, and 1 miss one by more." in text
    assert "| synthetic | high | dlora | real | 0.0% | 25.0% | 0.0% | 0.0% | noise | P99 E2E +19.0% (noise) |" in text
    assert "| synthetic | high | slora | real | 0.0% | 10.0% | 0.0% | 0.0% | miss | P99 E2E +30.0% |" in text
    assert "| synthetic | high | vllm | real | - | - | - | - | goal | - | - |" in text
    assert "At that level" not in text   # no case has a price level: no count of them


def test_the_torch_lora_path_makes_as_many_passes_as_the_step_is_priced_for(monkeypatch):
    """An unmerged batch of prefills on adapters 0 and 1 and decodes on 0, 2 and 2: the runtime's torch
    path loops over adapters once for the prefills and once for the decodes, so 4 passes per projection
    group and layer, where the batch has 3 distinct adapters; `Step.lora_passes` (what the per-adapter
    cost is charged for) counts the same 4."""
    from dlora_gpu import lora_ops
    from dlora_sim.core.contracts import Decision
    h = _harness(reference=False)
    h.set_mode(None)
    h.ensure_resident([0, 1, 2])
    dec = h.new([0, 2, 2], [30, 40, 50])
    h.step(Decision(dec, merged=None), scaled=False)   # their prompts
    passes: list[int] = []
    real = lora_ops._torch_apply
    monkeypatch.setattr(lora_ops, "_torch_apply", lambda y, x, st, groups: (passes.extend(s for s, _ in groups),
                                                                           real(y, x, st, groups)))
    pre = h.new([0, 1], [20, 25])
    _, _, step = h.step(Decision(pre + dec, merged=None))
    assert step.distinct == 3 and step.lora_passes == 4
    per_group = len(h.ex.model.layers) * 4   # qkv, o, gate_up, down
    assert len(passes) == per_group * step.lora_passes
    features = dict(prefill_tokens=step.prefill_tokens, prefill_sq=step.prefill_sq, decode_seqs=step.decode_seqs,
                    decode_context=step.decode_context, num_seqs=5, lora_rank_sum=step.rank_sum,
                    lora_token_rank=step.token_rank, resident_rank_sum=step.resident_rank_sum)
    assert h.cost.price(step).compute == h.cost.iteration_time(**features, lora_passes=4) > \
        h.cost.iteration_time(**features, lora_passes=3)   # charged per pass
    # a decode-only step: one pass per distinct adapter
    passes.clear()
    _, _, step = h.step(Decision(dec, merged=None))
    assert step.lora_passes == step.distinct == 2 and len(passes) == per_group * 2


def test_fidelity_interleaves_the_repeats_so_each_case_samples_the_machine_across_the_recording(monkeypatch):
    """Every case once, then every case again: a case's repeats do not share one stretch of a drifting
    machine."""
    from benchmarks import fidelity
    from calibration.validate import METRICS
    runs = []

    def run_repeat(overrides, out, clock):
        runs.append(out.name)
        about = {"device": "CPU", "profile": "cpu-tiny", "clock_scaling": None}
        return {"about": about}, {**{k: 0.0 for k, _ in METRICS}, "ks_latency": 0.1, "per_request_mean_abs": 0.1,
                                  "iterations_runtime": 10, "iterations_sim": 10, "loadavg_before": 0.1,
                                  "loadavg_after": 0.1, "price_bias": "+0%", "price_by_batch": "b",
                                  "price_mean_abs": "1%", "price_sensitivity": "s"}

    monkeypatch.setattr(fidelity, "case_overrides", lambda workload, system, load, requests, extra: ([], 1.0))
    monkeypatch.setattr(fidelity, "_run_repeat", run_repeat)
    assert fidelity.main(["--workloads", "synthetic", "--loads", "moderate,high", "--systems", "slora",
                          "--repeats", "2", "--clocks", "measured"]) == 0
    assert runs == ["synthetic_moderate_slora_measured_0", "synthetic_high_slora_measured_0",
                    "synthetic_moderate_slora_measured_1", "synthetic_high_slora_measured_1"]
