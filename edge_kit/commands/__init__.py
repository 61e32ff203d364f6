"""One module per CLI command; each exposes `run(args) -> dict` (the --json result)."""
