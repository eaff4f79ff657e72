"""Ray's environment: set before anything imports ray, which reads it at import time.

On our machines no traffic may leave loopback, and a serving tool should not phone home:
- usage statistics are off unless the user turned them on (RAY_USAGE_STATS_ENABLED);
- Ray is started (or connected to) only where the server says so, never by Ray's API on first use;
- for a Ray cluster on this machine (started here, or at a loopback address), every Ray process uses
  127.0.0.1. On Linux Ray otherwise replaces a loopback node address with the machine's network
  address and listens there; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is the switch that keeps it local.

And a signal meant for the server is the server's alone: see `own_process_groups`.
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
    # Ray's API calls start a Ray of their own when none is connected: once the server has shut its Ray
    # down, a start still under way in another thread (one that outran --start-timeout-s) would start a
    # second one. The server starts and connects Ray itself.
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
    if loopback(address) and loopback(host):
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def own_process_groups() -> None:
    """Start the processes Ray starts from here (GCS, raylet, their agents, and through the raylet every
    worker: Serve's controller, proxies, replicas) in process groups of their own, not the server's.

    `docker stop`, systemd and Kubernetes stop a service with SIGTERM to its whole process group, as a
    terminal's Ctrl-C sends SIGINT to it. Ray's processes shrug off SIGINT (Ray blocks it in them) but
    die of SIGTERM: the GCS went first, and the server, still deleting its application in order, waited
    60 s for it and exited 1 ("Failed to connect to GCS within 60 seconds"). Out of the group, they get
    no signal: the server alone does, and shuts them down in order. They still end with the server if it
    is killed outright: Ray ties them to it with the kernel's parent-death signal, the "fate sharing"
    that also makes Ray do exactly this on Windows (`ray._private.services.ConsolePopen`, the one Popen
    Ray starts its processes with; Ray's reaper, used where fate sharing is not, needs them in our
    group, so they stay there)."""
    from ray._private import services, utils

    if not utils.detect_fate_sharing_support() or getattr(services.ConsolePopen, "own_group", False):
        return

    class OwnGroup(services.ConsolePopen):
        own_group = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, process_group=0, **kwargs)  # setpgid(0, 0) in the child

    services.ConsolePopen = OwnGroup
