"""`edge-kit fleet serve`: MQTT consumers (one process each), drift evaluation, dashboard and API.

Consumers run as separate processes (`--workers N`, spawned) so ingest does not share a GIL with the
HTTP server and the drift evaluation; they share the database and the MQTT 5 shared subscription.
A consumer that dies is restarted; SIGTERM or Ctrl-C stops everything cleanly.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.synchronize
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device_agent.bundle.signing import load_public_key
from device_agent.uplink.wire import BrokerConfig, parse_broker_url, parse_host_port
from edge_kit.errors import UsageError
from edge_kit.fleet.captures.intake import Captures
from edge_kit.fleet.captures.requests import CaptureRequests
from edge_kit.fleet.captures.store import CaptureStore
from edge_kit.fleet.consumer_state import ConsumerState
from edge_kit.fleet.deployments.bundles import BundleFiles, DownloadLimits
from edge_kit.fleet.deployments.publisher import DeploymentPublisher
from edge_kit.fleet.deployments.rollout import RolloutManager
from edge_kit.fleet.device_tokens import load_device_key
from edge_kit.fleet.http_security import HttpSecurity, load_token
from edge_kit.fleet.ingest import SESSION_EXPIRY_SECONDS, ConsumerConfig, run_consumer
from edge_kit.fleet.reference_index import ReferenceStore
from edge_kit.fleet.server import FleetHttpLimits, make_server, serve_in_thread, server_tls_context
from edge_kit.fleet.service import FleetService
from edge_kit.fleet.settings import FleetSettings, load_settings
from edge_kit.fleet.storage import Storage

log = logging.getLogger(__name__)


def broker_config(args: argparse.Namespace) -> BrokerConfig:
    """--broker plus the --mqtt-* TLS flags, with the same parser and options the agent uses."""
    files = {"ca_certs": args.mqtt_ca_certs, "certfile": args.mqtt_certfile, "keyfile": args.mqtt_keyfile}
    for key, path in files.items():
        if path is not None and not Path(path).is_file():
            raise UsageError(f"--mqtt-{key.replace('_', '-')}: file not found: {path}")
    return parse_broker_url(args.broker, session_expiry=SESSION_EXPIRY_SECONDS, insecure=args.mqtt_tls_insecure,
                            **{k: v for k, v in files.items() if v is not None})


def http_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """TLS for the HTTP listener from the --tls-* flags; None when --tls-certfile is not given."""
    certfile, keyfile = getattr(args, "tls_certfile", None), getattr(args, "tls_keyfile", None)
    client_ca, crl = getattr(args, "tls_client_ca", None), getattr(args, "tls_crl", None)
    if certfile is None:
        given = [flag for flag, v in (("--tls-keyfile", keyfile), ("--tls-client-ca", client_ca),
                                      ("--tls-crl", crl)) if v is not None]
        if given:
            raise UsageError(f"{given[0]} needs --tls-certfile (the server certificate)")
        return None
    if crl is not None and client_ca is None:
        raise UsageError("--tls-crl needs --tls-client-ca (the CA whose revocations it lists)")
    for flag, path in (("--tls-certfile", certfile), ("--tls-keyfile", keyfile), ("--tls-client-ca", client_ca),
                       ("--tls-crl", crl)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{flag}: file not found: {path}")
    try:
        return server_tls_context(certfile, keyfile, client_ca, crl)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise UsageError(f"--tls-*: cannot use these files: {exc}") from exc


def bundle_pubkey(args: argparse.Namespace, settings: FleetSettings) -> str | None:
    """The public key bundles must be signed by: --pubkey, else the fleet config's `bundles.pubkey`, else none."""
    path = getattr(args, "pubkey", None) or settings.bundles.pubkey
    if path is not None and not Path(path).is_file():
        raise UsageError(f"{'--pubkey' if getattr(args, 'pubkey', None) else 'bundles.pubkey'}: file not found: "
                         f"{path}")
    return str(path) if path is not None else None


def _rollout_manager(args: argparse.Namespace, storage: Storage, service: FleetService, broker: BrokerConfig,
                     pubkey: str | None) -> RolloutManager:
    """Deployments (docs/deploy.md): bundles from --bundle/--bundles, published over the fleet's broker."""
    concurrency = getattr(args, "download_concurrency", 64)
    factor = getattr(args, "download_cap", 3.0)
    if concurrency < 1 or factor < 1.0:
        raise UsageError("--download-concurrency must be at least 1 and --download-cap at least 1 (x the bundle size)")
    public_url = getattr(args, "public_url", None) or ""
    if public_url and not public_url.startswith(("http://", "https://")):
        raise UsageError(f"--public-url must be http(s)://HOST[:PORT], got {public_url!r}")
    files = BundleFiles(Path(args.bundles) if args.bundles else None, [Path(b) for b in args.bundle],
                        public_key=load_public_key(pubkey) if pubkey else None)
    manager = RolloutManager(storage, service.settings, service.references, files, service.alerts, args.fleet,
                             public_url, download_limits=DownloadLimits(concurrency=concurrency,
                                                                        per_device_factor=factor))
    manager.publisher = DeploymentPublisher(broker, args.fleet, manager.messages,
                                            client_id=f"edgekit-fleet-{args.fleet}-deployer-{socket.gethostname()}")
    service.deployments = manager
    service.readiness_checks.append(("deployments", lambda: None if manager.publisher is None
                                     or manager.publisher.connected else "deployment publisher not connected"))
    return manager


def captures_location(args: argparse.Namespace) -> str:
    """--captures, else a `captures/` folder beside a SQLite --db; PostgreSQL (or an in-memory SQLite
    database) has no folder beside it, so there it must be named."""
    named = getattr(args, "captures", None)
    if named:
        return str(named)
    db = str(args.db)
    if db.startswith("sqlite:///") and db != "sqlite:///:memory:":
        return str(Path(db.removeprefix("sqlite:///")).parent / "captures")
    raise UsageError("--captures DIR|URL is needed with this --db: captures are kept beside a SQLite database "
                     "file by default, and a PostgreSQL database has no folder beside it (docs/captures.md)")


def _captures(args: argparse.Namespace, storage: Storage, service: FleetService, broker: BrokerConfig,
              store: CaptureStore) -> DeploymentPublisher:
    """Field captures (docs/captures.md): the store and index behind the upload routes, and the capture
    requests published retained on each device's `capture` topic."""
    requests = CaptureRequests(storage, args.fleet)
    publisher = DeploymentPublisher(broker, args.fleet, requests.messages, what="capture request",
                                    client_id=f"edgekit-fleet-{args.fleet}-captures-{socket.gethostname()}")
    requests.publisher = publisher
    service.enable_captures(Captures(storage, service.references, store), requests)
    service.readiness_checks.append(("captures", lambda: None if publisher.connected
                                     else "capture request publisher not connected"))
    return publisher


def _worker_main(cfg: ConsumerConfig, stop: multiprocessing.synchronize.Event, level: int) -> None:
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s worker{cfg.worker} %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))  # as the parent CLI holds it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    run_consumer(cfg, stop)


class Supervisor:
    """When to restart each consumer: exponential backoff (1, 2, 4 ... 30 s) while it keeps dying,
    back to the shortest delay once it has stayed up for HEALTHY_SECONDS (a broker that was down
    for an hour must not leave every later crash waiting the longest delay)."""

    HEALTHY_SECONDS = 60.0
    MAX_DELAY = 30.0

    def __init__(self, workers: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.restarts = 0
        self._failures = [0] * workers
        self._started = [clock()] * workers
        self._due: list[float | None] = [None] * workers

    def alive(self, i: int) -> None:
        if self._failures[i] and self.clock() - self._started[i] >= self.HEALTHY_SECONDS:
            self._failures[i] = 0

    def exited(self, i: int) -> float:
        """Record an exit; returns the delay before the restart."""
        if self.clock() - self._started[i] >= self.HEALTHY_SECONDS:
            self._failures[i] = 0
        delay = min(2.0 ** self._failures[i], self.MAX_DELAY)
        self._failures[i] += 1
        self._due[i] = self.clock() + delay
        return delay

    def due(self, i: int) -> bool:
        """True (once) when worker i's restart time has come."""
        due = self._due[i]
        if due is None or self.clock() < due:
            return False
        self._due[i] = None
        self._started[i] = self.clock()
        self.restarts += 1
        return True


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = load_settings(args.config)
    broker = broker_config(args)
    host, port = parse_host_port(args.http)
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    if not args.bundle and not args.bundles:
        raise UsageError("fleet serve needs the models' reference histograms: give --bundle B or --bundles DIR")
    pubkey = bundle_pubkey(args, settings)
    tls = http_tls(args)  # bad TLS files fail before the database is touched
    # Bad bundles fail before anything is created; with a key, only bundles it signed are used.
    references = ReferenceStore(args.bundle, args.bundles, public_key=load_public_key(pubkey) if pubkey else None)
    if pubkey is None:
        log.warning("fleet serve without --pubkey: any file in the bundles folder is trusted by its hashes alone, "
                    "so whoever can write there decides what a model's reference is")
    location = captures_location(args)
    key_file = getattr(args, "device_key_file", None)
    device_key = load_device_key(key_file) if key_file else None
    storage = Storage(args.db)  # creates the schema before any worker touches it
    try:  # after the database: the default folder is made beside its file, never a folder of its own
        store = CaptureStore(location, getattr(args, "captures_max_bytes", 10 * 1024**3))
    except BaseException:
        storage.close()
        raise
    service = FleetService(storage, references, settings)
    consumers = ConsumerState(args.workers)
    service.consumers = consumers
    if args.http_max_connections < 1 or args.http_timeout <= 0:
        raise UsageError("--http-max-connections must be at least 1 and --http-timeout positive")
    limits = FleetHttpLimits(request_timeout=args.http_timeout, max_connections=args.http_max_connections)
    token = load_token(args.token_file)
    security = HttpSecurity(
        token=token, allowed_hosts=frozenset(args.allowed_host), allowed_origins=frozenset(args.allowed_origin),
        # Without a token nothing can authenticate and nothing can be changed; reads then stay
        # possible from loopback only, so a fresh install still shows its dashboard on the machine.
        open_reads=args.open_reads or token is None,
        device_certs=getattr(args, "tls_client_ca", None) is not None,
        device_key=device_key,
        # `--captures-max-batch-bytes` where the CLI has it (docs/captures.md), else the fleet config's key.
        device_max_body=getattr(args, "captures_max_batch_bytes", None) or settings.captures.max_batch_bytes,
    )
    deployments = _rollout_manager(args, storage, service, broker, pubkey)
    capture_publisher = _captures(args, storage, service, broker, store)
    try:
        http = make_server(service, host, port, security, limits, tls)
    except OSError as exc:
        raise UsageError(f"--http {args.http}: cannot listen: {exc}") from exc
    if not deployments.public_url:  # devices fetch bundles from the address the server listens on
        listen = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        scheme = "https" if tls is not None else "http"
        deployments.public_url = (f"{scheme}://{'[' + listen + ']' if ':' in listen else listen}:"
                                  f"{http.server_address[1]}")
    if tls is not None and security.device_certs:
        log.info("bundle downloads need a device certificate from %s%s", args.tls_client_ca,
                 f" (revocations: {args.tls_crl})" if args.tls_crl else "")
    if not security.device_certs and device_key is None:
        log.warning("capture uploads are refused (403): no device credentials (--tls-client-ca or --device-key-file)")
    log.info("captures kept in %s (%d of %d bytes used)", location, store.used, store.max_bytes)

    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    group = f"edgekit-fleet-{args.fleet}"
    level = logging.getLogger().getEffectiveLevel()

    def config(i: int) -> ConsumerConfig:
        return ConsumerConfig(broker=broker, db=args.db, fleet=args.fleet, group=group, worker=i,
                              bundles=tuple(args.bundle), bundles_dir=args.bundles, settings=settings,
                              subscribe_status=(i == 0),
                              client_id=f"{group}-{socket.gethostname()}-{i}", state=consumers,
                              pubkey=pubkey)

    def start_worker(i: int) -> multiprocessing.process.BaseProcess:
        p = ctx.Process(target=_worker_main, args=(config(i), stop, level), name=f"fleet-consumer-{i}")
        p.start()
        return p

    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    workers: list[multiprocessing.process.BaseProcess | None] = [start_worker(i) for i in range(args.workers)]
    serve_in_thread(http)
    service.start()
    assert deployments.publisher is not None
    deployments.publisher.start()
    capture_publisher.start()
    deployments.start()
    log.info("fleet %s: %d consumer(s) on %s, dashboard %s://%s:%d/, %d model(s) known",
             args.fleet, args.workers, args.broker, "https" if tls else "http", host, port, len(references.all()))
    supervisor = Supervisor(len(workers))
    try:
        while not stopping.wait(1.0):
            for i, p in enumerate(workers):
                if p is not None and p.is_alive():
                    supervisor.alive(i)
                    continue
                if p is not None:
                    consumers.set_connected(i, False)  # a dead consumer must not look connected
                    log.error("consumer %d exited (code %s); restarting it in %.0f s", i, p.exitcode,
                              supervisor.exited(i))
                    workers[i] = None
                if supervisor.due(i):  # waits are scheduled, not slept: SIGTERM is handled at once
                    workers[i] = start_worker(i)
    finally:
        stop.set()
        for p in filter(None, workers):
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join()
        deployments.stop()
        if deployments.publisher is not None:
            deployments.publisher.close()
        capture_publisher.close()
        service.stop()
        http.shutdown()
        http.server_close()
        storage.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return {"stopped": True, "workers": args.workers, "restarts": supervisor.restarts}
