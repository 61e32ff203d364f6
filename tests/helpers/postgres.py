"""A throwaway PostgreSQL cluster for storage tests (Debian's postgresql package)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from harness.processes import free_port


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
