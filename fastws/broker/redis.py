"""The Redis pub/sub broker (``redis://host:port/db``, ``rediss://`` for TLS).

Two connections per node: one for publishing (commands pipelined, replies
matched in order, so a publish is one ``PUBLISH`` command, sent in call
order, and its failure is known exactly) and one subscriber connection.
Replies are parsed with ``hiredis`` when it is installed (the pure-Python
parser below otherwise). The connections are this module's own small RESP
client on asyncio rather than ``redis.asyncio``'s pool and ``PubSub``: a
pool spreads consecutive publishes over connections (no order), and
``PubSub`` reconnects and re-subscribes on its own terms, which would hide
outages from ``state`` and from the failure count.

Interest-based routing: the node subscribes only to channels of rooms that
have local members (the bridge tells it, see
:mod:`fastws.broker.bridge`). Every ``subscribe``/``unsubscribe`` call made
during one loop iteration is coalesced into one ``SUBSCRIBE`` /
``UNSUBSCRIBE`` command (chunks of ``CHUNK`` channels, one write).

Outages: when a connection is lost, ``state`` becomes ``"disconnected"``,
publishes fail at once (:class:`~fastws.broker.PublishError`, counted in
``stats()["failures"]``), and the broker reconnects by itself with
exponential backoff and full jitter (``backoff_min`` .. ``backoff_max``),
re-subscribes every key it still holds, then says ``"connected"``. A
subscriber link that goes silent is detected by a ``PING`` every
``ping_interval`` seconds.

Why it is not connected is told apart: Redis refusing the credentials
(``WRONGPASS``, ``NOAUTH``: a wrong or missing password) is "authentication
failed", anything else "not reachable"; the reason is logged when it
changes and is the detail of the ``broker`` check of ``/health``.  The URL is
printed with its password masked (:func:`fastws.config.mask_url`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl as _ssl
from collections import deque
from urllib.parse import parse_qsl, unquote, urlsplit

from ..config import mask_url
from ..errors import (
    BrokerAuthError,
    BrokerProtocolError,
    BrokerReplyError,
    BrokerURLError,
    PublishError,
    SubscribeError,
)
from .base import Broker, backoff_delay

log = logging.getLogger("fastws.broker")

CHUNK = 1024          # channels per SUBSCRIBE command (all chunks go in one write)
STABLE = 1.0          # seconds a link must hold before the reconnect backoff starts over
ACK_TIMEOUT = 5.0     # how long subscribe()/unsubscribe() wait for Redis' acks


# Redis error replies, bytes that are not RESP and refused credentials are the
# broker errors of fastws.errors (the short names are used throughout this package).
ReplyError = BrokerReplyError
ProtocolError = BrokerProtocolError
AuthenticationError = BrokerAuthError


#: Error replies by which Redis refuses a client's credentials (Redis 6+ and older).
_AUTH_REPLIES = ("wrongpass", "noauth", "invalid password", "invalid username-password",
                 "without any password configured", "no password is set")


def is_auth_error(exc) -> bool:
    """True if ``exc`` (an exception or an error reply) says Redis refused
    the credentials rather than being unreachable."""
    if isinstance(exc, BrokerAuthError) or any(
            c.__name__ == "AuthenticationError" for c in type(exc).__mro__):   # ours or redis-py's
        return True
    text = str(exc).lower()
    return any(m in text for m in _AUTH_REPLIES)


def link_problem(exc) -> str:
    """What a failed connection attempt means, for logs and /health:
    ``"authentication failed (...)"`` or ``"not reachable (...)"``."""
    detail = mask_url(str(exc) or type(exc).__name__)
    return f"authentication failed ({detail})" if is_auth_error(exc) else f"not reachable ({detail})"


try:
    import hiredis

    def _reader():
        return hiredis.Reader(protocolError=ProtocolError, replyError=ReplyError)
except ImportError:  # pragma: no cover - hiredis is in the "redis" extra
    hiredis = None

    def _reader():
        return _PyReader()


class _PyReader:
    """RESP2 parser with hiredis.Reader's interface (feed / gets -> False)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data) -> None:
        self.buf += data

    def gets(self):
        r = self._parse(0)
        if r is None:
            return False
        value, pos = r
        del self.buf[:pos]
        return value

    def _line(self, pos):
        end = self.buf.find(b"\r\n", pos)
        return (None, None) if end < 0 else (bytes(self.buf[pos + 1:end]), end + 2)

    def _parse(self, pos):
        if pos >= len(self.buf):
            return None
        t = self.buf[pos:pos + 1]
        line, nxt = self._line(pos)
        if line is None:
            return None
        if t == b"+":
            return line, nxt
        if t == b"-":
            return ReplyError(line.decode("utf-8", "replace")), nxt
        if t == b":":
            return int(line), nxt
        if t == b"$":
            n = int(line)
            if n < 0:
                return None, nxt
            if len(self.buf) < nxt + n + 2:
                return None
            return bytes(self.buf[nxt:nxt + n]), nxt + n + 2
        if t == b"*":
            n = int(line)
            if n < 0:
                return None, nxt
            out = []
            for _ in range(n):
                r = self._parse(nxt)
                if r is None:
                    return None
                v, nxt = r
                out.append(v)
            return out, nxt
        raise ProtocolError(f"bad RESP type byte {t!r}")


def encode_command(args) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = b"%d" % a
        out.append(b"$%d\r\n" % len(a))
        out.append(a)
        out.append(b"\r\n")
    return b"".join(out)


class RespConn(asyncio.Protocol):
    """One Redis connection. ``send`` queues a command and returns a future
    for its reply (replies are matched in order). In ``push_mode`` (a
    subscriber connection) every reply goes to ``on_push`` instead.

    Commands queued in one loop iteration go out in one write at its end
    (``call_soon``): a burst of publishes costs one system call, not one
    each, and a lone command waits for nothing but the callbacks already
    due."""

    def __init__(self, on_push=None, on_lost=None) -> None:
        self.transport = None
        self.closed = False
        self.push_mode = False
        self.on_push = on_push        # on_push(reply) in push mode
        self.on_lost = on_lost        # on_lost(exc) once, when the connection ends
        self._pending: deque = deque()
        self._parser = _reader()
        self._loop = asyncio.get_event_loop()
        self._out: list | None = None   # commands queued this iteration (None: no flush scheduled)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data) -> None:
        self._parser.feed(data)
        try:
            while True:
                r = self._parser.gets()
                if r is False:
                    break
                if self._pending and not (self.push_mode and isinstance(r, list)):
                    fut = self._pending.popleft()
                    if fut is not None and not fut.done():
                        fut.set_result(r)
                elif self.on_push is not None:
                    self.on_push(r)
        except ProtocolError as exc:
            log.error("fastws: bad reply from Redis: %s", exc)
            self.transport.abort()

    def connection_lost(self, exc) -> None:
        self.closed = True
        err = ConnectionError(f"connection to Redis lost: {exc or 'closed'}")
        while self._pending:
            fut = self._pending.popleft()
            if fut is not None and not fut.done():
                fut.set_exception(err)
        if self.on_lost is not None:
            cb, self.on_lost = self.on_lost, None
            cb(err)

    def _write(self, data: bytes) -> None:
        if self._out is None:
            self._out = [data]
            self._loop.call_soon(self._flush_out)
        else:
            self._out.append(data)

    def _flush_out(self) -> None:
        out, self._out = self._out, None
        if out and not self.closed and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def send(self, *args, reply: bool = True):
        """Queue one command; a future for its reply (None if ``reply`` is
        False: push-mode commands whose answers come as pushes)."""
        if self.closed:
            raise ConnectionError("connection to Redis is closed")
        self._write(encode_command(args))
        if not reply:
            return None
        fut = self._loop.create_future()
        self._pending.append(fut)
        return fut

    def send_many(self, commands) -> None:
        """Queue several push-mode commands."""
        if self.closed:
            raise ConnectionError("connection to Redis is closed")
        self._write(b"".join(encode_command(c) for c in commands))

    def pipeline(self, commands) -> list:
        """Queue several commands; a future for each reply, in order
        (a connection that is not in push mode)."""
        commands = list(commands)
        if self.closed:
            raise ConnectionError("connection to Redis is closed")
        self._write(b"".join(encode_command(c) for c in commands))
        futs = [self._loop.create_future() for _ in commands]
        self._pending.extend(futs)
        return futs

    @property
    def backlog(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport else 0

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()


#: The query options of a ``redis://`` / ``rediss://`` URL: name -> what it takes.
URL_OPTIONS = {
    "db": "the database number (same as the path /N)",
    "ssl_ca_certs": "rediss only: a CA bundle (PEM file) to verify the server with",
    "ssl_cert_reqs": "rediss only: none, optional or required (the default)",
}
URL_FORM = "redis://[user:password@]host[:port][/db][?option=value&...]"
_CERT_REQS = {"none": _ssl.CERT_NONE, "cert_none": _ssl.CERT_NONE,
              "optional": _ssl.CERT_OPTIONAL, "cert_optional": _ssl.CERT_OPTIONAL,
              "required": _ssl.CERT_REQUIRED, "cert_required": _ssl.CERT_REQUIRED}


def url_options(url: str, options: dict, form: str = URL_FORM) -> dict:
    """The query options of broker ``url``, each checked to be one of
    ``options`` (name -> what it takes) and given once; raises
    :class:`~fastws.errors.BrokerURLError` naming an unknown option and
    listing the known ones.  Values are strings, for the caller to check."""
    safe = mask_url(url)
    u = urlsplit(url)
    if u.fragment:
        raise BrokerURLError(safe, "unexpected '#' in the URL",
                             f"percent-encode it as %23 in a password; expected {form}")
    if not u.query:
        return {}
    try:
        pairs = parse_qsl(u.query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise BrokerURLError(safe, "malformed options after '?'", f"expected {form}") from None
    out: dict = {}
    for name, value in pairs:
        if name not in options:
            raise BrokerURLError(safe, f"unknown option {name!r}",
                                 "known options: " + ", ".join(options))
        if name in out:
            raise BrokerURLError(safe, f"option {name!r} given twice", "give each option once")
        out[name] = value
    return out


def url_port(url: str, u, form: str = URL_FORM, default: int = 6379) -> int:
    """The port of the split URL ``u`` (``default`` when absent), 1..65535."""
    try:
        port = u.port
    except ValueError:
        port = -1
    if port is None:
        return default
    if not 1 <= port <= 65535:
        raw = u.netloc.rpartition("@")[2].rpartition(":")[2]
        raise BrokerURLError(mask_url(url), f"port {raw!r} is not a port number 1..65535",
                             f"expected {form}")
    return port


def tls_context(url: str, tls: bool, q: dict):
    """The client TLS context of a ``rediss`` URL from its ``ssl_*`` options
    (None for plain ``redis``, which refuses them)."""
    safe = mask_url(url)
    given = [k for k in ("ssl_ca_certs", "ssl_cert_reqs") if k in q]
    if not tls:
        if given:
            raise BrokerURLError(safe, f"option {given[0]!r} needs TLS",
                                 "use the rediss scheme, or drop the option")
        return None
    cafile = q.get("ssl_ca_certs")
    if cafile is not None and not (os.path.isfile(cafile) and os.access(cafile, os.R_OK)):
        raise BrokerURLError(safe, f"ssl_ca_certs {cafile!r} is not a readable file",
                             "the path of a CA bundle in PEM")
    reqs = q.get("ssl_cert_reqs", "required").lower()
    if reqs not in _CERT_REQS:
        raise BrokerURLError(safe, f"ssl_cert_reqs {q['ssl_cert_reqs']!r} is not allowed",
                             "none, optional or required")
    try:
        ctx = _ssl.create_default_context(cafile=cafile)
    except _ssl.SSLError as exc:
        raise BrokerURLError(safe, f"ssl_ca_certs {cafile!r} is not a CA bundle ({exc.reason})",
                             "the path of a CA bundle in PEM") from None
    if _CERT_REQS[reqs] == _ssl.CERT_NONE:
        ctx.check_hostname = False
    ctx.verify_mode = _CERT_REQS[reqs]
    return ctx


def parse_hosts(url: str, what: str, default_port: int, form: str) -> tuple[dict, list[tuple[str, int]]]:
    """The userinfo (``username``, ``password``) and the comma-separated
    ``host[:port]`` list (``[v6]:port`` too) of a URL that names several
    servers (cluster seeds, Sentinels); each host and port is checked and a
    bad one raises :class:`~fastws.errors.BrokerURLError` naming the
    ``what`` ("seed", "Sentinel") it belongs to."""
    safe = mask_url(url)
    creds: dict = {"username": None, "password": None}
    userinfo, _, hosts = urlsplit(url).netloc.rpartition("@")
    if userinfo:
        user, _, password = userinfo.partition(":")
        creds["username"] = unquote(user) or None
        creds["password"] = unquote(password) or None
    out = []
    for part in hosts.split(","):
        part = part.strip()
        if part.startswith("["):                   # [v6]:port
            host, _, port = part[1:].partition("]")
            port = port[1:] if port.startswith(":") else ""
        else:
            host, sep, port = part.rpartition(":")
            if not sep:
                host, port = port, ""
        if not host:
            raise BrokerURLError(safe, f"{what} {part!r} has no host", f"expected {form}")
        if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise BrokerURLError(safe, f"port {port!r} of {what} {part!r} is not a port number 1..65535",
                                 f"expected {form}")
        out.append((host, int(port) if port else default_port))
    return creds, out


def parse_redis_url(url: str, options: dict = URL_OPTIONS, form: str = URL_FORM) -> dict:
    """host, port, db, username, password, ssl context of a redis:// URL.

    Every part is checked (scheme, port, database, each option is one of
    ``options``): a bad one raises :class:`~fastws.errors.BrokerURLError`
    saying which part and what is allowed."""
    safe = mask_url(url)
    u = urlsplit(url)
    scheme = u.scheme.lower()
    base = scheme.split("+", 1)[0]
    if base not in ("redis", "rediss"):
        raise BrokerURLError(safe, f"scheme {u.scheme!r} is not a Redis scheme", f"expected {form}")
    q = url_options(url, options, form)
    if "@" in u.netloc and not u.hostname:
        raise BrokerURLError(safe, "no host after '@'", f"expected {form}")
    port = url_port(url, u, form)
    path = u.path.strip("/")
    if path and "db" in q:
        raise BrokerURLError(safe, "database given twice (path and ?db=)", "give it once: /N")
    raw_db = path or q.get("db", "0") or "0"
    if not raw_db.isdigit() or not raw_db.isascii():
        raise BrokerURLError(safe, f"database {raw_db!r} is not a number", f"expected {form}")
    return {
        "host": u.hostname or "127.0.0.1",
        "port": port,
        "db": int(raw_db),
        "username": unquote(u.username) if u.username else None,
        "password": unquote(u.password) if u.password else None,
        "ssl": tls_context(url, base == "rediss", q),
    }


async def open_conn(host, port, *, ssl=None, username=None, password=None, db=0, timeout=2.0,
                    on_push=None) -> RespConn:
    """Connect, authenticate and select ``db``; raises on failure."""
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(
        loop.create_connection(lambda: RespConn(on_push), host, port, ssl=ssl,
                               server_hostname=host if ssl else None), timeout)
    try:
        if password is not None:
            args = ("AUTH", username, password) if username else ("AUTH", password)
            r = await asyncio.wait_for(conn.send(*args), timeout)
            if isinstance(r, ReplyError):
                raise AuthenticationError(str(r)) if is_auth_error(r) else r
        if db:
            r = await asyncio.wait_for(conn.send("SELECT", db), timeout)
            if isinstance(r, ReplyError):
                raise AuthenticationError(str(r)) if is_auth_error(r) else r
    except BaseException:
        conn.close()
        raise
    return conn


class RedisBroker(Broker):
    """Redis pub/sub. ``url``: ``redis://[user:password@]host:port/db``."""

    #: the query options its URL takes (name -> what it takes); unknown ones are refused
    URL_OPTIONS = URL_OPTIONS
    URL_FORM = URL_FORM
    PUBLISH = b"PUBLISH"
    SUBSCRIBE = b"SUBSCRIBE"
    UNSUBSCRIBE = b"UNSUBSCRIBE"
    MESSAGE = b"message"

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, node_id=None, prefix: str = "",
                 connect_timeout: float = 2.0, backoff_min: float = 0.05, backoff_max: float = 5.0,
                 ping_interval: float = 5.0, max_backlog: int = 64 << 20) -> None:
        super().__init__(node_id=node_id, prefix=prefix)
        self.url = url
        self.safe_url = mask_url(url)            # what logs and errors print
        self.conn_opts = parse_redis_url(url, self.URL_OPTIONS, self.URL_FORM)
        self.connect_timeout = connect_timeout   # per connection attempt; start() waits this long
        self.backoff_min = backoff_min           # first retry delay (seconds) ...
        self.backoff_max = backoff_max           # ... doubling up to this, with jitter
        self.ping_interval = ping_interval       # liveness check of the links
        self.max_backlog = max_backlog           # unsent bytes to Redis past which publishes fail
        self._pub = None                         # RespConn for PUBLISH
        self._sub = None                         # RespConn in push mode
        self._task = None
        self._closing = False
        self._connected = None                   # asyncio.Event
        self._to_sub: set = set()                # channels to SUBSCRIBE at the next flush
        self._to_unsub: set = set()
        self._flush_fut = None                   # the pending coalesced flush
        self._sub_waiters: dict = {}             # channel -> [futures] waiting for the ack
        self._unsub_waiters: dict = {}
        self._ever_connected = False
        self._last_rx = 0.0
        self._pong = None                        # the subscriber link's first PING answer
        self.problem = None                      # why it is not connected (link_problem), or None

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None and not self._task.done():
            return                               # started already
        self._loop = asyncio.get_running_loop()
        self._connected = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._task = self._loop.create_task(self._run())
        try:
            await asyncio.wait_for(self._connected.wait(), self.connect_timeout + 1.0)
        except asyncio.TimeoutError:
            if not is_auth_error(self.problem or ""):   # an authentication failure is logged already
                log.warning("fastws: broker %s not reachable yet; retrying in the background", self.safe_url)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._wakeup.set()
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._drop_links()
        self._release_waiters()
        self._set_state("closed")

    async def _connect(self):
        o = self.conn_opts
        return await open_conn(o["host"], o["port"], ssl=o["ssl"], username=o["username"],
                               password=o["password"], db=o["db"], timeout=self.connect_timeout)

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            self._set_state("connecting")
            try:
                pub = await self._connect()
                try:
                    sub = await self._connect()
                except BaseException:
                    pub.close()
                    raise
            except (OSError, asyncio.TimeoutError, ReplyError, ConnectionError) as exc:
                self._link_failed(exc)
            else:
                began = self._loop.time()
                # the backoff starts over only after a link that held for a while:
                # a backend that accepts and drops at once is not hammered
                if await self._serve(pub, sub) and self._loop.time() - began >= STABLE:
                    attempt = 0
            if self._closing:
                break
            self._set_state("disconnected")
            delay = backoff_delay(attempt, self.backoff_min, self.backoff_max)
            attempt += 1
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), delay)
            except asyncio.TimeoutError:
                pass

    def _link_failed(self, exc) -> None:
        """A connection attempt (or a new link's first commands) failed:
        remember why for /health; an authentication failure is logged at
        warning once per episode, other failures at debug (``start`` and
        ``on_lost`` say "not reachable" / "lost")."""
        problem = link_problem(exc)
        if is_auth_error(exc) and not is_auth_error(self.problem or ""):
            log.warning("fastws: broker %s: %s; check the user and password of the broker URL; "
                        "retrying in the background", self.safe_url, problem)
        else:
            log.debug("fastws: broker link to %s failed: %s", self.safe_url, problem)
        self.problem = problem

    async def _ping(self, pub) -> bool:
        """PING on the command connection; False when it did not answer in
        ``ping_interval`` (the link is dead: reconnect)."""
        try:
            r = await asyncio.wait_for(asyncio.shield(pub.send(b"PING")), self.ping_interval)
        except (asyncio.TimeoutError, ConnectionError):
            return False
        if isinstance(r, ReplyError):
            log.warning("fastws: broker PING answered %s", r)
        return True

    async def _serve(self, pub, sub) -> bool:
        """Use ``pub``/``sub`` until one of them is lost; True if it got to
        "connected" (the backoff starts over)."""
        lost = self._loop.create_future()

        def on_lost(exc):
            if not lost.done():
                lost.set_result(exc)
            if self.state == "connected" and not self._closing:
                log.warning("fastws: lost the broker at %s (%s); reconnecting", self.safe_url, exc)
                self._set_state("disconnected")     # at once: publishes fail from now on
            self._release_waiters()

        pub.on_lost = sub.on_lost = on_lost
        sub.on_push = self._on_push
        sub.push_mode = True
        self._pub, self._sub = pub, sub
        self._last_rx = self._loop.time()
        reached = False
        try:
            # both links answer before anything else (a proxy may accept and drop)
            self._pong = self._loop.create_future()
            sub.send(b"PING", reply=False)
            r = await asyncio.wait_for(pub.send(b"PING"), self.connect_timeout)
            if isinstance(r, ReplyError):
                raise (AuthenticationError if is_auth_error(r) else ConnectionError)(f"PING answered {r}")
            await asyncio.wait_for(self._pong, self.connect_timeout)
            # re-subscribe every key still held (all of them on first connect)
            chans = list(self._keys)
            self._to_sub.difference_update(chans)
            if chans:
                waiters = self._send_subs(chans)
                await asyncio.wait_for(asyncio.gather(*waiters), ACK_TIMEOUT)
            if lost.done():
                return False
            if self._ever_connected:
                self.counters["reconnects"] += 1
                log.warning("fastws: broker reconnected to %s (%d keys re-subscribed)", self.safe_url,
                            len(chans))
            self._ever_connected = True
            reached = True
            self.problem = None
            self._set_state("connected")
            self._connected.set()
            while not lost.done():
                await asyncio.wait([lost], timeout=self.ping_interval)
                if lost.done():
                    break
                if self._loop.time() - self._last_rx > 2.5 * self.ping_interval:
                    log.warning("fastws: broker subscriber link silent; reconnecting")
                    break
                sub.send(b"PING", reply=False)
                if not await self._ping(pub):
                    break
        except (asyncio.TimeoutError, ConnectionError) as exc:
            self._link_failed(exc)
        finally:
            self._connected.clear()
            self._drop_links()
            self._release_waiters()
        return reached

    def _drop_links(self) -> None:
        for c in (self._pub, self._sub):
            if c is not None:
                c.on_lost = None
                c.close()
        self._pub = self._sub = None

    def _release_waiters(self) -> None:
        """Disconnected: the interest is recorded; re-subscribed on reconnect."""
        for d in (self._sub_waiters, self._unsub_waiters):
            for futs in d.values():
                for f in futs:
                    if not f.done():
                        f.set_result(None)
            d.clear()

    # -- subscriptions ------------------------------------------------------------

    def _on_push(self, r) -> None:
        self._last_rx = self._loop.time()
        if isinstance(r, list) and r:
            kind = r[0]
            if kind == self.MESSAGE:
                self._deliver(r[1], r[2])
                return
            if kind in (b"subscribe", b"ssubscribe"):
                self._ack(self._sub_waiters, r[1])
                return
            if kind in (b"unsubscribe", b"sunsubscribe"):
                self._ack(self._unsub_waiters, r[1])
                return
            if kind == b"pong":
                if self._pong is not None and not self._pong.done():
                    self._pong.set_result(None)
                return
        elif r == b"PONG":       # PING outside subscribed mode (no channels yet)
            if self._pong is not None and not self._pong.done():
                self._pong.set_result(None)
        elif isinstance(r, ReplyError):
            if is_auth_error(r):    # the command link reports it (_link_failed)
                log.debug("fastws: broker subscriber: %s", r)
            else:
                log.warning("fastws: broker subscriber got an error: %s", r)

    @staticmethod
    def _ack(waiters: dict, channel) -> None:
        for f in waiters.pop(channel, ()):
            if not f.done():
                f.set_result(None)

    def _send_subs(self, chans, cmd=None, waiters=None) -> list:
        """Write SUBSCRIBE (or ``cmd``) for ``chans`` in one write; futures for the acks."""
        cmd = cmd or self.SUBSCRIBE
        waiters = self._sub_waiters if waiters is None else waiters
        futs = []
        for ch in chans:
            f = self._loop.create_future()
            waiters.setdefault(ch, []).append(f)
            futs.append(f)
        self._sub.send_many([(cmd, *chans[i:i + CHUNK]) for i in range(0, len(chans), CHUNK)])
        return futs

    def _schedule_flush(self):
        """Coalesce: one flush per loop iteration; a future resolved after it."""
        if self._flush_fut is None:
            self._flush_fut = self._loop.create_future()
            self._loop.call_soon(self._flush)
        return self._flush_fut

    def _flush(self) -> None:
        """One SUBSCRIBE and one UNSUBSCRIBE for everything asked this tick."""
        done, self._flush_fut = self._flush_fut, None
        to_sub = [c for c in self._to_sub if c in self._keys]
        to_unsub = [c for c in self._to_unsub if c not in self._keys]
        self._to_sub.clear()
        self._to_unsub.clear()
        sub = self._sub
        try:
            if sub is not None and not sub.closed:
                if to_sub:
                    self._send_subs(to_sub)
                if to_unsub:
                    self._send_subs(to_unsub, self.UNSUBSCRIBE, self._unsub_waiters)
        except ConnectionError:
            self._release_waiters()
        done.set_result(None)

    async def _wait(self, chans, waiters: dict) -> list:
        """Flush and wait for the acks of ``chans``; the channels Redis did
        not acknowledge within ``ACK_TIMEOUT`` (none while disconnected: the
        waiters are released, the interest is applied on reconnect)."""
        await self._schedule_flush()
        pairs = [(ch, f) for ch in chans for f in waiters.get(ch, ())]
        if not pairs:
            return []
        await asyncio.wait([f for _, f in pairs], timeout=ACK_TIMEOUT)
        missing = list(dict.fromkeys(ch for ch, f in pairs if not f.done()))
        if missing:
            log.warning("fastws: broker did not ack %d (un)subscriptions in %ss", len(missing), ACK_TIMEOUT)
        return missing

    async def subscribe(self, keys) -> None:
        chans = []
        for key in keys:
            ch = self.channel(key)
            self._keys[ch] = key
            self._to_unsub.discard(ch)
            self._to_sub.add(ch)
            chans.append(ch)
        if chans and self._task is not None and not self._closing:
            missing = await self._wait(chans, self._sub_waiters)
            if missing:     # not subscribed: not kept either (the bridge retries)
                failed = [self._keys.pop(ch) for ch in missing if ch in self._keys]
                raise SubscribeError(f"Redis did not acknowledge {len(missing)} subscriptions", failed)

    async def unsubscribe(self, keys) -> None:
        chans = []
        dropped = {}
        for key in keys:
            ch = self.channel(key)
            if self._keys.pop(ch, None) is None:
                continue
            dropped[ch] = key
            self._to_sub.discard(ch)
            self._to_unsub.add(ch)
            chans.append(ch)
        if chans and self._task is not None and not self._closing:
            missing = await self._wait(chans, self._unsub_waiters)
            if missing:     # still subscribed: kept, so a retry unsubscribes them
                for ch in missing:
                    self._keys.setdefault(ch, dropped[ch])
                raise SubscribeError(f"Redis did not acknowledge {len(missing)} unsubscriptions",
                                     [dropped[ch] for ch in missing])

    # -- publishing ---------------------------------------------------------------

    def _send_publish(self, key, payload: bytes):
        self.counters["publishes"] += 1
        pub = self._pub
        if pub is None or pub.closed or self.state != "connected":
            raise self._fail("not connected")
        if pub.backlog > self.max_backlog:
            raise self._fail("too much unsent data")
        fut = self._publish_cmd(pub, self.channel(key), self._envelope(payload))
        fut.add_done_callback(self._count_result)
        return fut

    def _publish_cmd(self, pub, ch, data):
        return pub.send(self.PUBLISH, ch, data)

    def _count_result(self, fut) -> None:
        if fut.cancelled() or fut.exception() is not None or isinstance(fut.result(), ReplyError):
            self.counters["failures"] += 1

    async def publish(self, key, payload: bytes):
        fut = self._send_publish(key, payload)
        try:
            r = await fut
        except ConnectionError as exc:
            raise PublishError(f"broker publish failed: {exc}") from None
        if isinstance(r, ReplyError):
            raise PublishError(f"broker publish failed: {r}")
        return r

    def publish_nowait(self, key, payload: bytes):
        try:
            return self._send_publish(key, payload)
        except PublishError:
            return None

    async def ping(self):
        pub = self._pub
        if pub is None or pub.closed or self.state != "connected":
            return False, self.problem or self.state
        try:
            r = await asyncio.wait_for(asyncio.shield(pub.send(b"PING")), 1.0)
        except (asyncio.TimeoutError, ConnectionError) as exc:
            return False, f"ping failed: {exc}"
        return not isinstance(r, ReplyError), self.state
