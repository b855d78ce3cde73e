"""`dlora-bench url=http://127.0.0.1:8000 workload=tiny`: replay a workload against a server.

Writes requests.csv and summary.json into its run folder with the columns and keys `dlora-sim`
writes (times as the client saw them; what only the server knows, such as iterations, is absent).
Ctrl-C stops sending, cancels what is in flight, and writes the requests sent so far, saying so.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from dlora_sim.core.config import ConfigError, build_workload
from dlora_sim.core.errors import UserError, reported, require_extra
from dlora_sim.core.paths import CONF_DIR
from dlora_sim.core.request import NS
from dlora_sim.core.results import Recorder, SimResult, summarize, write_results

log = logging.getLogger("dlora_bench")
logging.getLogger("httpx").setLevel(logging.WARNING)   # not a line per request


class ServerError(ConnectionError, UserError):
    """The server at `url` cannot be reached or is not an OpenAI-compatible server."""


def server_about(url: str) -> tuple[list[str], dict | None]:
    """The models the server at `url` serves, and, for a dlora-server, what it is (`/dlora/about`)."""
    import httpx
    try:
        with httpx.Client(base_url=url.rstrip("/"), timeout=30.0) as c:
            models = c.get("/v1/models")
            if models.status_code != 200:
                raise ServerError(f"url={url}: GET /v1/models answered {models.status_code}; is it an "
                                  "OpenAI-compatible server?")
            names = [m["id"] for m in models.json().get("data", [])]
            about = c.get("/dlora/about")
            return names, about.json() if about.status_code == 200 else None
    except httpx.HTTPError as e:
        raise ServerError(f"url={url}: cannot reach the server ({type(e).__name__}: {e})") from None


# summary.json's counts only the server knows, and the dlora-server counter each is read from
SERVER_COUNTS = {"num_iterations": "dlora:iterations", "num_switches": "dlora:mode_switches",
                 "num_adapter_loads": "dlora:adapter_loads", "num_preemptions": "dlora:preemptions",
                 "num_migrations": "dlora:migrations"}
UNSEEN = ("num_swap_outs", "num_swap_ins", "num_partial_prefill_chunks", "merged_iteration_share", "busy_s",
          "switch_s", "switching_share", "mean_queueing_delay_s", "p90_queueing_delay_s")


def server_counts(url: str) -> dict[str, float]:
    """A dlora-server's counters now (`/metrics`), by summary key; {} from a server without them."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(url.rstrip("/") + "/metrics", timeout=30.0).text
        families = {f.name: f for f in text_string_to_metric_families(text)}
    except (httpx.HTTPError, ValueError):
        return {}
    return {key: sum(s.value for s in families[name].samples if s.name.endswith("_total"))
            for key, name in SERVER_COUNTS.items() if name in families}


def bench_config(cfg: DictConfig, about: dict | None) -> dict:
    """The config the simulator replays to compare: a dlora-server's own (its system, cluster, profile,
    model) with this workload, or this command's own against another server."""
    mine = OmegaConf.to_container(cfg, resolve=True)
    if about is None:
        return mine
    theirs = dict(about["config"])
    for key in ("workload", "seed", "slo_s_per_token"):
        theirs[key] = mine[key]
    theirs.pop("server", None)
    theirs["bench"], theirs["url"] = mine["bench"], mine["url"]
    return theirs


def run_bench(cfg: DictConfig, out: Path, system: str) -> dict:
    from dlora_bench.replay import Replay

    workload = build_workload(cfg)
    url = str(cfg.url).rstrip("/").removesuffix("/v1")   # the OpenAI base URL (…/v1) or the server's root
    served, about = server_about(url)
    pattern = str(cfg.bench.adapter_names)
    names = [pattern.format(id=a.id) for a in workload.adapters]
    missing = [n for n in names if n not in served]
    if missing:
        raise ConfigError(f"url={url} serves no model {missing[0]!r} (the workload's adapter names: "
                          f"bench.adapter_names={pattern}); it serves {served[:8]}")
    vocab = cfg.bench.vocab if cfg.bench.vocab is not None else (about or {}).get("vocab")
    if vocab is None:
        raise ConfigError("bench.vocab: unknown for a server other than dlora-server; give the model's vocabulary "
                          "size (32000 for Llama-2)")
    bar = tqdm(total=len(workload.requests), unit="req", desc=f"replaying against {url}", mininterval=0.5,
               disable=not cfg.get("progress", True), leave=False)
    replay = Replay(url, workload, names, int(vocab), int(cfg.seed), float(cfg.bench.timeout_s), cfg.bench.api_key,
                    on_done=lambda s: bar.update(1))
    before = server_counts(url) if about is not None else {}
    wall0 = time.perf_counter()
    interrupted = False
    try:
        asyncio.run(replay.run())
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    sent = [s for s in replay.sent if s.sent >= 0]   # not a task Ctrl-C cancelled before it sent anything
    requests = [s.request() for s in sent]
    lag = [(s.sent - s.scheduled) / NS for s in sent]
    end = max([r.finish for r in requests if r.finish >= 0], default=0)
    server = {k: v for k, v in (about or {}).items() if k != "config"}
    extra = {"interrupted": interrupted,   # how late the client sent (an open loop only if these are small)
             "bench_send_lag_mean_s": round(sum(lag) / len(lag), 6) if lag else None,
             "bench_send_lag_max_s": round(max(lag), 6) if lag else None}
    res = SimResult(requests, Recorder(keep_iterations=False), end / NS, time.perf_counter() - wall0,
                    int((about or {}).get("config", {}).get("cluster", {}).get("num_replicas", 0))
                    or int(cfg.cluster.num_replicas), extra)
    counts = dict.fromkeys([*SERVER_COUNTS, *UNSEEN])   # unknown to a client: null, not 0
    if before:
        after = server_counts(url)
        counts.update({k: int(after[k] - before[k]) for k in before if k in after})
    summary = {"system": (about or {}).get("system") or system, "arm": None, "overrides": [],
               "executor": "dlora-bench", "clock": "real", "url": url, "server": server or None,
               "device": server.get("device"), "runtime": server.get("runtime"),
               **summarize(res, float(cfg.slo_s_per_token)), **counts, "config": bench_config(cfg, about)}
    write_results(out, res, summary)
    if interrupted:
        print(f"dlora-bench: interrupted; the {len(requests)} request(s) sent so far are in {out} "
              f"({summary['completed']} finished; the rest are marked rejected)", file=sys.stderr)
    return summary


@hydra.main(config_path=str(CONF_DIR), config_name="bench", version_base="1.3")
@reported("dlora-bench")
def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    s = run_bench(cfg, out, hc.runtime.choices.get("system", "custom"))
    log.info("%d/%d finished against %s: throughput %.3f req/s, %.1f output tokens/s, mean TTFT %s, mean TPOT %s "
             "-> %s", s["completed"], s["num_requests"], s["url"], s["throughput_rps"], s["output_tokens_per_s"],
             _ms(s["mean_ttft_s"]), _ms(s["mean_tpot_s"]), out)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f} ms"


def main() -> None:
    require_extra("dlora-bench", "the load generator", ("httpx", "prometheus_client"), "bench",
                  "`make install-bench` (docs/server.md)")
    sys.exit(_main())


if __name__ == "__main__":
    main()
