"""The dashboard in headless Chromium: charts drawn by the vendored Chart.js, an alert approved by a click."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_kit.fleet.service import FleetService
from harness.fleetkit import OPERATOR_TOKEN
from tests.helpers.deploykit import Fleet, bundle_source, deploy_fleet, install

pytestmark = pytest.mark.integration

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


def test_dashboard_shows_charts_and_approves_an_alert(http: str, service: FleetService) -> None:
    from playwright.sync_api import sync_playwright

    pending = [a for a in service.storage.alerts() if a["state"] == "pending_approval"]
    assert pending
    target = pending[-1]["id"]
    external: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda r: None if r.url.startswith(http) else external.append(r.url))
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(http + "/")
            # Charts exist and hold data from the API (fleet history, histogram).
            page.wait_for_function("() => window.Chart && Object.keys(Chart.instances).length === 3")
            page.wait_for_function("() => window.edgekitCharts.fleet.data.datasets.length > 0")
            page.wait_for_function("() => window.edgekitCharts.histogram.data.datasets[1].data.length > 0")
            assert page.evaluate("window.edgekitCharts.fleet.data.labels.length") == 3  # three fleet windows
            for canvas in ("chart-fleet", "chart-histogram"):
                box = page.locator(f"#{canvas}").bounding_box()
                assert box is not None and box["width"] > 100 and box["height"] > 50
            assert page.locator("#n-online").inner_text() == "8"
            # Picking a device draws its own drift history.
            page.locator("tr[data-device='dev00']").click()
            page.wait_for_function("() => window.edgekitCharts.device.data.datasets.length > 0")
            assert "dev00" in page.locator("#device-title").inner_text()
            # Without the operator token the approval is refused and nothing runs ...
            page.once("dialog", lambda d: d.dismiss())
            page.locator(f"#alert-{target} button[data-action='approve']").click()
            page.wait_for_function("() => document.querySelector('#token-form').classList.contains('needed')")
            assert service.storage.alert(target)["state"] == "pending_approval"  # type: ignore[index]
            # ... the operator types it into the page (kept in sessionStorage, sent as a header) and retries.
            page.locator("#token").fill(OPERATOR_TOKEN)
            page.locator("#token-form button").click()
            page.wait_for_function(f"() => !document.querySelector('#alert-{target} button[data-action=approve]')"
                                   f".disabled")
            # Approve the alert with a click; the retraining command runs and the row updates in place.
            page.locator(f"#alert-{target} button[data-action='approve']").click()
            page.wait_for_function(f"() => ['retraining', 'retrained'].includes("
                                   f"document.querySelector('#alert-{target} td.state').textContent)")
            service.alerts.wait()
            page.wait_for_function(f"() => document.querySelector('#alert-{target} td.state').textContent"
                                   f" === 'retrained'", timeout=15000)
            assert not errors, errors
        finally:
            browser.close()
    alert = service.storage.alert(target)
    assert alert is not None and alert["approved_by"] == "dashboard"
    assert alert["triggers"][-1]["outcome"] == "succeeded"
    assert not external, f"the page fetched from outside the server: {external}"


def test_one_failing_api_answer_blanks_no_other_panel(http: str, service: FleetService) -> None:
    from playwright.sync_api import Route, sync_playwright

    n_alerts = len(service.storage.alerts())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))

            def broken(route: Route) -> None:
                route.fulfill(status=500, content_type="application/json", body='{"error": "boom"}')

            page.route("**/api/devices", broken)
            page.route("**/api/concept*", broken)
            page.goto(http + "/")
            # The alerts panel fills although the devices and accuracy answers failed ...
            page.wait_for_function(f"() => document.querySelectorAll('#alerts tbody tr').length === {n_alerts}")
            # ... and the failing panels say so, each in its own place.
            page.wait_for_function("() => !document.querySelector('#err-devices').hidden")
            assert "500" in page.locator("#err-devices").inner_text()
            assert page.locator("#err-alerts").is_hidden()
            assert not errors, errors
        finally:
            browser.close()


def test_the_header_says_when_a_consumer_is_disconnected(http: str, service: FleetService) -> None:
    """The broker pill follows /healthz, which follows the consumers' shared state (no reload needed)."""
    from playwright.sync_api import sync_playwright

    from edge_kit.fleet.consumer_state import ConsumerState

    state = ConsumerState(2)
    state.set_connected(0, True)  # worker 1 cannot reach the broker
    service.consumers = state
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(http + "/")
            page.wait_for_function("() => document.getElementById('broker').textContent.includes('DISCONNECTED')")
            assert "1 of 2" in page.locator("#broker").inner_text()
            state.set_connected(1, True)
            page.wait_for_function("() => document.getElementById('broker').textContent === 'broker: connected'",
                                   timeout=20_000)
        finally:
            browser.close()


@pytest.fixture
def rollout_fleet(tmp_path: Path) -> Iterator[Fleet]:
    with deploy_fleet(tmp_path) as f:
        yield f


def test_deployments_panel_shows_the_canary_figures_and_promotes_and_halts(rollout_fleet: Fleet) -> None:
    """The deployments panel: devices' roles, versions and steps, the canary's figures, promote and halt by click."""
    from playwright.sync_api import sync_playwright

    from edge_kit.fleet.http_security import HttpSecurity
    from edge_kit.fleet.server import make_server, serve_in_thread

    fleet = rollout_fleet
    view = fleet.manager.create(bundle_source(fleet), None, canary=2, canary_windows=2, auto_promote=False, seed=1)
    dep = view["deployment"]
    install(fleet, dep, sorted(d for d, v in view["devices"].items() if v["role"] == "canary"), windows=2)
    fleet.manager.tick()
    assert fleet.manager.view(dep)["canary"]["passed"] is True
    server = make_server(fleet.service, "127.0.0.1", 0, HttpSecurity(token=OPERATOR_TOKEN))
    serve_in_thread(server)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    row = f"#deployment-{dep}"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(f"{base}/#token={OPERATOR_TOKEN}")
                page.wait_for_selector(f"{row} li.figure[data-figure='predicted_class']")
                assert page.locator(f"{row} td.state").inner_text().startswith("canary")
                assert "passed" in page.locator(f"{row} .verdict").inner_text()
                assert "p_value=" in page.locator(f"{row} li.figure[data-figure='predicted_class']").inner_text()
                assert page.locator(f"{row} ul.devices li").count() == 6
                assert page.locator(f"{row} ul.devices li", has_text="installed").count() == 2
                page.locator(f"{row} button[data-deploy-action='promote']").click()
                page.wait_for_function(f"() => document.querySelector('{row} td.state').textContent"
                                       ".startsWith('rolling')")
                page.once("dialog", lambda d: d.accept())
                page.locator(f"{row} button[data-deploy-action='halt']").click()
                page.wait_for_function(f"() => document.querySelector('{row} td.state').textContent"
                                       ".startsWith('halted')")
                assert not errors, errors
            finally:
                browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert fleet.manager.view(dep)["state"] == "halted"
