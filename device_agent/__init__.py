"""edge-kit device agent: verifies and runs a bundle, summarises what it sees, reports over MQTT."""
