"""Joining a running Ray cluster (the runtime's `runtime.ray.address`, a sweep's `hydra/launcher=ray_join`):
refused in one line when nobody listens at the address, instead of Ray retrying for minutes."""
from __future__ import annotations

import socket


def unreachable(address: str | None, timeout_s: float = 5.0) -> str | None:
    """Why a `host:port` Ray address cannot be joined (nothing accepts a connection there), or None
    (reachable, or an address Ray resolves itself: None, "auto", "local", a ray:// client URL)."""
    if not address or address in ("auto", "local") or "://" in address or ":" not in address:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except ValueError:
        return f"{port!r} is not a port"
    except OSError as e:
        return f"nothing accepts a connection at {address} ({e.strerror or e})"
