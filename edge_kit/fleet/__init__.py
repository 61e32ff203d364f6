"""The fleet drift service (`edge-kit fleet serve`): ingest, storage, drift tests, alerts, dashboard.

One module per job: `settings` (fleet TOML), `references` (reference histograms from bundles),
`storage` (SQLite/PostgreSQL), `ingest` (MQTT consumer + payload validation), `stats` (binned
two-sample tests), `drift` (fleet and per-device decisions), `concept` (accuracy from labels or
an estimate from confidence), `alerts` (stored alerts, approval, retraining), `server` (HTTP).
"""

__all__: list[str] = []  # the modules named above are the API; nothing is re-exported
