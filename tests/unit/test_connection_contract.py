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
        self.tls = False

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
                 on_open=None):
        self.rig = rig
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
        if self.echo:
            conn.send(message)

    async def _async_message(self, conn, message):
        self._message(conn, message)

    def on_disconnect(self, conn, code, reason):
        self.rig.log.append((self.rig.name_of(conn), "on_disconnect", code, reason))


class Rig:
    """One implementation's hub, its connections and what they did."""

    def __init__(self, impl, **settings):
        self.impl = impl
        self.mod = load(impl)
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

    def _callback_error(self, conn, exc):
        self.log.append((self.name_of(conn), "callback_error", type(exc).__name__, str(exc)))

    def name_of(self, conn):
        return self._names.get(id(conn), "?")

    # -- the handshake a native front would run ---------------------------------------

    def handshake(self, conn, head):
        name = self.name_of(conn)
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
        """Bytes from the peer, read the way uvloop reads them."""
        conn = self.conns[name]
        for piece in split(data, chunking):
            while piece:
                buf = conn.get_buffer(-1)
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
        state = {name: (c.closed, c.close_code, c.close_reason, c.id, c.dropped)
                 for name, c in self.conns.items()}
        return {"log": self.log, "received": self.received, "stats": hub.stats(),
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
    (c, tc), (p, tp) = rigs["cython"], rigs["wsproto"]
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
        assert rig.hub.connections[conn.id] is conn
        rig.feed("a", frame(TEXT, "second"))
        rig.loop.run()

    rig = both(scenario, handshake=None)
    assert rig.frames("a") == [(PONG, b"p"), (TEXT, b"first"), (TEXT, b"second")] or \
        rig.frames("a") == [(TEXT, b"first"), (PONG, b"p"), (TEXT, b"second")]
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
