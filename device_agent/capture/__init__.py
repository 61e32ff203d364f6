"""Field capture (docs/captures.md): a bounded, sampled set of the real inputs a device served, with its
predictions and the labels that come back, uploaded to the fleet server with the device's credential.

Off by default: without `[capture] enabled = true` no capture object exists, so nothing is sampled,
stored or sent, and `Agent.predict` pays one attribute check.

- `config`: the `[capture]` section of the agent config and its cross-key checks.
- `store`: the capture spool (SQLite, WAL, `synchronous=FULL`): records, label updates, counters,
  the day's budget, the fleet requests already honoured.
- `sampler`: which predicted rows are kept: `fraction`, the fleet's requests, `bytes_per_day`.
- `request`: the fleet's `edgekit.capture_request/1` message, checked like any hostile input.
- `uploader`: the thread that sends batches and label updates to the fleet server.
- `capture`: the `Capture` facade the agent calls, and `start_capture` that wires it to an agent.
"""

__all__: list[str] = []
