"""The thundering herd of room clients, small (fastws.bench.herd; the 20,000-client run is in bench/README.md).

300 :class:`fastws.client.RoomClient` (two client processes, three rooms)
on ``fastws serve --workers 2 --reuse-port`` with the Redis Streams broker
(a ``redis-server`` of the run's own); a publisher on a third server sends 30
sequence-numbered messages per second during the whole run; a second server
with ``--handshake-rate 50 --handshake-burst 10`` (per worker) takes the
port and the first is restarted (SIGTERM: ``"reconnect in X s"``) or killed
(SIGKILL: no close frame).  Each variant with the clients as they are
(hint, ``Retry-After``, full jitter) and with clients that retry at once.
Checked, correctness only (never speed):

* every client is back, subscribed again, none gave up, every one still
  connected at the end;
* every client got its room's whole sequence, nothing lost, nothing twice,
  in order, never a ``recovered: false`` or a reported gap; the publisher's
  every message was acknowledged and is in the stream;
* the second server answered 101 once per client, and in any second each of
  its workers accepted at most its admission bound (50 + 10; its access log's
  times);
* SIGTERM: every connection was closed 1001 and the hinted clients waited at
  least their hint; SIGKILL: every connection dropped without a close frame.

Everything is on 127.0.0.0/8, bounded in count and time, and stops by itself.
"""

from __future__ import annotations

import pytest

from fastws.bench import herd

CLIENTS = 300
SMALL = dict(rooms=3, rate=30.0, handshake_rate=50.0, handshake_burst=10, retry_after=1.0, reconnect_delay=1.0,
             warmup=1.0, tail=1.0, timeout=60.0, settle=15.0)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("variant", ["sigterm", "sigkill"])
def test_room_clients_come_back_and_miss_nothing(variant, tmp_path):
    summaries = herd.run(CLIENTS, procs=2, out=tmp_path, variants=(variant,), modes=("hinted", "naive"), **SMALL)
    assert [(s["variant"], s["mode"]) for s in summaries] == [(variant, "hinted"), (variant, "naive")]
    for s in summaries:
        figures = {k: v for k, v in s.items() if k != "series"}
        assert s["back"] == CLIENTS and s["all_back_s"] is not None, figures
        assert s["gave_up"] == 0 and s["connected_at_end"] == CLIENTS, figures
        assert (s["lost"], s["duplicated"], s["out_of_order"], s["unexpected"]) == (0, 0, 0, 0), figures
        assert (s["not_recovered"], s["gaps_reported"]) == (0, 0), figures
        assert s["publisher"]["failed_count"] == 0 and s["publisher"]["stream_is_sent"], figures
        assert min(s["truth_sizes"].values()) > 0 and s["delivered"] > 0, figures
        assert s["reconnect_handshakes"] == CLIENTS and s["handshakes_accepted"] == CLIENTS, figures
        assert s["admission_bound_per_s_per_worker"] == 50 + 10
        assert s["under_admission_bound"] and s["peak_per_s"] <= s["admission_bound_per_s"], figures
        if variant == "sigterm":
            assert s["close_codes"] == {"1001": CLIENTS}, figures
        else:
            assert s["close_codes"] == {"1006": CLIENTS}, figures
    hinted = summaries[0]
    if variant == "sigterm":
        assert hinted["waited_less_than_hint"] == 0, hinted
    assert (tmp_path / "client-herd.png").stat().st_size > 10_000
    assert (tmp_path / "client-herd.json").stat().st_size > 1_000
