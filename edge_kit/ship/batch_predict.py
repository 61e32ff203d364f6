"""`edge-kit batch-predict`: score many input shards with a bundle on Ray, resumably, one output per shard.

The bundle is verified on the driver first (signature when a key is given, every hash, the self-test:
exit 4 on a bad one). The driver then starts a pool of Ray actors (one CPU each, restarted when lost)
and feeds them the shards still to do, several shards per call and two calls queued per actor, so an
actor never waits for the driver. Each actor holds one ONNX Runtime session (device_agent's
`load_model`, so the manifest's preprocessing and the input checks are the agent's own) and reads its
shards with device_agent's streaming readers (`.npy`, `.npz`, `.csv`; Parquet through pyarrow). For
each shard it writes `<name>.pred.npz` atomically: `logits` (float32, one row per input row, in input
order), `predictions` (argmax), `rows`, `bundle_sha256` (of the bundle file) and `model_sha256`.
Writes (mostly fsync waits) run on a few threads while the next shards are scored; a call returns once
its outputs are on disk.

Resumable: an output that exists, loads and names this bundle's sha256 is complete (written under a
temporary name and renamed), so its shard is skipped. A job killed by a spot preemption and started
again writes only the rest, and every input row ends up in exactly one output row.

Timing: start-up (Ray, then the actors with the bundle loaded: up to the first actor ready) is reported
apart from scoring, with the steady rows/s per actor; progress is logged every `PROGRESS_EVERY_S`.
(Ray Data was used before: a block per shard cost 15-20 ms of scheduling and conversion per shard,
several times the shard's own scoring; plain actors cost a round trip per call, hidden by the queue.)
"""

from __future__ import annotations

import collections
import glob
import io
import logging
import math
import os
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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
# Actor calls: shards go to the actors in calls of several shards (at most this many, and about this many
# bytes of input), at least this many calls per actor when there are enough shards.
MAX_SHARDS_PER_CALL = 32
CALL_BYTES = 64 * 1024 * 1024
CALLS_PER_ACTOR = 8
CALLS_IN_FLIGHT = 2  # queued on each actor, so it starts the next call without waiting for the driver
# Writing an output is mostly waiting on fsync; these threads do it while the actor scores the next shards.
WRITER_THREADS = 4
WRITES_IN_FLIGHT = 8
WRITE_BYTES_IN_FLIGHT = 256 * 1024 * 1024
ACTOR_RESTARTS = 3  # a lost actor (preempted node) is restarted and its calls run again
PROGRESS_EVERY_S = 10.0


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


def shard_logits(runtime: Any, source: Path) -> np.ndarray:
    """The model's float32 logits for every row of one shard, in input order."""
    from device_agent.errors import InputError

    chunks: list[np.ndarray] = []
    done = 0
    for batch in shard_batches(source, READ_BATCH, math.prod(runtime.sample_shape)):
        try:
            x = runtime.as_batch(batch)
        except InputError as exc:
            raise DataError(f"{source}: rows {done}..{done + len(batch) - 1}: {exc}") from exc
        chunks.append(np.asarray(runtime.run(x), dtype=np.float32))
        done += len(x)
    if len(chunks) == 1:
        return chunks[0]
    return np.concatenate(chunks) if chunks else np.zeros((0, runtime.n_classes), dtype=np.float32)


def output_bytes(logits: np.ndarray, shard: Shard, bundle_sha256: str, model_sha256: str) -> bytes:
    """A shard's `.pred.npz`, built in memory (the file itself is written in one go)."""
    buf = io.BytesIO()
    np.savez(buf, logits=logits, predictions=logits.argmax(axis=1) if len(logits) else np.zeros(0, np.int64),
             rows=np.int64(len(logits)), bundle_sha256=np.str_(bundle_sha256), model_sha256=np.str_(model_sha256),
             source=np.str_(str(shard.source)))
    return buf.getvalue()


def write_output(path: Path, data: bytes) -> None:
    """Temp name, fsync, rename, fsync the folder: a present output is a complete one."""
    from device_agent.atomic import atomic_write_bytes

    atomic_write_bytes(path, data)


def score_shard(runtime: Any, shard: Shard, bundle_sha256: str) -> int:
    """Run one shard through the model and write its output atomically; returns its row count."""
    logits = shard_logits(runtime, shard.source)
    write_output(shard.output, output_bytes(logits, shard, bundle_sha256, runtime.info.sha256))
    return len(logits)


class OutputWriter:
    """Writes outputs on a few threads while the next shards are scored.

    Each write waits mostly on the disk (two fsyncs), not on a CPU: overlapped, the actor's CPU keeps
    scoring. At most `WRITES_IN_FLIGHT` outputs (and about `WRITE_BYTES_IN_FLIGHT` bytes) wait at once;
    `drain` returns once every queued output is on disk, and raises the first failed write.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="pred-writer")
        self._pending: collections.deque[tuple[Future[None], int]] = collections.deque()
        self._bytes = 0

    def submit(self, path: Path, data: bytes) -> None:
        while self._pending and (len(self._pending) >= WRITES_IN_FLIGHT
                                 or self._bytes + len(data) > WRITE_BYTES_IN_FLIGHT):
            self._wait_oldest()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._pending.append((self._pool.submit(write_output, path, data), len(data)))
        self._bytes += len(data)

    def _wait_oldest(self) -> None:
        future, size = self._pending.popleft()
        self._bytes -= size
        future.result()

    def drain(self) -> None:
        try:
            while self._pending:
                self._wait_oldest()
        finally:
            for future, _ in self._pending:  # after a failed write: let the others end, raise the first
                future.cancel()
            self._pending.clear()
            self._bytes = 0


class ShardScorer:
    """A Ray actor: one verified bundle, one ONNX Runtime session, many shards."""

    def __init__(self, bundle: str, pubkey: str | None, bundle_sha256: str) -> None:
        from device_agent.agent import load_model
        from device_agent.bundle.signing import load_public_key

        key = load_public_key(pubkey) if pubkey else None
        self.runtime = load_model(bundle, public_key=key, require_signature=key is not None).runtime
        self.bundle_sha256 = bundle_sha256
        self.writer = OutputWriter()

    def ready(self) -> bool:
        """Answered once the bundle is loaded: the driver times start-up with it."""
        return True

    def score(self, shards: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """Score shards in order; every output is on disk when this returns. A refused shard (a bad file)
        is returned as its message and exit code, not raised: Ray's retry layer would keep only its text."""
        results: list[dict[str, Any]] = []
        try:
            for source, output in shards:
                shard = Shard(Path(source), Path(output))
                try:
                    logits = shard_logits(self.runtime, shard.source)
                except EdgeKitError as exc:
                    results.append({"source": source, "rows": 0, "error": str(exc), "exit_code": exc.exit_code})
                    break  # the job stops at a refused shard: the driver sends nothing more
                self.writer.submit(shard.output,
                                   output_bytes(logits, shard, self.bundle_sha256, self.runtime.info.sha256))
                results.append({"source": source, "rows": len(logits), "error": "", "exit_code": 0})
        finally:
            self.writer.drain()
        return results


class ShardRefused(EdgeKitError):
    """A shard an actor refused on purpose (a bad file: exit 2), with that error's exit code and message."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def batch_predict(bundle: Path, inputs: str, out_dir: Path, *, pubkey: str | None = None, actors: int = 1,
                  address: str | None = None) -> dict[str, Any]:
    """Score every shard that has no complete output yet; returns counts, start-up and throughput."""
    from device_agent.agent import load_model
    from device_agent.bundle.signing import load_public_key

    if actors < 1:
        raise UsageError("--actors must be at least 1")
    started = time.perf_counter()
    key = load_public_key(pubkey) if pubkey else None
    loaded = load_model(bundle, public_key=key, require_signature=key is not None)  # exit 4 before any work
    bundle_sha256 = sha256_file(loaded.path)
    shards = plan_outputs(expand_inputs(inputs), out_dir)
    todo = [s for s in shards if not is_complete(s.output, bundle_sha256)]
    log.info("%d shards, %d already scored, %d to do", len(shards), len(shards) - len(todo), len(todo))
    run = RunStats()
    if todo:
        out_dir.mkdir(parents=True, exist_ok=True)
        for shard in todo:  # what a killed run was writing: never under a real name, so never trusted
            for stale in out_dir.glob(f".{shard.output.name}.*.tmp"):
                stale.unlink(missing_ok=True)
        run = _run_on_ray(todo, str(loaded.path), pubkey, bundle_sha256, actors, address, started)
    seconds = time.perf_counter() - started
    rows = run.rows
    return {"bundle": str(loaded.path), "bundle_sha256": bundle_sha256, "output": str(out_dir),
            "shards": len(shards), "skipped": len(shards) - len(todo), "scored": len(todo), "rows": rows,
            "actors": run.actors, "seconds": round(seconds, 3),
            "rows_per_second": round(rows / seconds, 1) if rows and seconds else None,
            "startup_s": None if run.startup_s is None else round(run.startup_s, 3),
            "ray_start_s": None if run.ray_s is None else round(run.ray_s, 3),
            "scoring_s": None if run.scoring_s is None else round(run.scoring_s, 3),
            "rows_per_s_steady": None if run.steady is None else round(run.steady, 1)}


@dataclass
class RunStats:
    """What the driver saw: rows, start-up (to the first actor ready), scoring, steady rows/s per actor."""

    rows: int = 0
    actors: int = 0
    ray_s: float | None = None  # of the start-up: connecting to Ray (starting a local instance)
    startup_s: float | None = None
    scoring_s: float | None = None
    steady: float | None = None


def plan_calls(todo: list[Shard], actors: int) -> list[list[Shard]]:
    """Shards grouped into actor calls: enough calls for every actor to get several (balance, progress),
    few enough that a call's fixed cost (a Ray round trip) stays small beside the shards' scoring."""
    per_call = max(1, min(MAX_SHARDS_PER_CALL, len(todo) // (actors * CALLS_PER_ACTOR)))
    calls: list[list[Shard]] = []
    current: list[Shard] = []
    size = 0
    for shard in todo:
        try:
            shard_size = shard.source.stat().st_size
        except OSError:
            shard_size = 0
        if current and (len(current) >= per_call or size + shard_size > CALL_BYTES):
            calls.append(current)
            current, size = [], 0
        current.append(shard)
        size += shard_size
    if current:
        calls.append(current)
    return calls


def _run_on_ray(todo: list[Shard], bundle: str, pubkey: str | None, bundle_sha256: str, actors: int,
                address: str | None, started: float) -> RunStats:
    import ray

    from edge_kit.train.ray_cluster import connected

    calls = plan_calls(todo, actors)
    stats = RunStats(actors=min(actors, len(calls)))
    try:
        with connected(address, actors):  # Ray's forwarded output on stderr: stdout is the result
            stats.ray_s = time.perf_counter() - started
            remote = ray.remote(num_cpus=1, max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)
            pool = [remote(ShardScorer).remote(bundle, pubkey, bundle_sha256) for _ in range(stats.actors)]
            refused = _drive(pool, calls, len(todo), started, stats)
    except Exception as exc:  # Ray wraps what an actor raised; a bad shard should read as itself (exit 2)
        cause = _edge_kit_cause(exc)
        if cause is not None:
            raise cause from None
        raise
    if refused is not None:
        raise refused
    return stats


def _drive(pool: list[Any], calls: list[list[Shard]], shards: int, started: float,
           stats: RunStats) -> ShardRefused | None:
    """Feed each actor calls (`CALLS_IN_FLIGHT` queued, so it never waits for the driver), log progress,
    and time start-up (to the first actor ready) apart from scoring. Returns the first refused shard."""
    import ray

    queue = collections.deque(calls)
    kinds: dict[Any, tuple[int, list[Shard] | None]] = {}  # ref -> (actor, its call; None for `ready`)
    for index, actor in enumerate(pool):
        kinds[actor.ready.remote()] = (index, None)
        for _ in range(CALLS_IN_FLIGHT):
            if queue:
                first = queue.popleft()
                kinds[actor.score.remote([(str(s.source), str(s.output)) for s in first])] = (index, first)
    ready_at: dict[int, float] = {}
    first_at: dict[int, float] = {}  # each actor's first call back: warm-up ends
    first_rows: dict[int, int] = {}
    last_at: dict[int, float] = {}
    rows_by: dict[int, int] = {}
    done = 0
    refused: ShardRefused | None = None
    first_ready: float | None = None
    last_log = time.perf_counter()
    while kinds:
        finished, _ = ray.wait(list(kinds), num_returns=1, timeout=PROGRESS_EVERY_S)
        now = time.perf_counter()
        for ref in finished:
            index, call = kinds.pop(ref)
            value = ray.get(ref)
            if call is None:
                ready_at[index] = now
                if first_ready is None:
                    first_ready = now
                    log.info("start-up %.1f s (Ray %.1f s, then %d actor(s) with the bundle loaded)", now - started,
                             stats.ray_s or 0.0, len(pool))
                continue
            for result in value:
                if result["error"] and refused is None:
                    refused = ShardRefused(str(result["error"]), int(result["exit_code"]))
                rows_by[index] = rows_by.get(index, 0) + int(result["rows"])
                done += 1
            last_at[index] = now
            if index not in first_at:
                first_at[index], first_rows[index] = now, rows_by.get(index, 0)
            if queue and refused is None:
                nxt = queue.popleft()
                kinds[pool[index].score.remote([(str(s.source), str(s.output)) for s in nxt])] = (index, nxt)
        if now - last_log >= PROGRESS_EVERY_S or not kinds:
            last_log = now
            rows = sum(rows_by.values())
            span = now - first_ready if first_ready is not None else 0.0
            log.info("%d/%d shards, %d rows, %.0f rows/s since start-up", done, shards, rows,
                     rows / span if span > 0 else 0.0)
    if refused is None and done != shards:
        raise EdgeKitError(f"{shards - done} shards came back without a result")
    stats.rows = sum(rows_by.values())
    if first_ready is not None:
        stats.startup_s = first_ready - started
        stats.scoring_s = max(last_at.values(), default=first_ready) - first_ready
        # Steady state: each actor after its first call (ORT's first runs, the writer threads starting);
        # an actor with a single call counts from when it was ready.
        warm = [i for i in last_at if last_at[i] > first_at[i]]
        if warm:
            busy = sum(last_at[i] - first_at[i] for i in warm)
            steady_rows = sum(rows_by[i] - first_rows[i] for i in warm)
        else:
            busy = sum(last_at[i] - ready_at.get(i, first_ready) for i in last_at)
            steady_rows = sum(rows_by[i] for i in last_at)
        stats.steady = steady_rows / busy if busy > 0 else None
    return refused


def _edge_kit_cause(exc: BaseException) -> EdgeKitError | None:
    """The EdgeKitError an actor raised, found through Ray's wrappers (RayTaskError, RayActorError)."""
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
