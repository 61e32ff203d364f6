"""Getting messages to the broker: a small `Publisher` protocol, an in-memory double, and MQTT 5.

The agent only needs four things from a transport: is it connected, publish a message and be told
when the broker acknowledged it, be told when a (re)connection succeeded, and a last will. The
in-memory `MemoryPublisher` implements the same protocol for unit tests (acks on demand, can be
"disconnected"); `MqttPublisher` is paho-mqtt 2.x speaking MQTT 5 to a real broker through the
connection layer the fleet consumer uses too (`device_agent.uplink.connection`: TLS, credentials,
persistent session, reconnect with backoff and jitter).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import paho.mqtt.client as mqtt

from device_agent.uplink.connection import MessageHandler, MqttConnection, publish_properties
from device_agent.uplink.wire import BrokerConfig

log = logging.getLogger(__name__)

AckCallback = Callable[[bool], None]
NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT 5 PUBACK reason code


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
    subscriptions: dict[str, MessageHandler] = field(default_factory=dict)

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

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None:
        self.subscriptions[topic_filter] = handler

    def deliver(self, topic: str, payload: bytes, retained: bool = True) -> None:
        """Simulate the broker delivering a message to this client's subscriptions."""
        for topic_filter, handler in self.subscriptions.items():
            if mqtt.topic_matches_sub(topic_filter, topic):
                handler(topic, payload, retained)

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


class MqttPublisher:
    """paho-mqtt 2.x, MQTT 5, QoS 1, persistent session, last will, on the shared `MqttConnection`."""

    def __init__(self, config: BrokerConfig, *, client_id: str, will: Message) -> None:
        self.config = config
        self._link = MqttConnection(config, client_id)
        self._client = self._link.client
        self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain,
                              properties=publish_properties(will.content_type))
        # Unacknowledged QoS 1 messages are bounded by the spool, not by paho's queue.
        self._client.max_inflight_messages_set(100)
        self._client.on_publish = self._handle_publish
        self._link.add_on_connect(self._connected_hook)
        self._acks: dict[int, AckCallback | None] = {}
        self._early: dict[int, bool] = {}
        self._acks_lock = threading.Lock()
        self._on_connect: Callable[[], None] | None = None

    @property
    def connected(self) -> bool:
        return self._link.connected

    @property
    def last_error(self) -> str | None:
        return self._link.last_error

    @property
    def reconnects(self) -> int:
        return self._link.reconnects

    def set_on_connect(self, callback: Callable[[], None]) -> None:
        self._on_connect = callback

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None:
        """Receive `topic_filter` (renewed on every reconnect); `handler` runs on the network thread."""
        self._link.subscribe(topic_filter, handler, qos)

    def start(self) -> None:
        self._link.start()

    def stop(self, final: Message | None = None) -> None:
        if final is not None and self.connected:
            done = threading.Event()
            if self.publish(final, lambda ok: done.set()):
                done.wait(2.0)
        self._link.close()

    def publish(self, message: Message, on_ack: AckCallback | None = None) -> bool:
        if not self.connected:
            return False
        # Never hold our lock while calling into paho: paho calls on_publish with its own lock held,
        # and taking the two in opposite orders deadlocks. A PUBACK that beats the registration
        # below is parked in `_early` and delivered here.
        info = self._client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain,
                                    properties=publish_properties(message.content_type))
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

    def _connected_hook(self) -> None:
        if self._on_connect is not None:
            self._on_connect()

    def _handle_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: object,
                        properties: object) -> None:
        # MQTT 5 PUBACK 0x10 "no matching subscribers" is not a failure code, but nobody got the
        # window: e.g. Mosquitto does not restore shared subscriptions from its persistence, so after
        # a broker restart the fleet's group is gone until its consumers resubscribe. Report it as not
        # delivered so the window stays spooled and is sent again.
        ok = not getattr(reason, "is_failure", False) and getattr(reason, "value", 0) != NO_MATCHING_SUBSCRIBERS
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
