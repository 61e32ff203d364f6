"""The fleet's ingest decodes a summary document straight into its stored row (reference channel order,
dispersion and repeats trailers, confusion). These tests hold that row to what the device's own
decoder (`WindowSummary.from_payload`) makes of the same document, and keep the strict count types."""

from __future__ import annotations

import json
import time
import zlib
from typing import Any

import numpy as np
import pytest

from device_agent.errors import PayloadError
from device_agent.monitoring.summary import WindowSummary
from edge_kit.fleet import dispersion_trailer
from edge_kit.fleet.ingest import Validator
from edge_kit.fleet.reference_index import ReferenceStore
from edge_kit.fleet.settings import parse_settings
from edge_kit.fleet.stats import repeat_design_effect
from edge_kit.fleet.storage import decode_counts
from harness.fleetkit import DigitsBundle, sample_images, summary

TOPIC = "edgekit/test/dev0/summary"


@pytest.fixture(scope="module")
def validator(digits_bundle: DigitsBundle) -> Validator:
    return Validator(ReferenceStore([digits_bundle.path]), parse_settings({}).ingest)


def _document(bundle: DigitsBundle, labels: bool) -> dict[str, Any]:
    x, y = sample_images(120, np.random.default_rng(3))
    s = summary(bundle, "dev0", time.time() - 600, x, y=y if labels else None, seq=7)
    data, _ = s.to_bytes(compress=False)
    doc: dict[str, Any] = json.loads(data)
    return doc


def _reversed_channels(doc: dict[str, Any]) -> None:
    doc["channels"] = dict(reversed(list(doc["channels"].items())))


def _no_dispersion(doc: dict[str, Any]) -> None:
    for c in doc["channels"].values():
        c.pop("disp", None)


def _partial_dispersion(doc: dict[str, Any]) -> None:
    next(iter(doc["channels"].values())).pop("disp")


def _with_n_eff(doc: dict[str, Any]) -> None:
    doc["n_eff"] = doc["n"] / 3


@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("change", [None, _reversed_channels, _no_dispersion, _partial_dispersion, _with_n_eff])
def test_the_stored_row_is_what_the_device_decoder_reads(validator: Validator, digits_bundle: DigitsBundle,
                                                         labels: bool, change: Any) -> None:
    doc = _document(digits_bundle, labels)
    if change is not None:
        change(doc)
    raw = json.dumps(doc).encode()
    row = validator.summary(TOPIC, zlib.compress(raw), "application/json+zlib")
    s = WindowSummary.from_payload(json.loads(raw))
    ref = validator.references.get(s.model["sha256"])
    assert ref is not None
    order = [s.channel_names.index(name) for name in ref.channel_names]
    bins = int(ref.bins.sum())

    expected_counts = np.concatenate([s.counts[i, : s.bins[i]] for i in order])
    blob, design = dispersion_trailer.split_repeats([row.counts], bins)
    plain, disp = dispersion_trailer.split(blob, bins, len(order))
    assert np.array_equal(decode_counts(plain, bins)[0], expected_counts)
    if s.dispersion is None:
        assert np.isnan(disp).all()
    else:
        assert np.array_equal(disp[0], s.dispersion[order].astype(np.float32))
    expected_design = repeat_design_effect(s.n, s.n_eff)
    if expected_design is None:
        assert np.isnan(design[0])
    else:
        assert design[0] == np.float32(expected_design)
    assert row.confusion == (None if s.confusion is None else s.confusion.astype(np.int64).tobytes())
    assert (row.n, row.seq, row.window_start, row.window_end) == (s.n, s.seq, s.window_start, s.window_end)
    assert (row.model_name, row.model_version) == (ref.name, ref.version)


@pytest.mark.parametrize("value", [True, 1.0, None, "1", [1], 2**63, -1])
def test_a_count_that_is_not_a_64_bit_count_is_refused(validator: Validator, digits_bundle: DigitsBundle,
                                                       value: Any) -> None:
    doc = _document(digits_bundle, labels=False)
    # A count of 1: True and 1.0 in its place keep the channel's sum, so only their type can fail them.
    counts, i = next((c["counts"], i) for c in doc["channels"].values() for i, k in enumerate(c["counts"]) if k == 1)
    counts[i] = value
    with pytest.raises(PayloadError) as err:
        validator.summary(TOPIC, json.dumps(doc).encode(), "application/json")
    assert err.value.kind in ("counts", "malformed")


def test_counts_in_the_wrong_bins_are_refused_by_channel_name(validator: Validator,
                                                              digits_bundle: DigitsBundle) -> None:
    doc = _document(digits_bundle, labels=False)
    name, channel = list(doc["channels"].items())[4]
    channel["counts"] = [*channel["counts"], 0]  # one bin more: same n, misaligned with the edges
    with pytest.raises(PayloadError, match=repr(name)) as err:
        validator.summary(TOPIC, json.dumps(doc).encode(), "application/json")
    assert err.value.kind == "bins"
