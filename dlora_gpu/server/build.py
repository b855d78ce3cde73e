"""A server from a composed `server` config: the engine (the same `build_engine` as `dlora-serve`),
its live loop, the base model as a servable adapter, the tokenizer and the metrics.

The workload group names the adapters served at start (`adapter-<id>`: the workload's adapters, read
from `runtime.adapters_dir` or random), and no requests: clients send those. The base model is served
as one more adapter whose B is zero (what PEFT initialises), so the policies see one kind of request;
it is priced like an adapter of the smallest rank. requests.csv is written into the run folder as
requests end, and summary.json when the server stops.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dlora_gpu.live import LiveEngine
from dlora_gpu.server.app import Server
from dlora_gpu.server.metrics import Metrics
from dlora_gpu.server.text import checkpoint_eos, find_tokenizer
from dlora_sim.core.config import ConfigError, build_workload
from dlora_sim.core.results import RequestStream

START_TIMEOUT_S = 600.0   # building and warming a 7B model's replicas takes minutes


def build_server(cfg: DictConfig, out: Path, system: str = "custom") -> Server:
    """Build and start the engine; the `Server` the app serves (stop it with `server.live.stop()`)."""
    from dlora_gpu.adapters import write_peft_adapter
    from dlora_gpu.cli import about, build_engine
    from dlora_gpu.model import LlamaConfig

    scfg = cfg.server
    if cfg.runtime.clock != "real":
        raise ConfigError(f"runtime.clock={cfg.runtime.clock}: a server runs on the real clock (wall time)")
    workload = build_workload(cfg)
    adapters = replace(workload, requests=())
    text = find_tokenizer(scfg.get("tokenizer"), cfg.runtime.get("checkpoint"))
    engine = build_engine(cfg, adapters, stream=RequestStream(out, 0))
    try:
        base = scfg.get("served_model_name") or cfg.model.name
        names = {a.name: a.id for a in adapters.adapters}
        if base in names:
            raise ConfigError(f"server.served_model_name={base}: also the name of a workload adapter")
        metrics_box: list[Metrics] = []
        live = LiveEngine(engine, names, base, on_finished=lambda r, why: metrics_box[0].finished(r, why))
        metrics_box.append(Metrics(live, base))
        live.start()
        if not live.inbox.started.wait(START_TIMEOUT_S) or not live.alive:
            live.stop()
            raise RuntimeError("the engine did not start")
        # the base model: an adapter of the smallest rank with B = 0 (on every worker, like any load)
        model_cfg = LlamaConfig.preset(cfg.model.name) if cfg.runtime.get("checkpoint") is None else None
        if model_cfg is None:
            from dlora_gpu.weights import read_config
            model_cfg = read_config(cfg.runtime.checkpoint)[0]
        rank = min(a.rank for a in adapters.adapters)
        path = write_peft_adapter(out / "base-adapter", model_cfg, rank, float(rank), 0, targets=("q_proj",),
                                  identity=True)
        live.load_adapter(base, str(path))
    except BaseException:
        engine.close()
        raise
    eos = None if text is None else text.eos
    eos = eos if eos is not None else checkpoint_eos(cfg.runtime.get("checkpoint"))
    info = {**about(engine), "system": system, "vocab": engine.info[0]["vocab"],
            "config": OmegaConf.to_container(cfg, resolve=True)}
    return Server(live, base, engine.info[0]["vocab"], text, eos, int(scfg.chat_max_tokens), info, metrics=metrics_box[0])
