"""The whole loop on one machine: `python -m edge_kit.demo.fleet` (`make fleet-demo`).

- `fleet`: the orchestrator and its command line (bundle, broker, fleet server, agents, feeders, summary);
- `broker`: a local MQTT 5 broker (Mosquitto) for the demo;
- `processes`: child processes with log files, readiness checks and clean stops;
- `shifts`: the input shifts some devices receive (noise, translation, class mix), ramped in gradually;
- `feeder`: one thread per device posting held-out digits (shifted or not) to the agent's HTTP API;
- `retrain`: the retraining command the fleet server runs when an alert is approved.
"""

__all__: list[str] = []  # the modules named above are the API; nothing is re-exported
