"""Starting or joining the Ray cluster a run uses.

A local cluster binds to 127.0.0.1 only: Ray has no authentication of its own, so nothing we
start may listen on other interfaces unless the user asks for it.
"""

from __future__ import annotations

import os

# Environment every Ray process we start (driver and workers) should see.
RAY_ENV = {
    # Ray Train v2's controller polls workers every 2 s by default, which made every
    # `ray.train.report()` block ~1.8 s (FIELD-NOTES). 0.1 s removes that stall.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    # With this unset, Ray 2.60 bound the machine's network address even when told to use
    # loopback; with it set to 0 every listener bound to 127.0.0.1 (checked with `ss -ltnp`).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Keep Ray from trying to reach the network for usage stats.
    "RAY_USAGE_STATS_ENABLED": "0",
    # Sub-second progress from Ray Data would drown our own progress lines.
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # Train v2 routes worker print() through a logger *and* stdout, so every line reached the
    # driver twice; plain stdout (forwarded once by log_to_driver) is enough.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def worker_env(hardware) -> dict[str, str]:
    """Environment for every training worker: RAY_ENV plus the hardware profile's NCCL variables
    (NCCL_P2P_DISABLE for GPUs without peer-to-peer, NCCL_IB_DISABLE without InfiniBand,
    NCCL_SOCKET_IFNAME when given, then hardware.nccl_env). Pure: no Ray import."""
    from sana_ray.hardware import nccl_env

    env = dict(RAY_ENV)
    if hardware.use_gpu:
        env |= nccl_env(hardware.profile_names(), hardware.interconnect, hardware.nccl_socket_ifname, hardware.nccl_env)
    elif hardware.nccl_socket_ifname:  # CPU workers talk gloo
        env["GLOO_SOCKET_IFNAME"] = hardware.nccl_socket_ifname
    return env


def worker_label_selectors(hardware) -> list[dict[str, str]] | None:
    """One Ray label selector per training worker, pool by pool (None when no pool has labels)."""
    if not any(pool.labels for pool in hardware.nodes):
        return None
    return [dict(pool.labels) for pool in hardware.nodes for _ in range(pool.workers)]


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = True) -> None:
    """Connect to ``address`` or start a local single-node Ray bound to 127.0.0.1.

    Reuses an existing connection (tests start one per session). The dashboard (on 127.0.0.1)
    is on by default because it serves the state API: without it Ray Train's placement-group
    cleaner cannot see its controller (a warning every second), and early-stopped Tune trials
    leaked their placement groups (FIELD-NOTES).
    """
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": {k: os.environ[k] for k in RAY_ENV}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    ray.init(
        # "local" always starts a new cluster, never attaching to one another process started.
        address="local",
        num_cpus=num_cpus,
        _node_ip_address="127.0.0.1",
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )
