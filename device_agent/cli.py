"""`edge-agent` command line: serve a bundle on a device, score files with it, or check it.

Errors are one line on stderr (a traceback only with --debug) and exit with the codes listed on every
help page (`cli_runner.EXIT_CODES`); with --json, stdout holds exactly one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from device_agent.cli_runner import (
    EXIT_CTRL_C,
    Parser,
    add_common_flags,
    add_verify_command,
    end_help_with,
    exit_codes_epilog,
    package_version,
    run_cli,
)
from device_agent.errors import EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_VERIFICATION

log = logging.getLogger("device_agent")

# The exit codes edge-agent can return (no accuracy gate and no training on a device).
AGENT_EXIT_CODES = (EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_VERIFICATION, EXIT_CTRL_C)
DESCRIPTION = """\
edge-agent runs a signed edge-kit bundle on a device: it verifies the bundle, serves predictions
(HTTP, Open Inference Protocol, or files), summarises what the model sees into windows of histograms,
and reports them to the fleet server over MQTT, keeping them on disk while the broker is away.

`edge-agent COMMAND --help` says what a command does. Every command takes --json (one JSON object on
stdout), --debug and -q. Docs: docs/agent.md; config keys: docs/config-agent.md."""


_common = add_common_flags


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="edge-agent", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"edge-agent {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "run", help="serve a bundle: summaries over MQTT, optional HTTP API, hot updates",
        description="Serve a bundle until SIGTERM or Ctrl-C: verify and self-test it, answer predictions over "
                    "HTTP (with --http),\nclose a summary window every --window-seconds and send it over MQTT "
                    "(spooled on disk while the\nbroker is away), and swap in a newer verified bundle dropped "
                    "into the --bundle folder while serving.\nSettings come from --config; flags override it.")
    p.add_argument("--config", help="agent config (TOML; keys in docs/config-agent.md); flags override it")
    p.add_argument("--bundle", help="bundle file, or a directory whose newest *.edgebundle is served (watched)")
    p.add_argument("--broker", help="mqtt://HOST:PORT, or mqtts:// for TLS")
    p.add_argument("--device-id", dest="device_id", help="this device's id (an MQTT topic level)")
    p.add_argument("--fleet", help="fleet name (MQTT topic level, default 'default')")
    p.add_argument("--spool", help="spool database path (default $STATE_DIRECTORY/spool.db or ./edge-agent-spool.db)")
    p.add_argument("--http", help="HOST:PORT for POST /predict, POST /labels, GET /healthz, GET /status and the "
                   "Open Inference Protocol under /v2")
    p.add_argument("--http-max-body-bytes", dest="http_max_body_bytes", type=int, metavar="BYTES",
                   help="largest request body the HTTP API reads (default 8 MiB)")
    p.add_argument("--http-max-samples", dest="http_max_samples", type=int, metavar="N",
                   help="most samples in one HTTP request (default 4096)")
    p.add_argument("--http-max-connections", dest="http_max_connections", type=int, metavar="N",
                   help="most open HTTP connections; one more closes the longest idle (default 64)")
    p.add_argument("--http-timeout", dest="http_timeout", type=float, metavar="S",
                   help="seconds a client has to send a request, or may stay idle (default 10)")
    p.add_argument("--window-seconds", dest="window_seconds", type=float, help="summary window length (default 60)")
    p.add_argument("--pubkey", help="Ed25519 public key (PEM): bundles must be signed by it")
    p.add_argument("--allow-downgrade", dest="allow_downgrade", action="store_true",
                   help="accept a bundle of a lower version of the same model (a deliberate rollback)")
    p.add_argument("--model-name", dest="model_name", metavar="NAME",
                   help="the one model this device serves; bundles of another name are refused "
                        "(default: the first bundle served pins it)")
    _common(p)

    p = sub.add_parser(
        "predict", help="run a bundle over a .npy/.npz/.csv file, streaming, into a .npy",
        description="Run a bundle over a file of inputs, in batches, and write the model outputs to a .npy "
                    "file.\nThe file is streamed: memory stays flat whatever its size.")
    p.add_argument("--bundle", required=True, help="the .edgebundle file to run")
    p.add_argument("--input", required=True, help="FILE.npy, FILE.npz or FILE.csv of raw inputs")
    p.add_argument("--output", required=True, help="FILE.npy for the model outputs")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=256,
                   help="rows per model call (default 256)")
    p.add_argument("--pubkey", help="Ed25519 public key (PEM) the bundle must be signed by")
    _common(p)

    add_verify_command(
        sub, "check a bundle's signature, every hash, and its self-test",
        "Check a bundle on this device before serving it: the signature (with --pubkey), the hash of every "
        "member,\nand its self-test (the model loads and reproduces the outputs recorded at build time).\n"
        "Exit 4 names the first member that fails.")
    # Added last, so it reaches every page, including those of commands added above.
    return end_help_with(parser, exit_codes_epilog(AGENT_EXIT_CODES))


def _public_key(path: str | Path | None) -> Any:
    if not path:
        return None
    from device_agent.bundle.signing import load_public_key

    return load_public_key(path)


def cmd_verify(args: argparse.Namespace) -> dict[str, Any]:
    from device_agent.agent import load_model

    loaded = load_model(args.bundle, public_key=_public_key(args.pubkey), require_signature=bool(args.pubkey))
    info = loaded.runtime.info
    log.info("%s %s verified (signed by %s), self-test %s", info.name, info.version, loaded.signed_by, loaded.selftest)
    return {"ok": True, "member": None, "bundle": str(loaded.path), "model": info.as_dict(),
            "signed": loaded.signed_by is not None, "signed_by": loaded.signed_by, "selftest": loaded.selftest}


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    from device_agent.agent import load_model
    from device_agent.batch import predict_file

    loaded = load_model(args.bundle, public_key=_public_key(args.pubkey), require_signature=bool(args.pubkey))
    result = predict_file(loaded.runtime, Path(args.input), Path(args.output), batch_size=args.batch_size)
    log.info("wrote %d rows to %s in %.2fs", result["rows"], result["output"], result["seconds"])
    return result


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    from device_agent.agent import Agent
    from device_agent.bundle.watcher import BundleWatcher
    from device_agent.capture.config import check_capture
    from device_agent.deploy.config import check_deploy
    from device_agent.http.server import AgentHTTPServer
    from device_agent.settings import apply_flags, load_settings
    from device_agent.uplink.forwarder import Forwarder
    from device_agent.uplink.spool import Spool
    from device_agent.uplink.transport import Message, MqttPublisher
    from device_agent.uplink.wire import parse_host_port, status_topic

    settings = apply_flags(load_settings(args.config), args)
    check_deploy(settings.deploy, bundle=settings.bundle, pubkey=settings.pubkey)
    check_capture(settings.capture, deploy=settings.deploy, mqtt=settings.mqtt)
    broker = settings.broker_config()
    assert settings.bundle is not None and settings.device_id is not None  # apply_flags checked
    listen = parse_host_port(settings.http) if settings.http else None
    spool = Spool(settings.spool_path(), max_windows=settings.spool_max_windows)
    offline = {"state": "offline", "device": settings.device_id, "fleet": settings.fleet, "reason": "connection lost"}
    will = Message(status_topic(settings.fleet, settings.device_id), json.dumps(offline).encode(), qos=1, retain=True)
    publisher = MqttPublisher(broker, client_id=f"edgekit-{settings.fleet}-{settings.device_id}", will=will)
    agent = Agent(
        settings.bundle, public_key=_public_key(settings.pubkey), require_signature=settings.require_signature,
        allow_downgrade=settings.allow_downgrade, model_name=settings.model_name,
        fleet=settings.fleet, device_id=settings.device_id, window_seconds=settings.window_seconds,
        forwarder=Forwarder(spool, publisher), compress=settings.mqtt.compress, intra_op_threads=settings.threads,
        request_memory_bytes=settings.http_limits.request_memory_bytes,
    )
    updater = None
    if settings.deploy.enabled:
        from device_agent.deploy.updater import start_deployments

        # Subscribed before the first connect, so that connect already brings the retained message.
        updater = start_deployments(agent, publisher, settings.deploy, settings.bundle, settings.mqtt)
    capture = None
    if settings.capture.enabled:
        from device_agent.capture.capture import start_capture

        # Like deployments: subscribed before the first connect, for the retained capture request.
        capture = start_capture(agent, publisher, settings.capture, deploy=settings.deploy, mqtt=settings.mqtt)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()
    watcher = BundleWatcher(settings.bundle, agent.update, interval=settings.watch_interval)
    watcher.start()
    server = None
    if listen is not None:
        try:
            server = AgentHTTPServer(listen, agent, settings.http_limits)
        except OSError as exc:
            if updater is not None:
                updater.stop()
            agent.stop()
            from device_agent.errors import UsageError

            raise UsageError(f"cannot listen on {settings.http}: {exc}") from exc
        server.start()
        log.info("HTTP API on %s", server.url)
    log.info("agent %s/%s running; windows every %ss to %s, spool %s", settings.fleet, settings.device_id,
             settings.window_seconds, broker.address, spool.path)
    try:
        stop.wait()
    finally:
        log.info("stopping")
        if updater is not None:
            updater.stop()  # a download in progress stops; its .part resumes at the next start
        watcher.stop()
        if server is not None:
            server.stop()
        if capture is not None:
            capture.stop()  # after the last prediction; spooled records are uploaded after the next start
        final = agent.stop()
    return {"stopped": True, "counters": final["counters"], "spool": final.get("spool")}


COMMANDS = {"run": cmd_run, "predict": cmd_predict, "verify": cmd_verify}


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("edge-agent", build_parser(), argv, lambda args: COMMANDS[args.command](args),
                   noisy_loggers=("paho",))
