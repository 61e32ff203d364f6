"""Progress: a tqdm bar with loss and throughput on a terminal, plain log lines otherwise."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from edge_kit.train.trainer import Progress

METRICS = {"train_loss": 0.25, "test_accuracy": 0.9, "throughput": 1234.0}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_a_bar_with_loss_and_throughput(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    progress = Progress(total_steps=4, done_steps=1)  # resumed: the bar starts where the checkpoint was
    progress.step(0.5, 1000.0)
    progress.epoch(0, 3, METRICS)
    progress.close()
    text = terminal.getvalue()
    assert "2/4" in text and "loss=0.5000" in text and "samples_s=1,000" in text
    assert "epoch 1/3: train_loss 0.2500 test_accuracy 0.9000 1,234 samples/s" in text


def test_no_terminal_gets_log_lines(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    with caplog.at_level(logging.INFO, logger="edge_kit.train.trainer"):
        progress = Progress(total_steps=4, done_steps=0)
        progress.step(0.5, 1000.0)
        progress.epoch(0, 3, METRICS)
        progress.close()
    assert pipe.getvalue() == ""  # no bar escape codes in a log file
    assert "epoch 1/3: train_loss 0.2500 test_accuracy 0.9000 1,234 samples/s" in caplog.text
