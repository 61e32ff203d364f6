"""One module per CLI command; each exposes `run(args) -> dict` (the --json result)."""

__all__: list[str] = []  # the modules named above are the API; nothing is re-exported
