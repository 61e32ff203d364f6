"""`edge-kit` command line: parse arguments, call the API, map errors to exit codes.

Heavy imports (torch, mlflow, onnx) happen inside the command modules, which are imported only
when their command runs, so `edge-kit --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from device_agent.cli_runner import Parser, add_common_flags, add_verify_command, run_cli
from edge_kit import __version__

log = logging.getLogger("edge_kit")

# command name -> module under edge_kit.commands that holds `run(args) -> dict`
COMMANDS: dict[str, str] = {
    "train": "train",
    "build": "build",
    "verify": "verify",
    "inspect": "inspect",
    "reproduce": "reproduce",
    "keygen": "keygen",
    "bench": "bench",
    "promote": "promote",
    "fleet serve": "fleet_serve",
    "batch-predict": "batch_predict",
}


# Third-party libraries that are chatty at INFO; their warnings still come through.
NOISY_LOGGERS = ("mlflow", "alembic", "urllib3", "dvc", "neural_compressor", "torch", "onnxscript", "onnx_ir", "paho")
_common = add_common_flags


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="edge-kit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"edge-kit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a config: checkpoints, MLflow run, fp32 ONNX")
    p.add_argument("--config", required=True, help="project config (TOML)")
    p.add_argument("--resume", choices=["auto", "never"], default="auto",
                   help="auto: continue from the newest valid checkpoint (default); never: start over")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or a local store)")
    p.add_argument("--ray-address", help="Ray cluster to train on with engine = \"ray\" (default: RAY_ADDRESS, "
                                         "else a local instance)")
    _common(p)

    p = sub.add_parser("build", help="train (or reuse), quantize, gate and sign a device bundle")
    p.add_argument("--config", required=True, help="project config (TOML)")
    p.add_argument("--out", required=True, help="folder to write the .edgebundle into")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--key", help="Ed25519 private key (PEM) to sign the bundle with")
    g.add_argument("--unsigned", action="store_true", help="write an unsigned bundle (must be asked for)")
    p.add_argument("--backend", choices=["ort", "inc"], help="override quantize.backend")
    p.add_argument("--tracking-uri", help="MLflow tracking URI")
    _common(p)

    add_verify_command(sub, "check a bundle's signature and every hash")

    p = sub.add_parser("inspect", help="show what a bundle holds and where it came from")
    p.add_argument("bundle")
    p.add_argument("--pubkey", help="Ed25519 public key (PEM) to verify the signature with")
    _common(p)

    p = sub.add_parser("reproduce", help="rebuild a bundle from its provenance and compare bytes")
    p.add_argument("bundle")
    p.add_argument("--config", required=True)
    p.add_argument("--tracking-uri", help="MLflow tracking URI")
    _common(p)

    p = sub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles")
    p.add_argument("--out", required=True, help="folder for edgekit.key (private) and edgekit.pub")
    p.add_argument("--force", action="store_true", help="overwrite an existing key pair")
    _common(p)

    p = sub.add_parser("bench", help="benchmark a bundle: int8 vs fp32 vs PyTorch, on this host")
    p.add_argument("bundle")
    p.add_argument("--out", required=True, help="folder for report.md, report.json and charts")
    p.add_argument("--config", help="project config (for the fp32 model, checkpoint and test split)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (for smoke tests)")
    _common(p)

    p = sub.add_parser("promote", help="make a bundle's registered MLflow model version the champion")
    p.add_argument("bundle")
    p.add_argument("--tracking-uri",
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the one the bundle names)")
    _common(p)

    p = sub.add_parser("batch-predict", help="score input shards with a bundle on Ray, one output per shard")
    p.add_argument("bundle")
    p.add_argument("--input", required=True, help="a shard, a folder of shards or a glob (.npy .npz .csv .parquet)")
    p.add_argument("--output", required=True, help="folder for one <shard>.pred.npz per input shard")
    p.add_argument("--pubkey", help="Ed25519 public key (PEM) the bundle must be signed by")
    p.add_argument("--actors", type=int, default=1, help="ONNX Runtime actors (one session each; default 1)")
    p.add_argument("--ray-address", help="Ray cluster (default: RAY_ADDRESS, else a local instance)")
    _common(p)

    fleet = sub.add_parser("fleet", help="fleet drift service")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND")
    p = fleet_sub.add_parser("serve", help="ingest summaries over MQTT, detect drift, serve the dashboard")
    p.add_argument("--broker", required=True,
                   help="mqtt://[USER@]HOST:PORT (mqtts:// for TLS); the password from $EDGEKIT_MQTT_PASSWORD")
    p.add_argument("--mqtt-ca-certs", dest="mqtt_ca_certs", help="CA (PEM) the broker certificate chains to")
    p.add_argument("--mqtt-certfile", dest="mqtt_certfile", help="client certificate (PEM), if the broker wants one")
    p.add_argument("--mqtt-keyfile", dest="mqtt_keyfile", help="the client certificate's private key (PEM)")
    p.add_argument("--mqtt-tls-insecure", dest="mqtt_tls_insecure", action="store_true",
                   help="skip the broker certificate check (testing only)")
    p.add_argument("--db", default="sqlite:///fleet.db", help="sqlite:///PATH (default) or postgresql://...")
    p.add_argument("--http", default="127.0.0.1:8080", help="HOST:PORT for the dashboard and API")
    p.add_argument("--fleet", default="default", help="fleet name (MQTT topic level)")
    p.add_argument("--workers", type=int, default=1, help="consumer processes on a shared subscription")
    p.add_argument("--bundle", action="append", default=[], help="bundle whose reference histograms to use")
    p.add_argument("--bundles", help="folder of bundles (re-read when it changes)")
    p.add_argument("--config", help="fleet config (TOML): drift thresholds, alerts, retraining command")
    p.add_argument("--token-file", help="file holding the operator token (else EDGEKIT_FLEET_TOKEN); "
                                        "without one the dashboard and API are read-only, for loopback only")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name clients use besides loopback and the --http address (reverse proxy)")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="URL",
                   help="another origin whose pages may call the API (e.g. https://ops.example.com)")
    p.add_argument("--open-reads", action="store_true",
                   help="let loopback clients read the API and /metrics without the token")
    p.add_argument("--http-max-connections", type=int, default=256, metavar="N",
                   help="open HTTP connections before the oldest idle one is closed (default 256)")
    p.add_argument("--http-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a request may take to arrive in full (default 10)")
    _common(p)
    return parser


def _command_key(args: argparse.Namespace) -> str | None:
    if args.command == "fleet":
        return f"fleet {args.fleet_command}" if getattr(args, "fleet_command", None) else None
    return args.command


def run_command(args: argparse.Namespace) -> dict[str, Any] | None:
    key = _command_key(args)
    assert key is not None
    module = importlib.import_module(f"edge_kit.commands.{COMMANDS[key]}")
    runner: Callable[[argparse.Namespace], dict[str, Any] | None] = module.run
    return runner(args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("edge-kit", build_parser(), argv, run_command, command_of=_command_key,
                   noisy_loggers=NOISY_LOGGERS)


if __name__ == "__main__":
    raise SystemExit(main())
