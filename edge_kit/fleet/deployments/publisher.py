"""The fleet's deployment messages over MQTT: retained, QoS 1, one topic per device.

The same publisher carries capture requests (`edge_kit.fleet.captures.requests`) on each device's
`capture` topic: another instance, its own client id, its own `everything`.

Retained so a device that is offline during the rollout finds the message when it (re)connects;
QoS 1 so the broker acknowledges each. What each topic must say is in the fleet database
(`DeploymentStore.published`), so on every (re)connect to the broker all of it is published again: a
broker restarted without its persistence, or one that lost a message in flight, ends up holding
exactly what the database says. A retained message is idempotent for the agents (they act on a
deployment id and action once).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence

from device_agent.uplink.connection import MqttConnection
from device_agent.uplink.wire import BrokerConfig

log = logging.getLogger(__name__)

Messages = Callable[[], Sequence[tuple[str, bytes]]]


class DeploymentPublisher:
    """Publishes (topic, payload) pairs retained; republishes `everything()` on every connect."""

    def __init__(self, broker: BrokerConfig, fleet: str, everything: Messages, client_id: str | None = None,
                 what: str = "deployment") -> None:
        self.everything = everything
        self.what = what
        self.link = MqttConnection(broker, client_id or f"edgekit-fleet-{fleet}-deployer-{socket.gethostname()}")
        self.link.add_on_connect(self._republish)
        self.published = 0

    def start(self) -> None:
        self.link.start()

    def close(self) -> None:
        self.link.close()

    @property
    def connected(self) -> bool:
        return self.link.connected

    def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish now when connected; otherwise the next connect publishes what the database says."""
        if not self.link.connected:
            return
        for topic, payload in messages:
            self._send(topic, payload)

    def _send(self, topic: str, payload: bytes) -> None:
        info = self.link.client.publish(topic, payload, qos=1, retain=True)
        if info.rc == 0:
            self.published += 1
        else:  # not sent on this connection: the republish on the next connect covers it
            log.warning("publishing %s failed (rc %s); it is sent again on the next connect", topic, info.rc)

    def _republish(self) -> None:
        messages = self.everything()
        for topic, payload in messages:
            self._send(topic, payload)
        if messages:
            log.info("published %d retained %s message(s)", len(messages), self.what)
