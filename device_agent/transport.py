"""Getting messages to the broker: a small `Publisher` protocol, an in-memory double, and MQTT 5.

The agent only needs four things from a transport: is it connected, publish a message and be told
when the broker acknowledged it, be told when a (re)connection succeeded, and a last will. The
in-memory `MemoryPublisher` implements the same protocol for unit tests (acks on demand, can be
"disconnected"); `MqttPublisher` is paho-mqtt 2.x speaking MQTT 5 to a real broker.

`MqttPublisher` runs its own network thread instead of paho's `loop_start`, because paho's built-in
reconnect backs off without jitter: after a broker restart, a whole fleet would reconnect in lock
step. Here every wait is drawn from [delay/2, delay] (decorrelated "equal jitter"), doubling up to
a ceiling, and reset after a successful CONNACK.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agent.errors import ConfigError

log = logging.getLogger(__name__)

AckCallback = Callable[[bool], None]


class Publisher(Protocol):
    """What the agent needs from a transport."""

    def start(self) -> None: ...

    def stop(self, final: Message | None = None) -> None:
        """Disconnect cleanly, publishing `final` (the offline status) first if connected."""

    @property
    def connected(self) -> bool: ...

    def publish(self, message: Message, on_ack: AckCallback | None = None) -> bool:
        """Hand a message over; False if not connected. `on_ack(ok)` runs when the broker answered."""

    def set_on_connect(self, callback: Callable[[], None]) -> None: ...


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    content_type: str = "application/json"
    qos: int = 1
    retain: bool = False


@dataclass
class MemoryPublisher:
    """In-memory double: records what was published; acks immediately or when `ack_all` is called."""

    auto_ack: bool = True
    is_connected: bool = True
    messages: list[Message] = field(default_factory=list)
    retained: dict[str, Message] = field(default_factory=dict)
    _unacked: list[AckCallback] = field(default_factory=list)
    _on_connect: Callable[[], None] | None = None
    started: bool = False

    def start(self) -> None:
        self.started = True
        if self.is_connected and self._on_connect:
            self._on_connect()

    def stop(self, final: Message | None = None) -> None:
        if final is not None and self.is_connected:
            self.publish(final)
        self.started = False

    @property
    def connected(self) -> bool:
        return self.is_connected

    def set_on_connect(self, callback: Callable[[], None]) -> None:
        self._on_connect = callback

    def publish(self, message: Message, on_ack: AckCallback | None = None) -> bool:
        if not self.is_connected:
            return False
        self.messages.append(message)
        if message.retain:
            self.retained[message.topic] = message
        if on_ack is not None:
            if self.auto_ack:
                on_ack(True)
            else:
                self._unacked.append(on_ack)
        return True

    def ack_all(self, ok: bool = True) -> int:
        pending, self._unacked = self._unacked, []
        for callback in pending:
            callback(ok)
        return len(pending)

    def reconnect(self) -> None:
        """Simulate a broker coming back; unacked messages are forgotten as a lost connection would."""
        self._unacked.clear()
        self.is_connected = True
        if self._on_connect:
            self._on_connect()


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how to connect. `tls` is on for mqtts:// or when a CA file is given."""

    host: str
    port: int
    tls: bool = False
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    insecure: bool = False
    username: str | None = None
    password: str | None = None
    keepalive: int = 30
    session_expiry: int = 7 * 24 * 3600
    reconnect_min: float = 0.5
    reconnect_max: float = 60.0

    @classmethod
    def from_url(cls, url: str, **options: object) -> BrokerConfig:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise ConfigError("broker", f"{url!r} is not mqtt://HOST:PORT or mqtts://HOST:PORT")
        tls = parts.scheme in ("mqtts", "ssl") or bool(options.get("ca_certs"))
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ConfigError("broker", f"bad port in {url!r}") from exc
        if parts.username and "username" not in options:
            options["username"] = parts.username
            options["password"] = parts.password
        return cls(host=parts.hostname, port=port, tls=tls, **options)  # type: ignore[arg-type]


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


class MqttPublisher:
    """paho-mqtt 2.x, MQTT 5, QoS 1, persistent session (clean_start=False + session expiry), last will."""

    def __init__(self, config: BrokerConfig, *, client_id: str, will: Message) -> None:
        self.config = config
        self._client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain,
                              properties=_publish_properties(will.content_type))
        if config.username:
            self._client.username_pw_set(config.username, config.password)
        if config.tls:
            self._client.tls_set(
                ca_certs=config.ca_certs, certfile=config.certfile, keyfile=config.keyfile,
                cert_reqs=ssl.CERT_NONE if config.insecure else ssl.CERT_REQUIRED,
            )
            if config.insecure:
                self._client.tls_insecure_set(True)
        # Unacknowledged QoS 1 messages are bounded by the spool, not by paho's queue.
        self._client.max_inflight_messages_set(100)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_publish = self._handle_publish
        self._acks: dict[int, AckCallback | None] = {}
        self._early: dict[int, bool] = {}
        self._acks_lock = threading.Lock()
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_connect: Callable[[], None] | None = None
        self._backoff = Backoff(config.reconnect_min, config.reconnect_max)
        self._ever_connected = False
        self._connack_seen = False
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def set_on_connect(self, callback: Callable[[], None]) -> None:
        self._on_connect = callback

    def start(self) -> None:
        self._thread = threading.Thread(target=self._network_loop, name="mqtt-network", daemon=True)
        self._thread.start()

    def stop(self, final: Message | None = None) -> None:
        if final is not None and self.connected:
            done = threading.Event()
            if self.publish(final, lambda ok: done.set()):
                done.wait(2.0)
        self._stopping.set()
        if self.connected:
            self._client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def publish(self, message: Message, on_ack: AckCallback | None = None) -> bool:
        if not self.connected:
            return False
        # Never hold our lock while calling into paho: paho calls on_publish with its own lock held,
        # and taking the two in opposite orders deadlocks. A PUBACK that beats the registration
        # below is parked in `_early` and delivered here.
        info = self._client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain,
                                    properties=_publish_properties(message.content_type))
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        with self._acks_lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._acks[info.mid] = on_ack
        if early is not None and on_ack is not None:
            on_ack(early)
        return True

    # -- paho callbacks (network thread) ---------------------------------------------------------

    def _handle_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object,
                        properties: object) -> None:
        self._connack_seen = True
        if getattr(reason, "is_failure", False):
            self.last_error = f"broker refused the connection: {reason}"
            log.error("%s (check the username, password or client certificate)", self.last_error)
            return
        self._connected.set()
        self._backoff.reset()
        self.last_error = None
        log.info("connected to %s:%d (session present: %s)", self.config.host, self.config.port,
                 getattr(flags, "session_present", "?"))
        if self._on_connect is not None:
            try:
                self._on_connect()
            except Exception:  # a status publish failing must not kill the network thread
                log.exception("on-connect handler failed")

    def _handle_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason: object,
                           properties: object) -> None:
        if self._connected.is_set() and not self._stopping.is_set():
            log.warning("disconnected from broker: %s", reason)
        self._connected.clear()

    def _handle_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: object,
                        properties: object) -> None:
        ok = not getattr(reason, "is_failure", False)
        with self._acks_lock:
            if mid not in self._acks:
                # Either the publish() that sent it has not registered yet, or paho queued it while
                # the link was down and publish() reported failure; bounded so the latter cannot grow.
                if len(self._early) >= 1000:
                    self._early.pop(next(iter(self._early)))
                self._early[mid] = ok
                return
            callback = self._acks.pop(mid)
        if callback is not None:
            callback(ok)

    # -- the network thread -------------------------------------------------------------------------

    def _connect_once(self) -> bool:
        self._connack_seen = False
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.config.session_expiry
        try:
            if self._ever_connected:
                self._client.reconnect()
            else:
                self._client.connect(self.config.host, self.config.port, keepalive=self.config.keepalive,
                                     clean_start=False, properties=props)
                self._ever_connected = True
            return True
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.last_error = f"cannot reach broker {self.config.host}:{self.config.port}: {exc}"
            return False

    def _network_loop(self) -> None:
        socket_open = False
        while not self._stopping.is_set():
            if not socket_open:
                socket_open = self._connect_once()
                if not socket_open:
                    delay = self._backoff.next()
                    log.warning("%s; retrying in %.1fs", self.last_error, delay)
                    self._stopping.wait(delay)
                    continue
            rc = self._client.loop(timeout=0.2)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                socket_open = False
                self._connected.clear()
                if self._stopping.is_set():
                    break
                delay = self._backoff.next()
                if not self._connack_seen:
                    self.last_error = (f"broker {self.config.host}:{self.config.port} closed the connection before "
                                       "accepting it (TLS client certificate, CA, or protocol refused?)")
                    log.error("%s; retrying in %.1fs", self.last_error, delay)
                else:
                    log.warning("broker connection lost (%s); reconnecting in %.1fs", mqtt.error_string(rc), delay)
                self._stopping.wait(delay)
        self._connected.clear()
        if socket_open:
            with contextlib.suppress(Exception):
                self._client.loop(timeout=0.2)  # flush the DISCONNECT


def _publish_properties(content_type: str) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = content_type
    return props
