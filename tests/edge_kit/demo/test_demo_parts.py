"""The demo's pieces on their own: shift ramps and what each shift does to raw digits, config edits, field data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_kit.demo.project import config_value, next_version, set_config_value
from edge_kit.demo.shifts import CLASSMIX_FRACTION, Shift, sample_batch
from edge_kit.errors import UsageError


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.reshape(-1, 1, 8, 8).astype(np.float32), d.target.astype(np.int64)


def test_severity_ramps_from_start_to_full() -> None:
    s = Shift("noise", start_s=8.0, ramp_s=8.0)
    assert [s.severity(t) for t in (0.0, 7.9, 8.0, 12.0, 16.0, 100.0)] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    assert Shift("none", 0.0, 0.0).severity(50.0) == 0.0
    with pytest.raises(ValueError, match="unknown shift"):
        Shift("rotate")


def test_unshifted_batches_are_held_out_samples_untouched() -> None:
    x, y = _digits()
    batch, labels = sample_batch(x, y, 64, Shift("noise", 10, 5), 0.0, np.random.default_rng(0))
    rows = {r.tobytes() for r in x}
    assert all(b.tobytes() in rows for b in batch)
    assert batch.shape == (64, 1, 8, 8) and labels.shape == (64,)


def test_noise_raises_pixel_spread_and_stays_in_range() -> None:
    x, y = _digits()
    clean, _ = sample_batch(x, y, 500, Shift("noise"), 0.0, np.random.default_rng(0))
    noisy, _ = sample_batch(x, y, 500, Shift("noise"), 1.0, np.random.default_rng(0))  # same samples
    assert noisy.min() >= 0 and noisy.max() <= 16
    assert np.abs(noisy - clean).mean() > 2.0
    assert (noisy[clean == 0] > 0).mean() > 0.4  # the blank background is no longer blank


def test_translate_moves_the_image_right_by_up_to_two_pixels() -> None:
    x, y = _digits()
    rng = np.random.default_rng(0)
    moved, _ = sample_batch(x[:1], y[:1], 1, Shift("translate"), 1.0, rng)
    np.testing.assert_array_equal(moved[0, 0, :, 2:], x[0, 0, :, :-2])
    assert not moved[0, 0, :, :2].any()
    half, _ = sample_batch(x[:1], y[:1], 1, Shift("translate"), 0.5, rng)
    np.testing.assert_array_equal(half[0, 0, :, 1:], x[0, 0, :, :-1])


def test_classmix_changes_the_class_mix_not_the_images() -> None:
    x, y = _digits()
    batch, labels = sample_batch(x, y, 4000, Shift("classmix"), 1.0, np.random.default_rng(0))
    share = np.isin(labels, (0, 1)).mean()
    expected = CLASSMIX_FRACTION + (1 - CLASSMIX_FRACTION) * np.isin(y, (0, 1)).mean()
    assert abs(share - expected) < 0.03
    rows = {r.tobytes() for r in x}
    assert all(b.tobytes() in rows for b in batch[:200])


def test_config_edits_keep_the_rest_of_the_file(tmp_path: Path) -> None:
    config = tmp_path / "edgekit.toml"
    config.write_text('# mine\n[project]\nname = "digits"\nversion = "1.0.9"  # bumped by retraining\n'
                      '[data]\nsource = "sklearn:digits"      # comment kept\nseed = 0\n'
                      '[model]\nkwargs = { channels = [16, 32] }\n[train]\nepochs = 2\nseed = 0  # init\n')
    set_config_value(config, "project", "version", next_version("1.0.9"))
    set_config_value(config, "train", "seed", 1)
    text = config.read_text()
    assert config_value(config, "project", "version") == "1.0.10"
    assert config_value(config, "train", "seed") == "1" and config_value(config, "data", "seed") == "0"
    assert "# mine" in text and "# comment kept" in text and "# bumped by retraining" in text and "# init" in text
    with pytest.raises(UsageError, match=r"train\.lr"):
        set_config_value(config, "train", "lr", "1")
    with pytest.raises(UsageError):
        next_version("1.0.x")
