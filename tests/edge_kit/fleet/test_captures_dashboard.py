"""The dashboard shows the field captures (headless Chromium): a table per device and model version (held,
labelled, bytes) and a captures column in the devices table, from captures uploaded over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_kit.fleet.captures.intake import Captures
from edge_kit.fleet.captures.requests import CaptureRequests
from edge_kit.fleet.captures.store import CaptureStore
from edge_kit.fleet.device_tokens import device_token
from edge_kit.fleet.http_security import HttpSecurity
from edge_kit.fleet.server import make_server, serve_in_thread
from edge_kit.fleet.service import FleetService
from harness.fleetkit import OPERATOR_TOKEN, DigitsBundle
from tests.edge_kit.fleet.captures_kit import UPLOAD, batch, call, device_headers, record

pytestmark = pytest.mark.integration
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
KEY = b"k" * 32


@pytest.fixture
def captures_http(service: FleetService, tmp_path: Path) -> Iterator[str]:
    service.enable_captures(Captures(service.storage, service.references, CaptureStore(str(tmp_path / "caps"), 10**8)),
                            CaptureRequests(service.storage, "test"))
    server = make_server(service, "127.0.0.1", 0, HttpSecurity(token=OPERATOR_TOKEN, device_key=KEY))
    serve_in_thread(server)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_dashboard_shows_captures_per_device_and_version(captures_http: str, digits_bundle: DigitsBundle
                                                             ) -> None:
    from playwright.sync_api import sync_playwright

    rng = np.random.default_rng(9)
    for device, n, labelled in (("dev00", 6, 2), ("dev03", 3, 0)):
        recs = [record(digits_bundle, rng, label="4" if i < labelled else None) for i in range(n)]
        status, body = call(captures_http + UPLOAD, "POST", batch(device, recs),
                            device_headers(device, device_token(KEY, device)))
        assert (status, body["stored"]) == (200, n)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{captures_http}/#token={OPERATOR_TOKEN}")
            page.wait_for_selector("tr[data-capture-device='dev00']")
            cells = page.locator("tr[data-capture-device='dev00'] td").all_inner_texts()
            assert cells[2:4] == ["6", "2"] and "1.0.0" in cells[1] and cells[4] == "1.5 KiB"
            assert page.locator("tr[data-capture-device='dev03'] td").all_inner_texts()[2:4] == ["3", "0"]
            assert "9 held, 2 labelled" in page.locator("#captures-store").inner_text()
            page.wait_for_function("() => document.querySelector(\"tr[data-device='dev00'] td.captures\")"
                                   ".textContent === '6 (2)'")
            assert page.locator("tr[data-device='dev01'] td.captures").inner_text() == ""
            assert not errors, errors
        finally:
            browser.close()
