"""`edge-kit batch-predict`: score many input shards with a bundle on Ray, resumably, one output per shard.

The bundle is verified on the driver first (signature when a key is given, every hash, the self-test:
exit 4 on a bad one). Ray Data then spreads the shards still to do over a pool of actors; each actor
holds one ONNX Runtime session (device_agent's `load_model`, so the manifest's preprocessing and the
input checks are the agent's own) and reads its shards with device_agent's streaming readers (`.npy`,
`.npz`, `.csv`; Parquet through pyarrow). For each shard it writes `<name>.pred.npz` atomically:
`logits` (float32, one row per input row, in input order), `predictions` (argmax), `rows`,
`bundle_sha256` (of the bundle file) and `model_sha256`.

Resumable: an output that exists, loads and names this bundle's sha256 is complete (written under a
temporary name and renamed), so its shard is skipped. A job killed by a spot preemption and started
again writes only the rest, and every input row ends up in exactly one output row.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_kit.errors import DataError, EdgeKitError, UsageError
from edge_kit.train.provenance import sha256_file

log = logging.getLogger(__name__)

SUFFIXES = (".npy", ".npz", ".csv", ".parquet")
OUTPUT_SUFFIX = ".pred.npz"
READ_BATCH = 1024  # rows per read and per inference call inside an actor


@dataclass(frozen=True)
class Shard:
    source: Path
    output: Path


def expand_inputs(pattern: str) -> list[Path]:
    """A file, a folder (its supported files) or a glob, as a sorted list of input shards."""
    path = Path(pattern)
    if path.is_dir():
        found = [p for p in path.iterdir() if p.is_file()]
    elif path.is_file():
        found = [path]
    else:
        found = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
    shards = sorted(p.resolve() for p in found if p.suffix.lower() in SUFFIXES)
    if not shards:
        raise UsageError(f"--input {pattern}: no {', '.join(SUFFIXES)} files found")
    return shards


def plan_outputs(sources: list[Path], out_dir: Path) -> list[Shard]:
    """One output per shard, named after the shard's path below the shards' common folder."""
    common = Path(os.path.commonpath([str(p.parent) for p in sources]))
    shards = []
    seen: dict[Path, Path] = {}
    for source in sources:
        name = "__".join(source.relative_to(common).parts)
        output = out_dir / f"{name}{OUTPUT_SUFFIX}"
        if output in seen:
            raise UsageError(f"--input: {seen[output]} and {source} would write the same output {output.name}")
        seen[output] = source
        shards.append(Shard(source, output))
    return shards


def is_complete(output: Path, bundle_sha256: str) -> bool:
    """True for an output this bundle wrote in full (writes are atomic, so a present one was finished)."""
    if not output.is_file():
        return False
    try:
        with np.load(output, allow_pickle=False) as npz:
            return bool(str(npz["bundle_sha256"]) == bundle_sha256 and len(npz["logits"]) == int(npz["rows"]))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        log.warning("output %s is unreadable; its shard is scored again", output)
        return False


def parquet_batches(path: Path, batch_size: int, row_values: int | None = None) -> Iterator[np.ndarray]:
    """Rows of a Parquet shard, every column numeric, as float32 (n, columns) batches."""
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid and OSError subclasses for a damaged file
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc
    columns = len(reader.schema_arrow)
    if row_values is not None and columns != row_values:  # checked before a row group is read
        raise DataError(f"{path}: {columns} columns do not fit the model: it takes {row_values} values per row")
    for batch in reader.iter_batches(batch_size=batch_size):
        try:
            yield np.column_stack([c.to_numpy(zero_copy_only=False) for c in batch.columns]).astype(np.float32)
        except (ValueError, TypeError) as exc:
            raise DataError(f"{path}: every column must be numeric: {exc}") from exc


def shard_batches(path: Path, batch_size: int, row_values: int | None = None) -> Iterator[np.ndarray]:
    """Batches of a shard; a shard whose declared rows do not hold `row_values` values is refused
    (DataError) before a row is read, so a small crafted file cannot declare its way into memory."""
    if path.suffix.lower() == ".parquet":
        return parquet_batches(path, batch_size, row_values)
    from device_agent.batch import open_batches

    return open_batches(path, batch_size, row_values)[1]


def score_shard(runtime: Any, shard: Shard, bundle_sha256: str) -> int:
    """Run one shard through the model and write its output atomically; returns its row count."""
    from device_agent.atomic import atomic_file
    from device_agent.errors import InputError

    chunks: list[np.ndarray] = []
    done = 0
    for batch in shard_batches(shard.source, READ_BATCH, math.prod(runtime.sample_shape)):
        try:
            x = runtime.as_batch(batch)
        except InputError as exc:
            raise DataError(f"{shard.source}: rows {done}..{done + len(batch) - 1}: {exc}") from exc
        chunks.append(np.asarray(runtime.run(x), dtype=np.float32))
        done += len(x)
    logits = np.concatenate(chunks) if chunks else np.zeros((0, runtime.n_classes), dtype=np.float32)
    shard.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(shard.output) as f:
        np.savez(f, logits=logits, predictions=logits.argmax(axis=1) if len(logits) else np.zeros(0, np.int64),
                 rows=np.int64(len(logits)), bundle_sha256=np.str_(bundle_sha256),
                 model_sha256=np.str_(runtime.info.sha256), source=np.str_(str(shard.source)))
    return len(logits)


class ShardScorer:
    """A Ray Data actor: one verified bundle, one ONNX Runtime session, many shards."""

    def __init__(self, bundle: str, pubkey: str | None, bundle_sha256: str) -> None:
        from device_agent.agent import load_model
        from device_agent.bundle.signing import load_public_key

        key = load_public_key(pubkey) if pubkey else None
        self.runtime = load_model(bundle, public_key=key, require_signature=key is not None).runtime
        self.bundle_sha256 = bundle_sha256

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, errors, codes = [], [], []
        for s, o in zip(batch["source"], batch["output"], strict=True):
            try:
                rows.append(score_shard(self.runtime, Shard(Path(str(s)), Path(str(o))), self.bundle_sha256))
                errors.append("")
                codes.append(0)
            except EdgeKitError as exc:  # returned, not raised: Ray Data's retry layer keeps only its text
                rows.append(0)
                errors.append(str(exc))
                codes.append(exc.exit_code)
        return {"source": batch["source"], "rows": np.asarray(rows, dtype=np.int64),
                "error": np.asarray(errors, dtype=str), "exit_code": np.asarray(codes, dtype=np.int64)}


class ShardRefused(EdgeKitError):
    """A shard an actor refused on purpose (a bad file: exit 2), with that error's exit code and message."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def batch_predict(bundle: Path, inputs: str, out_dir: Path, *, pubkey: str | None = None, actors: int = 1,
                  address: str | None = None) -> dict[str, Any]:
    """Score every shard that has no complete output yet; returns counts and throughput."""
    from device_agent.agent import load_model
    from device_agent.bundle.signing import load_public_key

    if actors < 1:
        raise UsageError("--actors must be at least 1")
    key = load_public_key(pubkey) if pubkey else None
    loaded = load_model(bundle, public_key=key, require_signature=key is not None)  # exit 4 before any work
    bundle_sha256 = sha256_file(loaded.path)
    shards = plan_outputs(expand_inputs(inputs), out_dir)
    todo = [s for s in shards if not is_complete(s.output, bundle_sha256)]
    log.info("%d shards, %d already scored, %d to do", len(shards), len(shards) - len(todo), len(todo))
    started = time.perf_counter()
    rows = 0
    if todo:
        out_dir.mkdir(parents=True, exist_ok=True)
        for shard in todo:  # what a killed run was writing: never under a real name, so never trusted
            for stale in out_dir.glob(f".{shard.output.name}.*.tmp"):
                stale.unlink(missing_ok=True)
        rows = _run_on_ray(todo, str(loaded.path), pubkey, bundle_sha256, actors, address)
    seconds = time.perf_counter() - started
    return {"bundle": str(loaded.path), "bundle_sha256": bundle_sha256, "output": str(out_dir),
            "shards": len(shards), "skipped": len(shards) - len(todo), "scored": len(todo), "rows": rows,
            "seconds": round(seconds, 3), "rows_per_second": round(rows / seconds, 1) if rows and seconds else None}


def _run_on_ray(todo: list[Shard], bundle: str, pubkey: str | None, bundle_sha256: str, actors: int,
                address: str | None) -> int:
    import ray
    import ray.data

    from edge_kit.train.ray_cluster import connected

    items = [{"source": str(s.source), "output": str(s.output)} for s in todo]
    try:
        with connected(address, actors):  # Ray's forwarded output on stderr: stdout is the result
            dataset = ray.data.from_items(items, override_num_blocks=len(items))
            scored = dataset.map_batches(
                ShardScorer,
                fn_constructor_kwargs={"bundle": bundle, "pubkey": pubkey, "bundle_sha256": bundle_sha256},
                batch_size=1, concurrency=actors, num_cpus=1)
            results = scored.take_all()
    except Exception as exc:  # Ray wraps what an actor raised; a bad shard should read as itself (exit 2)
        cause = _edge_kit_cause(exc)
        if cause is not None:
            raise cause from None
        raise
    for r in results:
        if str(r.get("error", "")):
            raise ShardRefused(str(r["error"]), int(r["exit_code"]))
    missing = {s.source for s in todo} - {Path(str(r["source"])) for r in results}
    if missing:
        raise EdgeKitError(f"{len(missing)} shards came back without a result, e.g. {sorted(missing)[0]}")
    return int(sum(int(r["rows"]) for r in results))


def _edge_kit_cause(exc: BaseException) -> EdgeKitError | None:
    """The EdgeKitError an actor raised, found through Ray's wrappers (RayTaskError, Ray Data's own)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, EdgeKitError):
            return current
        as_cause = getattr(current, "as_instanceof_cause", None)
        if callable(as_cause):
            stack.append(as_cause())
        stack.extend([current.__cause__, current.__context__, getattr(current, "cause", None)])
    return None
