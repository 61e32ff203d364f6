"""A real TCP proxy that cuts the link: each of the first `cuts` connections is closed after
`cut_after` bytes went from the server to the client, mid-response, like a flaky field link."""

from __future__ import annotations

import contextlib
import socket
import threading


class CuttingProxy:
    def __init__(self, target_port: int, *, cut_after: int, cuts: int = 1) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.cuts_left = cuts
        self.connections = 0
        self.cut = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._stopping = threading.Event()
        threading.Thread(target=self._accept, name="cutting-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the server is down: the client sees its connection close, as without a proxy
                client.close()
                continue
            with self._lock:
                self.connections += 1
                limit = self.cut_after if self.cuts_left > 0 else None
                self.cuts_left -= 1 if limit is not None else 0
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, limit), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(16384 if limit is None else min(16384, limit - sent))
                if not data:
                    break
                dst.sendall(data)
                sent += len(data)
                if limit is not None and sent >= limit:
                    with self._lock:
                        self.cut += 1
                    break
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._stopping.set()
        self._listener.close()
