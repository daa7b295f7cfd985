"""Starting or joining Ray (the store that trials read is located by ``agl.data.locate``)."""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


log = logging.getLogger(__name__)

# Small enough for a 2-core, shared 24 GB machine; trials pass paths, not arrays, through it.
DEFAULT_OBJECT_STORE_BYTES = 400 * 1024**2
LOOPBACK = "127.0.0.1"  # the node address of a local Ray: its servers listen on loopback only


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             dashboard: bool = False, object_store_memory: int | None = None) -> dict[str, Any]:
    """Start a local Ray (``address=None``) or join a cluster (``"auto"`` / ``"ray://..."``).

    The dashboard is off unless asked for, and then bound to 127.0.0.1. A local Ray
    uses 127.0.0.1 as its node address, so none of its servers (GCS, raylet, object
    manager, workers, agents) listens on another interface (see ``_loopback_node``). Token
    authentication follows ``RAY_AUTH_MODE`` (Ray's default: a token in
    ``~/.ray/auth_token``); the CLI that started a cluster and this driver must agree.
    Returns ``ray.cluster_resources()``.
    """
    import ray

    if ray.is_initialized():  # a caller (a test module, a notebook) already started or joined Ray
        return ray.cluster_resources()
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    kwargs: dict[str, Any] = {"include_dashboard": dashboard, "log_to_driver": True}
    if dashboard:
        kwargs["dashboard_host"] = "127.0.0.1"
    local = address in (None, "", "local")
    if local:
        kwargs.update(address="local", num_cpus=num_cpus, num_gpus=num_gpus, _node_ip_address=LOOPBACK,
                      object_store_memory=object_store_memory or DEFAULT_OBJECT_STORE_BYTES)
    else:
        _match_cli_auth()
        if num_cpus is not None or num_gpus is not None:
            log.warning("--num-cpus/--num-gpus are ignored when joining the cluster at %s", address)
        kwargs = {"address": address, "log_to_driver": True}
    # a cluster whose head listens on loopback (several nodes on this machine): keep 127.0.0.1 as given
    with _loopback_node() if local or _is_loopback(address) else contextlib.nullcontext():
        ray.init(**kwargs)
    resources = ray.cluster_resources()
    log.info("Ray %s: %s", "local" if local else f"cluster {address}",
             {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")})
    return resources


def _is_loopback(address: str | None) -> bool:
    """True for ``127.x.x.x:PORT``, ``localhost:PORT`` or ``[::1]:PORT`` (Ray would swap it for the machine's IP)."""
    if not address or "://" in address:
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.")


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Let a local ``ray.init`` keep 127.0.0.1 as its node address.

    Ray 2.60 binds its gRPC servers (GCS, raylet node and object managers, every worker) to
    all interfaces unless the node address is a loopback address, and its agents to the
    node address. ``ray.init(_node_ip_address="127.0.0.1")`` alone does not help on Linux:
    Ray replaces a loopback address by the machine's IP (``resolve_ip_for_localhost``)
    unless it runs in its single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
    its default on macOS and Windows). That flag is read once, when Ray is imported, so it
    is switched here for the duration of ``ray.init`` only; the started processes get the
    node address on their command lines.
    """
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):  # another Ray version: nothing to switch
        log.warning("this Ray has no single-machine switch; the local Ray may listen on all interfaces")
        yield
        return
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def _match_cli_auth() -> None:
    """Use token auth when joining a cluster if a token exists and RAY_AUTH_MODE is unset.

    ``ray start`` switches itself to token mode when ``~/.ray/auth_token`` exists; a driver
    joining with ``address="auto"`` does not, and is then refused (InvalidAuthToken).
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:  # Ray's own rule (the one `ray start` applies); it also refreshes Ray's cached config
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # another Ray version: set the mode before Ray reads it
        token_path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token")).expanduser()
        if os.environ.get("RAY_AUTH_TOKEN") or token_path.is_file():
            os.environ["RAY_AUTH_MODE"] = "token"
        return
    if maybe_enable_token_auth_if_token_available(warn_if_disabled=False):
        log.info("joining with Ray token auth (RAY_AUTH_MODE=token)")
