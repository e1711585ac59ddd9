"""``redis+sentinel://``: the pub/sub broker follows a Sentinel failover.

Real processes only: a master and a replica (``redis-server`` on free
ports) and three Sentinels (``redis-server --sentinel``, quorum 2, the
master down after 1 s). The master is killed with SIGKILL; the Sentinels
promote the replica; the brokers, never restarted, reconnect through the
Sentinels to the new master and keep their subscriptions.
"""

from __future__ import annotations

import os
import signal

import pytest

from brokerutil import (
    SERVICE,
    free_port,
    publish_until_one_arrives,
    redis_cli,
    run,
    sentinel_group_start,
    sentinel_group_stop,
    wait_for,
)
from fastws.broker import BrokerURLError, PublishError, create_broker
from fastws.broker.sentinel import SentinelBroker

K = ("", "room")


@pytest.fixture
def sentinel_group():
    group = sentinel_group_start()
    try:
        yield group
    finally:
        sentinel_group_stop(*group)


def test_sentinel_url_is_checked_at_creation():
    b = create_broker("redis+sentinel://u:pw@127.0.0.1:26380,[::1],h3:26381/mymaster/3?sentinel_password=s3")
    assert isinstance(b, SentinelBroker)
    assert b.sentinels == [("127.0.0.1", 26380), ("::1", 26379), ("h3", 26381)]
    assert (b.service, b.conn_opts["db"], b.conn_opts["password"], b.sentinel_password) == ("mymaster", 3, "pw", "s3")
    assert "pw" not in b.safe_url and "s3" not in b.safe_url        # what logs print
    for url, why in [("redis+sentinel://127.0.0.1:26379", "no service name"),
                     ("redis+sentinel://127.0.0.1:26379/m/x", "database 'x' is not a number"),
                     ("redis+sentinel://127.0.0.1:99999/m", "port '99999'"),
                     ("redis+sentinel://:1/m", "has no host"),
                     ("redis+sentinel://h/m?db=1", "unknown option 'db'"),
                     ("redis+sentinel://h/m/1/2", "unexpected path"),
                     ("redis+sentinel://h/m?ssl_cert_reqs=none", "needs TLS")]:
        with pytest.raises(BrokerURLError, match=why):
            create_broker(url)


def test_no_sentinel_answering_is_reported_not_raised():
    """Sentinels that do not answer: start() returns (the broker retries in
    the background), the broker is not connected and says why."""

    async def main():
        b = create_broker(f"redis+sentinel://127.0.0.1:{free_port()}/{SERVICE}", prefix="x",
                          connect_timeout=0.3, backoff_max=0.2)
        await b.start()
        try:
            assert b.state != "connected"
            with pytest.raises(PublishError):
                await b.publish(K, b"m")
            assert "no Sentinel named a master" in (b.problem or ""), b.problem
        finally:
            await b.close()

    run(main(), 20)


def test_failover_keeps_subscriptions_without_restart(sentinel_group):
    master, replica, sentinels = sentinel_group

    async def main():
        a = create_broker(sentinels.url(), prefix="sentinel", node_id="A", backoff_min=0.05, backoff_max=0.5)
        b = create_broker(sentinels.url(), prefix="sentinel", node_id="B", backoff_min=0.05, backoff_max=0.5)
        got: list[bytes] = []
        b.set_handler(lambda key, payload, origin: got.append(payload))
        await a.start()
        await b.start()
        try:
            assert a.master == b.master == ("127.0.0.1", master.port)
            await b.subscribe([K])
            await a.publish(K, b"before")
            await wait_for(lambda: got == [b"before"], 5, "the message before the failover")

            os.kill(master.proc.pid, signal.SIGKILL)
            master.proc.wait(5)
            # publish until one arrives through the promoted replica; what is
            # published while there is no master fails and is counted
            failed = await publish_until_one_arrives(a, K, got)
            assert a.master == b.master == ("127.0.0.1", replica.port)
            assert "master" in redis_cli(replica.port, "ROLE").splitlines()[0]
            assert b.stats()["reconnects"] >= 1 and a.stats()["reconnects"] >= 1
            assert a.stats()["failures"] == failed
            # B subscribed once, before the failover: the subscription moved with it
            after = [p for p in got if p.startswith(b"after")]
            assert after and len(set(after)) == len(after)
            await a.publish(K, b"last")
            await wait_for(lambda: got[-1] == b"last", 5, "a message on the new master")
        finally:
            await a.close()
            await b.close()

    run(main(), 90)
