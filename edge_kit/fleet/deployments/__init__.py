"""Rolling bundles out to the fleet: deployments, the model-aware canary, bundle downloads.

- `store`: the deployments and per-device deployment rows in the fleet database.
- `bundles`: the bundle files the fleet serves (by sha256), uploads, the download caps.
- `canary`: the canary figures (canary vs control devices) and the pass/fail decision.
- `rollout`: the state machine (canary -> rolling -> done, or halted / rolled_back) and what it publishes.
- `publisher`: the retained per-device deployment messages over MQTT, republished on every reconnect.
- `routes`: the HTTP API.
"""
