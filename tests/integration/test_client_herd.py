"""The thundering herd: 20,000 fastws clients lose their server at once (fastws.bench.herd).

A ``fastws serve --workers 2`` holds 20,000 connections of ``fastws.connect``
clients (two client processes); a second server listens on the same port
(``--reuse-port``); the first gets SIGTERM and closes every connection with
``"server restarting; reconnect in X s"`` (X spread over [5, 10] s).  Then the
same with clients that ignore the hint and retry at once.  Checked:

* every client is back, each after at least the delay its close reason named;
* the returns are spread over the hint window (p10..p90 apart by more than
  half of it), their peak per 100 ms is far below that of the clients that
  retry at once, and nobody needed more than one attempt.

Everything is on 127.0.0.0/8 (the clients connect from 16 loopback
addresses), bounded in count and time, and stops by itself.  The plot and
the figures of a run are in bench/results/client-herd.{png,json}.
"""

from __future__ import annotations

from fastws.bench import herd

CLIENTS = 20_000
DELAY = 5.0


def test_twenty_thousand_clients_come_back_spread_by_the_server_s_hint(tmp_path):
    hinted, naive = herd.run(CLIENTS, procs=2, out=tmp_path, modes=("hinted", "naive"), reconnect_delay=DELAY)
    for s in (hinted, naive):
        assert s["reconnected"] == CLIENTS, s
    assert hinted["waited_less_than_hint"] == 0
    assert hinted["p90_s"] - hinted["p10_s"] > 0.5 * DELAY, hinted
    assert hinted["last_s"] - hinted["first_s"] > 0.8 * DELAY, hinted
    assert hinted["attempts_max"] == 1 and hinted["attempts_total"] == CLIENTS
    assert hinted["peak_per_100ms"] < 0.6 * naive["peak_per_100ms"], (hinted["peak_per_100ms"],
                                                                       naive["peak_per_100ms"])
    assert naive["last_s"] - naive["first_s"] < hinted["last_s"] - hinted["first_s"]
    assert (tmp_path / "client-herd.png").stat().st_size > 10_000
