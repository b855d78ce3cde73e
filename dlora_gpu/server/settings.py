"""The `server` config group's checks that need nothing heavy, run before torch or the web stack are
imported: a mistake in the command line is refused in well under a second."""
from __future__ import annotations

import socket

from omegaconf import DictConfig

from dlora_gpu.server.text import check_tokenizer_folder
from dlora_sim.core.config import ConfigError
from dlora_sim.core.errors import UserError

SERVER_KEYS = {"host", "port", "served_model_name", "tokenizer", "max_model_len", "chat_max_tokens", "adapter_updates",
               "log_requests"}


class PortError(OSError, UserError):
    """server.port is taken or cannot be bound."""


def check_server_config(cfg: DictConfig) -> None:
    """Unknown `server` keys, a port that is not one or is taken, a clock a server cannot run on, a
    tokenizer folder without a tokenizer: each refused in one line."""
    scfg = cfg.server
    unknown = sorted(set(scfg) - SERVER_KEYS)
    if unknown:   # `+server.prot=...` (Hydra's own hint for a typo) would otherwise serve on the default port
        raise ConfigError(f"server.{unknown[0]}: no such key (server keys: {', '.join(sorted(SERVER_KEYS))})")
    if cfg.runtime.clock != "real":
        raise ConfigError(f"runtime.clock={cfg.runtime.clock}: a server runs on the real clock (wall time)")
    if scfg.get("tokenizer") is not None:
        check_tokenizer_folder(scfg.tokenizer)
    check_port(str(scfg.host), scfg.port)


def check_port(host: str, port) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise PortError(f"server.port must be an integer in 0..65535, got {port!r}")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise PortError(f"server.host={host} server.port={port}: cannot listen there ({e.strerror})") from None
