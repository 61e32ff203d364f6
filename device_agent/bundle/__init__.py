"""Which bundle may serve: the bundle format, its signatures, version order, the selection rule and the
folder watcher.

- `format`: the one definition of `<name>-<version>.edgebundle` (write, read, verify).
- `signing`: Ed25519 keys and manifest signatures.
- `versions`: the PEP 440 order of bundle versions.
- `selection`: the rule that decides which candidate serves (one product, start-up order,
  no-downgrade, rollback, rejections with their reasons).
- `watcher`: notices a new or changed bundle in the watched folder and offers it to the agent.
"""

__all__: list[str] = []  # the modules named above are the API; nothing is re-exported
