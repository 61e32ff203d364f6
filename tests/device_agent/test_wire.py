"""The one home of wire facts: topic names, broker URLs with TLS options, HOST:PORT addresses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent.errors import ConfigError, UsageError
from device_agent.uplink import wire


def test_topics_round_trip() -> None:
    assert wire.summary_topic("f1", "cam-7") == "edgekit/f1/cam-7/summary"
    assert wire.status_topic("f1") == "edgekit/f1/+/status"
    assert wire.shared_topic("g", wire.summary_topic("f1")) == "$share/g/edgekit/f1/+/summary"
    assert wire.parse_topic("edgekit/f1/cam-7/summary") == ("f1", "cam-7", "summary")
    for bad in ("edgekit/f1/cam-7", "other/f1/d/summary", "edgekit/f1/d/telemetry", "edgekit//d/status",
                "edgekit/f/d/status/x"):
        assert wire.parse_topic(bad) is None, bad
    with pytest.raises(ValueError):
        wire.topic("f", "d", "telemetry")


@settings(max_examples=60, deadline=None)
@given(fleet=st.text(min_size=1, max_size=12), device=st.text(min_size=1, max_size=12))
def test_any_valid_topic_level_round_trips(fleet: str, device: str) -> None:
    if wire.topic_level_problem(fleet) or wire.topic_level_problem(device):
        return
    for kind in wire.KINDS:
        assert wire.parse_topic(wire.topic(fleet, device, kind)) == (fleet, device, kind)


def test_topic_levels_refuse_wildcards_and_separators() -> None:
    assert wire.topic_level_problem("cam-7") is None
    for bad in ("a/b", "+", "#", " ", "", "x\x00"):
        assert wire.topic_level_problem(bad) is not None, repr(bad)


def test_broker_url_carries_tls_and_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    c = wire.parse_broker_url("mqtt://127.0.0.1:1999")
    assert (c.host, c.port, c.tls, c.username) == ("127.0.0.1", 1999, False, None)
    c = wire.parse_broker_url("mqtts://broker.example")
    assert (c.port, c.tls) == (8883, True)
    # A private CA turns TLS on even for mqtt:// (the fleet parser used to have no CA at all).
    c = wire.parse_broker_url("mqtt://broker.example:8883", ca_certs="/ca.pem", certfile="/c.pem", keyfile="/k.pem")
    assert (c.tls, c.ca_certs, c.certfile, c.keyfile) == (True, "/ca.pem", "/c.pem", "/k.pem")
    monkeypatch.setenv(wire.PASSWORD_ENV, "from-env")
    c = wire.parse_broker_url("mqtts://fleet%40x@broker.example")
    assert (c.username, c.password) == ("fleet@x", "from-env")
    c = wire.parse_broker_url("mqtts://u:p%3Aq@broker.example")
    assert (c.username, c.password) == ("u", "p:q")
    c = wire.parse_broker_url("mqtt://u:p@h:1", username="other", password="pw")
    assert (c.username, c.password) == ("other", "pw")


def test_bad_broker_urls_name_the_flag_or_the_key() -> None:
    for bad in ("http://x:1", "mqtt://", "mqtt://h:99999", "mqtt://h:1/path", "mqtt://h:1?x=1", "h:1883"):
        with pytest.raises(UsageError, match="--broker"):
            wire.parse_broker_url(bad)
    with pytest.raises(ConfigError, match=r"mqtt\.broker"):
        wire.parse_broker_url("http://x:1", what="mqtt.broker")


def test_host_port() -> None:
    assert wire.parse_host_port("127.0.0.1:8081") == ("127.0.0.1", 8081)
    assert wire.parse_host_port(":9000") == ("127.0.0.1", 9000)
    assert wire.parse_host_port("[::1]:9000") == ("::1", 9000)
    for bad in ("localhost", "h:x", "h:70000", "::1:9000", ""):
        with pytest.raises(UsageError, match="--http"):
            wire.parse_host_port(bad)
