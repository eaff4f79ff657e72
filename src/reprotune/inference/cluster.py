"""Ray's environment: set before anything imports ray, which reads it at import time.

On our machines no traffic may leave loopback, and a serving tool should not phone home:
- usage statistics are off unless the user turned them on (RAY_USAGE_STATS_ENABLED);
- for a Ray cluster on this machine (started here, or at a loopback address), every Ray process uses
  127.0.0.1. On Linux Ray otherwise replaces a loopback node address with the machine's network
  address and listens there; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is the switch that keeps it local.
"""

from __future__ import annotations

import ipaddress
import os
import sys


def loopback(address: str | None) -> bool:
    """Whether an address (host, host:port, ray://host:port) is on this machine's loopback interface
    (None: a Ray cluster this process starts)."""
    if address is None:
        return True
    host = address.removeprefix("ray://")
    if host.startswith("["):  # [::1]:6379
        host = host[1:host.find("]")]
    elif host.count(":") == 1:  # host:port (more colons: a bare IPv6 address)
        host = host.split(":")[0]
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ray_environment(address: str | None, host: str = "127.0.0.1") -> None:
    """Set Ray's environment for a cluster at `address` (None: one this process starts) behind a server
    bound to `host`: Ray stays on 127.0.0.1 when both are on loopback. A server bound to a network
    address (a container's 0.0.0.0) is meant to be reached, and so are its Ray node's metrics."""
    if "ray" in sys.modules:
        raise RuntimeError("ray_environment() must run before ray is imported")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if loopback(address) and loopback(host):
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
