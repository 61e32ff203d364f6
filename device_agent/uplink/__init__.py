"""Getting summaries out: the disk spool, the MQTT connection and the facts that cross the wire.

- `wire`: topic names and broker URLs, one definition for the agent and the fleet.
- `connection`: the paho-mqtt 2.x client both sides use (MQTT 5, TLS, persistent session).
- `transport`: the `Publisher` protocol, an in-memory double, and MQTT.
- `spool`: closed windows on disk until the broker acknowledged them.
- `forwarder`: moves spooled windows to the broker, deleting each only after its PUBACK.
"""
