"""The whole attack set at once against one server, while good clients keep talking.

One ``fastws serve`` process per front (native: ``attack_app:app``; ASGI:
the raw ASGI app ``attack_app:asgi``), on both engines, with TLS and
without, configured as a public server would be (``attacks.hardened_args``:
compression on, a 64 KiB message limit, a 256 KiB body limit, 2 s to send a
request head, 1 s for a body, 1,000 rooms per connection, room names of 256
bytes at most, a connection cap, 16 connections and 5 upgrades a second per
client address, 1,000 messages and 1 MiB a second per connection, the
publish API behind a token; the app guards /private with a JWT and locks
rooms named locked-*).

Every attack of ``tests/attacks.py`` (``ATTACKS``: compressed 4 GiB header,
endless compressed fragments, zip bombs, slowloris, slow upgrade and body,
silent and undecided connections, 40,000 room joins, long room names,
cross-site Origin, publish API abuse, 2,000 client close codes, protocol
violations, bad request heads, a connection flood and an upgrade burst from
one address, message and byte floods, forged tokens, locked rooms) runs at
once, each from its own 127.0.0.N source address (or a pool 127.N.x.y of
its own), in a child process (the attackers never share an interpreter
with the good clients).  The set runs three times: two rounds,
then, once the server has settled, the measured round.  Throughout:

* a good ``websockets`` client on 127.0.0.1 sends a message every 5 ms over
  one connection: every echo arrives, in order; it is never refused or
  dropped, and its close handshake at the end is a clean 1000;
* a new good connection every 0.5 s is accepted and echoed;
* every attack gets the bounded outcome the table expects (close code,
  status, refusal), in every round;
* after the measured round the server's open fds (``/proc/PID/fd``) come
  back to what they were before it, its resident memory (VmRSS) to within
  ``RSS_MARGIN``, no room is left over (``websocket_rooms`` 0), and the
  process is alive.

The baseline is taken after two rounds: over TLS the server's RSS climbs
for a few rounds (12, 6, 3.5, 1, 0.5 MiB: memory the server has freed but
glibc's malloc keeps; ``malloc_trim(0)`` in the server gives it all back);
what is measured is that one more round does not keep it growing.

Every connection goes to 127.0.0.1; every attack is bounded in count, bytes
and time and stops by itself.  ``bench/attack.py`` measures what the attack
costs the good client's round trips.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests import attacks

WARMUP_ROUNDS = 2        # rounds of the attack set before the baseline is taken
TAIL = 1.0               # seconds of good traffic after the last attack
RSS_MARGIN = 12 << 20    # resident memory allowed to stay above the baseline, bytes (a third
                         # round grew it by up to 5 MiB plain, 7 MiB over TLS)
SETTLE = 20.0            # seconds the fd count and RSS get to come back
RUN_BOUND = 120.0        # seconds one round of the attack set may take


@pytest.fixture(params=sorted(attacks.FRONTS))
def front(request) -> str:
    return request.param


@pytest.fixture(params=["plain", "tls"])
def transport(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return attacks.make_cert(tmp_path_factory.mktemp("tls"))


def rss(pid: int) -> int:
    return attacks.status_kib(pid, "VmRSS") * 1024


def settled(pid: int, baseline_fds: int, baseline_rss: int) -> tuple[int, int]:
    """(fds, RSS) once both are back within bounds, or after SETTLE seconds."""
    deadline = time.monotonic() + SETTLE
    while True:
        fds, mem = attacks.open_fds(pid), rss(pid)
        if (fds <= baseline_fds and mem <= baseline_rss + RSS_MARGIN) or time.monotonic() > deadline:
            return fds, mem
        time.sleep(0.2)


def test_whole_attack_set_while_a_good_client_talks(server_factory, engine, front, transport, cert):
    app = attacks.FRONTS[front][0]
    tls_dir = cert if transport == "tls" else None
    server = server_factory(*attacks.hardened_args(front, tls_dir), app=app)
    pid = server.proc.pid
    assert not attacks.children(pid), "one process serves: its memory and fds are what is measured"
    target = attacks.hardened_target(server.port, front, tls_dir)
    url = target.url(target.echo_path)

    async def main():
        stop = asyncio.Event()
        good = attacks.GoodClient(url, ssl_ctx=target.tls, period=0.005, source=attacks.HOST)
        fresh = attacks.FreshClients(url, ssl_ctx=target.tls, every=0.5, source=attacks.HOST)
        talking = asyncio.create_task(good.run(stop))
        await asyncio.wait_for(good.ready.wait(), 15)
        opening = asyncio.create_task(fresh.run(stop))
        first = []
        for round_no in range(WARMUP_ROUNDS):
            first += await attacks.run_attacks_in_child(target, round_no=round_no, timeout=RUN_BOUND)
        before = await asyncio.to_thread(attacks.settled_fds, pid), rss(pid)
        sent_before = good.sent
        t0 = time.monotonic()
        measured = await attacks.run_attacks_in_child(target, round_no=WARMUP_ROUNDS, timeout=RUN_BOUND)
        took = time.monotonic() - t0
        await asyncio.sleep(TAIL)
        stop.set()
        await asyncio.wait_for(asyncio.gather(talking, opening), 30)
        samples = await attacks.metric_samples(target, attacks.HOST)
        return good, fresh, first, measured, took, before, sent_before, samples

    good, fresh, first, measured, took, (fds0, rss0), sent_before, samples = asyncio.run(main())
    print(f"\nfirst rounds\n{attacks.report(first)}\nmeasured round\n{attacks.report(measured)}\n"
          f"measured round {took:.1f}s; good client {good.sent} messages ({good.sent - sent_before} "
          f"during the measured round), p99 {attacks.percentile(good.rtts, 0.99) * 1000:.1f} ms, worst "
          f"{max(good.rtts) * 1000:.1f} ms; {fresh.done} fresh connections")

    assert server.alive(), f"the server died\n{server.log_tail()}"
    # the good clients: never refused, never dropped, every echo in order
    assert not good.failures, good.failures
    assert good.received == good.sent and good.sent - sent_before >= 200, (good.sent, good.received)
    assert good.close_code == 1000, good.close_code
    assert not fresh.failures, fresh.failures[:5]
    assert fresh.done >= 4, f"only {fresh.done} fresh connections"
    # every attack had the bounded outcome it should have, in every round
    wrong = [r for r in first + measured if not r.ok]
    assert not wrong, attacks.report(wrong)
    assert [r.name for r in measured] == [a.name for a in attacks.ATTACKS]
    # what the attacks took is given back
    fds, mem = settled(pid, fds0, rss0)
    print(f"fds {fds0} -> {fds}; RSS {rss0 / 2**20:.1f} -> {mem / 2**20:.1f} MiB")
    assert fds <= fds0, f"the server holds {fds} fds, {fds0} before the measured round"
    assert mem <= rss0 + RSS_MARGIN, (
        f"the server's RSS is {mem / 2**20:.1f} MiB, {rss0 / 2**20:.1f} MiB before the measured round")
    rooms = [v for (name, _), v in samples.items() if name == "websocket_rooms"]
    assert rooms == [0], f"rooms left over after the attack: {rooms}"
