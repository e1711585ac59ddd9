"""Redis Sentinel: the pub/sub broker on whichever Redis the Sentinels name master.

::

    redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db][?option=value&...]
    rediss+sentinel://...      TLS to the Sentinels and to the master

The hosts are Sentinels (port 26379 when none is given), ``service`` is the
master's name in their ``sentinel monitor`` line, and the user, password
and database are the master's (option ``sentinel_password`` for Sentinels
that require one).

Before each connection the broker asks the Sentinels in turn ``SENTINEL
get-master-addr-by-name service``, connects to the address the first one
that knows it answers, and checks with ``ROLE`` that the server is a master
(a demoted master that still answers is refused; the next attempt asks the
Sentinels again). When the master fails, its links drop (Sentinel also
closes the clients of a master it demotes); the broker reconnects through
the Sentinels to the promoted replica and subscribes again to every channel
it had, as after any reconnect of :class:`~fastws.broker.redis.RedisBroker`:
no node restarts, no subscription is lost. What is published while no
master is reachable fails and is counted (``stats()["failures"]``), as in
any Redis outage; a publish answered ``READONLY`` (a master being demoted)
drops the links so that the next connection asks the Sentinels.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import unquote, urlsplit

from ..config import mask_url
from ..errors import BrokerURLError
from .redis import (
    URL_OPTIONS,
    RedisBroker,
    ReplyError,
    RespConn,
    open_conn,
    parse_hosts,
    parse_redis_url,
    tls_context,
    url_options,
)

log = logging.getLogger("fastws.broker")

SENTINEL_PORT = 26379
SENTINEL_URL_OPTIONS = {k: v for k, v in URL_OPTIONS.items() if k != "db"} | {
    "sentinel_password": "the Sentinels' password (their requirepass), if they have one",
}
SENTINEL_URL_FORM = ("redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db]"
                     "[?option=value&...]")


class NoMasterError(ConnectionError):
    """No Sentinel named a reachable master for the service (yet)."""


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, dict]:
    """``([(host, port), ...] of the Sentinels, service, connection options)``.

    Every part is checked (scheme, each Sentinel's host and port, the
    service name, the database, each option); a bad one raises
    :class:`~fastws.errors.BrokerURLError` saying which part and what is
    allowed."""
    safe = mask_url(url)
    u = urlsplit(url)
    scheme = u.scheme.lower()
    if scheme not in ("redis+sentinel", "rediss+sentinel"):
        raise BrokerURLError(safe, f"scheme {u.scheme!r} is not a Redis Sentinel scheme",
                             f"expected {SENTINEL_URL_FORM}")
    q = url_options(url, SENTINEL_URL_OPTIONS, SENTINEL_URL_FORM)
    parts = [p for p in u.path.split("/") if p]
    if not parts:
        raise BrokerURLError(safe, "no service name", f"the master's name in 'sentinel monitor': "
                             f"expected {SENTINEL_URL_FORM}")
    if len(parts) > 2:
        raise BrokerURLError(safe, f"unexpected path {u.path!r}", f"expected {SENTINEL_URL_FORM}")
    service = unquote(parts[0])
    raw_db = parts[1] if len(parts) == 2 else "0"
    if not (raw_db.isascii() and raw_db.isdigit()):
        raise BrokerURLError(safe, f"database {raw_db!r} is not a number", f"expected {SENTINEL_URL_FORM}")
    creds, sentinels = parse_hosts(url, "Sentinel", SENTINEL_PORT, SENTINEL_URL_FORM)
    opts: dict = {**creds, "db": int(raw_db), "ssl": tls_context(url, scheme.startswith("rediss"), q),
                  "sentinel_password": q.get("sentinel_password") or None}
    return sentinels, service, opts


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def is_sentinel_url(url: str) -> bool:
    """True for a ``redis+sentinel://`` or ``rediss+sentinel://`` URL."""
    return url.split("://", 1)[0].lower() in ("redis+sentinel", "rediss+sentinel")


async def master_address(sentinels: list[tuple[str, int]], service: str, *, ssl: Any = None,
                         password: str | None = None, timeout: float = 2.0) -> tuple[str, int]:
    """The master of ``service`` as the first Sentinel that knows it names it
    (asked in turn); :class:`NoMasterError` saying what each answered otherwise."""
    problems = []
    for host, port in sentinels:
        try:
            conn = await open_conn(host, port, ssl=ssl, password=password, timeout=timeout)
        except (OSError, asyncio.TimeoutError, ReplyError, ConnectionError) as exc:
            problems.append(f"{host}:{port}: {exc or type(exc).__name__}")
            continue
        try:
            r = await asyncio.wait_for(conn.send("SENTINEL", "get-master-addr-by-name", service), timeout)
        except (asyncio.TimeoutError, ConnectionError) as exc:
            problems.append(f"{host}:{port}: {exc or type(exc).__name__}")
            continue
        finally:
            conn.close()
        if isinstance(r, list) and len(r) == 2:
            return _text(r[0]), int(_text(r[1]))
        problems.append(f"{host}:{port}: {r!r}" if isinstance(r, ReplyError)
                        else f"{host}:{port}: does not know the service {service!r}")
    raise NoMasterError("no Sentinel named a master: " + "; ".join(problems))


async def open_master(url: str, timeout: float = 2.0) -> tuple[RespConn, tuple[str, int]]:
    """A connection to the master of the ``redis+sentinel://`` ``url``
    (authenticated, its database selected, checked with ``ROLE``) and its
    address; :class:`NoMasterError` when there is none (yet)."""
    sentinels, service, o = parse_sentinel_url(url)
    host, port = await master_address(sentinels, service, ssl=o["ssl"], password=o["sentinel_password"],
                                      timeout=timeout)
    conn = await open_conn(host, port, ssl=o["ssl"], username=o["username"], password=o["password"], db=o["db"],
                           timeout=timeout)
    try:
        role = await asyncio.wait_for(conn.send("ROLE"), timeout)
    except BaseException:
        conn.close()
        raise
    if not (isinstance(role, list) and role and _text(role[0]) == "master"):
        conn.close()
        raise NoMasterError(f"{host}:{port}, named master by the Sentinels, is not a master (yet)")
    return conn, (host, port)


async def open_url(url: str, timeout: float = 2.0) -> RespConn:
    """A connection to the Redis of ``url``: ``redis://`` / ``rediss://``
    directly, ``redis+sentinel://`` to the master its Sentinels name."""
    if is_sentinel_url(url):
        return (await open_master(url, timeout))[0]
    o = parse_redis_url(url)
    return await open_conn(o["host"], o["port"], ssl=o["ssl"], username=o["username"], password=o["password"],
                           db=o["db"], timeout=timeout)


class SentinelBroker(RedisBroker):
    """Redis pub/sub on the master that Redis Sentinel names (see the module doc)."""

    URL_OPTIONS = SENTINEL_URL_OPTIONS
    URL_FORM = SENTINEL_URL_FORM

    def __init__(self, url: str, **opts) -> None:
        self.sentinels, self.service, sentinel_opts = parse_sentinel_url(url)
        self.sentinel_password = sentinel_opts.pop("sentinel_password")
        # RedisBroker parses a plain redis URL: give it the first Sentinel's
        # address, then keep the options parsed here (the master's)
        host, port = self.sentinels[0]
        scheme = "rediss" if url.lower().startswith("rediss") else "redis"
        super().__init__(f"{scheme}://{host}:{port}/0", **opts)
        self.url = url
        self.safe_url = mask_url(url)            # what logs print (the sentinel_password masked too)
        self.conn_opts = sentinel_opts
        self.master: tuple[str, int] | None = None   # the address of the last master connected to

    async def _connect(self):
        conn, address = await open_master(self.url, self.connect_timeout)
        if self.master != address:
            if self.master is not None:
                log.warning("fastws: broker %s: the master is now %s:%d (was %s:%d)", self.safe_url, *address,
                            *self.master)
            self.master = address
        return conn

    def _count_result(self, fut) -> None:
        """Counts a failed publish; one answered READONLY (its master is being
        demoted) also closes the links, so that the next connection asks the
        Sentinels who the master is now."""
        super()._count_result(fut)
        if fut.cancelled() or fut.exception() is not None:
            return
        r = fut.result()
        if isinstance(r, ReplyError) and str(r).startswith("READONLY") and self._pub is not None:
            log.warning("fastws: broker %s: %s:%s is read-only now (a failover); reconnecting through the "
                        "Sentinels", self.safe_url, *(self.master or ("?", 0)))
            self._pub.close()                    # on_lost: the links are served no more, reconnect


__all__ = ["SentinelBroker", "parse_sentinel_url", "SENTINEL_URL_FORM", "NoMasterError", "is_sentinel_url",
           "master_address", "open_master", "open_url"]
