"""MQTT ingest: validate each summary against its model's reference, drop duplicates, store in batches.

Delivery is at-least-once end to end. The consumer acknowledges a QoS-1 message (paho `manual_ack`)
only after the transaction holding it has committed, so a consumer killed at any point loses
nothing: the broker redelivers what was not acknowledged (persistent session: `clean_start=False`
and a session expiry), and the database drops what it already has by the idempotency key
`(device, model.sha256, window.start)`.

Scale-out: every consumer subscribes through the MQTT 5 shared subscription
`$share/<group>/edgekit/<fleet>/+/summary`, so the broker spreads summaries over all consumers of
the group, whether they are processes of one `--workers N` server or servers on several machines.
Status messages are retained, and retained messages are not delivered on shared subscriptions, so
one consumer per server also subscribes to `edgekit/<fleet>/+/status` directly (upserts, so
several servers doing it is harmless).
"""

from __future__ import annotations

import json
import logging
import math
import operator
import sqlite3
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson  # parses summaries ~4x faster than json (134 -> 30 us each): most of the ingest budget

from device_agent.bundle.signing import load_public_key
from device_agent.errors import PayloadError
from device_agent.monitoring.summary_codec import (
    CONTENT_TYPE_JSON,
    CONTENT_TYPE_ZLIB,
    MAX_DECODED_BYTES,
    decode_payload,
)
from device_agent.monitoring.summary_validation import INT64_MAX, SCHEMA, checked_counts
from device_agent.uplink.connection import MqttConnection
from device_agent.uplink.wire import (
    BrokerConfig,
    parse_broker_url,
    parse_topic,
    shared_topic,
    status_topic,
    summary_topic,
)
from edge_kit.fleet import dispersion_trailer as dispersion
from edge_kit.fleet.consumer_state import ConsumerState
from edge_kit.fleet.reference_index import ModelReference, ReferenceStore
from edge_kit.fleet.settings import FleetSettings, IngestSettings
from edge_kit.fleet.stats import repeat_design_effect
from edge_kit.fleet.storage import Storage, WindowRow, encode_counts

log = logging.getLogger(__name__)

# Window starts before this are a broken device clock (2020-01-01), not data.
EARLIEST_WINDOW = 1_577_836_800.0
# More inferences than this in one window is a corrupt or hostile count (and would overflow pooling).
MAX_WINDOW_N = 10**12
SESSION_EXPIRY_SECONDS = 24 * 3600
MAX_BATCH_DELAY = 0.05  # seconds a received message may wait for its batch to fill

# `Validator._plain_row`: what orjson.dumps writes for a list of non-negative integers, and for one of
# numbers or nulls; the types a JSON number decodes to; a channel's four statistics.
_COUNT_BYTES = b"0123456789,[]"
_NUMBER_BYTES = b"0123456789.e+-,[]nul"  # (the last three: null)
_NUMBER = (int, float)
_STATS = operator.itemgetter("min", "max", "sum", "sumsq")
_MODEL_KEYS = frozenset(("name", "version", "sha256"))


def _topic_parts(topic: str) -> tuple[str, str, str]:
    parts = parse_topic(topic)
    if parts is None:
        raise PayloadError("topic", f"unexpected topic {topic!r}")
    return parts


class Validator:
    """Turns one MQTT message into a stored row, or raises PayloadError with a kind for /metrics.

    The checked JSON document goes straight to the row, in the reference's channel order, without
    building a `WindowSummary` first: decoded once (zlib, then orjson), its counts converted once
    (`checked_counts`), then gathered into reference order by one cached index per channel layout.
    """

    def __init__(self, references: ReferenceStore, settings: IngestSettings) -> None:
        self.references = references
        self.settings = settings
        self._layouts: dict[tuple[str, tuple[str, ...]], _Layout] = {}

    def summary(self, topic: str, data: bytes, content_type: str | None, now: float | None = None) -> WindowRow:
        now = time.time() if now is None else now
        if len(data) > self.settings.max_payload_bytes:
            raise PayloadError("too_large", f"{len(data)} bytes > limit {self.settings.max_payload_bytes}")
        fleet, device, _ = _topic_parts(topic)
        try:
            row = self._plain_row(fleet, device, data, content_type, now)
        except Exception:  # whatever the shortcut trips on, the full checks below decide and name it
            row = None
        if row is not None:
            return row
        return self._checked_row(fleet, device, topic, data, content_type, now)

    def _checked_row(self, fleet: str, device: str, topic: str, data: bytes, content_type: str | None,
                     now: float) -> WindowRow:
        """Every check in turn, each refusal a `PayloadError` of its own kind and message."""
        try:
            p, flat = checked_counts(decode_payload(data, content_type, fast_loads=orjson.loads))
            window = p["window"]
            start, end, seq = float(window["start"]), float(window["end"]), int(window.get("seq", 0))
        except PayloadError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:  # e.g. a window start beyond a float
            raise PayloadError("malformed", f"summary cannot be decoded: {exc}") from exc
        if p["fleet"] != fleet or p["device"] != device:
            raise PayloadError("topic_mismatch", f"payload says {p['fleet']}/{p['device']}, topic {topic!r}")
        sha256 = p["model"]["sha256"]
        ref = self.references.get(sha256)
        if ref is None:
            raise PayloadError("unknown_model", f"no bundle for model sha256 {sha256[:16]}...")
        channels = list(p["channels"].values())
        layout = self._layout(ref, p["channels"])
        if list(map(len, (c["counts"] for c in channels))) != layout.payload_bins:
            bad = next(name for name, c in zip(p["channels"], channels, strict=True)
                       if len(c["counts"]) != layout.bins_of[name])
            raise PayloadError("bins", f"channel {bad!r} counts are not aligned with the reference edges")
        n: int = p["n"]
        # The checks let min and max through only as finite numbers or null, and only together.
        if n > 0 and any(c.get("min") is None for c in channels):
            raise PayloadError("malformed", "a non-empty window needs numeric min and max for every channel")
        implausible = self._implausible(n, start, end, now)
        if implausible is not None:
            raise implausible
        labels = p.get("labels")
        confusion = None if labels is None else self._confusion(labels, ref, start, end)
        disp = None
        if all("disp" in c for c in channels):  # all or nothing: a partial signal is no signal
            disp = np.array([c["disp"] for c in channels], dtype=np.float64).reshape(len(channels), 4)
        return self._row(fleet, device, ref, layout, start, end, seq, n, now, flat, disp, p.get("n_eff"), confusion)

    def _implausible(self, n: int, start: float, end: float, now: float) -> PayloadError | None:
        """Why a well-formed window cannot be what a device measured, or None."""
        if n > MAX_WINDOW_N:  # every count is at most n (they add up to n): n bounds them all
            return PayloadError("counts", f"n = {n} is not a plausible window size")
        # A device may not claim more inferences than it could have run: n weighs its window in
        # every pooled test, so an inflated n would let one device speak for the fleet.
        rate = self.settings.max_inferences_per_second
        if n > max(end - start, 1.0) * rate:
            return PayloadError("rate", f"n = {n} in a {end - start:.0f} s window is over "
                                        f"ingest.max_inferences_per_second = {rate:g}")
        if end > now + self.settings.max_clock_skew_seconds:
            return PayloadError("future_window", f"window ends {end - now:.0f} s in the future")
        if start < EARLIEST_WINDOW or end - start > self.settings.max_window_seconds:
            return PayloadError("window", f"implausible window [{start}, {end}]")
        return None

    def _confusion(self, labels: dict[str, Any], ref: ModelReference, start: float, end: float) -> bytes:
        """The stored confusion matrix of well-formed labels, once they are checked against the model."""
        if labels["classes"] != ref.labels:
            raise PayloadError("labels", "label classes differ from the model's labels")
        # Labels are ground truth fed back for earlier predictions, so a window may carry more labels
        # than its own n (late labels of the previous window); no window can carry more than the
        # device could have predicted in it, which bounds what a device can claim the same way as n.
        labelled = sum(map(sum, labels["confusion"]))
        rate = self.settings.max_inferences_per_second
        if labelled > max(end - start, 1.0) * rate:
            raise PayloadError("labels_over_n", f"{labelled} labels in a "
                               f"{end - start:.0f} s window is over "
                               f"ingest.max_inferences_per_second = {rate:g}")
        return np.array(labels["confusion"], dtype=np.int64).tobytes()

    @staticmethod
    def _row(fleet: str, device: str, ref: ModelReference, layout: _Layout, start: float, end: float, seq: int,
             n: int, now: float, flat: np.ndarray, disp: np.ndarray | None, n_eff: Any,
             confusion: bytes | None) -> WindowRow:
        """The stored row of a checked summary (`flat` and `disp` in payload channel order)."""
        return WindowRow(
            device=device, model_sha256=ref.sha256, window_start=start, window_end=end,
            # Name and version from the matched reference: the sha256 is what was checked, the payload's
            # words for it are not.
            seq=seq, n=n, fleet=fleet, model_name=ref.name, model_version=ref.version,
            received_at=now, confusion=confusion,
            counts=dispersion.attach_repeats(
                dispersion.attach(encode_counts(flat[layout.gather]), None if disp is None else disp[layout.order]),
                repeat_design_effect(n, None if n_eff is None else float(n_eff))),
        )

    def _plain_row(self, fleet: str, device: str, data: bytes, content_type: str | None,
                   now: float) -> WindowRow | None:
        """The row of a well-formed summary, checked in bulk; None where anything is unusual.

        The hot path: what `_checked_row` accepts from an honest device, at a fraction of its cost.
        It accepts nothing that `_checked_row` refuses, and builds the same row; on None (or an
        exception) `_checked_row` runs and names the problem, so refusals keep their kind and
        message. The bulk checks lean on orjson: its `loads` refuses NaN, infinities, lone
        surrogates and invalid UTF-8, so every float it returns is finite and every string valid;
        its `dumps` writes an int as digits, a float with `.` or `e`, None as `null` and everything
        else with letters or quotes, so the characters of a re-encoded list say what it holds.
        """
        if content_type == CONTENT_TYPE_ZLIB:
            inflater = zlib.decompressobj()
            raw = inflater.decompress(data, MAX_DECODED_BYTES + 1)
            if len(raw) > MAX_DECODED_BYTES or inflater.unconsumed_tail:
                return None
        elif content_type in (None, "", CONTENT_TYPE_JSON) and len(data) <= MAX_DECODED_BYTES:
            raw = data
        else:
            return None
        p = orjson.loads(raw)
        if (type(p) is not dict or p.get("schema") != SCHEMA or p.get("fleet") != fleet or p.get("device") != device
                or len(fleet) > 128 or len(device) > 128 or "\x00" in fleet + device):
            return None
        model, window, channels, n = p.get("model"), p.get("window"), p.get("channels"), p.get("n")
        if type(model) is not dict or type(window) is not dict or type(channels) is not dict or not channels:
            return None
        if (not model.keys() >= _MODEL_KEYS or set(map(type, model.values())) != {str}
                or max(map(len, model.values())) > 256 or "\x00" in "".join(model.values())):
            return None
        ref = self.references.get(model["sha256"])
        start: Any = window.get("start")
        end: Any = window.get("end")
        seq = window.get("seq", 0)
        if (ref is None or type(start) not in _NUMBER or type(end) not in _NUMBER or not start <= end
                or type(seq) is not int or not 0 <= seq <= INT64_MAX
                or type(n) is not int or not 0 <= n <= MAX_WINDOW_N):
            return None
        n_eff = p.get("n_eff")
        if n_eff is not None and not (type(n_eff) in _NUMBER and 0 <= n_eff <= n):
            return None
        start, end = float(start), float(end)
        if self._implausible(n, start, end, now) is not None:
            return None
        layout = self._layout(ref, channels)
        values = list(channels.values())
        if not layout.plain or set(map(type, values)) != {dict}:
            return None
        # Counts: lists of the reference's lengths holding only non-negative integers (digits), adding up to n.
        lists = [c.get("counts") for c in values]
        if list(map(len, lists)) != layout.payload_bins:
            return None
        text = orjson.dumps(lists)
        if text.translate(None, _COUNT_BYTES) or text.count(b"[") != len(lists) + 1:
            return None
        # Digits and commas only: parsed in C (a number past int64 saturates, and is then over n).
        flat = np.fromstring(text.translate(None, b"[]"), dtype=np.int64, sep=",")
        if int(flat.max()) > n or (np.add.reduceat(flat, layout.starts) != n).any():  # (no overflow: each <= n)
            return None
        # min, max, sum, sumsq: numbers or null; min and max null only together, and only when n is 0.
        stats = list(map(_STATS, values))  # KeyError where one is missing
        text = orjson.dumps(stats)
        if text.translate(None, _NUMBER_BYTES) or text.count(b"[") != len(stats) + 1:
            return None
        if b"n" in text and (n > 0 or [s[0] is None for s in stats] != [s[1] is None for s in stats]):
            return None
        disp = None
        disps = [c["disp"] for c in values if "disp" in c]
        if disps:
            if len(disps) != len(values):
                return None
            text = orjson.dumps(disps)
            if (text.translate(None, _NUMBER_BYTES[:-3]) or text.count(b"[") != len(disps) + 1
                    or set(map(len, disps)) != {4}
                    or {type(d[1]) for d in disps} | {type(d[3]) for d in disps} != {int}):  # df and k
                return None
            disp = np.array(disps, dtype=np.float64)
            if float(disp.min()) < 0 or float(disp[:, 1::2].max()) >= 2.0**63:
                return None
        labels = p.get("labels")
        confusion = None
        if labels is not None:
            if (type(labels) is not dict or type(labels.get("classes")) is not list
                    or type(labels.get("confusion")) is not list):
                return None
            classes, m = labels["classes"], labels["confusion"]
            k = len(classes)
            text = orjson.dumps(m)
            if (len(m) != k or set(map(type, m)) != {list} or set(map(len, m)) != {k}
                    or text.translate(None, _COUNT_BYTES) or text.count(b"[") != k + 1
                    or not set(map(type, classes)) <= {str} or max(map(len, classes), default=0) > 256
                    or "\x00" in "".join(classes)):
                return None
            confusion = self._confusion(labels, ref, start, end)  # PayloadError (then the full checks name it)
        return self._row(fleet, device, ref, layout, start, end, seq, n, now, flat, disp, n_eff, confusion)

    def _layout(self, ref: ModelReference, channels: dict[str, Any]) -> _Layout:
        """How a payload's channels map onto the reference (channels are matched by name, not position)."""
        key = (ref.sha256, tuple(channels))
        layout = self._layouts.get(key)
        if layout is None:
            names = list(channels)
            if sorted(names) != sorted(ref.channel_names):
                missing = sorted(set(ref.channel_names) - set(names))[:3]
                extra = sorted(set(names) - set(ref.channel_names))[:3]
                raise PayloadError("channels", f"channels differ from the reference of {ref.name} {ref.version}: "
                                               f"missing {missing}, unknown {extra}")
            layout = _Layout(ref, names)
            if len(self._layouts) < 1024:
                self._layouts[key] = layout
        return layout

    @staticmethod
    def status(topic: str, data: bytes, now: float | None = None) -> dict[str, Any]:
        fleet, device, _ = _topic_parts(topic)
        if len(data) > 64 * 1024:
            raise PayloadError("too_large", "status message over 64 KiB")
        try:
            # NaN/Infinity are refused (the API serves this JSON back; strict parsers reject them).
            status = json.loads(data, parse_constant=_no_constant)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise PayloadError("malformed_json", str(exc)[:200]) from exc
        except ValueError as exc:
            raise PayloadError("status", str(exc)) from exc
        if not isinstance(status, dict) or status.get("state") not in ("online", "offline"):
            raise PayloadError("status", "status needs state 'online' or 'offline'")
        if not _storable_json(status):
            raise PayloadError("status", "status holds a non-finite number, an integer beyond 64 bits or a "
                                         "string that is not valid UTF-8")
        return {"device": device, "fleet": fleet, "state": status["state"],
                "at": time.time() if now is None else now, "status": status}


class _Layout:
    """A payload's channel order against its reference: what `Validator.summary` needs per message."""

    def __init__(self, ref: ModelReference, names: list[str]) -> None:
        position = {n: i for i, n in enumerate(names)}
        self.order = np.array([position[n] for n in ref.channel_names], dtype=np.int64)
        self.bins_of = {n: int(b) for n, b in zip(ref.channel_names, ref.bins, strict=True)}
        self.payload_bins = [self.bins_of[n] for n in names]  # what each payload channel's counts must hold
        # Positions in the payload's concatenated counts, in reference channel order: one gather
        # turns the payload's counts into the stored layout (valid once the bins match).
        offsets = np.cumsum([0, *self.payload_bins])
        self.gather = np.concatenate([np.arange(offsets[j], offsets[j + 1]) for j in self.order])
        self.starts = offsets[:-1]  # where each payload channel's counts begin (np.add.reduceat)
        # Whether `Validator._plain_row` may take these names as checked: each a name the full checks
        # pass (no NUL, at most 256 characters), every channel with at least one bin.
        self.plain = all(len(n) <= 256 and "\x00" not in n for n in names) and min(self.payload_bins) > 0


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} in status")


def _storable_json(value: Any, depth: int = 0) -> bool:
    """Finite floats, 64-bit integers and valid UTF-8 strings all the way down (bounded depth)."""
    if depth > 32:
        return False
    if isinstance(value, dict):
        return all(_storable_json(k, depth + 1) and _storable_json(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_storable_json(v, depth + 1) for v in value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return "\x00" not in value
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    if isinstance(value, float):
        return math.isfinite(value)
    return False


@dataclass
class IngestBatch:
    """Messages received but not yet committed; their MQTT ids are acknowledged after the commit."""

    windows: list[WindowRow] = field(default_factory=list)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    mids: list[tuple[int, int]] = field(default_factory=list)  # (mid, qos)
    first_at: float = 0.0

    def __len__(self) -> int:
        return len(self.mids)

    def count(self, name: str, k: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + k


class Ingestor:
    """Validation + batching + storage, independent of MQTT (the consumer below feeds it)."""

    def __init__(self, storage: Storage, references: ReferenceStore, settings: IngestSettings) -> None:
        self.storage = storage
        self.validator = Validator(references, settings)
        self.batch = IngestBatch()
        self._logged_kinds: set[str] = set()
        self.totals: dict[str, int] = {}

    def receive(self, topic: str, data: bytes, content_type: str | None, mid: int = 0, qos: int = 0) -> None:
        if not self.batch.mids:
            self.batch.first_at = time.monotonic()
        self.batch.mids.append((mid, qos))
        try:
            if topic.endswith("/status"):
                self.batch.statuses.append(self.validator.status(topic, data))
            else:
                self.batch.windows.append(self.validator.summary(topic, data, content_type))
                self.batch.count("received")
        except PayloadError as exc:
            self._reject(topic, exc.kind, str(exc))
        except Exception as exc:  # a bug must not turn one message into a crash loop (it would be redelivered)
            self._reject(topic, "internal_error", f"{type(exc).__name__}: {exc}")
            log.debug("internal error on %s", topic, exc_info=True)

    def _reject(self, topic: str, kind: str, message: str) -> None:
        self.batch.count(f"rejected:{kind}")
        if kind not in self._logged_kinds:  # once per kind: a bad device must not flood the log
            self._logged_kinds.add(kind)
            log.warning("rejected a message on %s (%s); further '%s' rejections are only counted in /metrics",
                        topic, message, kind)

    def flush(self) -> list[tuple[int, int]]:
        """Commit the batch; returns the (mid, qos) pairs that may now be acknowledged.

        A batch the database refuses for its data (a value validation let through) is stored row
        by row: the culprit is rejected (counted as `rejected:storage`, logged once, acknowledged)
        and the rest kept. Refusing the whole batch would have the broker redeliver it forever.
        An operational failure (database down, disk full) still raises: then redelivery is right.
        """
        mids = self.commit(self.batch)
        self.batch = IngestBatch()
        return mids

    def take(self) -> IngestBatch:
        """The batch received so far, for `commit` on another thread; a new one starts filling."""
        batch, self.batch = self.batch, IngestBatch()
        return batch

    def commit(self, batch: IngestBatch) -> list[tuple[int, int]]:
        """`flush` of a batch taken out of the ingestor (`take`): the (mid, qos) pairs it earned."""
        if not batch.mids:
            return []
        try:
            new = self.storage.ingest(batch.windows, batch.statuses, batch.counters)
            stored = len(batch.windows)
        except Exception as exc:
            if not is_data_error(exc):
                raise
            new, stored = self._store_one_by_one(batch)
        counters = dict(batch.counters)
        counters["accepted"] = new
        counters["duplicate"] = stored - new
        for k, v in counters.items():
            self.totals[k] = self.totals.get(k, 0) + v
        return batch.mids

    def _store_one_by_one(self, batch: IngestBatch) -> tuple[int, int]:
        """(new, stored) windows; culprits are counted into the batch's counters, which are stored last."""
        new = stored = 0
        for w in batch.windows:
            try:
                new += self.storage.ingest([w], [], {})
                stored += 1
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                self._reject_into(batch, f"edgekit/{w.fleet}/{w.device}/summary", exc)
        for status in batch.statuses:
            try:
                self.storage.ingest([], [status], {})
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                self._reject_into(batch, f"edgekit/{status['fleet']}/{status['device']}/status", exc)
        self.storage.add_counters(batch.counters)
        return new, stored

    def _reject_into(self, batch: IngestBatch, topic: str, exc: BaseException) -> None:
        batch.count("rejected:storage")
        if "storage" not in self._logged_kinds:
            self._logged_kinds.add("storage")
            log.warning("the database refused a message on %s (%s: %s); it is dropped and acknowledged, the rest "
                        "of its batch kept; further ones are only counted in /metrics", topic,
                        type(exc).__name__, str(exc)[:200])


def is_data_error(exc: BaseException) -> bool:
    """The database refused a value (too large, bad text), as opposed to being unavailable."""
    if isinstance(exc, OverflowError | ValueError | UnicodeError | TypeError | sqlite3.IntegrityError
                  | sqlite3.DataError | sqlite3.InterfaceError | sqlite3.ProgrammingError):
        return True
    # psycopg's DataError/IntegrityError, matched by name: psycopg is an optional install.
    return type(exc).__module__.startswith("psycopg") and any(
        c.__name__ in ("DataError", "IntegrityError") for c in type(exc).__mro__)


@dataclass(frozen=True)
class ConsumerConfig:
    broker: str | BrokerConfig  # a URL is parsed with the consumer defaults below
    db: str
    fleet: str
    group: str
    worker: int
    bundles: tuple[str, ...]
    bundles_dir: str | None
    settings: FleetSettings
    subscribe_status: bool = True
    client_id: str | None = None
    state: ConsumerState | None = None  # where /metrics and /healthz read whether this worker is connected
    pubkey: str | None = None  # bundles must be signed by this key (PEM path) to be used

    def broker_config(self) -> BrokerConfig:
        if isinstance(self.broker, BrokerConfig):
            return self.broker
        return parse_broker_url(self.broker, session_expiry=SESSION_EXPIRY_SECONDS)


class Flag(Protocol):
    """A threading or multiprocessing Event."""

    def is_set(self) -> bool: ...

    def set(self) -> None: ...


def run_consumer(cfg: ConsumerConfig, stop: Flag | None = None, ready: Flag | None = None) -> dict[str, int]:
    """Consume until `stop` is set (or forever). Runs in its own process under `--workers N`.

    The shared `MqttConnection` keeps the link up: it reconnects with backoff and jitter after a
    broker restart, and every (re)connect resubscribes. Acknowledgements belong to the connection
    that delivered the message, so when the link drops the pending batch is stored but not
    acknowledged: the broker redelivers it on the persistent session and the duplicates are dropped.
    """
    broker = cfg.broker_config()
    storage = Storage(cfg.db)
    references = ReferenceStore(list(cfg.bundles), cfg.bundles_dir,
                                public_key=load_public_key(cfg.pubkey) if cfg.pubkey else None)
    ingestor = Ingestor(storage, references, cfg.settings.ingest)
    client_id = cfg.client_id or f"edgekit-fleet-{cfg.fleet}-{cfg.group}-{cfg.worker}"
    # MQTT 5 Receive Maximum: how many unacknowledged messages the broker may send us; it must
    # exceed a batch, since acknowledgements wait for the batch's commit.
    link = MqttConnection(broker, client_id, manual_ack=True, receive_maximum=4 * cfg.settings.ingest.batch_size)
    client = link.client
    state = cfg.state

    def on_connect() -> None:
        subs = [(shared_topic(cfg.group, summary_topic(cfg.fleet)), 1)]
        if cfg.subscribe_status:
            subs.append((status_topic(cfg.fleet), 1))
        client.subscribe(subs)
        if state is not None:
            if link.connects > 1:
                state.count_reconnect(cfg.worker)
            state.set_connected(cfg.worker, True)

    committer = _BackgroundCommit(ingestor)

    def on_disconnect() -> None:
        if state is not None:
            state.set_connected(cfg.worker, False)
        committer.wait()  # keep the rows, drop the acks (see the docstring)
        if ingestor.batch.mids:
            _store(ingestor)

    def on_subscribe(c: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        failed = [r for r in reasons if r.is_failure]
        if failed:
            log.error("subscription refused by the broker: %s (does it support MQTT 5 shared subscriptions?)",
                      failed)
        if ready is not None:
            ready.set()

    delivered = [0]

    def on_message(c: Any, userdata: Any, msg: Any) -> None:
        delivered[0] += 1
        content_type = getattr(msg.properties, "ContentType", None) if msg.properties else None
        ingestor.receive(msg.topic, msg.payload, content_type, msg.mid, msg.qos)

    last = [0]

    def read_on() -> bool:
        """Read the next message at once while the last read delivered one and the batch has room."""
        more = delivered[0] != last[0] and len(ingestor.batch) < batch_size
        last[0] = delivered[0]
        return more

    link.add_on_connect(on_connect)
    link.add_on_disconnect(on_disconnect)
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    batch_size = cfg.settings.ingest.batch_size
    if state is not None:
        state.set_connected(cfg.worker, False)
    try:
        while stop is None or not stop.is_set():
            last[0] = delivered[0]
            link.step(0.02, read_on)
            if committer.done:
                _ack(link, committer.wait())
            # One transaction (one fsync) per batch: commit when it is full, or when its oldest message
            # has waited MAX_BATCH_DELAY (light load, or a broker that caps in-flight messages lower).
            if ingestor.batch.mids and (len(ingestor.batch) >= batch_size
                                        or time.monotonic() - ingestor.batch.first_at > MAX_BATCH_DELAY):
                _ack(link, committer.wait())  # one batch in flight at most: commits (and acks) stay in order
                if ingestor.batch.mids:  # (a failed commit dropped the link, whose hook stored this batch)
                    committer.submit()
        _ack(link, committer.wait())
        _flush_and_ack(link, ingestor)
        if link.connected:
            client.loop(timeout=0.05)  # send the last acknowledgements
    finally:
        committer.close()
        link.close()
        if state is not None:
            state.set_connected(cfg.worker, False)
        storage.close()
    return ingestor.totals


def _store(ingestor: Ingestor) -> list[tuple[int, int]] | None:
    """Commit the batch and return the acks it earned; None when storing failed (nothing to ack)."""
    try:
        return ingestor.flush()
    except Exception:
        log.exception("storing a batch failed; it stays unacknowledged and the broker redelivers it")
        ingestor.batch = IngestBatch()
        return None


def _flush_and_ack(link: MqttConnection, ingestor: Ingestor) -> None:
    _ack(link, _store(ingestor))


def _ack(link: MqttConnection, mids: list[tuple[int, int]] | None) -> None:
    """Acknowledge what a commit earned; after a failed one (None), drop the link instead."""
    if mids is None:
        link.drop()  # the broker redelivers unacknowledged messages only on a new connection
        return
    link.ack_all([mid for mid, qos in mids if qos == 1])  # the subscriptions are QoS 1: nothing else needs one
    for mid, qos in mids:
        if qos > 1:
            link.client.ack(mid, qos)


def _commit(ingestor: Ingestor, batch: IngestBatch) -> list[tuple[int, int]] | None:
    """`_store` of a batch taken out of the ingestor (runs on the commit thread)."""
    try:
        return ingestor.commit(batch)
    except Exception:
        log.exception("storing a batch failed; it stays unacknowledged and the broker redelivers it")
        return None


class _BackgroundCommit:
    """At most one batch committing on a thread of its own while the next one fills on the MQTT thread.

    A commit mostly waits (SQLite's fsync, PostgreSQL's round trip) with the GIL released, so the next
    batch is decoded and validated meanwhile. Acknowledgements still follow the commit: `wait` hands
    its (mid, qos) pairs to the MQTT thread, which acks them only on the connection that delivered them
    (the disconnect hook waits for the commit and drops its acks).
    """

    def __init__(self, ingestor: Ingestor) -> None:
        self._ingestor = ingestor
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleet-ingest-commit")
        self._pending: Future[list[tuple[int, int]] | None] | None = None

    @property
    def done(self) -> bool:
        return self._pending is not None and self._pending.done()

    def submit(self) -> None:
        """Commit the batch received so far in the background (call `wait` first: one at a time)."""
        assert self._pending is None
        self._pending = self._thread.submit(_commit, self._ingestor, self._ingestor.take())

    def wait(self) -> list[tuple[int, int]] | None:
        """The acks the batch in flight earned ([] when none is); None when its commit failed."""
        if self._pending is None:
            return []
        future, self._pending = self._pending, None
        return future.result()

    def close(self) -> None:
        self._thread.shutdown(wait=True)
