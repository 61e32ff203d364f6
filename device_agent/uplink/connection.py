"""One MQTT connection layer for both sides: the agent's publisher and the fleet's consumers.

What it owns: the paho-mqtt 2.x client (`CallbackAPIVersion.VERSION2`, MQTT 5), TLS (CA, client
certificate and key, the insecure flag), credentials, a persistent session (`clean_start=False`
with a session expiry), and reconnecting: paho's `loop()` does not reconnect after the broker
went away (it just keeps returning an error), so `step()` does, with exponential backoff and
jitter, and calls the `on_connect` hooks on every (re)connect so users resubscribe there.
`subscribe()` does that for you: the subscription is renewed on every (re)connect, so the broker
delivers the topic's retained message again after each one (the agent's deployment topic).

It does not run a thread unless asked: the fleet consumer calls `step()` from its own loop (one
thread, so its batch needs no lock); the agent's publisher calls `start()` for a network thread.

Why our own loop instead of paho's `loop_start`: paho's built-in reconnect backs off without jitter,
so after a broker restart a whole fleet would reconnect in lock step. Here every wait is drawn from
[delay/2, delay] ("equal jitter"), doubling up to a ceiling, and reset after a successful CONNACK.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agent.uplink.wire import BrokerConfig

log = logging.getLogger(__name__)

Hook = Callable[[], None]
MessageHandler = Callable[[str, bytes, bool], None]  # (topic, payload, retained)
_PUBACK = struct.Struct("!BBH")  # PUBACK, remaining length 2, packet id: success, as paho's own `ack` writes it


class Backoff:
    """Exponential backoff with equal jitter: each wait is uniform in [d/2, d], d doubling to a ceiling."""

    def __init__(self, minimum: float, maximum: float, rng: random.Random | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum
        self._delay = minimum
        self._rng = rng or random.Random()

    def next(self) -> float:
        d = self._delay
        self._delay = min(self.maximum, self._delay * 2)
        return self._rng.uniform(d / 2, d)

    def reset(self) -> None:
        self._delay = self.minimum


def publish_properties(content_type: str) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
    props.ContentType = content_type
    return props


class MqttConnection:
    """A paho client that stays connected: `step()` drives the network and reconnects when it must.

    `connected` is true between a successful CONNACK and the loss of the link; `connects` counts
    successful CONNACKs, `reconnects` those after the first; `last_error` says why it is not
    connected. Hooks run on the thread that calls `step()`.
    """

    def __init__(self, config: BrokerConfig, client_id: str, *, manual_ack: bool = False,
                 receive_maximum: int | None = None) -> None:
        self.config = config
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5, manual_ack=manual_ack)
        if config.username:
            self.client.username_pw_set(config.username, config.password)
        if config.tls:
            self.client.tls_set(ca_certs=config.ca_certs, certfile=config.certfile, keyfile=config.keyfile,
                                cert_reqs=ssl.CERT_NONE if config.insecure else ssl.CERT_REQUIRED)
            if config.insecure:
                self.client.tls_insecure_set(True)
        self._props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        self._props.SessionExpiryInterval = config.session_expiry
        if receive_maximum is not None:
            # How many unacknowledged QoS>0 messages the broker may send us at once.
            self._props.ReceiveMaximum = max(1, min(receive_maximum, 65535))
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self._on_connect: list[Hook] = []
        self._on_disconnect: list[Hook] = []
        self._subscriptions: dict[str, tuple[int, MessageHandler]] = {}
        self._backoff = Backoff(config.reconnect_min, config.reconnect_max)
        self._connected = threading.Event()
        self._session_up = False  # a CONNACK was seen on the current socket: its loss runs the hooks
        self._socket_open = False
        self._connack_seen = False
        self._ever_opened = False
        self._retry_at = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.connects = 0
        self.last_error: str | None = None

    # -- state ----------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def reconnects(self) -> int:
        return max(0, self.connects - 1)

    def add_on_connect(self, hook: Hook) -> None:
        """Run `hook` after every successful (re)connect: subscribe, publish the online status."""
        self._on_connect.append(hook)

    def add_on_disconnect(self, hook: Hook) -> None:
        """Run `hook` when an established connection is lost (not when an attempt fails)."""
        self._on_disconnect.append(hook)

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None:
        """Subscribe now (if connected) and on every reconnect; `handler` runs on the network thread for
        each matching message, so it must hand heavy work to another thread."""
        self._subscriptions[topic_filter] = (qos, handler)
        self.client.on_message = self._handle_message
        if self.connected:
            self.client.subscribe(topic_filter, qos=qos)

    # -- driving the network ------------------------------------------------------------------------

    def step(self, timeout: float = 0.2, read_on: Callable[[], bool] | None = None) -> None:
        """One round: connect if due, else move bytes for up to `timeout` seconds.

        `read_on`, when given, is asked after each packet read whether to read another one straight
        away (a consumer draining a backlog: one `select` per burst instead of one per message); it
        should say no once a read delivered nothing, else the round ends on an empty socket.
        """
        if not self._socket_open:
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                self._stopping.wait(min(wait, timeout))
                return
            if not self._open():
                self._schedule_retry()
                log.warning("%s; retrying in %.1fs", self.last_error, self._retry_at - time.monotonic())
                return
        rc = self.client.loop(timeout=timeout)
        while rc == mqtt.MQTT_ERR_SUCCESS and read_on is not None and read_on():
            rc = self.client.loop_read()
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._lost(mqtt.error_string(rc))

    def ack_all(self, mids: Sequence[int]) -> None:
        """Acknowledge QoS-1 messages received under `manual_ack`, in one socket write.

        paho's `ack` queues and sends one 4-byte PUBACK per message (two system calls each); a
        batch committed at once is acknowledged at once here, as the same packets back to back.
        """
        if not mids:
            return
        queue = getattr(self.client, "_packet_queue", None)
        if queue is None:  # a paho without it: one at a time, through the public call
            for mid in mids:
                self.client.ack(mid, 1)
            return
        queue(mqtt.PUBACK, b"".join([_PUBACK.pack(mqtt.PUBACK, 2, mid) for mid in mids]), 0, 0)

    def run(self, stop: threading.Event, timeout: float = 0.2) -> None:
        while not stop.is_set():
            self.step(timeout)

    def start(self) -> None:
        """Drive the connection from a daemon thread until `close()`."""
        self._thread = threading.Thread(target=self.run, args=(self._stopping,), name="mqtt-network", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Disconnect cleanly (the broker then does not publish the last will) and stop the thread."""
        self._stopping.set()
        was_connected = self.connected
        self._connected.clear()
        if was_connected:
            with contextlib.suppress(Exception):
                self.client.disconnect()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if was_connected:
            with contextlib.suppress(Exception):
                self.client.loop(timeout=0.2)  # flush the DISCONNECT
        self._socket_open = False

    def drop(self) -> None:
        """Close the link on purpose; `step()` reconnects after the usual backoff."""
        if self._socket_open:
            with contextlib.suppress(Exception):
                self.client.disconnect()
            self._lost("dropped on purpose")

    # -- internals ------------------------------------------------------------------------------------

    def _open(self) -> bool:
        self._connack_seen = False
        try:
            if self._ever_opened:
                self.client.reconnect()  # same host, port, clean_start=False and properties
            else:
                self.client.connect(self.config.host, self.config.port, keepalive=self.config.keepalive,
                                    clean_start=False, properties=self._props)
                self._ever_opened = True
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.last_error = f"cannot reach broker {self.config.address}: {exc}"
            return False
        self._socket_open = True
        return True

    def _schedule_retry(self) -> None:
        self._retry_at = time.monotonic() + self._backoff.next()

    def _lost(self, why: str) -> None:
        self._socket_open = False
        was_connected, self._session_up = self._session_up, False
        self._connected.clear()
        if self._stopping.is_set():
            return
        self._schedule_retry()
        delay = self._retry_at - time.monotonic()
        if not self._connack_seen:
            self.last_error = (f"broker {self.config.address} closed the connection before accepting it "
                               "(TLS client certificate, CA, or protocol refused?)")
            log.error("%s; retrying in %.1fs", self.last_error, delay)
        elif was_connected:
            self.last_error = f"connection to broker {self.config.address} lost ({why})"
            log.warning("broker connection lost (%s); reconnecting in %.1fs", why, delay)
        else:  # refused in the CONNACK: keep that reason, it says what to fix
            log.warning("retrying the broker in %.1fs", delay)
        if was_connected:
            self._run_hooks(self._on_disconnect, "on-disconnect")

    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._connack_seen = True
        if getattr(reason, "is_failure", False):
            self.last_error = f"broker refused the connection ({self.config.address}): {reason}"
            log.error("%s (check the username, password or client certificate)", self.last_error)
            return
        self._connected.set()
        self._session_up = True
        self._backoff.reset()
        self.connects += 1
        self.last_error = None
        log.info("connected to %s (session present: %s)", self.config.address, getattr(flags, "session_present", "?"))
        for topic_filter, (qos, _) in self._subscriptions.items():
            self.client.subscribe(topic_filter, qos=qos)
        self._run_hooks(self._on_connect, "on-connect")

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        for topic_filter, (_, handler) in list(self._subscriptions.items()):
            if mqtt.topic_matches_sub(topic_filter, msg.topic):
                try:
                    handler(msg.topic, bytes(msg.payload), bool(msg.retain))
                except Exception:  # a failing handler must not kill the network loop
                    log.exception("handler for %s failed", msg.topic)

    def _handle_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                           properties: Any) -> None:
        if self._connected.is_set() and not self._stopping.is_set():
            log.warning("disconnected from broker %s: %s", self.config.address, reason)
        # Publishing stops at once; `loop()` reports the loss on its next call, where reconnecting starts.
        self._connected.clear()

    @staticmethod
    def _run_hooks(hooks: list[Hook], what: str) -> None:
        for hook in hooks:
            try:
                hook()
            except Exception:  # a failing hook must not kill the network loop
                log.exception("%s handler failed", what)
