"""Joining Ray for this process: a local instance on loopback, or the cluster `--ray-address` names.

Ray's own join waits minutes for a cluster head that is not there, so a plain TCP connect to the
address comes first and turns a wrong address into a clear error within seconds.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from accelc.errors import UsageError

CONNECT_TIMEOUT_S = 5.0


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of `HOST:PORT` or `ray://HOST:PORT`; None for Ray's own lookups (`auto`)."""
    if address == "auto":
        return None
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise UsageError(f"--ray-address {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    return parts.hostname, port


def start(ray, address: str | None) -> bool:
    """Initialise Ray; True when a local instance was started here (the caller shuts it down)."""
    if address is None:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1", configure_logging=False)  # fmt: skip
        return True
    target = _host_port(address)
    if target is not None:
        try:
            socket.create_connection(target, timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise UsageError(f"--ray-address {address}: nothing answers there ({exc})") from None
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UsageError(f"--ray-address {address}: cannot join that Ray cluster ({exc})") from None
    return False
