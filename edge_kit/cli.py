"""`edge-kit` command line: train, build, check and ship models to edge devices, and run the fleet server.

Parses arguments, calls the API and maps errors to exit codes (through `device_agent.cli_runner`).
Heavy imports (torch, mlflow, onnx) happen inside the command modules, which are imported only
when their command runs, so `edge-kit --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from device_agent.cli_runner import (
    EXIT_CODES,
    Parser,
    add_common_flags,
    add_verify_command,
    end_help_with,
    exit_codes_epilog,
    run_cli,
)
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
    "fleet deploy": "fleet_deploy",
    "fleet rollout": "fleet_rollout",
    "fleet enroll": "fleet_enroll",
    "fleet revoke": "fleet_revoke",
    "batch-predict": "batch_predict",
    "data snapshot": "data_snapshot",
    "data add": "data_add",
    "fleet captures": "fleet_captures",
    "fleet capture-request": "fleet_capture_request",
}


# Third-party libraries that are chatty at INFO; their warnings still come through.
NOISY_LOGGERS = ("mlflow", "alembic", "urllib3", "dvc", "neural_compressor", "torch", "onnxscript", "onnx_ir", "paho")
_common = add_common_flags

DESCRIPTION = """\
edge-kit takes PyTorch models from a reproducible training run to signed int8 bundles for edge
devices, and watches the devices that serve them for drift. The devices run `edge-agent`.

  keygen -> train -> build -> verify / inspect / reproduce -> promote, bench, batch-predict
  fleet serve: gather the devices' summaries, detect drift, alert, retrain

`edge-kit COMMAND --help` says what a command does. Every command takes --json (one JSON object on
stdout), --debug and -q. Docs: docs/architecture.md; config keys: docs/config.md (project),
docs/config-fleet.md (fleet serve)."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="edge-kit", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"edge-kit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train", help="train a model from a config: checkpoints, MLflow run, fp32 ONNX",
        description="Train the model a project config names, from its DVC-tracked data snapshot, seeded and "
                    "deterministic.\nCheckpoints are written as it goes; SIGTERM saves one and exits 75, and "
                    "running the same command again\ncontinues bitwise. The run, its metrics, the checked fp32 "
                    "ONNX export and its provenance go to MLflow.")
    p.add_argument("--config", required=True, help="project config (TOML; keys in docs/config.md)")
    p.add_argument("--resume", choices=["auto", "never"], default="auto",
                   help="auto: continue from the newest valid checkpoint (default); never: start over")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or a local store)")
    p.add_argument("--ray-address", help="Ray cluster to train on with engine = \"ray\" (default: RAY_ADDRESS, "
                                         "else a local instance)")
    _common(p)

    p = sub.add_parser(
        "build", help="train (or reuse), quantize, gate and sign a device bundle",
        description="Make a device bundle from a project config: train (or reuse the run with the same config, "
                    "commit and data),\ncalibrate, quantize to int8, gate accuracy on the held-out split, keep "
                    "the fastest candidate that passes,\nand write <name>-<version>.edgebundle signed with --key. "
                    "If no candidate passes the gate: exit 3,\nno bundle, and a report naming the layers to blame.")
    p.add_argument("--config", required=True, help="project config (TOML; keys in docs/config.md)")
    p.add_argument("--out", required=True, help="folder to write the .edgebundle into")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--key", help="Ed25519 private key (PEM) to sign the bundle with")
    g.add_argument("--unsigned", action="store_true", help="write an unsigned bundle (must be asked for)")
    p.add_argument("--backend", choices=["ort", "inc"], help="override quantize.backend: ONNX Runtime or Intel "
                                                            "Neural Compressor")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or a local store)")
    _common(p)

    add_verify_command(
        sub, "check a bundle's signature and every hash",
        "Check a bundle before it ships: the signature (with --pubkey) and the hash of every member.\n"
        "Exit 4 names the first member that fails (tampered, truncated, wrong key).")

    p = sub.add_parser(
        "inspect", help="show what a bundle holds and where it came from",
        description="Show what a bundle holds: the model and its inputs, the gate result, int8 coverage, the "
                    "candidates timed,\nand where it came from (MLflow run, commit, data). Hashes are always "
                    "checked; the signature only with --pubkey,\nand the output says which.")
    p.add_argument("bundle", help="the .edgebundle file to show")
    p.add_argument("--pubkey", help="Ed25519 public key (PEM) to verify the signature with")
    _common(p)

    p = sub.add_parser(
        "reproduce", help="rebuild a bundle from its provenance and compare bytes",
        description="Rebuild a bundle from the provenance it records and the project config, and compare the "
                    "model bytes.\nExit 0 when the rebuild is byte-identical, 4 with the difference otherwise.")
    p.add_argument("bundle", help="the .edgebundle file to rebuild")
    p.add_argument("--config", required=True, help="the project config (TOML) the bundle was built from")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or a local store)")
    _common(p)

    p = sub.add_parser(
        "keygen", help="make an Ed25519 key pair for signing bundles",
        description="Make an Ed25519 key pair: edgekit.key signs bundles (`build --key`), edgekit.pub goes to "
                    "the devices\n(`edge-agent run --pubkey`). An existing pair is never overwritten without --force "
                    "(exit 2).")
    p.add_argument("--out", required=True, help="folder for edgekit.key (private) and edgekit.pub")
    p.add_argument("--force", action="store_true", help="overwrite an existing key pair")
    _common(p)

    p = sub.add_parser(
        "bench", help="benchmark a bundle: int8 vs fp32 vs PyTorch, on this host",
        description="Benchmark a bundle on this machine: its model against the fp32 ONNX model and PyTorch of "
                    "the same run,\neach in its own process: latency, throughput by batch size and threads, "
                    "size, memory, accuracy.\nWrites report.md, report.json and charts.")
    p.add_argument("bundle", help="the .edgebundle file to measure")
    p.add_argument("--out", required=True, help="folder for report.md, report.json and charts")
    p.add_argument("--config", help="project config (for the fp32 model, checkpoint and test split)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (for smoke tests)")
    _common(p)

    p = sub.add_parser(
        "promote", help="make a bundle's registered MLflow model version the champion",
        description="Point the MLflow registry's `champion` alias at the model version this bundle was "
                    "registered as by `build`.\nThe bundle must be signed by --pubkey (exit 4 otherwise), and the "
                    "MLflow store is the operator's,\nnever one the bundle names: MLflow sends "
                    "MLFLOW_TRACKING_TOKEN to that store.")
    p.add_argument("bundle", help="the .edgebundle file whose model version to promote")
    p.add_argument("--pubkey", required=True,
                   help="Ed25519 public key (PEM) the bundle must be signed by (unsigned or other key: exit 4)")
    p.add_argument("--tracking-uri",
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the store of --config); "
                        "never the one a bundle names")
    p.add_argument("--config", help="project config whose own MLflow store to use when no URI is given")
    _common(p)

    p = sub.add_parser(
        "batch-predict", help="score input shards with a bundle on Ray, one output per shard",
        description="Score files of inputs with a bundle on Ray actors, one ONNX Runtime session per actor, and "
                    "write one\n<shard>.pred.npz per input shard (docs/batch-predict.md).")
    p.add_argument("bundle", help="the .edgebundle file to score with")
    p.add_argument("--input", required=True, help="a shard, a folder of shards or a glob (.npy .npz .csv .parquet)")
    p.add_argument("--output", required=True, help="folder for one <shard>.pred.npz per input shard")
    p.add_argument("--pubkey", help="Ed25519 public key (PEM) the bundle must be signed by")
    p.add_argument("--actors", type=int, default=1, help="ONNX Runtime actors (one session each; default 1)")
    p.add_argument("--ray-address", help="Ray cluster (default: RAY_ADDRESS, else a local instance)")
    _common(p)

    data = sub.add_parser(
        "data", help="the project's data snapshot",
        description="The project's versioned data: the snapshot file that DVC records and training reads.")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    p = data_sub.add_parser(
        "snapshot", help="write the data snapshot and check it against its DVC record",
        description="Write the snapshot a project config names (data/<name>.npz for a built-in dataset, "
                    "byte-identical every time)\nif it is missing, and check it against its DVC record: the "
                    "snapshot stage's entry in dvc.lock, or its .dvc file.\nA snapshot that no longer matches "
                    "its record is left as it is and refused (exit 2). This is the `snapshot`\nstage of the "
                    "examples' dvc.yaml, so `dvc repro` works on a fresh clone.")
    p.add_argument("--config", required=True, help="project config (TOML; keys in docs/config.md)")
    _common(p)
    p = data_sub.add_parser(
        "add", help="add exported field captures to the project's data as a new DVC snapshot",
        description="Merge the labelled records of a `fleet captures export` folder into the project's field "
                    "data\n(data/field.npz; records already there are skipped), record it with DVC, set data.field "
                    "in the config,\nappend to data/field-manifest.json and commit those to git (docs/captures.md). "
                    "The next build trains\non base + field rows and names both in its provenance.")
    p.add_argument("export_dir", metavar="DIR", help="a folder `edge-kit fleet captures export` wrote")
    p.add_argument("--config", required=True, help="project config (TOML; keys in docs/config.md)")
    p.add_argument("--no-commit", action="store_true", help="record with DVC but do not commit to git")
    _common(p)

    fleet = sub.add_parser(
        "fleet", help="fleet drift service",
        description="The fleet server, which gathers what the devices report (docs/fleet.md).")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND")
    p = fleet_sub.add_parser(
        "serve", help="ingest summaries over MQTT, detect drift, serve the dashboard",
        description="Consume the devices' summaries over MQTT, test them against each bundle's reference "
                    "histograms,\ntrack accuracy from returned labels, raise alerts that run a retraining "
                    "command once approved,\nand serve a dashboard at /, a JSON API under /api/ and /metrics. "
                    "SIGTERM or Ctrl-C stops it cleanly.")
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
    p.add_argument("--pubkey", help="Ed25519 public key (PEM): only bundles it signed are used, others are "
                                     "skipped and counted (default: the fleet config's bundles.pubkey)")
    p.add_argument("--config", help="fleet config (TOML; keys in docs/config-fleet.md): drift thresholds, "
                                    "alerts, retraining command")
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
    p.add_argument("--public-url", metavar="URL",
                   help="http(s)://HOST[:PORT] devices download bundles from (default: the --http address)")
    p.add_argument("--download-concurrency", type=int, default=64, metavar="N",
                   help="bundle downloads served at once; beyond: 503 with Retry-After (default 64)")
    p.add_argument("--download-cap", type=float, default=3.0, metavar="X",
                   help="bytes one device may fetch per deployment, as a multiple of the bundle size (default 3)")
    p.add_argument("--tls-certfile", metavar="PEM",
                   help="serve HTTPS with this server certificate (e.g. `fleet enroll --role broker --host NAME`)")
    p.add_argument("--tls-keyfile", metavar="PEM", help="the server certificate's private key (PEM)")
    p.add_argument("--tls-client-ca", metavar="PEM",
                   help="the fleet CA: bundle downloads then need a device certificate it issued (CN = device "
                        "id); operators still use the token")
    p.add_argument("--tls-crl", metavar="PEM",
                   help="CRL of --tls-client-ca (the CA folder's crl.pem): revoked devices are refused "
                        "(read at start)")
    p.add_argument("--captures", metavar="DIR|URL",
                   help="where uploaded field captures go: a folder or an fsspec URL (default: captures/ beside a "
                        "SQLite --db; PostgreSQL needs it named) (docs/captures.md)")
    p.add_argument("--captures-max-bytes", type=int, default=10 * 1024**3, metavar="N",
                   help="capture store quota in bytes; uploads beyond it get 507 (default 10 GiB)")
    p.add_argument("--device-key-file", metavar="PATH",
                   help="the fleet's device key (the CA folder's device-token.key): devices without a client "
                        "certificate upload captures with their enrolled token")
    _common(p)

    p = fleet_sub.add_parser(
        "deploy", help="roll a bundle out to the fleet: canary devices first, then the rest",
        description="Start a deployment on a running `fleet serve` (docs/deploy.md): the bundle goes to N canary "
                    "devices first;\nonce they sent W windows of it, their model's behaviour is compared with "
                    "the devices still on the old\nversion, and the bundle is promoted to the rest or the "
                    "canaries are rolled back. Prints the deployment id.")
    p.add_argument("bundle", help="a local .edgebundle (uploaded), folder:NAME (in the server's --bundles folder) "
                                  "or an https:// URL (with --sha256 --size --name --version)")
    p.add_argument("--server", required=True, help="the fleet server's URL, e.g. http://fleet:8080")
    p.add_argument("--token-file", help="file holding the operator token (else EDGEKIT_FLEET_TOKEN)")
    p.add_argument("--devices", metavar="ID,ID,...", help="target devices (default: every device the fleet has seen)")
    p.add_argument("--canary", type=int, default=1, metavar="N", help="canary devices, drawn at random (default 1)")
    p.add_argument("--canary-windows", type=int, default=3, metavar="W",
                   help="windows each canary sends of the new model before the decision (default 3)")
    p.add_argument("--auto-promote", action="store_true", help="promote to the rest as soon as the canary passes")
    p.add_argument("--seed", type=int, help="seed of the canary draw (default: drawn, and shown in the deployment)")
    p.add_argument("--sha256", help="with a URL: the sha256 of the bundle file")
    p.add_argument("--size", type=int, help="with a URL: the bundle file's size in bytes")
    p.add_argument("--name", help="with a URL: the bundle's name (manifest)")
    p.add_argument("--version", help="with a URL: the bundle's version (manifest)")
    _common(p)

    p = fleet_sub.add_parser(
        "rollout", help="show a deployment, or promote, halt or roll it back",
        description="Show a deployment on a running `fleet serve` (state, every device's version and step, the "
                    "canary's figures),\nor change it: --promote (canary to everyone), --halt (tell no further "
                    "device), --rollback (every device\ntold returns to the bundle it served before).")
    p.add_argument("deployment", help="the deployment id `fleet deploy` printed")
    p.add_argument("--server", required=True, help="the fleet server's URL, e.g. http://fleet:8080")
    p.add_argument("--token-file", help="file holding the operator token (else EDGEKIT_FLEET_TOKEN)")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--promote", action="store_true", help="promote the canary to every target device")
    action.add_argument("--halt", action="store_true", help="tell no further device; installed ones keep it")
    action.add_argument("--rollback", action="store_true",
                        help="every device told to install returns to the bundle it served before")
    _common(p)

    p = fleet_sub.add_parser(
        "enroll", help="issue a device its own key and certificate from the fleet CA",
        description="Issue a key and certificate signed by the fleet's CA (made in --ca DIR when absent), whose "
                    "identity\n(subject CN) is the device id: with deploy/mosquitto.conf the broker makes it the "
                    "MQTT username and\nits ACL lets the device publish only on its own topics. --role service "
                    "issues the fleet server's\nidentity, --role broker the broker's own certificate "
                    "(docs/security.md, \"Device identity\").")
    p.add_argument("device_id", nargs="?", default="",
                   help="the device id (an MQTT topic level: no '/', '+', '#'); not used with --role service/broker")
    p.add_argument("--ca", required=True, help="the CA folder (0700): ca.key, ca.pem, crl.pem, issued.json")
    p.add_argument("--out", help="folder for <id>.key (0600), <id>.pem and ca.pem (default: DIR/issued/<id>)")
    p.add_argument("--days", type=int, default=365, help="validity of the certificate in days (default 365)")
    p.add_argument("--role", choices=["device", "service", "broker"], default="device",
                   help="device (default), the fleet service's client identity, or the broker's server certificate")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="with --role broker: a DNS name or IP address clients connect to (repeatable)")
    p.add_argument("--force", action="store_true", help="replace key and certificate files already in --out")
    _common(p)

    captures = fleet_sub.add_parser(
        "captures", help="field captures the devices uploaded",
        description="Field captures held by a running `fleet serve` (docs/captures.md).")
    captures_sub = captures.add_subparsers(dest="captures_command", metavar="SUBCOMMAND", required=True)
    p = captures_sub.add_parser(
        "export", help="write the fleet's captures as .npz shards for `edge-kit data add`",
        description="Download captured records (inputs, predictions, labels) from a running fleet server and "
                    "write them\nas DIR/captures-NNNNN.npz shards with DIR/manifest.json (counts per device and "
                    "label source).\nLabels can also come from a CSV keyed by request id (--labels-csv).")
    p.add_argument("--server", required=True, help="the fleet server's URL, e.g. http://fleet:8080")
    p.add_argument("--token-file", help="file holding the operator token (else EDGEKIT_FLEET_TOKEN)")
    p.add_argument("--out", required=True, help="folder for the shards and manifest.json (replaced)")
    p.add_argument("--devices", help="comma-separated device ids (default: every device)")
    p.add_argument("--since", help="only records captured at or after this time (unix seconds or ISO 8601)")
    p.add_argument("--labelled-only", action="store_true", help="only records that carry a label")
    p.add_argument("--labels-csv", help="CSV of request_id,label (or request_id,row,label): fills or overrides labels")
    p.add_argument("--shard-records", type=int, default=10_000, help="records per .npz shard (default 10000)")
    _common(p)

    p = fleet_sub.add_parser(
        "capture-request", help="ask a device for more captured samples",
        description="Ask a device (over its retained `capture` topic) to capture its next N predicted rows, "
                    "within its own\nbudget; a device without capture enabled, or with fleet_requests off, "
                    "ignores it (docs/captures.md).")
    p.add_argument("device_id", help="the device to ask")
    p.add_argument("--samples", type=int, required=True, help="how many more samples (1..100000)")
    p.add_argument("--reason", default="", help="why (shown to operators)")
    p.add_argument("--server", required=True, help="the fleet server's URL, e.g. http://fleet:8080")
    p.add_argument("--token-file", help="file holding the operator token (else EDGEKIT_FLEET_TOKEN)")
    _common(p)

    p = fleet_sub.add_parser(
        "revoke", help="revoke a device's certificates (the broker's CRL)",
        description="Put every certificate issued to DEVICE_ID on the CA's revocation list (DIR/crl.pem, the "
                    "broker's crlfile).\nThe broker applies it when it reloads (SIGHUP) or restarts; from then on "
                    "the device cannot connect.")
    p.add_argument("device_id", help="the device id (or edgekit-fleet/service) whose certificates to revoke")
    p.add_argument("--ca", required=True, help="the CA folder the certificates were issued from")
    _common(p)
    # Added last, so it reaches every page, including those of commands added above.
    return end_help_with(parser, exit_codes_epilog(EXIT_CODES))


def _command_key(args: argparse.Namespace) -> str | None:
    if args.command == "fleet":
        return f"fleet {args.fleet_command}" if getattr(args, "fleet_command", None) else None
    if args.command == "data":
        return f"data {args.data_command}" if getattr(args, "data_command", None) else None
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
