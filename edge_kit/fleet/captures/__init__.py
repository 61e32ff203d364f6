"""Field captures on the fleet side (docs/captures.md): devices upload sampled inputs with their own
credential, the fleet keeps them as immutable `.npz` shards in a capture store (a folder or an fsspec
URL) indexed by record id in the `captures` table, operators export them and ask devices for more.

store.py       the shard files: quota, full disk, atomic writes
shards.py      one accepted batch <-> the bytes of its `.npz` shard
validation.py  a hostile upload body checked record by record against the bundle's input
index.py       the `captures` table: exactly-once by record id, counts, paged export, label updates
intake.py      an upload from validation to shard to index; label updates; the export page
requests.py    capture requests: stored, turned into retained `capture` topic messages
routes.py      the HTTP routes
"""

__all__: list[str] = []
