"""Channels and reference histograms: the binning rule and the vectorised Histogrammer agree."""

from __future__ import annotations

import json

import numpy as np
import pytest

from device_agent.monitoring.channels import MonitorPlan, softmax
from device_agent.monitoring.reference import Reference, bin_counts, build_reference, class_edges
from device_agent.monitoring.summary import Histogrammer


def test_image_channels_are_row_and_column_means_plus_outputs() -> None:
    plan = MonitorPlan.for_image((1, 4, 3), ["a", "b"])
    assert plan.channel_names == [
        "in.row0", "in.row1", "in.row2", "in.row3", "in.col0", "in.col1", "in.col2", "in.mean", "in.std",
        "out.p.a", "out.p.b", "out.confidence", "out.pred",
    ]
    x = np.arange(24, dtype=np.float32).reshape(2, 1, 4, 3)
    logits = np.array([[0.0, 2.0], [3.0, 1.0]])
    v = plan.values(x, logits)
    assert v.shape == (2, 13)
    np.testing.assert_allclose(v[0, :4], x[0, 0].mean(axis=1))
    np.testing.assert_allclose(v[1, 4:7], x[1, 0].mean(axis=0))
    np.testing.assert_allclose(v[:, 9:11], softmax(logits))
    assert v[:, 12].tolist() == [1.0, 0.0]
    np.testing.assert_allclose(v[:, 7], x.reshape(2, -1).mean(axis=1))
    np.testing.assert_allclose(v[:, 8], x.reshape(2, -1).astype(np.float64).std(axis=1), rtol=1e-12)
    assert MonitorPlan.from_manifest(plan.to_manifest()) == plan


def test_colour_images_are_averaged_over_planes_first() -> None:
    plan = MonitorPlan.for_image((3, 5, 4), ["a", "b"])
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, size=(6, 3, 5, 4))
    v = plan.values(x, rng.normal(size=(6, 2)))
    gray = x.mean(axis=1)
    expected = np.concatenate([gray.mean(axis=2), gray.mean(axis=1), gray.reshape(6, -1).mean(axis=1, keepdims=True),
                               gray.reshape(6, -1).std(axis=1, keepdims=True)], axis=1)
    np.testing.assert_allclose(v[:, :11], expected, rtol=1e-10)


def test_binning_rule_puts_outliers_in_the_outer_bins() -> None:
    edges = np.array([0.0, 1.0, 2.0, 3.0])
    assert bin_counts(np.array([-5.0, 0.0, 0.99, 1.0, 2.5, 3.0, 99.0]), edges).tolist() == [3, 1, 3]
    assert class_edges(3).tolist() == [-0.5, 0.5, 1.5, 2.5]


def test_histogrammer_matches_the_per_channel_rule_and_reference_roundtrips() -> None:
    plan = MonitorPlan.for_features(["a", "b"], ["x", "y", "z"])
    rng = np.random.default_rng(0)
    values = plan.values(rng.normal(size=(300, 2)), rng.normal(size=(300, 3)))
    ref = build_reference(plan, values, bins=10)
    assert ref.channels["out.pred"].bins == 3  # one bin per class
    again = Reference.from_json(json.loads(json.dumps(ref.to_json())))
    h = Histogrammer(again)
    fresh = plan.values(rng.normal(1.0, size=(50, 2)), rng.normal(size=(50, 3)))
    counts = h.counts(fresh)
    for j, name in enumerate(plan.channel_names):
        c = again.channels[name]
        assert counts[j, : c.bins].tolist() == bin_counts(fresh[:, j], c.edges).tolist()
        assert counts[j, c.bins :].sum() == 0


def test_malformed_reference_is_refused() -> None:
    with pytest.raises(ValueError):
        Reference.from_json({"schema": "edgekit.reference/1", "channels": {
            "a": {"kind": "numeric", "edges": [0.0, 0.0, 1.0], "counts": [1, 1], "n": 2, "mean": 0.0, "std": 1.0}}})
    with pytest.raises(ValueError):
        Reference.from_json({"schema": "nope", "channels": {}})


def test_a_constant_channel_gets_one_bin_and_counts_everything() -> None:
    plan = MonitorPlan.for_features(["const", "x"], ["a", "b"])
    rng = np.random.default_rng(2)
    train = np.c_[np.full(100, 3.0), rng.normal(size=100)]
    ref = build_reference(plan, plan.values(train, rng.normal(size=(100, 2))), bins=8)
    assert ref.channels["in.const"].bins == 1
    h = Histogrammer(ref)
    fresh = plan.values(np.c_[np.array([3.0, 7.0, -1.0]), np.zeros(3)], rng.normal(size=(3, 2)))
    assert h.counts(fresh)[0, :1].tolist() == [3]
