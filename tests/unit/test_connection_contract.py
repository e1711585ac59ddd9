"""The connection contract, differentially: ``_core`` against ``_pyconn``.

Both implementations of ``Hub``/``Connection`` (the Cython one and the
Python twin, see ``fastws/core.py``) run through the same scenarios and
must do the same things: the same bytes on the wire at the same moments,
the same transport calls (pause/resume reading, close, abort, write_eof),
the same callbacks with the same arguments, the same counters.

No socket server and no real loop: a manual loop (``ManualLoop``: its own
clock, ``call_soon``, ``call_later``/``call_at`` with cancellable handles,
``create_task`` running coroutines step by step) is advanced by the test,
and a recording transport (``RecordingTransport``) stands in for uvloop's.
Its ``get_extra_info("socket")`` is one end of a real
``socket.socketpair()``, so the Cython connection's direct writes
(``send(2)``/``sendmsg(2)`` on the fd) really happen; the transport's own
``write`` sends into the same socket, so the order of both paths shows in
the one byte stream the test reads from the peer end.  Reads are driven as
uvloop drives a BufferedProtocol (``get_buffer(-1)``, fill,
``buffer_updated(n)``), which covers the Cython connection's direct reads of
large frames into the message buffer, under several chunkings.

Each scenario returns nothing; ``both(scenario)`` runs it once per
implementation and compares the two runs' transcripts: per connection, the
bytes the peer received after each test action or loop iteration (so write
coalescing shows), the event log, and ``hub.stats()`` plus the timeout
counters.  Scenarios also assert what the behaviour must be (close codes,
HTTP statuses), so two equally wrong implementations fail too.
"""

from __future__ import annotations

import heapq
import inspect
import random
import socket
import struct
import time
import zlib
from collections import deque

import pytest

from fastws import core, errors, frames
from fastws.config import Config
from fastws.frames import BINARY, CLOSE, PING, PONG, TEXT
from fastws.handshake import accept_response, error_response, parse_request

IMPLS = ["cython", "wsproto"]
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
MASK = b"\x37\xfa\x21\x3d"


def load(name):
    """The module with Hub/Connection of implementation ``name``; fails
    (never skips) when the Cython extension is not built."""
    try:
        return core.connection_module(name)
    except ImportError as exc:
        pytest.fail(f"{name} is not importable ({exc}); build it with "
                    "`python setup.py build_ext --inplace`", pytrace=False)


# -- the manual loop -------------------------------------------------------------


class Handle:
    """What call_soon/call_later return: cancellable."""

    def __init__(self, when, seq, callback, args):
        self.when, self.seq, self.callback, self.args = when, seq, callback, args
        self._cancelled = False

    def cancel(self):
        self._cancelled = True

    def cancelled(self):
        return self._cancelled

    def __lt__(self, other):
        return (self.when, self.seq) < (other.when, other.seq)


class Gate:
    """An awaitable the test opens: ``await gate`` inside a task waits for
    ``gate.open(value)``."""

    def __init__(self):
        self.done = False
        self.value = None
        self._waiters = []

    def open(self, value=None):
        self.done, self.value = True, value
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w()

    def __await__(self):
        if not self.done:
            yield self
        return self.value


class Task:
    """A coroutine run by the manual loop, one step per loop callback; it
    may await only ``Gate`` objects."""

    def __init__(self, loop, coro):
        self._loop = loop
        self._coro = coro
        self._done = False
        self._exc = None
        self._result = None
        self._callbacks = []
        loop.call_soon(self._step)

    def _step(self):
        try:
            gate = self._coro.send(None)
        except StopIteration as stop:
            self._finish(result=stop.value)
        except Exception as exc:  # the task's exception, as asyncio keeps it
            self._finish(exc=exc)
        else:
            assert isinstance(gate, Gate), f"a task awaited {gate!r}, not a Gate"
            gate._waiters.append(lambda: self._loop.call_soon(self._step))

    def _finish(self, result=None, exc=None):
        self._done, self._result, self._exc = True, result, exc
        for cb in self._callbacks:
            self._loop.call_soon(cb, self)
        self._callbacks = []

    def add_done_callback(self, cb):
        if self._done:
            self._loop.call_soon(cb, self)
        else:
            self._callbacks.append(cb)

    def done(self):
        return self._done

    def cancelled(self):
        return False

    def exception(self):
        return self._exc

    def result(self):
        if self._exc is not None:
            raise self._exc
        return self._result


class ManualLoop:
    """The parts of an asyncio loop a hub uses, on a clock the test moves."""

    def __init__(self, on_iteration=None):
        self.now = 1000.0
        self._ready = deque()
        self._timers = []
        self._seq = 0
        self.on_iteration = on_iteration   # called after each iteration (drains the peers)

    def time(self):
        return self.now

    def call_soon(self, callback, *args, context=None):
        self._seq += 1
        h = Handle(None, self._seq, callback, args)
        self._ready.append(h)
        return h

    def call_later(self, delay, callback, *args, context=None):
        return self.call_at(self.now + delay, callback, *args)

    def call_at(self, when, callback, *args, context=None):
        self._seq += 1
        h = Handle(when, self._seq, callback, args)
        heapq.heappush(self._timers, h)
        return h

    def create_task(self, coro, name=None, context=None):
        return Task(self, coro)

    def timers(self):
        """Timer handles not cancelled (for the one-timer-per-hub check)."""
        return [h for h in self._timers if not h.cancelled()]

    def _iteration(self):
        """Run the callbacks ready now (not those they schedule), as one
        iteration of a real loop does."""
        n = len(self._ready)
        for _ in range(n):
            h = self._ready.popleft()
            if not h.cancelled():
                h.callback(*h.args)
        if self.on_iteration is not None:
            self.on_iteration()

    def run(self):
        """Run iterations until nothing is ready (bounded)."""
        for _ in range(10_000):
            if not self._ready:
                return
            self._iteration()
        raise AssertionError("the loop never went idle")

    def advance(self, seconds):
        """Move the clock ``seconds`` on, firing due timers in order."""
        end = self.now + seconds
        self.run()
        while self._timers and self._timers[0].when <= end + 1e-9:
            h = heapq.heappop(self._timers)
            if h.cancelled():
                continue
            self.now = max(self.now, h.when)
            self._ready.append(h)
            self.run()
        self.now = end
        self.run()


# -- the transport ----------------------------------------------------------------


def _big_buffers(sock):
    for opt in (33, 32):  # SO_RCVBUFFORCE, SO_SNDBUFFORCE (root), else the plain ones
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF if opt == 33 else socket.SO_SNDBUF, 8 << 20)


class RecordingTransport:
    """A transport over one end of a socketpair that records what the
    protocol asks of it; ``connection_lost`` follows close/abort on the
    next loop iteration, as with a real transport."""

    def __init__(self, rig, name, sock):
        self.rig = rig
        self.name = name
        self.sock = sock
        self.protocol = None
        self.reading = True
        self.closing = False
        self.buffered = 0         # what get_write_buffer_size reports (the test sets it)
        self.writes = 0           # write/writelines calls
        self.tls = rig.tls        # then the socket must not be written to directly

    def _log(self, *event):
        self.rig.log.append((self.name, *event))

    def get_extra_info(self, name, default=None):
        if name == "socket":
            return self.sock
        if name == "sslcontext":
            return object() if self.tls else None
        if name == "peername":
            return ("127.0.0.1", 40000)
        return default

    def set_protocol(self, protocol):
        self.protocol = protocol

    def get_protocol(self):
        return self.protocol

    def write(self, data):
        if self.closing:
            self._log("write after close", len(data))
            return
        self.writes += 1
        if self.tls:   # every byte goes through here: each write is compared
            self._log("write", len(data))
        self.sock.sendall(bytes(data))

    def writelines(self, chunks):
        self.write(b"".join(bytes(c) for c in chunks))

    def get_write_buffer_size(self):
        return self.buffered

    def set_write_buffer_limits(self, high=None, low=None):
        self._log("set_write_buffer_limits", high, low)

    def is_reading(self):
        return self.reading

    def pause_reading(self):
        self._log("pause_reading")
        self.reading = False

    def resume_reading(self):
        self._log("resume_reading")
        self.reading = True

    def can_write_eof(self):
        return True

    def write_eof(self):
        self._log("write_eof")

    def is_closing(self):
        return self.closing

    def _lose(self):
        self.closing = True
        self.rig.loop.call_soon(self._lost)

    def _lost(self):
        self.protocol.connection_lost(None)

    def close(self):
        self._log("close")
        if not self.closing:
            self._lose()

    def abort(self):
        self._log("abort")
        if not self.closing:
            self._lose()


# -- routes and the handshake --------------------------------------------------------


class Route:
    """A route as the hub sees one: callbacks and their async flags; every
    call is logged."""

    def __init__(self, rig, *, echo=True, fail_on=None, async_message=False, async_open=False,
                 on_open=None, path=None):
        self.rig = rig
        if path is not None:
            self.path = path                # labels the route's delivery-latency histogram
        self.echo = echo
        self.fail_on = fail_on              # a message that makes on_message raise
        self.open_is_async = async_open
        self.message_is_async = async_message
        self.disconnect_is_async = False
        self.user_open = on_open
        self.on_open = self._async_open if async_open else self._open
        self.on_message = self._async_message if async_message else self._message

    def _open(self, conn):
        self.rig.log.append((self.rig.name_of(conn), "on_open", conn.path, conn.query_string))
        if self.user_open is not None:
            self.user_open(conn)

    async def _async_open(self, conn):
        self._open(conn)

    def _message(self, conn, message):
        name = self.rig.name_of(conn)
        self.rig.log.append((name, "on_message", message if len(message) < 200 else
                             (type(message).__name__, len(message), hash(message))))
        if self.fail_on is not None and message == self.fail_on:
            raise RuntimeError("the application failed")
        if self.echo and not conn.closed:
            conn.send(message)

    async def _async_message(self, conn, message):
        self._message(conn, message)

    def on_disconnect(self, conn, code, reason):
        self.rig.log.append((self.rig.name_of(conn), "on_disconnect", code, reason))


class Rig:
    """One implementation's hub, its connections and what they did."""

    def __init__(self, impl, tls=False, quiet_handshake=False, **settings):
        self.impl = impl
        self.mod = load(impl)
        self.tls = tls
        self.quiet_handshake = quiet_handshake   # the C fast path calls no handshake: log none
        self.log = []
        self.loop = ManualLoop(on_iteration=self.drain)
        self.settings = settings
        self.routes = {}
        self.holds = {}               # name -> Gate of a held upgrade
        self.hub = self.mod.Hub(self.loop, settings.pop("handshake", self.handshake),
                                on_callback_error=self._callback_error, **settings)
        self.conns = {}               # name -> connection
        self.peers = {}               # name -> the peer end of its socketpair
        self.transports = {}
        self.received = {}            # name -> [bytes per action/iteration]
        self._names = {}
        self.epoch = 0
        self.direct_reads = 0         # get_buffer handed out something else than the read buffer

    def _callback_error(self, conn, exc):
        self.log.append((self.name_of(conn), "callback_error", type(exc).__name__, str(exc)))

    def name_of(self, conn):
        return self._names.get(id(conn), "?")

    # -- the handshake a native front would run ---------------------------------------

    def handshake(self, conn, head):
        name = self.name_of(conn)
        if self.quiet_handshake:
            req = parse_request(head)
            conn.accept_upgrade(accept_response(req), self.routes[req.path], req.path, req.query_string)
            return
        self.log.append((name, "handshake", head))
        if head is None:
            conn.reject_upgrade(error_response(431, "request head too large"))
            return
        if head.startswith(b"POST "):
            size = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])

            def got_body(body, conn=conn, name=name):
                self.log.append((name, "body", body))
                conn.reject_upgrade(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")

            conn.read_body(size, got_body)
            return
        try:
            req = parse_request(head)
        except errors.HandshakeError as exc:
            conn.reject_upgrade(error_response(exc.status, exc.detail))
            return
        if req.path == "/reject":
            conn.reject_upgrade(error_response(403, "refused"))
            return
        route = self.routes.get(req.path)
        if route is None:
            conn.reject_upgrade(error_response(404, "no route"))
            return
        response = accept_response(req)
        if req.path == "/hold":
            conn.hold_upgrade()
            gate = self.holds[name] = Gate()

            async def decide():
                if await gate:
                    self.log.append((name, "accept", conn.accept_upgrade(
                        response, route, req.path, req.query_string)))
                else:
                    conn.reject_upgrade(error_response(403, "refused later"))

            self.loop.create_task(decide())
            return
        self.log.append((name, "accept", conn.accept_upgrade(response, route, req.path, req.query_string)))

    # -- connections ---------------------------------------------------------------------

    def _pair(self, name):
        a, b = socket.socketpair()
        _big_buffers(a)
        _big_buffers(b)
        b.setblocking(False)
        self.peers[name] = b
        self.received[name] = []
        t = RecordingTransport(self, name, a)
        self.transports[name] = t
        return t

    def connect(self, name):
        """A new connection from the hub's factory, made on a transport."""
        conn = self.hub.connection_factory()
        self._names[id(conn)] = name
        self.conns[name] = conn
        t = self._pair(name)
        t.set_protocol(conn)
        conn.connection_made(t)
        self.drain()
        return conn

    def adopt(self, name, route, early=b"", path="/adopted", query="a=1", deflate=None):
        """A connection handed over by another protocol (the ASGI front)."""
        conn = self.hub.connection_factory()
        self._names[id(conn)] = name
        self.conns[name] = conn
        t = self._pair(name)
        response = accept_response(parse_request(upgrade_head(path + "?" + query)))
        conn.adopt(t, response, route, path, query, None, deflate, early)
        assert t.protocol is conn
        self.drain()
        return conn

    def feed(self, name, data, chunking="whole"):
        """Bytes from the peer, read the way uvloop reads them (or, with
        chunking "data_received", as a plain Protocol gets them)."""
        conn = self.conns[name]
        if chunking == "data_received":
            for piece in split(data, "random"):
                conn.data_received(piece)
            self.drain()
            return
        for piece in split(data, chunking):
            while piece:
                buf = conn.get_buffer(-1)
                if not isinstance(buf, bytearray):
                    self.direct_reads += 1
                n = min(len(piece), len(buf))
                memoryview(buf)[:n] = piece[:n]
                piece = piece[n:]
                conn.buffer_updated(n)
        self.drain()

    def drain(self):
        """Read what every peer got since the last drain: one entry per
        connection per action or loop iteration (empty ones included)."""
        self.epoch += 1
        for name, sock in self.peers.items():
            chunks = []
            while True:
                try:
                    data = sock.recv(1 << 20)
                except BlockingIOError:
                    break
                if not data:
                    break
                chunks.append(data)
            if chunks:
                self.received[name].append((self.epoch, b"".join(chunks)))

    def stream(self, name):
        """Everything the peer of ``name`` received, in one bytes."""
        return b"".join(data for _, data in self.received[name])

    def frames(self, name):
        """The server frames the peer received after the 101 response."""
        data = self.stream(name)
        end = data.find(b"\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 101 "), data[:80]
        return parse_server_frames(data[end + 4:])

    def transcript(self):
        """What gets compared between implementations."""
        hub = self.hub
        counters = {k: getattr(hub, k) for k in ("handshake_timeouts", "body_timeouts",
                                                   "ping_timeouts", "idle_timeouts")}
        state = {name: (c.state, c.closed, c.close_code, c.close_reason, c.id, c.dropped)
                 for name, c in self.conns.items()}
        stats = hub.stats()
        # the delivery latency is real time: per route label its count is compared, not its values
        latency = stats.pop("delivery_latency")
        for h in latency.values():
            assert sum(h["buckets"]) == h["count"] and len(h["buckets"]) == len(core.DELIVERY_LATENCY_BUCKETS) + 1
        stats["delivery_latency_counts"] = {label: h["count"] for label, h in latency.items()}
        return {"log": self.log, "received": self.received, "stats": stats,
                "counters": counters, "conns": state, "open": sorted(hub.connections)}

    def close_all_peers(self):
        for sock in self.peers.values():
            sock.close()
        for t in self.transports.values():
            t.sock.close()


def both(scenario, **settings):
    """Run ``scenario(rig)`` on both implementations; assert they did the
    same; return the Cython rig (for further asserts)."""
    rigs = {}
    for impl in IMPLS:
        rig = Rig(impl, **dict(settings))
        try:
            scenario(rig)
            rig.loop.run()
            rig.drain()
            rigs[impl] = (rig, rig.transcript())
        finally:
            rig.close_all_peers()
    (c, tc), (_, tp) = rigs["cython"], rigs["wsproto"]
    for key in tc:
        assert tc[key] == tp[key], f"{key} differ:\ncython : {tc[key]!r}\nwsproto: {tp[key]!r}"
    return c


# -- bytes ---------------------------------------------------------------------------------


def split(data, chunking):
    if chunking == "whole":
        return [data]
    if chunking == "random":
        rnd = random.Random(len(data))
        out, at = [], 0
        while at < len(data):
            step = rnd.choice((1, 3, 7, 100, 1500, 9000, 70000))
            out.append(data[at:at + step])
            at += step
        return out
    step = int(chunking)
    return [data[i:i + step] for i in range(0, len(data), step)]


def upgrade_head(target="/echo", extra=()):
    lines = [f"GET {target} HTTP/1.1", "Host: example.com", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Version: 13",
             *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def frame(opcode, payload=b"", fin=True, rsv1=False):
    """A masked client frame."""
    if isinstance(payload, str):
        payload = payload.encode()
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    if n <= 125:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n <= 0xFFFF:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    masked = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload)) if n < 4096 else _mask_fast(payload)
    return head + MASK + masked


def _mask_fast(payload):
    key = int.from_bytes(MASK * ((len(payload) + 3) // 4), "big") >> (8 * ((-len(payload)) % 4))
    return (int.from_bytes(payload, "big") ^ key).to_bytes(len(payload), "big")


def close_frame(code, reason=""):
    return frame(CLOSE, struct.pack("!H", code) + reason.encode())


def parse_server_frames(data):
    """[(opcode, payload)] of unmasked server frames (a cut frame at the end is dropped)."""
    out, at = [], 0
    while at + 2 <= len(data):
        op, ln = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if ln == 126:
            ln = struct.unpack_from("!H", data, at)[0]
            at += 2
        elif ln == 127:
            ln = struct.unpack_from("!Q", data, at)[0]
            at += 8
        if at + ln > len(data):
            break
        out.append((op, data[at:at + ln]))
        at += ln
    return out


def close_of(payload):
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode()


# -- step 1 of the contract: one Hub signature, hub_settings, the public hooks -------------


def test_hub_settings_maps_every_hub_knob():
    c = Config(max_message_size=5000, body_timeout=7.5, slow_grace=2.0, high_water=1234)
    settings = core.hub_settings(c)
    assert set(settings) == set(core.HUB_KNOBS)
    assert settings["max_message_size"] == 5000
    assert settings["body_timeout"] == 7.5
    assert settings["slow_grace"] == 2.0
    assert settings["high_water"] == 1234
    for impl in IMPLS:
        hub = load(impl).Hub(ManualLoop(), None, **settings)
        for name, value in settings.items():
            assert getattr(hub, name) == value, (impl, name)


def test_hub_and_connection_signatures_are_the_same():
    """Same keyword arguments (unknown ones refused alike), same defaults,
    same public names."""
    hubs = {impl: load(impl).Hub(ManualLoop()) for impl in IMPLS}
    for name in core.HUB_KNOBS + ("tick", "on_callback_error", "handshake", "on_lost", "rooms",
                                  "loop", "connections"):
        values = {impl: getattr(hub, name) for impl, hub in hubs.items()}
        if name == "loop":
            continue
        assert values["cython"] == values["wsproto"], (name, values)
    for impl in IMPLS:
        with pytest.raises(TypeError):
            load(impl).Hub(ManualLoop(), None, no_such_setting=1)
    for cls in ("Hub", "Connection"):
        public = {}
        for impl in IMPLS:
            public[impl] = {n for n in dir(getattr(load(impl), cls)) if not n.startswith("_")}
        assert public["wsproto"] <= public["cython"], public["wsproto"] - public["cython"]
    py = load("wsproto")
    for method in ("accept_upgrade", "reject_upgrade", "hold_upgrade", "read_body", "adopt"):
        assert list(inspect.signature(getattr(py.Connection, method)).parameters) == \
            list(inspect.signature(getattr(load("cython").Connection, method)).parameters), method
    assert list(inspect.signature(py.Hub.broadcast_frame).parameters) == \
        list(inspect.signature(load("cython").Hub.broadcast_frame).parameters)


def test_exports_of_core():
    mod = load(core.IMPLEMENTATION if core.IMPLEMENTATION == "cython" else "wsproto")
    assert core.Hub is mod.Hub and core.Connection is mod.Connection
    for name in ("TEXT", "BINARY", "OPEN", "CLOSED", "PRIORITY_LOW", "PRIORITY_HIGH"):
        assert getattr(core, name) == getattr(frames, name)


def test_upgrade_accepted_by_the_handshake():
    def scenario(rig):
        rig.routes["/echo"] = Route(rig)
        conn = rig.connect("a")
        rig.feed("a", upgrade_head("/echo?x=1") + frame(TEXT, "early"))
        rig.loop.run()
        assert conn.path == "/echo" and conn.query_string == "x=1"
        rig.feed("a", frame(TEXT, "hello") + frame(BINARY, b"\x00\x01"))
        rig.loop.run()

    rig = both(scenario)
    assert rig.frames("a") == [(TEXT, b"early"), (TEXT, b"hello"), (BINARY, b"\x00\x01")]


def test_adopt_takes_over_a_decided_upgrade():
    def scenario(rig):
        route = Route(rig)
        conn = rig.adopt("a", route, early=frame(TEXT, "first") + frame(PING, b"p"))
        rig.loop.run()
        assert conn.path == "/adopted" and conn.query_string == "a=1"
        assert rig.hub.connections[conn.number] is conn
        assert rig.hub.connection(conn.id) is conn and conn.id == str(conn.number)
        rig.feed("a", frame(TEXT, "second"))
        rig.loop.run()

    rig = both(scenario, handshake=None)
    assert rig.frames("a") == [(TEXT, b"first"), (PONG, b"p"), (TEXT, b"second")]
    assert not any(e[1] == "handshake" for e in rig.log)


def test_a_head_on_a_hub_without_handshake_gets_400():
    def scenario(rig):
        rig.connect("a")
        rig.feed("a", upgrade_head("/echo"))
        rig.loop.run()

    rig = both(scenario, handshake=None)
    assert rig.stream("a").startswith(b"HTTP/1.1 400 ")
    assert ("a", "close") in rig.log


def test_broadcast_frame_queues_ready_payloads():
    def scenario(rig):
        route = Route(rig, echo=False)
        conns = [rig.adopt(n, route) for n in "abc"]
        rig.loop.run()
        assert rig.hub.broadcast_frame(TEXT, "héllo".encode(), conns, exclude=conns[1]) == 2
        assert rig.hub.broadcast_frame(BINARY, bytearray(b"\x00\xff"), conns) == 3
        assert rig.hub.broadcast("text", conns) == 3
        assert rig.hub.broadcast(b"bin", conns, priority=frames.PRIORITY_HIGH) == 3
        with pytest.raises(ValueError):
            rig.hub.broadcast_frame(PING, b"x", conns)
        with pytest.raises(TypeError):
            rig.hub.broadcast(123, conns)
        rig.loop.run()

    rig = both(scenario, handshake=None)
    assert rig.frames("a") == [(TEXT, "héllo".encode()), (BINARY, b"\x00\xff"),
                               (TEXT, b"text"), (BINARY, b"bin")]
    assert rig.frames("b") == [(BINARY, b"\x00\xff"), (TEXT, b"text"), (BINARY, b"bin")]


# -- scenarios --------------------------------------------------------------------------------


def upgraded(rig, name, path="/echo", route=None, **route_kw):
    """A connection upgraded through the handshake callback."""
    if route is None:
        route = rig.routes.get(path) or Route(rig, **route_kw)
    rig.routes[path] = route
    conn = rig.connect(name)
    rig.feed(name, upgrade_head(path))
    rig.loop.run()
    assert not conn.closed
    return conn


def close_codes(rig, name):
    return [close_of(p) for op, p in rig.frames(name) if op == CLOSE]


def test_upgrade_through_the_c_fast_path():
    """The Cython hub answers a plain upgrade in C (no handshake call); the
    Python hub asks its handshake: the same 101 bytes, the same frames."""
    def scenario(rig):
        route = rig.routes["/echo"] = Route(rig)
        rig.hub.set_fast_upgrade({"/echo": route})
        conn = rig.connect("a")
        rig.feed("a", upgrade_head("/echo?room=1") + frame(TEXT, "in the same read"))
        rig.loop.run()
        assert (conn.path, conn.query_string) == ("/echo", "room=1")
        rig.feed("a", frame(TEXT, "later"))
        rig.loop.run()

    rig = both(scenario, quiet_handshake=True)
    assert rig.hub.fast_upgrades == 1
    assert rig.stream("a").startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert rig.frames("a") == [(TEXT, b"in the same read"), (TEXT, b"later")]


@pytest.mark.parametrize("chunking", ["whole", "1", "random"])
def test_handshake_accept_reject_and_errors(chunking):
    def scenario(rig):
        rig.routes["/echo"] = Route(rig)
        for name, head in [("ok", upgrade_head("/echo")), ("refused", upgrade_head("/reject")),
                           ("missing", upgrade_head("/nowhere")),
                           ("bad", b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")]:
            rig.connect(name)
            rig.feed(name, head, chunking)
            rig.loop.run()

    rig = both(scenario)
    assert rig.stream("ok").startswith(b"HTTP/1.1 101 ")
    assert rig.stream("refused").startswith(b"HTTP/1.1 403 ")
    assert rig.stream("missing").startswith(b"HTTP/1.1 404 ")
    assert rig.stream("bad").startswith(b"HTTP/1.1 4")
    assert [e for e in rig.log if e[1] == "on_disconnect"] == []   # never upgraded: no disconnect
    assert rig.hub.stats()["connections"] == 1


def test_hold_then_async_accept_or_reject():
    def scenario(rig):
        rig.routes["/hold"] = Route(rig)
        for name in ("yes", "no"):
            rig.connect(name)
            rig.feed(name, upgrade_head("/hold") + frame(TEXT, "sent early"))
            rig.loop.run()
            assert not rig.transports[name].reading        # held: nothing read meanwhile
        rig.loop.advance(1.0)
        rig.holds["yes"].open(True)
        rig.holds["no"].open(False)
        rig.loop.run()
        assert rig.transports["yes"].reading
        rig.feed("yes", frame(TEXT, "after"))
        rig.loop.run()

    rig = both(scenario)
    assert rig.frames("yes") == [(TEXT, b"sent early"), (TEXT, b"after")]
    assert rig.stream("no").startswith(b"HTTP/1.1 403 ")


def test_head_over_max_head_size():
    def scenario(rig):
        rig.connect("a")
        rig.feed("a", b"GET / HTTP/1.1\r\nX: " + b"y" * 600, "100")
        rig.loop.run()

    rig = both(scenario, max_head_size=512)
    assert ("a", "handshake", None) in rig.log
    assert rig.stream("a").startswith(b"HTTP/1.1 431 ")


SIZES = [0, 1, 125, 126, 4095, 4096, 16383, 16384, 65535, 65536, 65537, 100_000, 300_000]


@pytest.mark.parametrize("chunking", ["whole", "1000", "random", "data_received"])
@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_messages_of_all_sizes(chunking, opcode):
    """Echoed messages from empty to 300 KB: past 64 KiB the Cython
    connection reads the payload straight into the message (get_buffer
    hands it out) and sends header and payload by sendmsg."""
    rnd = random.Random(opcode)
    payloads = [bytes(rnd.randrange(32, 127) for _ in range(min(n, 2000))) * (n // 2000 + 1)
                for n in SIZES]
    payloads = [p[:n] for p, n in zip(payloads, SIZES, strict=True)]
    messages = [p.decode() if opcode == TEXT else p for p in payloads]

    def scenario(rig):
        upgraded(rig, "a")
        stream = b"".join(frame(opcode, p) for p in payloads)
        rig.feed("a", stream, chunking)
        rig.loop.run()

    rig = both(scenario, max_message_size=1 << 20)
    assert rig.frames("a") == [(opcode, p) for p in payloads]
    assert [e[2] for e in rig.log if e[1] == "on_message"][:4] == messages[:4]
    stats = rig.hub.stats()
    assert stats["messages_in"] == stats["messages_out"] == len(SIZES)
    # the Cython side took its direct paths: frames sent on the socket (the
    # transport wrote only the 101), large payloads read into the message
    assert rig.transports["a"].writes == 1
    if chunking != "data_received":
        assert rig.direct_reads > 0


@pytest.mark.parametrize("chunking", ["whole", "1", "random"])
def test_fragments_with_control_frames_between(chunking):
    def scenario(rig):
        upgraded(rig, "a")
        data = (frame(TEXT, "hé", fin=False) + frame(PING, b"1") + frame(0, "llo ", fin=False)
                + frame(PONG, b"x") + frame(0, "wörld") + frame(BINARY, b"\x00" * 70000, fin=False)
                + frame(PING, b"2") + frame(0, b"\x01" * 70000))
        rig.feed("a", data, chunking)
        rig.loop.run()

    rig = both(scenario)
    assert rig.frames("a") == [(PONG, b"1"), (TEXT, "héllo wörld".encode()), (PONG, b"2"),
                               (BINARY, b"\x00" * 70000 + b"\x01" * 70000)]


def test_server_ping_and_send_frame():
    def scenario(rig):
        conn = upgraded(rig, "a")
        conn.ping(b"hi")
        conn.send_frame(core.encode_frame(BINARY, b"ready"))
        conn.send("two")
        conn.send(b"x" * 20000)        # large binary: header and payload queued apart (Cython)
        rig.loop.run()
        with pytest.raises(ValueError):
            conn.ping(b"x" * 126)
        with pytest.raises(TypeError):
            conn.send(42)

    rig = both(scenario)
    assert rig.frames("a") == [(PING, b"hi"), (BINARY, b"ready"), (TEXT, b"two"), (BINARY, b"x" * 20000)]
    # everything queued in one iteration went out in one piece, after the 101
    assert len(rig.received["a"]) == 2


def test_writes_are_coalesced_once_per_iteration():
    def scenario(rig):
        route = Route(rig, echo=False)
        conns = [rig.adopt(n, route) for n in "ab"]
        rig.loop.run()
        for i in range(5):
            conns[0].send(f"m{i}")
            rig.hub.broadcast(f"b{i}", conns)
        rig.drain()                      # nothing written before the loop runs
        rig.loop.run()

    rig = both(scenario, handshake=None)
    assert len(rig.received["a"]) == 2 and len(rig.received["b"]) == 2


@pytest.mark.parametrize("tls", [False, True])
def test_close_handshake_started_by_the_client(tls):
    def scenario(rig):
        upgraded(rig, "a")
        rig.feed("a", frame(TEXT, "bye soon") + close_frame(4001, "done"))
        rig.loop.run()

    rig = both(scenario, tls=tls)
    assert rig.frames("a") == [(TEXT, b"bye soon"), (CLOSE, struct.pack("!H", 4001))]
    assert ("a", "close") in rig.log
    assert [e for e in rig.log if e[1] == "on_disconnect"] == [("a", "on_disconnect", 4001, "done")]
    assert rig.hub.stats()["closes"] == {"4xxx": 1}


def test_close_handshake_started_by_the_server():
    def scenario(rig):
        conn = upgraded(rig, "a")
        long_reason = "é" * 100          # cut to 123 bytes on a character boundary
        conn.close(3001, long_reason)
        conn.close(1000)                 # no-op once closing
        rig.loop.run()
        with pytest.raises(errors.ConnectionClosed) as err:
            conn.send("late")
        assert err.value.code == 3001
        rig.feed("a", frame(TEXT, "still read while closing") + close_frame(3001))
        rig.loop.run()

    rig = both(scenario)
    closes = close_codes(rig, "a")
    assert closes == [(3001, "é" * 61)]
    assert ("a", "on_disconnect", 3001, "") in rig.log
    assert ("a", "close") in rig.log


def test_server_close_unanswered_is_aborted_after_close_timeout():
    def scenario(rig):
        conn = upgraded(rig, "a")
        conn.close(1001, "going")
        rig.loop.run()
        rig.loop.advance(1.0)
        assert not rig.transports["a"].closing
        rig.loop.advance(3.0)

    rig = both(scenario, close_timeout=2.0)
    assert ("a", "abort") in rig.log
    assert ("a", "on_disconnect", 1001, "going") in rig.log


@pytest.mark.parametrize("bad", [
    frame(3, b"unknown opcode"),
    frame(TEXT, b"\xff\xfe"),
    frame(0, b"stray continuation"),
    frame(PING, b"x" * 10, fin=False),
    frame(BINARY, b"x" * 2000),          # over max_message_size
    b"\x81\x05hello",                    # unmasked
])
def test_protocol_errors_close_linger_then_abort(bad):
    def scenario(rig):
        upgraded(rig, "a")
        rig.feed("a", frame(TEXT, "fine") + bad + frame(TEXT, "ignored after the error"))
        rig.loop.run()
        rig.feed("a", frame(TEXT, "ignored while lingering"))
        rig.loop.advance(10.0)

    rig = both(scenario, max_message_size=1000, close_timeout=5.0)
    frames_ = rig.frames("a")
    assert frames_[0] == (TEXT, b"fine")
    code, reason = close_of(frames_[1][1])
    assert code in (1002, 1007, 1009) and reason == errors.CLOSE_REASONS[code]
    events = [e[1] for e in rig.log if e[0] == "a" and e[1] in ("write_eof", "abort", "close")]
    assert events == ["write_eof", "abort"]
    assert ("a", "on_disconnect", code, reason) in rig.log


def test_protocol_error_then_peer_eof():
    def scenario(rig):
        upgraded(rig, "a")
        rig.feed("a", frame(3))
        rig.loop.run()
        rig.transports["a"]._lose()        # the peer answered our FIN with its own
        rig.loop.run()
        rig.loop.advance(10.0)

    rig = both(scenario)
    assert ("a", "abort") not in rig.log
    assert ("a", "on_disconnect", 1002, "protocol error") in rig.log


def test_ping_timeout_and_pong_in_time():
    def scenario(rig):
        upgraded(rig, "quiet")
        upgraded(rig, "alive")
        rig.loop.advance(2.5)           # quiet for a ping interval: both pinged
        for _ in range(12):             # "alive" answers, "quiet" never does
            rig.feed("alive", frame(PONG, b""))
            rig.loop.advance(1.0)       # close_timeout: "quiet" aborted

    rig = both(scenario, ping_interval=2.0, ping_timeout=2.0, close_timeout=3.0)
    assert close_codes(rig, "quiet") == [tuple(errors.PING_TIMEOUT)]
    assert (PING, b"") in rig.frames("alive") and close_codes(rig, "alive") == []
    assert rig.hub.ping_timeouts == 1
    assert ("quiet", "abort") in rig.log
    assert ("quiet", "on_disconnect", *errors.PING_TIMEOUT) in rig.log


def test_active_connections_are_not_pinged():
    def scenario(rig):
        upgraded(rig, "a")
        for _ in range(10):
            rig.loop.advance(0.5)
            rig.feed("a", frame(TEXT, "x"))

    rig = both(scenario, ping_interval=2.0, ping_timeout=2.0)
    assert all(op == TEXT for op, _ in rig.frames("a"))


def test_idle_timeout():
    def scenario(rig):
        upgraded(rig, "idle")
        upgraded(rig, "busy")
        for _ in range(8):
            rig.loop.advance(0.5)
            rig.feed("busy", frame(TEXT, "x"))
            rig.feed("idle", frame(PONG, b""))   # traffic, but no message
        rig.loop.advance(0.5)

    rig = both(scenario, idle_timeout=3.0, ping_interval=0)
    assert close_codes(rig, "idle") == [tuple(errors.IDLE_TIMEOUT)]
    assert close_codes(rig, "busy") == []
    assert rig.hub.idle_timeouts == 1


def test_handshake_timeouts():
    def scenario(rig):
        rig.routes["/hold"] = Route(rig)
        rig.connect("silent")
        rig.connect("partial")
        rig.feed("partial", b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        rig.connect("undecided")
        rig.feed("undecided", upgrade_head("/hold"))
        rig.loop.advance(1.5)
        assert rig.log.count(("silent", "abort")) == 0
        rig.loop.advance(1.5)

    rig = both(scenario, handshake_timeout=2.0)
    assert rig.stream("partial").startswith(b"HTTP/1.1 408 ")
    assert ("silent", "abort") in rig.log and ("undecided", "abort") in rig.log
    assert rig.hub.handshake_timeouts == 3


def post_head(size):
    return f"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode()


def test_body_read_and_body_timeout():
    def scenario(rig):
        rig.connect("whole")
        rig.feed("whole", post_head(10) + b"01234", "3")
        rig.loop.advance(0.5)
        rig.feed("whole", b"56789")
        rig.loop.run()
        rig.connect("late")
        rig.feed("late", post_head(10) + b"0123")
        rig.loop.advance(4.0)

    rig = both(scenario, body_timeout=3.0)
    assert ("whole", "body", b"0123456789") in rig.log
    assert rig.stream("whole").startswith(b"HTTP/1.1 200 OK")
    assert rig.stream("late").startswith(b"HTTP/1.1 408 ")
    assert rig.hub.body_timeouts == 1


def test_slow_consumer_drops_by_priority_then_closes():
    def scenario(rig):
        route = Route(rig, echo=False)
        slow, fast = rig.adopt("slow", route), rig.adopt("fast", route)
        rig.loop.run()
        slow.pause_writing()              # as the transport does past high water
        rig.transports["slow"].buffered = 70_000
        both_ = [slow, fast]
        assert rig.hub.broadcast(b"L" * 100, both_, priority=frames.PRIORITY_LOW) == 1
        for _ in range(6):                # NORMAL until the queue is half full
            rig.hub.broadcast(b"N" * 100, both_)
        stats = rig.hub.stats()
        assert stats["queued_bytes_max"] >= 70_000
        for _ in range(5):                # HIGH is kept, past max_queue: slow consumer
            rig.hub.broadcast(b"H" * 100, both_, priority=frames.PRIORITY_HIGH)
        rig.loop.run()
        rig.loop.advance(6.0)

    rig = both(scenario, handshake=None, max_queue=1000, close_timeout=5.0)
    assert close_codes(rig, "slow") == [tuple(errors.SLOW_CONSUMER)]
    stats = rig.hub.stats()
    assert stats["slow_consumer_closes"] == 1
    assert stats["dropped"][("backpressure", frames.PRIORITY_LOW)] == 1
    assert stats["dropped"][("backpressure", frames.PRIORITY_NORMAL)] >= 1
    assert ("slow", "abort") in rig.log
    assert ("slow", "on_disconnect", *errors.SLOW_CONSUMER) in rig.log


def test_slow_grace_and_resume():
    def scenario(rig):
        route = Route(rig, echo=False)
        late, back = rig.adopt("late", route), rig.adopt("back", route)
        rig.loop.run()
        late.pause_writing()
        back.pause_writing()
        rig.hub.broadcast("queued", [late, back])
        rig.loop.run()
        rig.loop.advance(1.0)
        back.resume_writing()             # drained in time: the queue goes out
        rig.loop.advance(5.0)
        rig.hub.broadcast("after grace", [late, back])
        rig.loop.run()

    rig = both(scenario, handshake=None, slow_grace=4.0)
    assert close_codes(rig, "late") == [tuple(errors.SLOW_CONSUMER)]
    assert rig.frames("back") == [(TEXT, b"queued"), (TEXT, b"after grace")]


def test_send_past_max_queue_while_paused():
    def scenario(rig):
        conn = upgraded(rig, "a")
        conn.pause_writing()
        conn.send(b"x" * 600)
        conn.send(b"y" * 600)            # past max_queue: 1008 at once
        rig.loop.run()
        with pytest.raises(errors.ConnectionClosed):
            conn.send("z")

    rig = both(scenario, max_queue=1000)
    assert close_codes(rig, "a") == [tuple(errors.SLOW_CONSUMER)]


@pytest.mark.parametrize("where", ["message", "async message", "open", "async open"])
def test_callback_exceptions_close_1011(where):
    def scenario(rig):
        def fail_open(conn):
            raise RuntimeError("open failed")

        route = Route(rig, fail_on="boom", async_message=where == "async message",
                      async_open=where == "async open",
                      on_open=fail_open if "open" in where else None)
        rig.routes["/echo"] = route
        rig.connect("a")
        rig.feed("a", upgrade_head("/echo"))
        rig.loop.run()
        rig.feed("a", frame(TEXT, "boom" if "message" in where else "fine") + frame(TEXT, "next"))
        rig.loop.run()
        rig.feed("a", close_frame(1011))
        rig.loop.run()

    rig = both(scenario)
    assert close_codes(rig, "a") == [tuple(errors.CALLBACK_FAILED)]
    assert [e for e in rig.log if e[1] == "callback_error"] == [("a", "callback_error", "RuntimeError",
                                                                 "open failed" if "open" in where
                                                                 else "the application failed")]
    assert [e for e in rig.log if e[1] == "on_disconnect"] == [("a", "on_disconnect", 1011, "")]


def test_on_disconnect_once_with_the_right_code():
    def scenario(rig):
        rig.hub.on_lost = lambda conn: rig.log.append((rig.name_of(conn), "on_lost", conn.rooms))
        a = upgraded(rig, "aborted")
        upgraded(rig, "closed").rooms = ("room-1",)    # as if it had joined a room
        a.abort()
        a.abort()
        rig.loop.run()
        rig.feed("closed", close_frame(1000, "bye"))
        rig.loop.run()
        rig.transports["closed"]._lose()    # a second loss report is ignored
        rig.loop.run()

    rig = both(scenario)
    disconnects = [e for e in rig.log if e[1] == "on_disconnect"]
    assert disconnects == [("aborted", "on_disconnect", 1006, ""), ("closed", "on_disconnect", 1000, "bye")]
    assert [e for e in rig.log if e[1] == "on_lost"] == [("closed", "on_lost", ("room-1",))]
    assert rig.hub.stats()["closes"] == {1006: 1, 1000: 1}


def test_broadcast_to_compressed_and_plain_connections():
    def scenario(rig):
        route = Route(rig, echo=False)
        plain = rig.adopt("plain", route)
        deflated = rig.adopt("deflated", route, deflate=frames.DeflateParams())
        nocontext = rig.adopt("nocontext", route,
                              deflate=frames.DeflateParams(server_no_context_takeover=True))
        conns = [plain, deflated, nocontext]
        rig.loop.run()
        for i in range(3):
            assert rig.hub.broadcast_frame(TEXT, f"message {i} message {i}".encode(), conns) == 3
            assert rig.hub.broadcast(b"\x00" * 500, conns) == 3
        rig.loop.run()

    rig = both(scenario, handshake=None)
    assert rig.frames("plain")[0] == (TEXT, b"message 0 message 0")
    assert all(rig.stream(n)[rig.stream(n).find(b"\r\n\r\n") + 4] & 0x40 for n in ("deflated", "nocontext"))
    assert rig.hub.stats()["messages_out"] == 18


def test_broadcast_compressed_once_for_members_without_context_takeover():
    """Members that take each message on its own get the same compressed
    frames (compressed once per window size, as a fresh compressor would);
    each inflates on its own; a member with context takeover gets its own."""
    nocontext = frames.DeflateParams(server_no_context_takeover=True)
    small = frames.DeflateParams(server_no_context_takeover=True, server_max_window_bits=10)
    messages = [f"room message {i} ".encode() * 20 for i in range(3)]

    def scenario(rig):
        route = Route(rig, echo=False)
        conns = [rig.adopt("a", route, deflate=nocontext), rig.adopt("b", route, deflate=nocontext),
                 rig.adopt("small", route, deflate=small),
                 rig.adopt("takeover", route, deflate=frames.DeflateParams())]
        rig.loop.run()
        for m in messages:
            assert rig.hub.broadcast_frame(TEXT, m, conns) == 4
        rig.loop.run()

    rig = both(scenario, handshake=None)
    assert rig.frames("a") == rig.frames("b")
    for name, bits in (("a", 15), ("small", 10)):
        got = rig.frames(name)
        for (op, payload), m in zip(got, messages, strict=True):
            fresh = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -bits)
            assert op == TEXT and payload == (fresh.compress(m) + fresh.flush(zlib.Z_SYNC_FLUSH))[:-4]
            assert zlib.decompressobj(-bits).decompress(payload + b"\x00\x00\xff\xff") == m
    inflater = zlib.decompressobj(-15)        # the context member: one stream over its messages
    assert [inflater.decompress(p + b"\x00\x00\xff\xff") for _, p in rig.frames("takeover")] == messages


def test_one_loop_timer_per_hub():
    """The timers of every connection share the wheel's one loop timer."""
    for impl in IMPLS:
        rig = Rig(impl, ping_interval=2.0)
        try:
            rig.routes["/echo"] = Route(rig)
            for i in range(50):
                rig.connect(f"c{i}")
            for i in range(0, 50, 2):
                rig.feed(f"c{i}", upgrade_head("/echo"))
            rig.loop.run()
            assert rig.hub.scheduled == 50
            assert len(rig.loop.timers()) == 1, impl
            rig.hub.stop_timers()
            assert rig.loop.timers() == []
        finally:
            rig.close_all_peers()


@pytest.mark.parametrize("timeouts", [
    {}, {"ping_interval": 0.1}, {"idle_timeout": 30.0, "ping_interval": 0},
    {"handshake_timeout": 0, "body_timeout": 0, "close_timeout": 0, "ping_interval": 0, "ping_timeout": 0},
    {"close_timeout": 7.0, "ping_interval": 100.0, "handshake_timeout": 3.3},
])
def test_tick_formula_and_timer_state(timeouts):
    hubs = [load(impl).Hub(ManualLoop(), None, **timeouts) for impl in IMPLS]
    assert hubs[0].tick == hubs[1].tick
    assert 0.05 <= hubs[0].tick <= 1.0


def test_counters_and_timer_state_match_step_by_step():
    """A longer mixed run; after it, the per-connection timer state (due
    tick, kind, last read, last ping, hub tick) is the same too."""
    states = {}

    def scenario(rig):
        a = upgraded(rig, "a")
        b = upgraded(rig, "b")
        for i in range(20):
            rig.loop.advance(0.7)
            if i % 3 == 0:
                rig.feed("a", frame(TEXT, f"m{i}"))
            if i % 5 == 0:
                rig.feed("b", frame(PONG, b""))
            rig.hub.broadcast(f"tick {i}", [a, b])
        states[rig.impl] = (a.timer_state, b.timer_state)
        rig.loop.run()

    both(scenario, ping_interval=3.0, ping_timeout=2.0, idle_timeout=9.0)
    assert states["cython"] == states["wsproto"]


def test_compressed_messages_in_and_out():
    import zlib

    def deflate(data, comp):
        out = comp.compress(data) + comp.flush(zlib.Z_SYNC_FLUSH)
        return out[:-4]

    def scenario(rig):
        rig.adopt("a", Route(rig), deflate=frames.DeflateParams())
        comp = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
        data = b"".join(frame(TEXT, deflate(f"compressed {i} ".encode() * 10, comp), rsv1=True)
                        for i in range(3))
        data += frame(BINARY, deflate(b"\x00" * 100_000, comp), rsv1=True)
        rig.feed("a", data, "random")
        rig.loop.run()
        rig.feed("a", frame(TEXT, b"not compressed"))
        rig.loop.run()

    rig = both(scenario, handshake=None)
    messages = [e[2] for e in rig.log if e[1] == "on_message"]
    assert messages[:3] == [f"compressed {i} " * 10 for i in range(3)]
    assert messages[3][:2] == ("bytes", 100_000) and messages[4] == "not compressed"


def test_lost_while_the_upgrade_is_held():
    def scenario(rig):
        rig.routes["/hold"] = Route(rig)
        conn = rig.connect("a")
        rig.feed("a", upgrade_head("/hold"))
        rig.transports["a"]._lose()
        rig.loop.run()
        rig.holds["a"].open(True)      # the decision comes too late: not accepted
        rig.loop.run()
        with pytest.raises(errors.ConnectionClosed) as err:
            conn.send("x")
        assert err.value.code == 1006

    rig = both(scenario)
    assert ("a", "accept", False) in rig.log
    assert not any(e[1] in ("on_open", "on_disconnect") for e in rig.log)


def test_on_open_sends_and_closes():
    def scenario(rig):
        def greet(conn):
            conn.send("welcome")
            with pytest.raises(ValueError):
                conn.close(999)
            conn.close(4002, "full")

        rig.routes["/echo"] = Route(rig, on_open=greet)
        rig.connect("a")
        rig.feed("a", upgrade_head("/echo") + frame(TEXT, "read while closing"))
        rig.loop.run()
        rig.feed("a", close_frame(4002))
        rig.loop.run()
        rig.conns["a"].close(999)      # once closed, close() is a no-op: no check either

    rig = both(scenario)
    assert rig.frames("a") == [(TEXT, b"welcome"), (CLOSE, struct.pack("!H", 4002) + b"full")]
    assert ("a", "on_message", "read while closing") in rig.log
    assert ("a", "on_disconnect", 4002, "") in rig.log


# -- the stub file ------------------------------------------------------------------------------


def _stub():
    import ast
    from pathlib import Path

    tree = ast.parse((Path(core.__file__).parent / "_core.pyi").read_text())
    module, classes = {}, {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign):
            module[node.target.id] = None
        elif isinstance(node, ast.FunctionDef):
            module[node.name] = node
        elif isinstance(node, ast.ClassDef):
            members = {}
            for item in node.body:
                if isinstance(item, ast.AnnAssign):
                    members[item.target.id] = None
                elif isinstance(item, ast.FunctionDef):
                    members[item.name] = item
            classes[node.name] = members
    return module, classes


def _params(fn):
    a = fn.args
    return [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]


def test_stub_matches_the_extension():
    """_core.pyi names what _core exports, with the same parameters."""
    cy = load("cython")
    module, classes = _stub()
    runtime = {n for n in dir(cy) if not n.startswith("_")}
    stubbed = {n for n in list(module) + list(classes) if not n.startswith("_")}
    assert stubbed == runtime
    for name, fn in module.items():
        obj = getattr(cy, name)
        if fn is not None:
            assert _params(fn) == list(inspect.signature(obj).parameters), name
    for cls_name, members in classes.items():
        if cls_name.startswith("_"):
            continue
        cls = getattr(cy, cls_name)
        own = {n for n in vars(cls) if not n.startswith("_")}
        assert {n for n in members if not n.startswith("_")} == own, cls_name
        for name, fn in members.items():
            if fn is None or name == "__init__":
                continue
            attr = vars(cls)[name]
            if callable(attr):
                assert _params(fn) == list(inspect.signature(attr).parameters), (cls_name, name)
    # __init__ of a cdef class has no introspectable signature: the twin's has
    py = load("wsproto")
    for cls_name in ("Hub", "Connection"):
        assert _params(classes[cls_name]["__init__"]) == \
            list(inspect.signature(getattr(py, cls_name).__init__).parameters), cls_name
    engine = core.engine_module("wsproto").Engine
    assert _params(classes["Engine"]["__init__"]) == list(inspect.signature(engine.__init__).parameters)


# -- public connection ids, the on_closed hook, rate limits, the delivery latency ---------


def test_connection_ids_carry_the_node_id():
    node = "web1-4242-0badcafe"

    def scenario(rig):
        a, b = upgraded(rig, "a"), upgraded(rig, "b")
        c = rig.adopt("c", Route(rig))
        assert (a.id, b.id, c.id) == (f"{node}-1", f"{node}-2", f"{node}-3")
        assert (a.number, b.number, c.number) == (1, 2, 3)
        assert repr(b).startswith(f"<fastws.Connection id={node}-2 ")
        hub = rig.hub
        assert hub.node_id == node
        assert sorted(hub.connections) == [1, 2, 3]       # keyed by number
        assert hub.connection(b.id) is b and hub.connection(2) is b
        for other in ("other-2", "2", f"{node}-99", f"{node}-x", f"{node}-", f"{node}--2", f"{node}-2.0",
                      f"{node}-²", None, 2.0, True, b"2", 0, -2):
            assert hub.connection(other) is None, other
        b.abort()
        rig.loop.run()
        assert hub.connection(f"{node}-2") is None and b.id == f"{node}-2"   # the id stays readable

    both(scenario, node_id=node)


def test_connection_ids_without_a_node_id():
    def scenario(rig):
        conn = rig.connect("a")
        assert conn.id is None and conn.number == 0      # not upgraded yet
        rig.routes["/echo"] = Route(rig)
        rig.feed("a", upgrade_head("/echo"))
        rig.loop.run()
        assert conn.id == "1" and rig.hub.connection("1") is conn and rig.hub.connection("x-1") is None

    both(scenario)


def test_on_closed_runs_once_for_every_upgraded_connection():
    def scenario(rig):
        hub = rig.hub
        assert hub.on_closed is None
        hub.on_lost = lambda conn: rig.log.append((rig.name_of(conn), "on_lost"))
        hub.on_closed = lambda conn: rig.log.append((rig.name_of(conn), "on_closed", conn.close_code,
                                                     conn.remote_address, conn.id))
        rig.routes["/hold"] = Route(rig)
        closed = upgraded(rig, "closed")
        closed.rooms = ("room",)                         # as if it had joined a room
        adopted = rig.adopt("adopted", Route(rig))
        rig.connect("rejected")
        rig.feed("rejected", upgrade_head("/reject"))
        rig.connect("held")
        rig.feed("held", upgrade_head("/hold"))
        rig.connect("silent")
        rig.loop.run()
        rig.feed("closed", close_frame(1000, "bye"))
        adopted.abort()
        rig.transports["held"]._lose()
        rig.transports["silent"]._lose()
        rig.loop.run()
        rig.transports["closed"]._lose()                 # a second loss report changes nothing
        rig.loop.run()

    rig = both(scenario)
    hooks = [e for e in rig.log if e[1] in ("on_lost", "on_closed", "on_disconnect")]
    assert hooks == [   # once each, after on_lost, before on_disconnect; none for the others
        ("closed", "on_lost"),
        ("closed", "on_closed", 1000, ("127.0.0.1", 40000), "1"),
        ("closed", "on_disconnect", 1000, "bye"),
        ("adopted", "on_closed", 1006, ("127.0.0.1", 40000), "2"),
        ("adopted", "on_disconnect", 1006, ""),
    ]


def test_on_closed_failure_is_logged_and_the_connection_still_ends(caplog):
    def scenario(rig):
        def hook(conn):
            raise RuntimeError("node side failed")

        rig.hub.on_closed = hook
        conn = upgraded(rig, "a")
        conn.abort()
        rig.loop.run()

    with caplog.at_level("ERROR", logger="fastws"):
        rig = both(scenario)
    assert ("a", "on_disconnect", 1006, "") in rig.log
    assert sum("on_closed hook failed" in r.getMessage() for r in caplog.records) == 2   # once per implementation
    assert rig.hub.connections == {}


def test_rate_limit_settings_and_window():
    for impl in IMPLS:
        hub = load(impl).Hub(ManualLoop())
        assert hub.rate_window == (0, 0, 0) and hub.tick == 1.0          # off: no change to the wheel
        hub = load(impl).Hub(ManualLoop(), max_messages_per_second=10, rate_burst_seconds=1.0)
        assert hub.tick == 0.25 and hub.rate_window == (4, 10, 0)         # the tick follows the window
        hub = load(impl).Hub(ManualLoop(), max_bytes_per_second=1000, rate_burst_seconds=0.3, tick=0.25)
        assert hub.rate_window == (1, 0, 250)                             # rounded to whole ticks, >= 1
        hub = load(impl).Hub(ManualLoop(), max_messages_per_second=0.1, max_bytes_per_second=1 << 30,
                             rate_burst_seconds=3600, tick=1.0)
        assert hub.rate_window == (3600, 360, 4294967293)                 # capped: uint32 counters
        assert hub.rate_limited == {"messages": 0, "bytes": 0}


def test_rate_limit_messages():
    def scenario(rig):
        route = Route(rig)
        steady, flood = rig.adopt("steady", route), rig.adopt("flood", route)
        rig.loop.run()
        for second in range(5):                    # 8 a second, under the 10 allowed: never closed
            rig.feed("steady", b"".join(frame(TEXT, f"s{second}.{i}") for i in range(8)))
            rig.feed("flood", b"".join(frame(TEXT, f"f{second}.{i}") for i in range(10)))
            rig.loop.run()
            rig.loop.advance(1.0)
        assert not steady.closed and not flood.closed
        # 11 in one window: the 11th closes the connection, it and what follows are dropped
        rig.feed("flood", b"".join(frame(TEXT, f"over{i}") for i in range(14)))
        rig.loop.run()
        assert flood.state == frames.CLOSING and rig.hub.rate_limited == {"messages": 1, "bytes": 0}
        rig.feed("flood", frame(TEXT, "after the close") + close_frame(1008))
        rig.loop.run()
        rig.loop.advance(2.0)

    # no pings, no idle timeout: the wheel turns for the rate windows alone
    rig = both(scenario, handshake=None, max_messages_per_second=10, rate_burst_seconds=1.0,
               ping_interval=0, idle_timeout=0)
    flood = [p.decode() for op, p in rig.frames("flood") if op == TEXT]
    assert flood[-10:] == [f"over{i}" for i in range(10)] and "over10" not in flood
    assert close_codes(rig, "flood") == [tuple(errors.RATE_LIMITED)]
    assert ("flood", "on_disconnect", 1008, "") in rig.log
    assert not any(e[1] == "on_message" and e[2] in ("over10", "after the close") for e in rig.log)
    assert len([p for op, p in rig.frames("steady") if op == TEXT]) == 40
    assert rig.hub.stats()["rate_limited"] == {"messages": 1, "bytes": 0}
    assert rig.hub.stats()["closes"] == {1008: 1}


def test_rate_limit_bytes_counts_every_frame():
    def scenario(rig):
        route = Route(rig, echo=False)
        data, pings = rig.adopt("data", route), rig.adopt("pings", route)
        rig.loop.run()
        rig.feed("data", frame(BINARY, bytes(200)) * 4)        # 4 x 208 = 832 bytes: in
        rig.loop.run()
        rig.loop.advance(1.0)                                  # a new window
        rig.feed("data", frame(BINARY, bytes(200)) * 4)
        rig.loop.run()
        assert not data.closed
        rig.feed("data", frame(BINARY, bytes(200)))            # 1,040 bytes in this window: over
        rig.feed("pings", frame(PING, bytes(100)) * 9)         # 9 x 106 = 954: in
        rig.loop.run()
        assert not pings.closed
        rig.feed("pings", frame(PING, bytes(100)))             # control frames count too
        rig.loop.run()
        rig.loop.advance(6.0)                                  # no answer: aborted after close_timeout

    rig = both(scenario, handshake=None, max_bytes_per_second=1000, rate_burst_seconds=1.0,
               close_timeout=5.0)
    assert close_codes(rig, "data") == [tuple(errors.RATE_LIMITED)]
    assert close_codes(rig, "pings") == [tuple(errors.RATE_LIMITED)]
    assert len([1 for e in rig.log if e[0] == "data" and e[1] == "on_message"]) == 8
    assert ("data", "abort") in rig.log and ("pings", "abort") in rig.log
    assert rig.hub.stats()["rate_limited"] == {"messages": 0, "bytes": 2}


def latency_counts(hub):
    """route label -> observations, from hub.stats()."""
    return {label: h["count"] for label, h in hub.stats()["delivery_latency"].items()}


def test_delivery_latency_is_observed_per_route_per_connection_written():
    bounds = core.DELIVERY_LATENCY_BUCKETS
    assert load("cython").DELIVERY_LATENCY_BUCKETS == load("wsproto").DELIVERY_LATENCY_BUCKETS == bounds
    assert list(bounds) == sorted(bounds)
    assert (load("cython").DELIVERY_LATENCY_ROUTES == load("wsproto").DELIVERY_LATENCY_ROUTES
            == core.DELIVERY_LATENCY_ROUTES == 64)

    def scenario(rig):
        hub = rig.hub
        assert hub.stats()["delivery_latency"] == {}
        echo = upgraded(rig, "echo", path="/chat", route=Route(rig, path="/chat"))
        feed = Route(rig, echo=False, path="/feed")
        quiet = [rig.adopt(f"q{i}", feed, path="/feed") for i in range(18)]
        pathless = rig.adopt("pathless", Route(rig, echo=False), path="/any/thing")
        # a label per route (its path; "asgi" without one), in the order of the first accept
        assert list(hub.stats()["delivery_latency"]) == ["/chat", "/feed", "asgi"]
        assert latency_counts(hub) == {"/chat": 0, "/feed": 0, "asgi": 0}
        rig.feed("echo", frame(TEXT, "one") + frame(TEXT, "two"))    # one read, one reply write
        rig.loop.run()
        lat = hub.stats()["delivery_latency"]
        assert latency_counts(hub) == {"/chat": 1, "/feed": 0, "asgi": 0}
        assert lat["/chat"]["buckets"][-1] == 0
        chat = lat["/chat"]
        # a broadcast outside any read, flushed 30 ms later: 3 writes of >= 30 ms, all /feed's
        hub.broadcast("news", quiet[:3])
        time.sleep(0.03)
        rig.loop.run()
        lat = hub.stats()["delivery_latency"]
        assert latency_counts(hub) == {"/chat": 1, "/feed": 3, "asgi": 0}
        slow = sum(lat["/feed"]["buckets"][bounds.index(0.025) + 1:])
        assert slow == 3 and lat["/feed"]["sum"] >= 0.09
        assert lat["/chat"] == chat and lat["asgi"]["sum"] == 0
        # one flush of 20 connections of the three routes (past a group of 16):
        # each write lands in its own route's histogram
        hub.broadcast("all", [echo, *quiet, pathless])
        rig.loop.run()
        assert latency_counts(hub) == {"/chat": 2, "/feed": 21, "asgi": 1}
        # frames a paused connection holds are not observed when they go out
        quiet[0].pause_writing()
        hub.broadcast("held", quiet[:1])
        rig.loop.run()
        quiet[0].resume_writing()
        rig.loop.run()
        assert latency_counts(hub) == {"/chat": 2, "/feed": 21, "asgi": 1}
        assert quiet[0].closed is False

    both(scenario)


def test_delivery_latency_routes_past_the_slots_share_other():
    def scenario(rig):
        hub = rig.hub
        # 70 routes: the first 63 labels get a histogram each, the other 7 share "other";
        # a route whose path is "other" itself shares that entry
        paths = ["other"] + [f"/r{i}" for i in range(1, 70)]
        conns = [rig.adopt(f"c{i}", Route(rig, echo=False, path=p), path="/x") for i, p in enumerate(paths)]
        hub.broadcast("x", conns)
        rig.loop.run()
        counts = latency_counts(hub)
        assert list(counts) == paths[:63]
        assert counts == {**{p: 1 for p in paths[1:63]}, "other": 1 + 7}
        assert len(hub.stats()["delivery_latency"]) == core.DELIVERY_LATENCY_ROUTES - 1

    both(scenario)
