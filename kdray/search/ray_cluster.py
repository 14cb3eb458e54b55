"""Ray for a search: connecting to a cluster (or starting a local Ray with token auth), refusing an address
where no Ray answers, and refusing trial resources the cluster cannot hold (Tune would wait for them forever)."""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional

from kdray.errors import ConfigError, first_line
from kdray.experiment.space import SearchSettings
from kdray.redact import mask

log = logging.getLogger("kdray")


def init_ray(address: Optional[str], num_cpus: Optional[int] = None) -> None:
    """Connect to a cluster (``address``, else ``$RAY_ADDRESS``), or start a local Ray bound to 127.0.0.1
    with token auth. An address where no Ray answers is refused within seconds (``--address``)."""
    import ray

    if ray.is_initialized():
        return
    field = "--address"
    if address is None and os.environ.get("RAY_ADDRESS"):  # e.g. inside `ray job submit`, or a sourced env.sh
        address, field = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
        log.info("Ray: connecting to RAY_ADDRESS=%s", mask(address))
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "runtime_env": {"env_vars": {"KDRAY_CACHE_DIR": os.environ.get("KDRAY_CACHE_DIR", "")}}}
    if address is None:
        # A local Ray (2.60+) turns token auth on by itself (RAY_AUTH_MODE=token, a generated token);
        # the dashboard is off and the node binds to the loopback address.
        ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kwargs)
        if os.environ.get("RAY_AUTH_MODE") != "token":
            log.warning("local Ray started without token authentication (RAY_AUTH_MODE=%s)",
                        os.environ.get("RAY_AUTH_MODE"))
        return
    # Ray replaces a node address of 127.0.0.1 by this machine's outward IP, so a cluster kept on
    # loopback runs its nodes on another 127.x.y.z address; the driver then has to say it is there too.
    host = address.split("://")[-1].rsplit(":", 1)[0]
    if host.startswith("127.") and host != "127.0.0.1":
        kwargs["_node_ip_address"] = host
    check_ray_answers(address, field)
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        ray.shutdown()
        raise ConfigError(field, address, f"the address of a running Ray cluster ({first_line(e)}); omit "
                                          "--address for a local Ray") from None


def check_ray_answers(address: str, field: str, timeout_s: float = 5.0) -> None:
    """Refuse a ``host:port`` or ``ray://host:port`` address where nothing accepts a connection (ray.init
    would wait minutes there). ``auto`` is left to Ray, which answers at once."""
    import socket

    target = address.split("://", 1)[-1]
    if address == "auto" or ":" not in target:
        return
    host, port = target.rsplit(":", 1)
    if not port.isdigit():
        raise ConfigError(field, address, "auto, host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(field, address, f"the address of a running Ray cluster (nothing answers at {host}:{port}: "
                                          f"{e.strerror or e}); start one with `ray start --head`, or omit --address "
                                          "for a local Ray") from None


def alive_nodes() -> int:
    """Nodes of the connected Ray cluster that are up."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def check_cluster_fits(s: SearchSettings, field_cpus: str = "--cpus-per-worker") -> None:
    """Refuse trial resources that no node of the cluster has (Tune would wait for them forever). An
    autoscaling cluster whose nodes are not up yet: set KDRAY_WAIT_FOR_RESOURCES=1."""
    import ray

    if os.environ.get("KDRAY_WAIT_FOR_RESOURCES") == "1":
        return
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    cpus = max((r.get("CPU", 0.0) for r in nodes), default=0.0)
    gpus = max((r.get("GPU", 0.0) for r in nodes), default=0.0)
    if s.cpus_per_worker > cpus:
        raise ConfigError(field_cpus, s.cpus_per_worker, f"at most {cpus:g} CPUs per worker (the largest node of this "
                                                         "Ray cluster; KDRAY_WAIT_FOR_RESOURCES=1 waits for an "
                                                         "autoscaler)")
    if s.gpus_per_worker > gpus:
        raise ConfigError("--gpus-per-worker", s.gpus_per_worker, f"at most {gpus:g} GPUs per worker (the largest node "
                                                                  "of this Ray cluster; KDRAY_WAIT_FOR_RESOURCES=1 "
                                                                  "waits for an autoscaler)")
    total_cpus = sum(r.get("CPU", 0.0) for r in nodes)
    total_gpus = sum(r.get("GPU", 0.0) for r in nodes)
    fit = min(total_cpus // s.cpus_per_worker, total_gpus // s.gpus_per_worker if s.gpus_per_worker else math.inf)
    if s.workers_per_trial > fit:
        raise ConfigError("--workers-per-trial", s.workers_per_trial,
                          f"at most {fit:g} workers of {s.cpus_per_worker:g} CPUs and {s.gpus_per_worker:g} GPUs (this "
                          f"Ray cluster has {total_cpus:g} CPUs and {total_gpus:g} GPUs; a trial's workers start "
                          "together)")
