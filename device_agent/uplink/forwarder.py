"""Moves spooled windows to the broker, deleting each only after its PUBACK.

A window is spooled (durable) before anything tries to send it. The forwarder publishes the oldest
pending windows while the transport is connected and remembers which are in flight; the broker's
acknowledgement deletes the row. An in-flight window that got no answer within `resend_after`
seconds (its connection died with it) is sent again: at-least-once delivery, and the server drops
duplicates by the idempotency key carried in the payload.

If the spool cannot be written (disk full), the window is kept in a small in-memory queue and
spooled again on the next pass, so a transient full disk loses nothing while the agent runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from device_agent.errors import SpoolError
from device_agent.uplink.spool import Spool
from device_agent.uplink.transport import Message, Publisher

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 50
MAX_UNSPOOLED = 1000


class Forwarder:
    def __init__(self, spool: Spool, publisher: Publisher, *, resend_after: float = 30.0,
                 retry_refused: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.spool = spool
        self.publisher = publisher
        self.resend_after = resend_after
        # A window the broker did not take (refused, or no subscriber yet) is sent again after this.
        self.retry_refused = min(retry_refused, resend_after)
        self._refusing = False  # log a run of refusals once, not once per window per pass
        self._clock = clock
        self._in_flight: dict[int, float] = {}  # spool id -> when sent
        self._unspooled: deque[tuple[str, Message]] = deque(maxlen=MAX_UNSPOOLED)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # The status message is built on demand and published from the forwarding thread, so that
        # one thread does all publishing (never paho's callback thread, never the request path).
        self.status_source: Callable[[], Message] | None = None
        self._status_due = threading.Event()
        self.published = 0
        self.acked = 0
        self.spool_errors = 0
        self.memory_dropped = 0
        self.last_spool_error: str | None = None

    def submit(self, key: str, message: Message) -> bool:
        """Spool a closed window durably (True), or keep it in memory if the disk refuses (False)."""
        try:
            self.spool.put(key, message.topic, message.payload, message.content_type)
        except SpoolError as exc:
            self.spool_errors += 1
            self.last_spool_error = str(exc)
            log.error("%s; keeping window %s in memory and retrying", exc, key)
            if len(self._unspooled) == self._unspooled.maxlen:
                self.memory_dropped += 1
                log.error("in-memory queue full too: dropped the oldest unspooled window")
            self._unspooled.append((key, message))
            self._wake.set()
            return False
        self._wake.set()
        return True

    def _respool(self) -> None:
        while self._unspooled:
            key, message = self._unspooled[0]
            try:
                self.spool.put(key, message.topic, message.payload, message.content_type)
            except SpoolError:
                return
            self._unspooled.popleft()
            log.info("spooled window %s after an earlier write failure", key)

    def request_status(self) -> None:
        """Publish a fresh status message on the next pass (soon: the thread is woken)."""
        self._status_due.set()
        self._wake.set()

    def pump(self) -> int:
        """Publish what is pending and not in flight; returns how many messages were handed over."""
        self._respool()
        if not self.publisher.connected:
            return 0
        if self._status_due.is_set() and self.status_source is not None:
            self._status_due.clear()
            if not self.publisher.publish(self.status_source()):
                self._status_due.set()
        now = self._clock()
        with self._lock:
            for window_id, sent in list(self._in_flight.items()):
                if now - sent > self.resend_after:
                    del self._in_flight[window_id]
            room = MAX_IN_FLIGHT - len(self._in_flight)
            exclude = set(self._in_flight)
        if room <= 0:
            return 0
        sent_count = 0
        for window in self.spool.pending(limit=room, exclude=exclude):
            with self._lock:
                self._in_flight[window.id] = now
            message = Message(window.topic, window.payload, window.content_type, qos=1)
            if not self.publisher.publish(message, self._ack_handler(window.id)):
                with self._lock:
                    self._in_flight.pop(window.id, None)
                break
            sent_count += 1
        self.published += sent_count
        return sent_count

    def _ack_handler(self, window_id: int) -> Callable[[bool], None]:
        def on_ack(ok: bool) -> None:
            with self._lock:
                if ok:
                    self._in_flight.pop(window_id, None)
                else:  # hold it back `retry_refused` seconds: the resend rule in pump() frees it then
                    self._in_flight[window_id] = self._clock() - self.resend_after + self.retry_refused
            if ok:
                self.spool.delete(window_id)
                self.acked += 1
                self._refusing = False
                self._wake.set()  # room for the next batch
            elif not self._refusing:
                self._refusing = True
                log.warning("the broker did not take window %d (refused, or no subscriber yet); it stays "
                            "spooled and is sent again every %.0fs", window_id, self.retry_refused)
        return on_ack

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def notify(self) -> None:
        self._wake.set()

    def start(self, interval: float = 1.0) -> None:
        def loop() -> None:
            while not self._stopping.is_set():
                try:
                    self.pump()
                except Exception:  # keep forwarding whatever one pass ran into
                    log.exception("forwarding pass failed")
                self._wake.wait(interval)
                self._wake.clear()

        self._thread = threading.Thread(target=loop, name="spool-forwarder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def stats(self) -> dict[str, object]:
        return {**self.spool.stats(), "in_flight": self.in_flight, "unspooled": len(self._unspooled),
                "published": self.published, "acked": self.acked, "spool_errors": self.spool_errors,
                "memory_dropped": self.memory_dropped,
                "last_spool_error": self.last_spool_error}
