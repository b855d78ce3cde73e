"""Serving until stopped: build the server, run uvicorn, then stop the engine and write the results
folder (the config is checked first, before this module's imports: `settings`)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import uvicorn
from omegaconf import DictConfig

from dlora_gpu.server.app import make_app
from dlora_gpu.server.build import build_server
from dlora_sim.core.jobs import finish_job

log = logging.getLogger("dlora_gpu.server")


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, except that Ctrl-C or SIGTERM only stops it (uvicorn re-raises the signal once
    it has shut down, which would end the process before the results are written), and that the engine
    stops first: every request in flight then ends with an error event its client can read, instead of
    being cut off when uvicorn's graceful shutdown runs out."""

    def __init__(self, config: uvicorn.Config, live):
        super().__init__(config)
        self.live = live

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            self._captured_signals.clear()

    async def shutdown(self, sockets=None) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.live.stop)
        await super().shutdown(sockets)


def serve(cfg: DictConfig, out: Path, system: str) -> dict:
    """Serve until interrupted; the summary of what was served (also in `out`/summary.json)."""
    host, port = str(cfg.server.host), cfg.server.port   # checked by `settings.check_server_config`
    srv = build_server(cfg, out, system)
    live = srv.live
    adapters = ", ".join(n for n in live.names if n != srv.base)
    log.info("serving %s (base) and %s on http://%s:%d/v1 on %s; Ctrl-C stops and writes the results to %s",
             srv.base, adapters, host, port, srv.about.get("device"), out)
    config = uvicorn.Config(make_app(srv), host=host, port=port, log_level="warning",
                            access_log=bool(cfg.server.log_requests), timeout_graceful_shutdown=5)
    try:
        _Uvicorn(config, live).run()
    except BaseException:
        live.stop()
        raise
    about = {k: v for k, v in srv.about.items() if k not in ("system", "config")}   # finish_job adds both
    return finish_job(cfg, out, system, [], live.stop, {**about, "served_model_name": srv.base,
                                                         "adapter_names": live.served})
