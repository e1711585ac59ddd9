"""fastws.client.backoff: the delays between attempts and the server's hints, as plain functions.

(The same behaviour against real servers: tests/integration/test_client_reconnect.py.)
"""

from __future__ import annotations

import email.utils
import random
import time

import pytest

from fastws.client import Backoff, reconnect_hint, retry_after
from fastws.client.connection import parse_url
from fastws.errors import RESTARTING


def test_windows_double_up_to_the_cap_and_delays_stay_inside():
    b = Backoff(0.5, 4.0, rng=random.Random(7))
    assert [b.window(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    for n in range(20):
        window = b.window()
        d = b.next_delay()
        assert 0.0 <= d <= window
        assert b.attempt == n + 1


def test_full_jitter_is_uniform_over_the_window():
    b = Backoff(1.0, 1.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(20000)]
    deciles = [sum(1 for d in delays if k / 10 <= d < (k + 1) / 10) for k in range(10)]
    assert all(1800 <= c <= 2200 for c in deciles), deciles


def test_max_attempts_and_reset_after_a_stable_connection(monkeypatch):
    b = Backoff(0.1, 1.0, max_attempts=3, reset_after=10.0)
    for _ in range(3):
        assert not b.exhausted
        b.next_delay()
    assert b.exhausted
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    b.connected()
    now[0] += 2.0                          # a short-lived connection keeps the count
    b.disconnected()
    assert b.attempt == 3
    b.connected()
    now[0] += 10.0                         # a stable one starts afresh
    b.disconnected()
    assert b.attempt == 0 and not b.exhausted
    with pytest.raises(ValueError):
        Backoff(0, 1)
    with pytest.raises(ValueError):
        Backoff(2, 1)
    with pytest.raises(ValueError):
        Backoff(1, 2, max_attempts=0)


def test_the_server_s_reconnect_hint_is_read_from_its_close_reason():
    for delay in (0.3, 1.7, 12.0):
        assert reconnect_hint(RESTARTING.reason.format(delay=delay)) == pytest.approx(round(delay, 1))
    for reason in ("", "server shutting down", "slow consumer", "reconnect in soon", None):
        assert reconnect_hint(reason) is None


def test_retry_after_in_seconds_or_as_a_date():
    assert retry_after([("retry-after", "7")]) == 7.0
    assert retry_after([("Retry-After", " 3 ")]) == 3.0
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert retry_after([("retry-after", date)], now=now) == pytest.approx(30.0)
    assert retry_after([("retry-after", email.utils.formatdate(now - 30, usegmt=True))], now=now) == 0.0
    assert retry_after([("retry-after", "soon")]) is None
    assert retry_after([("content-type", "text/plain")]) is None
    assert retry_after(None) is None


def test_websocket_urls():
    assert parse_url("ws://127.0.0.1:8000/rt?x=1") == (False, "127.0.0.1", 8000, "/rt?x=1", "127.0.0.1:8000")
    assert parse_url("wss://example.com") == (True, "example.com", 443, "/", "example.com")
    assert parse_url("ws://[::1]:9/") == (False, "::1", 9, "/", "[::1]:9")
    for bad in ("http://example.com/", "ws:///nohost", "ws://h:port/", "example.com"):
        with pytest.raises(ValueError):
            parse_url(bad)
