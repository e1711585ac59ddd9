"""Fixtures of the broker suite: real backends only.

``backend``        parametrized: "memory", "embedded" (an EmbeddedRelay on a
                   temporary Unix socket, in-process), "redis" (the server
                   of $FASTWS_TEST_REDIS, default redis://127.0.0.1:6379/0,
                   see brokerutil), "streams" (the Redis Streams
                   broker on the same server; the test's keys are deleted
                   after it), "cluster" (a 3-master Redis Cluster of our own
                   ``redis-server`` processes).
``make_broker``    ``await make_broker(**opts)``: a started broker of the
                   current backend; every broker of one test shares a prefix
                   unique to the test; all are closed after the test.
``redis_cluster``  session-scoped: the cluster's ``[(host, port)]`` (started
                   on free ports, stopped at the end of the session).
``TcpProxy``       a small asyncio TCP proxy to inject faults (not a mock).

Every prefix of the run starts with ``brokerutil.RUN_PREFIX``; the keys
left under it (streams, presence) are deleted when the session ends, so the
shared Redis is left as it was found.
"""

from __future__ import annotations

import asyncio
import os
import tempfile

import pytest

from brokerutil import (
    REDIS_URL,
    RUN_PREFIX,
    STREAMS_URL,
    delete_keys,
    need_redis,
    new_prefix,
    redis_available,
    start_cluster,
    stop_cluster,
)

BACKENDS = ["memory", "embedded", "redis", "streams", "cluster"]


@pytest.fixture(scope="session", autouse=True)
def _leave_redis_as_found():
    """Delete every key this run made on the shared Redis (all under RUN_PREFIX)."""
    yield
    if redis_available():
        asyncio.run(delete_keys(RUN_PREFIX))


@pytest.fixture(scope="session")
def redis_cluster():
    ports, procs, workdir = start_cluster(3)
    try:
        yield [("127.0.0.1", p) for p in ports]
    finally:
        stop_cluster(procs, workdir)


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param in ("redis", "streams"):
        need_redis()
    if request.param == "cluster":
        request.getfixturevalue("redis_cluster")
    return request.param


@pytest.fixture
def make_broker(backend, request):
    """An async factory of started brokers of ``backend`` sharing a per-test prefix."""
    from fastws.broker import create_broker
    from fastws.broker.embedded import EmbeddedRelay

    prefix = new_prefix()
    state = {"brokers": [], "hub": None, "path": None}
    cluster = request.getfixturevalue("redis_cluster") if backend == "cluster" else None

    async def factory(**opts):
        opts.setdefault("prefix", prefix)
        if backend == "memory":
            b = create_broker(f"memory://{prefix}", **opts)
        elif backend == "embedded":
            if state["hub"] is None:
                state["path"] = os.path.join(tempfile.mkdtemp(prefix="fws-"), "hub.sock")
                state["hub"] = EmbeddedRelay(state["path"])
                await state["hub"].start()
            b = create_broker("unix://" + state["path"], **opts)
        elif backend == "redis":
            b = create_broker(REDIS_URL, **opts)
        elif backend == "streams":
            b = create_broker(STREAMS_URL, **opts)
        else:
            b = create_broker("redis+cluster://" + ",".join(f"{h}:{p}" for h, p in cluster), **opts)
        await b.start()
        assert b.state == "connected", f"{backend} broker did not connect"
        state["brokers"].append(b)
        return b

    async def cleanup():
        for b in state["brokers"]:
            await b.close()
        if state["hub"] is not None:
            await state["hub"].close()
        if backend == "streams":
            await delete_keys(prefix)

    factory.backend = backend
    factory.prefix = prefix
    factory.cleanup = cleanup
    factory.state = state
    return factory
