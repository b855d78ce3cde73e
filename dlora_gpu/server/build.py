"""A server from a composed `server` config: the engine (the same `build_engine` as `dlora-serve`),
its live loop, the base model as a servable adapter, the tokenizer and the metrics.

The workload group names the adapters served at start (`adapter-<id>`: the workload's adapters, read
from `runtime.adapters_dir` or random), and no requests: clients send those. The base model is served
as one more adapter whose B is zero (what PEFT initialises), so the policies see one kind of request;
it is priced like an adapter of the smallest rank. requests.csv is written into the run folder as
requests end, and summary.json when the server stops.
"""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dlora_gpu.live import LiveEngine
from dlora_gpu.server.app import Server
from dlora_gpu.server.metrics import Metrics
from dlora_gpu.server.text import find_tokenizer
from dlora_sim.core.config import ConfigError, build_workload
from dlora_sim.core.results import RequestStream

START_TIMEOUT_S = 600.0   # building and warming a 7B model's replicas takes minutes


def build_server(cfg: DictConfig, out: Path, system: str = "custom") -> Server:
    """Build and start the engine; the `Server` the app serves (stop it with `server.live.stop()`).
    A failure leaves nothing in `out` but what Hydra put there."""
    from dlora_gpu.cli import about, build_engine

    scfg = cfg.server
    model, raw = model_config(cfg)
    max_len = scfg.get("max_model_len") or model.max_position
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 2:
        raise ConfigError(f"server.max_model_len must be an integer >= 2, got {max_len!r}")
    workload = build_workload(cfg)
    adapters = replace(workload, requests=())
    base = scfg.get("served_model_name") or cfg.model.name
    if base in {a.name for a in adapters.adapters}:
        raise ConfigError(f"server.served_model_name={base}: also the name of a workload adapter")
    text = find_tokenizer(scfg.get("tokenizer"), cfg.runtime.get("checkpoint"))
    if text is not None and len(text.tok) > model.vocab_size:
        raise ConfigError(f"server.tokenizer: {text.folder} has {len(text.tok)} tokens, more than the model's "
                          f"vocabulary ({model.vocab_size}): not this model's tokenizer")
    stream = RequestStream(out, 0)
    engine = live = None
    try:
        engine = build_engine(cfg, adapters, stream=stream)
        live = LiveEngine(engine, {a.name: a.id for a in adapters.adapters}, base)
        metrics = Metrics(live, base)
        live.start()
        if not live.inbox.started.wait(START_TIMEOUT_S) or not live.alive:
            raise RuntimeError("the engine did not start")
        live.load_adapter(base, str(_base_adapter(model, out / "base-adapter",
                                                  min(a.rank for a in adapters.adapters))))
    except BaseException:
        if live is not None:
            live.stop()   # closes the engine too
        elif engine is not None:
            engine.close()
        stream.abort()
        shutil.rmtree(out / "base-adapter", ignore_errors=True)
        raise
    eos = None if text is None else text.eos
    if eos is None:   # no tokenizer to say it: the checkpoint's config.json, if it names one
        eos = raw.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None
    vocab = engine.info[0]["vocab"]
    info = {**about(engine), "system": system, "vocab": vocab, "config": OmegaConf.to_container(cfg, resolve=True)}
    folder = cfg.runtime.get("adapters_dir")
    paths = {a.name: str(Path(folder) / f"adapter-{a.id}") for a in adapters.adapters} if folder else {}
    return Server(live, base, vocab, text, eos, int(scfg.chat_max_tokens), info, paths, metrics,
                  bool(scfg.get("adapter_updates", True)), max_len)


def model_config(cfg: DictConfig) -> tuple:
    """The served model's shape and its config.json as read: the checkpoint's, or the preset's (and {})
    for random weights."""
    from dlora_gpu.model import LlamaConfig
    from dlora_gpu.weights import read_config

    checkpoint = cfg.runtime.get("checkpoint")
    return (LlamaConfig.preset(cfg.model.name), {}) if checkpoint is None else read_config(checkpoint)


def _base_adapter(model, path: Path, rank: int) -> Path:
    """The base model as an adapter (written into the run folder): B = 0 on one projection, of the
    workload's smallest rank."""
    from dlora_gpu.adapters import write_peft_adapter

    return write_peft_adapter(path, model, rank, float(rank), 0, targets=("q_proj",), identity=True)
