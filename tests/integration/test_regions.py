"""Regions: three simulated regions on this machine, real processes only.

Each region has its own ``redis-server`` (on a free port, never the shared
one) and two ``fastws serve`` nodes (``apps/regions_app.py``); a region's
nodes reach each other region's Redis through a TCP proxy that adds 40 ms
each way and can cut the link (``regions_helpers.py``).  Clients are real
``websockets`` clients.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from regions_helpers import Client, Deployment

DELAY = 0.04


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("regions"), delay=DELAY, extra=("--region-directory-ttl", "3"))
    try:
        yield d
    finally:
        d.stop()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 120))


def _seqs(msgs: list[dict], pub: str) -> list[int]:
    return [int(m["data"].split(":")[1]) for m in msgs if m["data"].startswith(pub + ":")]


@pytest.mark.timeout(180)
def test_user_to_user_across_regions(world: Deployment) -> None:
    """A user in region a sends to a user in region c and gets an answer
    back; the message takes the WAN link (at least one delay) and the sender
    is told which region it was handed to."""
    async def main() -> None:
        alice = await Client.connect(world.node("a", 0), "alice")
        bob = await Client.connect(world.node("c", 1), "bob")
        try:
            t0 = time.monotonic()
            await alice.send(op="to", user="bob", data="hi bob")
            got = await bob.wait(lambda m: m.get("op") == "dm")
            took = time.monotonic() - t0
            assert got == {"op": "dm", "from": "alice", "data": "hi bob"}
            assert took >= DELAY, took
            sent = await alice.wait(lambda m: m.get("op") == "sent")
            assert sent["regions"] == ["c"], sent
            await bob.send(op="to", user="alice", data="hi alice")
            back = await alice.wait(lambda m: m.get("op") == "dm")
            assert back == {"op": "dm", "from": "bob", "data": "hi alice"}
            await asyncio.sleep(1.0)           # nothing arrives twice
            assert len(bob.of("dm")) == 1 and len(alice.of("dm")) == 1
            # a user who is nowhere: no region takes it
            await alice.send(op="to", user="nobody", data="x")
            none = await alice.wait(lambda m: m.get("op") == "sent" and m["data"] == "x")
            assert none["regions"] == []
        finally:
            await alice.close()
            await bob.close()

    run(main())
