from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from collections.abc import Iterator

from fleetkit import DigitsBundle, make_bundle, populate

from edge_kit.fleet.ingest import Ingestor
from edge_kit.fleet.references import ReferenceStore
from edge_kit.fleet.server import make_server, serve_in_thread
from edge_kit.fleet.service import FleetService
from edge_kit.fleet.settings import parse_settings
from edge_kit.fleet.storage import Storage
from tests.conftest import free_port


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory: pytest.TempPathFactory) -> DigitsBundle:
    return make_bundle(tmp_path_factory.mktemp("bundles"))


RETRAIN_SCRIPT = "import os; print('retrain', os.environ['EDGEKIT_ALERT_ID'])"


@pytest.fixture
def service(tmp_path: Path, digits_bundle: DigitsBundle) -> Iterator[FleetService]:
    settings = parse_settings({
        "drift": {"k": 2, "m": 3, "min_n": 100},
        "alerts": {"retrain_command": [sys.executable, "-c", RETRAIN_SCRIPT],
                   "retrain_min_interval_seconds": 3600},
        "concept": {"min_labels": 100},
    })
    storage = Storage(f"sqlite:///{tmp_path}/fleet.db")
    references = ReferenceStore([digits_bundle.path])
    populate(Ingestor(storage, references, settings.ingest), digits_bundle, drifting=("dev00", "dev01"))
    svc = FleetService(storage, references, settings)
    svc.evaluate()
    try:
        yield svc
    finally:
        svc.stop()
        storage.close()


@pytest.fixture
def http(service: FleetService) -> Iterator[str]:
    server = make_server(service, "127.0.0.1", 0)
    serve_in_thread(server)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()




class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1:<free port> (initdb + pg_ctl from the Debian package)."""

    def __init__(self) -> None:
        import glob
        import os
        import pwd
        import tempfile

        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not bins:
            pytest.fail("PostgreSQL is not installed: run `make system-deps` (make test does it for you)")
        self.bin = Path(bins[-1])
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="edgekit-pg-"))
        self.data = self.root / "data"
        # initdb refuses to run as root: run the server as the package's "postgres" user then.
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chmod(self.root, 0o755)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql://edgekit@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.prefix, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "edgekit", "--auth=trust", "-E", "UTF8")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
