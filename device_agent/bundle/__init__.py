"""Which bundle may serve: the bundle format, its signatures, version order and the folder watcher.

- `format`: the one definition of `<name>-<version>.edgebundle` (write, read, verify).
- `signing`: Ed25519 keys and manifest signatures.
- `versions`: the order of bundle versions (the no-downgrade rule).
- `watcher`: notices a new bundle in the watched folder.
- `selection`: the rule that decides which candidate serves (start-up order, no-downgrade, rejections).
"""
