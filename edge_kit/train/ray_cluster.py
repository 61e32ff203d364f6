"""Reaching Ray: a running cluster (`--ray-address` or RAY_ADDRESS), else a small private local instance.

Kept apart from the training engine so batch scoring can connect without importing torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sys
from collections.abc import Iterator

log = logging.getLogger(__name__)

# A local instance stays small: it shares the machine with the driver and, in CI, with the tests.
LOCAL_OBJECT_STORE_BYTES = 128 * 1024 * 1024


def connect(address: str | None, cpus: int) -> None:
    """Join the cluster at `address` (else RAY_ADDRESS); with neither, start a local instance listening on
    loopback only, with max(2, cpus) CPUs. A no-op when this process is already connected."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address)
        return
    log.info("no --ray-address or RAY_ADDRESS: starting a local Ray instance (%d CPUs)", max(2, cpus))
    private_token()
    with loopback_node():
        ray.init(address="local", num_cpus=max(2, cpus), include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, _node_ip_address="127.0.0.1")


# Ray's switch for "this node is alone on this machine": with it off, Ray keeps 127.0.0.1 as the node's
# address instead of swapping in the machine's routable one, and then every server it starts (GCS,
# raylet, object manager, workers, dashboard and runtime-env agents) listens on loopback only.
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_node() -> Iterator[None]:
    """While a private instance starts: its node address stays 127.0.0.1, so it listens on loopback only.

    `_node_ip_address="127.0.0.1"` alone is not enough: Ray replaces a loopback address with the
    machine's routable one unless its cluster switch is off. The switch is read from the environment
    when `ray` is imported (here and in every process the instance starts, which inherit the variable);
    in this process `ray` may be imported already, so its constant is set too. Both are restored once
    the instance runs, so a later connection to a real cluster is unaffected.
    """
    from ray._private import ray_constants

    saved_env = os.environ.get(_LOCAL_ONLY_ENV)
    saved_flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop(_LOCAL_ONLY_ENV, None)
        else:
            os.environ[_LOCAL_ONLY_ENV] = saved_env
        if saved_flag is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved_flag


@contextlib.contextmanager
def connected(address: str | None, cpus: int) -> Iterator[None]:
    """Connected to Ray for the block (see `connect`), with everything Ray prints for the cluster on stderr.

    A Ray driver prints its workers' forwarded output and the raylet's messages ("(raylet) A worker died
    ...") on sys.stdout, from threads of its own; stdout belongs to the command's result (`--json`: one
    JSON object). So within the block sys.stdout is sys.stderr, and a connection made here is closed
    before the block ends, which stops those threads: no late line lands on stdout either.
    """
    import ray

    already = ray.is_initialized()
    with contextlib.redirect_stdout(sys.stderr):
        connect(address, cpus)
        try:
            yield
        finally:
            if not already:
                ray.shutdown()


def private_token() -> None:
    """Give a private local instance a token of its own, unless the user chose how Ray authenticates.

    The private instance listens on loopback only (`loopback_node`), but every local user can reach
    loopback, so token authentication stays on; and Ray's default token is one file per user
    (~/.ray/auth_token), which any other Ray instance of the same user may create or replace under a
    running one. The workers this process starts inherit the variables.
    """
    if "RAY_AUTH_MODE" in os.environ or "RAY_AUTH_TOKEN" in os.environ or "RAY_AUTH_TOKEN_PATH" in os.environ:
        return
    # Only the token: Ray itself turns token mode on for a new local instance (and refreshes its cached
    # config; setting RAY_AUTH_MODE here, after `import ray`, would not reach that cache).
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
