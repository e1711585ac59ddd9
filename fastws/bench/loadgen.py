"""A neutral WebSocket load generator: raw uvloop sockets, no fastws code.

It shares nothing with the server it measures. It writes its own upgrade
request, sends frames that were masked once in advance, and checks every frame
it receives:

* echo-type scenarios compare the reply stream byte for byte with the frame a
  correct server must send back (header + payload, unmasked, minimal length
  encoding); a mismatch falls back to ``FrameParser``, a minimal RFC 6455
  client-side parser (RSV bits, opcodes, control-frame rules, fragments,
  masking), so a server that fragments or pings is still judged correctly;
* fan-out subscribers parse every frame and check the sequence number;
* with ``--protocol sio`` they are minimal Socket.IO v5 / Engine.IO v4
  clients on a raw WebSocket (open packet, namespace CONNECT, ping/pong,
  events and binary attachments), checked frame by frame the same way;
* with ``--deflate`` (echo, fanout) every client offers permessage-deflate
  (RFC 7692) and fails unless the server accepts it; messages are 512-byte
  JSON ticks, sent compressed, and every message received is inflated and
  checked byte for byte (echo: the message sent; fan-out: the tick its
  sequence number and send time make).

* with ``--tls`` every connection is a TLS connection (``wss://``): the
  client's ``SSLContext`` verifies nothing (the servers measured use a
  self-signed certificate made for the run) and every scenario runs on it
  unchanged (the handshake scenario then times a full TLS + WebSocket
  handshake per connection). ``--procs N`` spreads echo and handshake
  clients over N processes too (fan-out and memory already spread theirs).

``crossnode`` spreads the subscribers over two servers (``--port``,
``--port-b``) that share rooms through a broker, publishes on the first and
counts a message as acknowledged once a subscriber on the second also got it.

One scenario per command, one JSON line on stdout::

    python -m fastws.bench.loadgen echo --port 9001 [--conns 64 --window 16 --size 32]
    python -m fastws.bench.loadgen echo --port 9001 --deflate --size 512
    python -m fastws.bench.loadgen latency --port 9001
    python -m fastws.bench.loadgen fanout --port 9001 --subscribers 1000
    python -m fastws.bench.loadgen crossnode --port 9001 --port-b 9002 --subscribers 2000 [--protocol sio]
    python -m fastws.bench.loadgen memory --port 9001 --conns 10000 --server-pid PID
    python -m fastws.bench.loadgen handshake --port 9001 --conns 5000
    python -m fastws.bench.loadgen large --port 9001 --size 65536
    python -m fastws.bench.loadgen echo --port 9443 --tls --procs 2

Every loop is bounded by a count and by a duration and stops by itself. All
traffic goes to the loopback host given (127.0.0.1 by default); with many
connections the generator spreads them over processes (``--procs``) and over
loopback source addresses 127.0.0.2, 127.0.0.3, ... (``--src-addrs``).

The handshake uses one fixed ``Sec-WebSocket-Key`` for every connection, so
the request is built once and the raw uvloop peer can answer with a fixed
101; the ``Sec-WebSocket-Accept`` of every answer is still checked.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import hashlib
import json
import math
import multiprocessing
import os
import random
import resource
import socket
import ssl
import struct
import sys
import time
import zlib

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = base64.b64encode(
    hashlib.sha1((KEY + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
)

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
CONNS_PER_SOURCE = 20000  # below the 28k ephemeral ports of one (src, dst) pair

now_ns = time.monotonic_ns  # CLOCK_MONOTONIC: comparable across processes

#: ``--tls``: the client context of every connection (None: plain TCP). Set
#: once in ``main`` before any child process is forked, so children share it.
TLS_CONTEXT: ssl.SSLContext | None = None
#: the protocol version and cipher of the first TLS connection of this process
TLS_INFO: dict = {}


def tls_client_context() -> ssl.SSLContext:
    """A client context that accepts any certificate (the benchmark's servers
    use a self-signed one made for the run; there is nothing to verify on a
    loopback measurement) and otherwise keeps Python's defaults (TLS 1.2+)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --------------------------------------------------------------------- frames


def upgrade_request(host: str, port: int, path: str, deflate: bool = False) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {KEY}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        + (f"Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n" if deflate else "")
        + "\r\n"
    ).encode()


def xor_mask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        n, "little"
    )


def _header(opcode: int, n: int, masked: bool) -> bytes:
    b0 = 0x80 | opcode
    m = 0x80 if masked else 0
    if n < 126:
        return struct.pack("!BB", b0, m | n)
    if n < 65536:
        return struct.pack("!BBH", b0, m | 126, n)
    return struct.pack("!BBQ", b0, m | 127, n)


def client_frame(opcode: int, payload: bytes, mask: bytes) -> bytes:
    """A masked, final frame as a client must send it."""
    return _header(opcode, len(payload), True) + mask + xor_mask(payload, mask)


def server_frame(opcode: int, payload: bytes) -> bytes:
    """The unmasked, final frame a server must send for ``payload``."""
    return _header(opcode, len(payload), False) + payload


class ProtocolError(Exception):
    pass


class FrameParser:
    """Minimal RFC 6455 parser for frames a server sends to a client.

    ``feed(data)`` returns complete messages and control frames as
    ``(opcode, payload)``; any violation raises ``ProtocolError``. Masked
    frames are refused unless ``allow_masked`` (the raw echo peer sends the
    client's own masked frames back).
    """

    def __init__(self, allow_masked: bool = False) -> None:
        self.buf = bytearray()
        self.allow_masked = allow_masked
        self.frag_op: int | None = None
        self.frags: list[bytes] = []

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self.buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            if b0 & 0x70:
                raise ProtocolError("reserved bits set")
            op = b0 & 0x0F
            fin = b0 & 0x80
            ln = b1 & 0x7F
            hl = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                hl = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hl = 10
            masked = b1 & 0x80
            if masked:
                if not self.allow_masked:
                    raise ProtocolError("masked frame from the server")
                hl += 4
            if n - pos < hl + ln:
                break
            payload = bytes(buf[pos + hl : pos + hl + ln])
            if masked:
                payload = xor_mask(payload, bytes(buf[pos + hl - 4 : pos + hl]))
            pos += hl + ln
            if op >= 8:
                if op not in (CLOSE, PING, PONG):
                    raise ProtocolError(f"unknown control opcode {op:#x}")
                if not fin or ln > 125:
                    raise ProtocolError("bad control frame")
                out.append((op, payload))
            elif op == 0:
                if self.frag_op is None:
                    raise ProtocolError("continuation without a start")
                self.frags.append(payload)
                if fin:
                    out.append((self.frag_op, b"".join(self.frags)))
                    self.frag_op = None
                    self.frags = []
            elif op in (TEXT, BINARY):
                if self.frag_op is not None:
                    raise ProtocolError("new data frame inside a fragmented message")
                if fin:
                    out.append((op, payload))
                else:
                    self.frag_op = op
                    self.frags = [payload]
            else:
                raise ProtocolError(f"unknown opcode {op:#x}")
        del buf[:pos]
        return out


# ------------------------------------------------------------------ clients


class Stats:
    """Errors shared by all clients of one process (first few kept)."""

    def __init__(self) -> None:
        self.errors = 0
        self.first_errors: list[str] = []
        self.lost = 0

    def error(self, msg: str) -> None:
        self.errors += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(msg)


class Client(asyncio.Protocol):
    """Upgrade, then hand every received chunk to ``on_data``."""

    def __init__(self, request: bytes, stats: Stats, mask: bytes) -> None:
        self.request = request
        self.stats = stats
        self.mask = mask
        self.transport = None
        self.upgraded = False
        self.closed = False
        self.closing = False
        self.head = b""
        self.extensions = None  # the 101's Sec-WebSocket-Extensions (None: none)
        self.opened = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            self.on_data(data)
            return
        head = self.head + data
        i = head.find(b"\r\n\r\n")
        if i < 0:
            if len(head) > 16384:
                self.fail("response head too long")
            self.head = head
            return
        self.head = b""
        status, _, rest = head[:i].partition(b"\r\n")
        if not status.startswith(b"HTTP/1.1 101"):
            self.fail(f"upgrade refused: {status[:60]!r}")
            return
        accept = None
        for line in rest.split(b"\r\n"):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"sec-websocket-accept":
                accept = value.strip()
            elif name == b"sec-websocket-extensions":
                ext = value.strip().decode("latin-1")
                self.extensions = f"{self.extensions}, {ext}" if self.extensions else ext
        if accept != ACCEPT:
            self.fail(f"bad Sec-WebSocket-Accept {accept!r}")
            return
        self.upgraded = True
        self.on_upgraded()
        tail = head[i + 4 :]
        if tail:
            self.on_data(tail)

    def on_upgraded(self) -> None:
        """The 101 was checked: the connection counts as open (a subclass
        with its own opening exchange, like Socket.IO, resolves later)."""
        if not self.opened.done():
            self.opened.set_result(self)

    def on_data(self, data: bytes) -> None:  # pragma: no cover - overridden
        pass

    def handle_control(self, op: int, payload: bytes) -> bool:
        """Answer pings, ignore pongs; a close from the server is an error."""
        if op == PING:
            self.transport.write(client_frame(PONG, payload, self.mask))
            return True
        if op == PONG:
            return True
        if op == CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            if not self.closing:
                self.stats.error(f"server closed the connection: {code} {payload[2:80]!r}")
            self.closing = True
            self.transport.close()
            return True
        return False

    def fail(self, msg: str) -> None:
        self.stats.error(msg)
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(msg))
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Send a close frame (1000) and close our side."""
        if self.transport is not None and not self.closed:
            self.closing = True
            try:
                self.transport.write(client_frame(CLOSE, b"\x03\xe8", self.mask))
                self.transport.close()
            except Exception:  # already gone
                pass

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"connection lost: {exc}"))
        elif not self.closing:
            self.stats.lost += 1


class EchoClient(Client):
    """Keeps ``window`` identical messages in flight; checks each echo.

    Fast path: the received bytes must equal k copies of the expected server
    frame (one bytes comparison). Anything else goes through FrameParser.
    """

    def __init__(self, request, stats, mask, frame, expect, window, allow_masked):
        super().__init__(request, stats, mask)
        self.frame = frame
        self.expect = expect
        self.flen = len(expect)
        self.window = window
        self.send_blocks = [frame * k for k in range(window + 1)]
        self.expect_blocks = [expect * k for k in range(window + 1)]
        self.tail = b""
        self.sent = 0
        self.received = 0
        self.running = True
        self.parser: FrameParser | None = None
        self.allow_masked = allow_masked
        self.payload = None

    def start(self) -> None:
        self.transport.write(self.send_blocks[self.window])
        self.sent += self.window

    def on_data(self, data: bytes) -> None:
        if self.parser is None:
            if self.tail:
                data = self.tail + data
            flen = self.flen
            k = len(data) // flen
            end = k * flen
            if k <= self.window and (
                (data if end == len(data) else data[:end]) == self.expect_blocks[k]
            ):
                self.tail = data[end:] if end != len(data) else b""
                if k:
                    self.got(k)
                return
            # Not the canonical byte stream: parse and check frame by frame.
            self.parser = FrameParser(self.allow_masked)
            self.payload = FrameParser(True).feed(self.expect)[0]
            self.tail = b""
        try:
            msgs = self.parser.feed(data)
        except ProtocolError as e:
            self.fail(f"protocol error: {e}")
            return
        k = 0
        for op, payload in msgs:
            if op >= 8:
                self.handle_control(op, payload)
            elif (op, payload) == self.payload:
                k += 1
            else:
                self.fail(f"wrong echo: opcode {op}, {len(payload)} bytes")
                return
        if k:
            self.got(k)

    def got(self, k: int) -> None:
        self.received += k
        if self.received > self.sent:
            self.fail("more echoes than messages sent")
            return
        if self.running:
            while k > self.window:
                self.transport.write(self.send_blocks[self.window])
                k -= self.window
                self.sent += self.window
            self.transport.write(self.send_blocks[k])
            self.sent += k


class PingPongClient(EchoClient):
    """One message in flight; records every round trip (after warm-up)."""

    def __init__(self, *a, max_rounds, deadline_ns, warmup):
        super().__init__(*a)
        self.samples = array.array("q")
        self.max_rounds = max_rounds
        self.deadline_ns = deadline_ns
        self.warmup = warmup
        self.t0 = 0
        self.done = asyncio.get_running_loop().create_future()

    def start(self) -> None:
        self.t0 = now_ns()
        self.transport.write(self.frame)
        self.sent = 1

    def got(self, k: int) -> None:
        t = now_ns()
        self.received += k
        if k != 1 or self.received > self.sent:
            self.fail("more echoes than messages sent")
            return
        if self.received > self.warmup:
            self.samples.append(t - self.t0)
        if len(self.samples) >= self.max_rounds or t >= self.deadline_ns:
            if not self.done.done():
                self.done.set_result(None)
            return
        self.t0 = now_ns()
        self.transport.write(self.frame)
        self.sent += 1


class LargeClient(EchoClient):
    """One large message in flight; the reply is compared as a byte stream."""

    def __init__(self, *a):
        super().__init__(*a)
        self.off = 0

    def start(self) -> None:
        self.transport.write(self.send_blocks[self.window])
        self.sent = self.window

    def on_data(self, data: bytes) -> None:
        if self.parser is not None:
            return EchoClient.on_data(self, data)
        expect = self.expect
        flen = self.flen
        pos = 0
        n = len(data)
        while pos < n:
            take = min(n - pos, flen - self.off)
            chunk = data if (pos == 0 and take == n) else data[pos : pos + take]
            if chunk != expect[self.off : self.off + take]:
                # Fall back to the parser from the start of this message.
                self.parser = FrameParser(self.allow_masked)
                self.payload = FrameParser(True).feed(expect)[0]
                self.parser.feed(expect[: self.off])
                self.off = 0
                return EchoClient.on_data(self, data[pos:])
            self.off += take
            pos += take
            if self.off == flen:
                self.off = 0
                self.got(1)

    def got(self, k: int) -> None:
        self.received += k
        if self.received > self.sent:
            self.fail("more echoes than messages sent")
            return
        if self.running:
            self.transport.write(self.frame)
            self.sent += 1


_FRAME_STRUCTS: dict = {}


class Subscriber(Client):
    """Counts relayed messages: payload = seq (u64) + publish time (u64) + filler."""

    def __init__(self, request, stats, mask, expect_len, sample):
        super().__init__(request, stats, mask)
        self.parser = FrameParser()
        self.next_seq = 0
        self.expect_len = expect_len
        self.sample = sample  # array to record latencies into, or None
        self.last_ns = 0
        self.waiter = None  # (count, future): resolved when next_seq reaches count
        self.progress = None  # called after each read that delivered messages (a publisher's pump)
        self.slow = expect_len < 16 or expect_len > 125
        self.rest = b""
        self.head2 = bytes([0x82, expect_len]) if not self.slow else b""

    def on_data(self, data: bytes) -> None:
        t = now_ns()
        if not self.slow:
            # Fast path: whole frames of the expected shape, checked by one
            # struct unpack per read (header bytes, length, sequence).
            if self.rest:
                data = self.rest + data
            flen = self.expect_len + 2
            n = len(data) // flen
            end = n * flen
            if n:
                st = _FRAME_STRUCTS.get((n, self.expect_len))
                if st is None:
                    st = _FRAME_STRUCTS[(n, self.expect_len)] = struct.Struct(
                        "<" + f"BBQQ{self.expect_len - 16}x" * n
                    )
                vals = st.unpack_from(data)
                seq0 = self.next_seq
                if (
                    vals[0::4].count(0x82) == n
                    and vals[1::4].count(self.expect_len) == n
                    and vals[2::4] == tuple(range(seq0, seq0 + n))
                ):
                    self.next_seq = seq0 + n
                    if self.sample is not None:
                        for sent_ns in vals[3::4]:
                            self.sample.append(t - sent_ns)
                    self.rest = data[end:] if end != len(data) else b""
                    self.last_ns = t
                    self.on_delivered()
                    return
            elif len(data) < flen and (len(data) < 2 or data[:2] == self.head2):
                self.rest = data
                return
            # Anything else (control frames, fragments, errors): full parser.
            self.slow = True
            self.rest = b""
        try:
            msgs = self.parser.feed(data)
        except ProtocolError as e:
            self.fail(f"protocol error: {e}")
            return
        for op, payload in msgs:
            if op >= 8:
                self.handle_control(op, payload)
                continue
            if op != BINARY or len(payload) != self.expect_len:
                self.fail(f"unexpected message: opcode {op}, {len(payload)} bytes")
                return
            seq, sent_ns = struct.unpack_from("<QQ", payload)
            if not self.delivered(seq, sent_ns, t):
                return
        self.last_ns = t
        self.on_delivered()

    def delivered(self, seq: int, sent_ns: int, t: int) -> bool:
        """One checked message: it must be the next in sequence."""
        if seq != self.next_seq:
            self.fail(f"out of order or missing: got seq {seq}, expected {self.next_seq}")
            return False
        self.next_seq = seq + 1
        if self.sample is not None:
            self.sample.append(t - sent_ns)
        return True

    def on_delivered(self) -> None:
        w = self.waiter
        if w is not None and (self.next_seq >= w[0] or self.closed) and not w[1].done():
            w[1].set_result(None)
        if self.progress is not None:
            self.progress()

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        w = self.waiter  # a lost subscriber will get nothing more: stop waiting for it
        if w is not None and not w[1].done():
            w[1].set_result(None)

    def publish_frames(self, seq: int, t: int, size: int) -> bytes:
        """What a publisher of this protocol writes for message ``seq``."""
        return client_frame(BINARY, struct.pack("<QQ", seq, t) + bytes(size - 16), self.mask)


# Engine.IO v4 / Socket.IO v5 over a raw WebSocket (no polling, no upgrade):
# the server opens with ``0{json}``, the client joins the default namespace
# with ``40``, the server answers ``40{"sid": ...}``; events are ``42[...]``;
# a binary event is ``451-[..., {"_placeholder": true, "num": 0}]`` followed by
# the attachment as a binary frame; the server pings with ``2``, the client
# answers ``3``; ``6`` is a no-op.
SIO_PATH = "/socket.io/?EIO=4&transport=websocket"
SIO_EVENT = b'42["msg","'
SIO_END = b'"]'
SIO_BINARY_EVENT = b'451-["msg",{"_placeholder":true,"num":0}]'


class SioSubscriber(Subscriber):
    """A Socket.IO client on a raw WebSocket that checks every event.

    Text mode: each event is ``42["msg","<seq:016x><send time ns:016x><filler>"]``
    (a string of ``expect_len`` characters); binary mode (``binary = True``):
    ``451-["msg",{placeholder}]`` + a binary frame with the same payload as
    :class:`Subscriber` (seq u64 + send time u64 + zeros). Every frame goes
    through :class:`FrameParser`; any other packet, or a sequence gap, fails
    the connection. ``opened`` resolves on the namespace CONNECT answer.
    """

    binary = False

    def __init__(self, request, stats, mask, expect_len, sample):
        super().__init__(request, stats, mask, expect_len, sample)
        self.slow = True  # always the full parser
        self.eio_open = False  # got ``0{...}``
        self.connected = False  # got ``40{...}``
        self.attachment = False  # a binary event header came; its attachment is next
        self.text_len = len(SIO_EVENT) + expect_len + len(SIO_END)
        self.filler = b"." * (expect_len - 32)
        self.pong = client_frame(TEXT, b"3", mask)

    def on_upgraded(self) -> None:
        pass  # open once the server accepted the namespace CONNECT

    def on_data(self, data: bytes) -> None:
        t = now_ns()
        try:
            msgs = self.parser.feed(data)
        except ProtocolError as e:
            self.fail(f"protocol error: {e}")
            return
        got = False
        for op, p in msgs:
            if op >= 8:
                self.handle_control(op, p)
                continue
            if op == BINARY:
                if not self.attachment:
                    self.fail("binary frame without a binary event header")
                    return
                self.attachment = False
                if len(p) != self.expect_len:
                    self.fail(f"attachment of {len(p)} bytes, expected {self.expect_len}")
                    return
                seq, sent_ns = struct.unpack_from("<QQ", p)
            elif self.attachment:
                self.fail(f"text frame {p[:40]!r} where the binary attachment was due")
                return
            elif p == b"2":  # Engine.IO ping
                self.transport.write(self.pong)
                continue
            elif not self.connected:
                if not self.handshake(p):
                    return
                continue
            elif self.binary and p == SIO_BINARY_EVENT:
                self.attachment = True
                continue
            elif (not self.binary and len(p) == self.text_len and p.startswith(SIO_EVENT)
                  and p.endswith(SIO_END)):
                body = p[len(SIO_EVENT): -len(SIO_END)]
                if body[:16] != b"%016x" % self.next_seq:
                    self.fail(f"out of order or missing: got {body[:16]!r}, expected seq {self.next_seq}")
                    return
                if body[32:] != self.filler:
                    self.fail("event payload changed in transit")
                    return
                try:
                    seq, sent_ns = self.next_seq, int(body[16:32], 16)
                except ValueError:
                    self.fail(f"bad timestamp in event {body[:40]!r}")
                    return
            elif p == b"6":  # Engine.IO no-op
                continue
            else:
                self.fail(f"unexpected Engine.IO/Socket.IO packet {p[:60]!r}")
                return
            if not self.delivered(seq, sent_ns, t):
                return
            got = True
        if got:
            self.last_ns = t
            self.on_delivered()

    def handshake(self, p: bytes) -> bool:
        """``0{open}`` -> send ``40``; ``40{"sid"}`` -> open. False on failure."""
        try:
            if not self.eio_open:
                info = json.loads(p[1:]) if p[:2] == b"0{" else None
                if not (isinstance(info, dict) and isinstance(info.get("sid"), str)
                        and isinstance(info.get("pingInterval"), int)):
                    raise ValueError("expected the Engine.IO open packet 0{sid, pingInterval, ...}")
                self.eio_open = True
                self.transport.write(client_frame(TEXT, b"40", self.mask))
                return True
            if p[:3] == b"40{":
                info = json.loads(p[2:])
                if not (isinstance(info, dict) and isinstance(info.get("sid"), str)):
                    raise ValueError("CONNECT answer without a sid")
                self.connected = True
                if not self.opened.done():
                    self.opened.set_result(self)
                return True
            if p[:2] == b"44":
                raise ValueError(f"namespace CONNECT refused: {p[:80]!r}")
            raise ValueError(f"unexpected packet before CONNECT: {p[:60]!r}")
        except ValueError as e:  # json.JSONDecodeError is one
            self.fail(f"socket.io handshake: {e}")
            return False

    def publish_frames(self, seq: int, t: int, size: int) -> bytes:
        if self.binary:
            return (client_frame(TEXT, SIO_BINARY_EVENT, self.mask)
                    + client_frame(BINARY, struct.pack("<QQ", seq, t) + bytes(size - 16), self.mask))
        return client_frame(TEXT, SIO_EVENT + b"%016x%016x" % (seq, t) + self.filler + SIO_END, self.mask)


class SioBinarySubscriber(SioSubscriber):
    binary = True


class _Publishing:
    """A subscriber that publishes; its own copies are acknowledgements.

    At most ``window`` messages are unacknowledged (not rate-limited). With
    witnesses (subscribers on another node), a message counts as
    acknowledged only once its own copy and every witness's copy arrived, so
    the window bounds what is in flight across nodes too.
    """

    def __init__(self, *a, window, size, max_msgs, deadline_ns, rate):
        super().__init__(*a)
        self.window = window
        self.size = size
        self.max_msgs = max_msgs
        self.deadline_ns = deadline_ns
        self.rate = rate
        self.published = 0
        self.first_ns = 0
        self.finished = asyncio.get_running_loop().create_future()
        self.timer = None
        self.witnesses: list = []

    def watch(self, witness) -> None:
        self.witnesses.append(witness)
        witness.progress = self.pump

    def publish_one(self) -> None:
        t = now_ns()
        if self.published >= self.max_msgs or t >= self.deadline_ns:
            if not self.finished.done():
                self.finished.set_result(self.published)
            return
        if not self.published:
            self.first_ns = t
        self.transport.write(self.publish_frames(self.published, t, self.size))
        self.published += 1

    def start(self) -> None:
        if self.rate:
            self.interval = 1e9 / self.rate
            self.tick()
        else:
            self.pump()

    def tick(self) -> None:
        if self.finished.done():
            return
        self.publish_one()
        if not self.finished.done():
            due = self.first_ns + self.published * self.interval
            delay = max(0.0, (due - now_ns()) / 1e9)
            self.timer = asyncio.get_running_loop().call_later(delay, self.tick)

    def pump(self) -> None:
        if self.rate or self.finished.done() or self.transport is None:
            return
        acked = self.next_seq
        for w in self.witnesses:
            acked = min(acked, w.next_seq)
        while self.published - acked < self.window and not self.finished.done():
            self.publish_one()

    def on_delivered(self) -> None:
        self.pump()
        super().on_delivered()


class Publisher(_Publishing, Subscriber):
    pass


class SioPublisher(_Publishing, SioSubscriber):
    pass


class SioBinaryPublisher(_Publishing, SioBinarySubscriber):
    pass


# --protocol: (subscriber class, publisher class, default path)
PROTOCOLS = {
    "ws": (Subscriber, Publisher, "/room"),
    "sio": (SioSubscriber, SioPublisher, SIO_PATH),
    "sio-binary": (SioBinarySubscriber, SioBinaryPublisher, SIO_PATH),
}


# permessage-deflate (RFC 7692), ``--deflate``: the client offers the
# extension (letting the server choose client_max_window_bits), sends every
# message compressed on its own (RSV1, raw deflate, the 00 00 ff ff tail
# stripped; a full flush after each message, so it never refers to an earlier
# one: always allowed, client_no_context_takeover or not) and inflates every
# message received: one decompressor per connection carried from message to
# message, or a fresh one per message when the server said
# server_no_context_takeover. A server that declines the extension fails the
# connection. Messages are JSON ticks of --size bytes, realistic and
# compressible, every one different: its text follows from its sequence number
# and send time, so each received message is checked byte for byte.
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
DEFLATE_TAIL = b"\x00\x00\xff\xff"
DEFLATE_MIN_SIZE = 256  # the tick's fields take ~150 bytes; the rest is padding
_TICK_HEAD = b'{"type":"tick","seq":'
_TICK_SYMBOLS = (b"AAPL", b"MSFT", b"NVDA", b"AMZN", b"GOOG", b"META", b"TSLA", b"AVGO")
_TICK_WORDS = (b"bid ask last open high low close volume trade quote auction halt resume index spread "
               b"venue session block odd-lot imbalance").split()
_TICK_PAD = b" ".join(random.Random(7).choices(_TICK_WORDS, k=4000))
ECHO_RING = 1024  # distinct echo messages (each connection starts at its own place in the ring)
#: no server context takeover: inflating is a function of the compressed bytes
#: alone, so a fan-out subscriber process checks each distinct message once
#: (every subscriber still checks its sequence number); bounded
_CHECKED: dict = {}


def tick_payload(seq: int, t: int, size: int) -> bytes:
    """The JSON tick number ``seq`` sent at ``t`` (ns), exactly ``size`` bytes."""
    c = 10000 + (seq * 7919) % 90000  # cents
    head = (b'{"type":"tick","seq":%d,"t":%d,"symbol":"%s","price":%d.%02d,"bid":%d.%02d,"ask":%d.%02d,'
            b'"qty":%d,"pad":"' % (seq, t, _TICK_SYMBOLS[seq % 8], c // 100, c % 100, (c - 1) // 100,
                                  (c - 1) % 100, (c + 1) // 100, (c + 1) % 100, 100 * (1 + seq % 50)))
    off = (seq * 61) % (len(_TICK_PAD) - size)
    return head + _TICK_PAD[off:off + size - len(head) - 2] + b'"}'


def tick_fields(text: bytes, size: int) -> tuple[int, int] | None:
    """(seq, send time) of a correct tick of ``size`` bytes, else None."""
    if len(text) != size or not text.startswith(_TICK_HEAD):
        return None
    try:
        _, s, t, _ = text.split(b",", 3)
        seq, sent = int(s[6:]), int(t[4:])
    except ValueError:
        return None
    return (seq, sent) if tick_payload(seq, sent, size) == text else None


def negotiate_deflate(header: str | None) -> dict:
    """The permessage-deflate parameters the server answered; ValueError if
    it declined the extension or answered something not allowed."""
    if not header:
        raise ValueError("the server declined permessage-deflate (no Sec-WebSocket-Extensions in its 101)")
    exts = [e.strip() for e in header.split(",") if e.strip()]
    name, *params = [p.strip() for p in exts[0].split(";")]
    if len(exts) != 1 or name.lower() != "permessage-deflate":
        raise ValueError(f"the server answered Sec-WebSocket-Extensions: {header!r} to a permessage-deflate offer")
    out = {"server_no_context_takeover": False, "client_no_context_takeover": False,
           "server_max_window_bits": 15, "client_max_window_bits": 15}
    seen = set()
    for p in params:
        k, eq, v = p.partition("=")
        k, v = k.strip().lower(), v.strip().strip('"')
        if k not in out or k in seen or (k.endswith("takeover") and eq):
            raise ValueError(f"bad permessage-deflate parameter {p!r} in {header!r}")
        seen.add(k)
        if k.endswith("window_bits"):
            if not (v.isdigit() and 8 <= int(v) <= 15):
                raise ValueError(f"bad permessage-deflate parameter {p!r} in {header!r}")
            out[k] = int(v)
        else:
            out[k] = True
    if out["client_max_window_bits"] < 9:
        # zlib cannot make a raw deflate stream with a 256-byte window
        raise ValueError(f"client_max_window_bits={out['client_max_window_bits']} is not supported by this client")
    return out


def deflate_frame(compressed: bytes, mask: bytes) -> bytes:
    """A masked, final, compressed (RSV1) text frame."""
    h = _header(TEXT, len(compressed), True)
    return bytes([h[0] | 0x40]) + h[1:] + mask + xor_mask(compressed, mask)


def deflate_message(compressor, payload: bytes) -> bytes:
    """``payload`` compressed on its own (full flush), the 00 00 ff ff tail stripped."""
    data = compressor.compress(payload) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert data.endswith(DEFLATE_TAIL)
    return data[:-4]


class DeflateParser(FrameParser):
    """FrameParser for a permessage-deflate connection: RSV1 on the first
    frame of a data message marks it compressed; messages come out as
    ``(opcode, payload, compressed)``."""

    def __init__(self) -> None:
        super().__init__()
        self.frag_rsv1 = False

    def feed(self, data: bytes) -> list[tuple[int, bytes, bool]]:
        buf = self.buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            if b0 & 0x30:
                raise ProtocolError("RSV2/RSV3 set")
            if b1 & 0x80:
                raise ProtocolError("masked frame from the server")
            rsv1 = bool(b0 & 0x40)
            op = b0 & 0x0F
            fin = b0 & 0x80
            ln = b1
            hl = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                hl = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hl = 10
            if n - pos < hl + ln:
                break
            payload = bytes(buf[pos + hl : pos + hl + ln])
            pos += hl + ln
            if op >= 8:
                if op not in (CLOSE, PING, PONG):
                    raise ProtocolError(f"unknown control opcode {op:#x}")
                if not fin or ln > 125 or rsv1:
                    raise ProtocolError("bad control frame")
                out.append((op, payload, False))
            elif op == 0:
                if self.frag_op is None or rsv1:
                    raise ProtocolError("continuation without a start, or with RSV1")
                self.frags.append(payload)
                if fin:
                    out.append((self.frag_op, b"".join(self.frags), self.frag_rsv1))
                    self.frag_op = None
                    self.frags = []
            elif op in (TEXT, BINARY):
                if self.frag_op is not None:
                    raise ProtocolError("new data frame inside a fragmented message")
                if fin:
                    out.append((op, payload, rsv1))
                else:
                    self.frag_op = op
                    self.frag_rsv1 = rsv1
                    self.frags = [payload]
            else:
                raise ProtocolError(f"unknown opcode {op:#x}")
        del buf[:pos]
        return out


class _Inflating:
    """Client side of permessage-deflate: checks the 101's answer, inflates."""

    deflate: dict | None = None  # the negotiated parameters
    compressed = 0  # data messages received compressed

    def on_upgraded(self) -> None:
        try:
            self.deflate = negotiate_deflate(self.extensions)
        except ValueError as e:
            self.fail(str(e))
            return
        self.takeover = not self.deflate["server_no_context_takeover"]
        self.inflater = zlib.decompressobj(-15)
        super().on_upgraded()

    def inflate(self, payload: bytes) -> bytes:
        d = self.inflater if self.takeover else zlib.decompressobj(-15)
        out = d.decompress(payload + DEFLATE_TAIL)
        if d.eof:  # a final block: the next message starts a new stream
            self.inflater = zlib.decompressobj(-15)
        return out


class DeflateEchoClient(_Inflating, Client):
    """``window`` compressed JSON ticks in flight, taken in turn from a ring
    of ``ECHO_RING`` pre-compressed frames from ``offset`` on; every echo is
    inflated (when compressed) and compared with the tick sent."""

    def __init__(self, request, stats, mask, frames, payloads, window, offset):
        super().__init__(request, stats, mask)
        self.frames = frames  # ECHO_RING + window frames (the ring, wrapped)
        self.payloads = payloads
        self.window = window
        self.next_send = offset
        self.next_recv = offset
        self.parser = DeflateParser()
        self.sent = 0
        self.received = 0
        self.running = True

    def send(self, k: int) -> None:
        i = self.next_send
        while k > 0:
            m = min(k, self.window)
            self.transport.write(b"".join(self.frames[i : i + m]))
            i = (i + m) % ECHO_RING
            self.sent += m
            k -= m
        self.next_send = i

    def start(self) -> None:
        self.send(self.window)

    def on_data(self, data: bytes) -> None:
        if self.deflate is None:
            return
        try:
            msgs = self.parser.feed(data)
        except ProtocolError as e:
            self.fail(f"protocol error: {e}")
            return
        k = 0
        for op, payload, comp in msgs:
            if op >= 8:
                self.handle_control(op, payload)
                continue
            if comp:
                try:
                    payload = self.inflate(payload)
                except zlib.error as e:
                    self.fail(f"inflate failed: {e}")
                    return
                self.compressed += 1
            want = self.payloads[self.next_recv]
            if op != TEXT or payload != want:
                self.fail(f"wrong echo: opcode {op}, {len(payload)} bytes {payload[:48]!r}, "
                          f"expected {want[:48]!r}")
                return
            self.next_recv = (self.next_recv + 1) % ECHO_RING
            k += 1
        if k:
            self.received += k
            if self.received > self.sent:
                self.fail("more echoes than messages sent")
                return
            if self.running:
                self.send(k)


class DeflateSubscriber(_Inflating, Subscriber):
    """A fan-out subscriber of compressed JSON ticks (``expect_len`` bytes
    each once inflated), checked byte for byte and in sequence."""

    def __init__(self, request, stats, mask, expect_len, sample):
        super().__init__(request, stats, mask, expect_len, sample)
        self.slow = True
        self.parser = DeflateParser()
        self.compressor = None

    def on_data(self, data: bytes) -> None:
        t = now_ns()
        if self.deflate is None:
            return
        try:
            msgs = self.parser.feed(data)
        except ProtocolError as e:
            self.fail(f"protocol error: {e}")
            return
        size = self.expect_len
        memo = None if self.takeover else _CHECKED
        got = False
        for op, payload, comp in msgs:
            if op >= 8:
                self.handle_control(op, payload)
                continue
            fields = memo.get(payload) if comp and memo is not None else None
            if fields is None:
                text = payload
                if comp:
                    try:
                        text = self.inflate(payload)
                    except zlib.error as e:
                        self.fail(f"inflate failed: {e}")
                        return
                fields = tick_fields(text, size) if op == TEXT else None
                if fields is None:
                    self.fail(f"unexpected message: opcode {op}, {len(text)} bytes {text[:48]!r}")
                    return
                if comp and memo is not None:
                    if len(memo) >= 4096:
                        memo.clear()
                    memo[payload] = fields
            if comp:
                self.compressed += 1
            if not self.delivered(fields[0], fields[1], t):
                return
            got = True
        if got:
            self.last_ns = t
        self.on_delivered()

    def publish_frames(self, seq: int, t: int, size: int) -> bytes:
        if self.compressor is None:
            self.compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
        return deflate_frame(deflate_message(self.compressor, tick_payload(seq, t, size)), self.mask)


class DeflatePublisher(_Publishing, DeflateSubscriber):
    pass


def fanout_classes(a) -> tuple:
    """(subscriber class, publisher class) of the fan-out clients."""
    if a.deflate:
        return DeflateSubscriber, DeflatePublisher
    return PROTOCOLS[a.protocol][:2]


# ---------------------------------------------------------------- helpers


def percentile(sorted_vals, q: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, math.ceil(q / 100 * len(sorted_vals)) - 1))
    return sorted_vals[i]


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of a process and its descendants, in clock ticks."""
    total = 0
    for p in [pid] + descendants(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total


def proc_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its descendants, in seconds, with the
    scheduler's nanosecond accounting (/proc/PID/task/TID/schedstat, every
    thread); clock ticks (10 ms) where schedstat is missing.  A handshake run
    lasts a fraction of a second: ticks would quantize it by 10% or more."""
    total = 0.0
    for p in [pid] + descendants(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0]) / 1e9
            except (OSError, IndexError, ValueError):
                return proc_cpu_ticks(pid) / os.sysconf("SC_CLK_TCK")
    return total


def descendants(pid: int) -> list[int]:
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            continue
        for k in kids:
            out.append(k)
            out.extend(descendants(k))
    return out


def rss_bytes(pid: int) -> int:
    """VmRSS of a process plus its descendants (workers), in bytes."""
    total = 0
    for p in [pid] + descendants(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


class CpuMeter:
    """CPU used by the server (from /proc; several processes: the sum) and by
    this load generator."""

    def __init__(self, server_pid: int | None, *more: int | None) -> None:
        self.pids = [p for p in (server_pid, *more) if p]
        self.pid = self.pids[0] if self.pids else None
        self.hz = os.sysconf("SC_CLK_TCK")

    def seconds(self) -> float:
        return sum(proc_cpu_seconds(p) for p in self.pids)

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.s0 = self.seconds()
        r = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.c0 = r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime

    def stop(self) -> dict:
        dt = max(1e-9, time.monotonic() - self.t0)
        r = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = {"client_cpu": round((r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime - self.c0) / dt, 3)}
        if self.pids:
            out["server_cpu"] = round((self.seconds() - self.s0) / dt, 3)
        return out


def source_addresses(n_conns: int, explicit: int) -> list[str | None]:
    """Loopback source addresses: 127.0.0.1 (no bind) up to CONNS_PER_SOURCE."""
    n = explicit or max(1, math.ceil(n_conns / CONNS_PER_SOURCE))
    if n == 1:
        return [None]
    return [f"127.0.0.{2 + i}" for i in range(n)]


async def open_one(loop, factory, host, port, src):
    tls = TLS_CONTEXT
    if src is None:
        if tls is None:
            _, proto = await loop.create_connection(factory, host, port)
        else:
            tr, proto = await loop.create_connection(factory, host, port, ssl=tls, server_hostname=host)
            if not TLS_INFO:
                note_tls(tr)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((src, 0))
            sock.setblocking(False)
            await loop.sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        if tls is None:
            _, proto = await loop.create_connection(factory, sock=sock)
        else:
            tr, proto = await loop.create_connection(factory, sock=sock, ssl=tls, server_hostname=host)
            if not TLS_INFO:
                note_tls(tr)
    await proto.opened
    return proto


def note_tls(transport) -> None:
    """Record the TLS version and cipher the server chose (first connection)."""
    obj = transport.get_extra_info("ssl_object")
    if obj is not None:
        cipher = obj.cipher()
        TLS_INFO.update(version=obj.version(), cipher=cipher[0] if cipher else None)


async def open_many(n, factory, host, port, *, concurrency=100, deadline_ns=None, srcs=(None,), stats=None):
    """Open n upgraded connections, ``concurrency`` handshakes at a time."""
    loop = asyncio.get_running_loop()
    out: list = []
    nxt = 0

    async def worker():
        nonlocal nxt
        while nxt < n and (deadline_ns is None or now_ns() < deadline_ns):
            i = nxt
            nxt += 1
            try:
                out.append(await open_one(loop, factory, host, port, srcs[i % len(srcs)]))
            except (OSError, ConnectionError) as e:
                if stats is not None:
                    stats.error(f"connect failed: {e}")

    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    return out


async def close_all(clients, wait: float = 0.5) -> None:
    for c in clients:
        c.close()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and not all(c.closed for c in clients):
        await asyncio.sleep(0.02)
    for c in clients:
        if not c.closed and c.transport is not None:
            c.transport.abort()


def mask_from(rng: random.Random) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(4))


def result_base(a, scenario: str) -> dict:
    return {"scenario": scenario, "host": a.host, "port": a.port, "path": a.path, "seed": a.seed}


def finish(res: dict, stats: Stats, extra_ok: bool = True) -> dict:
    res["errors"] = stats.errors
    if stats.first_errors:
        res["first_errors"] = stats.first_errors
    res["lost_connections"] = stats.lost
    res["ok"] = bool(extra_ok and stats.errors == 0 and stats.lost == 0)
    if TLS_CONTEXT is not None:
        res["tls"] = {"enabled": True, **TLS_INFO}
    return res


# ---------------------------------------------------------------- scenarios


def echo_frames(a) -> tuple:
    """(mask, opcode, frame to send, frame the server must answer) for the
    echo-type scenarios: ``a.size`` random alphanumeric bytes, seeded."""
    rng = random.Random(a.seed)
    mask = mask_from(rng)
    opcode = BINARY if a.binary else TEXT
    payload = bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(a.size))
    frame = client_frame(opcode, payload, mask)
    return mask, opcode, frame, frame if a.raw else server_frame(opcode, payload)


async def measure_echo(a, clients, res: dict) -> tuple[int, int, float, float, bool]:
    """Start the echo ``clients``, let them warm up, count what is echoed for
    ``a.duration`` (or ``a.max_messages``) while metering the server's CPU
    into ``res``, stop them and wait (bounded) for what is still in flight:
    (received at start, at end, start time, end time, every message echoed)."""
    for c in clients:
        c.start()
    await asyncio.sleep(a.warmup)
    cpu = CpuMeter(a.server_pid)
    t0 = time.monotonic()
    cpu.start()
    r0 = sum(c.received for c in clients)
    deadline = t0 + a.duration
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        if sum(c.received for c in clients) - r0 >= a.max_messages:
            break
    r1 = sum(c.received for c in clients)
    t1 = time.monotonic()
    res.update(cpu.stop())
    for c in clients:
        c.running = False
    drained = await wait_until(lambda: all(c.received == c.sent or c.closed for c in clients), 5.0)
    return r0, r1, t0, t1, drained and all(c.received == c.sent for c in clients)


async def run_echo(a, gate=None, srcs=None) -> dict:
    """C connections x W identical small messages in flight; messages/s echoed.

    ``gate`` (``run_split``'s child processes): awaited once every connection
    is open, before the measurement starts; ``srcs``: this process's share of
    the source addresses."""
    stats = Stats()
    mask, opcode, frame, expect = echo_frames(a)
    req = upgrade_request(a.host, a.port, a.path)
    if srcs is None:
        srcs = source_addresses(a.conns, a.src_addrs)
    clients = await open_many(
        a.conns,
        lambda: EchoClient(req, stats, mask, frame, expect, a.window, a.raw),
        a.host, a.port, srcs=srcs, stats=stats,
    )
    res = result_base(a, "echo")
    res.update(conns=a.conns, window=a.window, size=a.size, opcode=opcode)
    if len(clients) < a.conns:
        res["value"] = 0
        await close_all(clients)
        return finish(res, stats, False)
    if gate is not None:
        await gate()
    r0, r1, t0, t1, complete = await measure_echo(a, clients, res)
    res.update(
        value=round((r1 - r0) / (t1 - t0)),
        unit="messages/s",
        seconds=round(t1 - t0, 3),
        messages=r1 - r0,
        sent_total=sum(c.sent for c in clients),
        echoed_total=sum(c.received for c in clients),
        parser_fallbacks=sum(1 for c in clients if c.parser is not None),
    )
    await close_all(clients)
    return finish(res, stats, complete)


async def run_deflate_echo(a) -> dict:
    """``run_echo`` with permessage-deflate (``--deflate``): C connections x W
    compressed JSON ticks of ``a.size`` bytes in flight; messages/s echoed."""
    stats = Stats()
    rng = random.Random(a.seed)
    mask = mask_from(rng)
    t0_ns = 1_700_000_000_000_000_000 + rng.randrange(10**15)
    payloads = [tick_payload(i, t0_ns + i * 1_000_003, a.size) for i in range(ECHO_RING)]
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    frames = [deflate_frame(deflate_message(compressor, p), mask) for p in payloads]
    frames += frames[: a.window]
    req = upgrade_request(a.host, a.port, a.path, deflate=True)
    srcs = source_addresses(a.conns, a.src_addrs)
    index = [0]

    def factory():
        index[0] += 1
        return DeflateEchoClient(req, stats, mask, frames, payloads, a.window, (index[0] * 97) % ECHO_RING)

    clients = await open_many(a.conns, factory, a.host, a.port, srcs=srcs, stats=stats)
    res = result_base(a, "echo")
    res.update(conns=a.conns, window=a.window, size=a.size, opcode=TEXT,
               deflate=clients[0].extensions if clients else None,
               compressed_bytes_sent=round(sum(len(f) for f in frames[:ECHO_RING]) / ECHO_RING, 1))
    if len(clients) < a.conns:
        res["value"] = 0
        return finish(res, stats, False)
    r0, r1, t0, t1, complete = await measure_echo(a, clients, res)
    echoed = sum(c.received for c in clients)
    res.update(
        value=round((r1 - r0) / (t1 - t0)),
        unit="messages/s",
        seconds=round(t1 - t0, 3),
        messages=r1 - r0,
        sent_total=sum(c.sent for c in clients),
        echoed_total=echoed,
        received_compressed=sum(c.compressed for c in clients),
    )
    await close_all(clients)
    return finish(res, stats, complete)


async def wait_until(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def run_latency(a) -> dict:
    """One connection, one message in flight: round-trip percentiles (µs)."""
    stats = Stats()
    mask, opcode, frame, expect = echo_frames(a)
    req = upgrade_request(a.host, a.port, a.path)
    deadline_ns = now_ns() + int((a.duration + a.warmup + 2) * 1e9)
    res = result_base(a, "latency")
    clients = await open_many(
        1,
        lambda: PingPongClient(
            req, stats, mask, frame, expect, 1, a.raw,
            max_rounds=a.rounds, deadline_ns=deadline_ns, warmup=a.warmup_rounds,
        ),
        a.host, a.port, stats=stats,
    )
    if not clients:
        res["value"] = None
        return finish(res, stats, False)
    c = clients[0]
    cpu = CpuMeter(a.server_pid)
    cpu.start()
    c.start()
    try:
        await asyncio.wait_for(asyncio.shield(c.done), a.duration + a.warmup + 5)
    except asyncio.TimeoutError:
        stats.error("latency run did not finish")
    res.update(cpu.stop())
    s = sorted(c.samples)
    us = lambda v: round(v / 1000, 2)  # noqa: E731
    res.update(
        size=a.size,
        rounds=len(s),
        value=us(percentile(s, 50)),
        unit="µs p50",
        p50_us=us(percentile(s, 50)),
        p99_us=us(percentile(s, 99)),
        p999_us=us(percentile(s, 99.9)),
        mean_us=us(sum(s) / len(s)) if s else None,
        min_us=us(s[0]) if s else None,
        max_us=us(s[-1]) if s else None,
    )
    await close_all(clients)
    return finish(res, stats, bool(s))


async def run_large(a) -> dict:
    """One connection, ``--window`` large binary messages in flight (1 by default): MB/s echoed."""
    rng = random.Random(a.seed)
    stats = Stats()
    mask = mask_from(rng)
    payload = rng.randbytes(a.size)
    frame = client_frame(BINARY, payload, mask)
    expect = frame if a.raw else server_frame(BINARY, payload)
    req = upgrade_request(a.host, a.port, a.path)
    res = result_base(a, "large")
    clients = await open_many(
        a.conns, lambda: LargeClient(req, stats, mask, frame, expect, a.window, a.raw),
        a.host, a.port, stats=stats,
    )
    if len(clients) < a.conns:
        res["value"] = 0
        return finish(res, stats, False)
    for c in clients:
        c.start()
    await asyncio.sleep(a.warmup)
    cpu = CpuMeter(a.server_pid)
    cpu.start()
    t0 = time.monotonic()
    r0 = sum(c.received for c in clients)
    deadline = t0 + a.duration
    while time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        if sum(c.received for c in clients) - r0 >= a.max_messages:
            break
    r1 = sum(c.received for c in clients)
    t1 = time.monotonic()
    res.update(cpu.stop())
    for c in clients:
        c.running = False
    drained = await wait_until(lambda: all(c.received == c.sent or c.closed for c in clients), 10.0)
    msgs = r1 - r0
    res.update(
        conns=a.conns,
        size=a.size,
        value=round(msgs * a.size / (t1 - t0) / 1e6, 1),
        unit="MB/s",
        messages=msgs,
        messages_per_s=round(msgs / (t1 - t0), 1),
        seconds=round(t1 - t0, 3),
        parser_fallbacks=sum(1 for c in clients if c.parser is not None),
    )
    await close_all(clients)
    return finish(res, stats, drained and msgs > 0 and all(c.received == c.sent for c in clients))


async def run_handshake(a, gate=None, srcs=None) -> dict:
    """Open N connections (``--concurrency`` handshakes at a time): opened/s.

    ``gate``, ``srcs``: as for ``run_echo`` (the gate opens the run)."""
    stats = Stats()
    mask = mask_from(random.Random(a.seed))
    req = upgrade_request(a.host, a.port, a.path)
    if srcs is None:
        srcs = source_addresses(a.conns, a.src_addrs)
    if gate is not None:
        await gate()
    deadline_ns = now_ns() + int(a.duration * 1e9)
    cpu = CpuMeter(a.server_pid)
    cpu.start()
    t0 = time.monotonic()
    clients = await open_many(
        a.conns, lambda: Client(req, stats, mask), a.host, a.port,
        concurrency=a.concurrency, deadline_ns=deadline_ns, srcs=srcs, stats=stats,
    )
    t1 = time.monotonic()
    res = result_base(a, "handshake")
    res.update(cpu.stop())
    res.update(
        value=round(len(clients) / (t1 - t0)),
        unit="connections/s",
        opened=len(clients),
        requested=a.conns,
        concurrency=a.concurrency,
        seconds=round(t1 - t0, 3),
        source_addresses=len(srcs),
    )
    await close_all(clients, 1.0)
    return finish(res, stats, len(clients) == a.conns)


def _split_child(a, n, conn, srcs):
    """Child process of ``run_split``: the echo or handshake scenario with
    ``n`` of the connections; reports ("ready",) when its connections are
    open (echo) or at once (handshake), waits for "go", then ("done", result)."""
    sub = argparse.Namespace(**vars(a))
    sub.conns = n

    async def gate():
        conn.send(("ready",))
        await read_pipe(conn)  # "go"

    fn = run_echo if a.scenario == "echo" else run_handshake
    res = run_loop(fn(sub, gate=gate, srcs=srcs))
    conn.send(("done", res))


def run_split(a) -> dict:
    """Echo or handshake spread over ``a.procs`` processes (``--procs N``, N >
    1): each process opens its share of the connections, then all start
    together; the rates add up. The server's CPU is the mean of what each
    process metered over its own measurement window (the windows coincide);
    the load generator's CPU is the sum over the processes."""
    procs = min(a.procs, a.conns)
    ctx = multiprocessing.get_context("fork")
    srcs_all = source_addresses(a.conns, a.src_addrs)
    pipes, children = [], []
    for i, n in enumerate(spread(a.conns, procs)):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_split_child, args=(a, n, child, srcs_all[i::procs] or srcs_all), daemon=True)
        p.start()
        pipes.append(parent)
        children.append(p)
    results: list = [None] * procs
    ready = []
    deadline = time.monotonic() + a.duration + 120
    for i, pipe in enumerate(pipes):
        if pipe.poll(max(0.1, deadline - time.monotonic())):
            msg = pipe.recv()
            if msg[0] == "done":
                results[i] = msg[1]
            else:
                ready.append(i)
    for i in ready:
        pipes[i].send("go")
    for i in ready:
        if pipes[i].poll(max(0.1, deadline - time.monotonic())):
            results[i] = pipes[i].recv()[1]
    for p in children:
        p.join(5)
        if p.is_alive():
            p.kill()
    got = [r for r in results if r is not None]
    res = result_base(a, a.scenario)
    stats = Stats()
    for r in got:
        stats.errors += r.get("errors", 0)
        stats.lost += r.get("lost_connections", 0)
        for e in r.get("first_errors", []):
            if len(stats.first_errors) < 5:
                stats.first_errors.append(e)
    if len(got) < procs:
        stats.error(f"{procs - len(got)} of {procs} load generator processes did not report")
    mean = lambda k: round(sum(r.get(k, 0) for r in got) / max(1, len(got)), 3)  # noqa: E731
    total = lambda k: sum(r.get(k, 0) for r in got)  # noqa: E731
    res.update(procs=procs, source_addresses=len(srcs_all), procs_values=[r.get("value") for r in got],
               server_cpu=mean("server_cpu"), client_cpu=round(total("client_cpu"), 3))
    if a.scenario == "echo":
        res.update(conns=a.conns, window=a.window, size=a.size, opcode=got[0].get("opcode") if got else None,
                   value=total("value"), unit="messages/s", seconds=max((r.get("seconds", 0) for r in got), default=0),
                   messages=total("messages"), sent_total=total("sent_total"), echoed_total=total("echoed_total"),
                   parser_fallbacks=total("parser_fallbacks"))
        ok = len(got) == procs and all(r.get("ok") for r in got) and res["echoed_total"] == res["sent_total"]
    else:
        secs = max((r.get("seconds", 0) for r in got), default=0)
        opened = total("opened")
        res.update(value=round(opened / secs) if secs else 0, unit="connections/s", opened=opened,
                   requested=a.conns, concurrency=a.concurrency, seconds=secs)
        ok = len(got) == procs and all(r.get("ok") for r in got) and opened == a.conns
    out = finish(res, stats, ok)
    tls = next((r["tls"] for r in got if r.get("tls")), None)
    if tls:
        out["tls"] = tls
    return out


def _memory_child(a, n, conn, srcs):
    """Child process: hold n idle echo connections until told to check them."""

    async def main():
        stats = Stats()
        rng = random.Random(a.seed + n)
        mask = mask_from(rng)
        payload = b"idle-check"
        frame = client_frame(TEXT, payload, mask)
        expect = frame if a.raw else server_frame(TEXT, payload)
        req = upgrade_request(a.host, a.port, a.path)
        clients = await open_many(
            n, lambda: EchoClient(req, stats, mask, frame, expect, 1, a.raw),
            a.host, a.port, srcs=srcs, stats=stats,
        )
        conn.send(("open", len(clients), dict(TLS_INFO)))
        await read_pipe(conn)  # "check"
        for c in clients:
            c.running = False
            c.start()
        ok = await wait_until(lambda: all(c.received == 1 or c.closed for c in clients), 10.0)
        ok = ok and all(c.received == 1 for c in clients)
        conn.send(("checked", ok, stats.errors, stats.first_errors, stats.lost))
        await read_pipe(conn)  # "close"
        await close_all(clients, 1.0)

    run_loop(main())


async def read_pipe(conn):
    """Await one object from a multiprocessing pipe without blocking the loop.

    A worker thread does the blocking read (the loop's add_reader would make
    the pipe non-blocking, which multiprocessing does not support).
    """
    return await asyncio.get_running_loop().run_in_executor(None, conn.recv)


def spread(total: int, procs: int) -> list[int]:
    base, extra = divmod(total, procs)
    return [base + (1 if i < extra else 0) for i in range(procs)]


def run_memory(a) -> dict:
    """Server RSS delta / K for K idle, upgraded connections (VmRSS)."""
    if not a.server_pid:
        raise SystemExit("memory needs --server-pid")
    procs = a.procs or max(1, math.ceil(a.conns / 15000))
    ctx = multiprocessing.get_context("fork")
    srcs_all = source_addresses(a.conns, a.src_addrs)
    time.sleep(a.settle)
    rss0 = rss_bytes(a.server_pid)
    pipes, children = [], []
    t0 = time.monotonic()
    for i, n in enumerate(spread(a.conns, procs)):
        parent, child = ctx.Pipe()
        srcs = srcs_all[i::procs] or srcs_all
        p = ctx.Process(target=_memory_child, args=(a, n, child, srcs), daemon=True)
        p.start()
        pipes.append(parent)
        children.append(p)
    deadline = time.monotonic() + a.duration + 60
    opened = 0
    for pipe in pipes:
        if pipe.poll(max(0.1, deadline - time.monotonic())):
            msg = pipe.recv()
            opened += msg[1]
            if msg[2] and not TLS_INFO:
                TLS_INFO.update(msg[2])
    t_open = time.monotonic() - t0
    time.sleep(a.settle)
    if a.settle > 0:
        wait_quiet(a.server_pid, 3.0)
    rss1 = rss_bytes(a.server_pid)
    for pipe in pipes:
        pipe.send("check")
    ok = opened == a.conns
    errors, first, lost = 0, [], 0
    for pipe in pipes:
        if pipe.poll(max(0.1, deadline - time.monotonic())):
            _, cok, e, fe, lo = pipe.recv()
            ok = ok and cok
            errors += e
            first += fe
            lost += lo
        else:
            ok = False
    for pipe in pipes:
        pipe.send("close")
    for p in children:
        p.join(5)
        if p.is_alive():
            p.kill()
    res = result_base(a, "memory")
    per = (rss1 - rss0) / max(1, opened)
    res.update(
        value=round(per),
        unit="bytes/conn",
        kib_per_conn=round(per / 1024, 2),
        conns=a.conns,
        opened=opened,
        rss_before=rss0,
        rss_after=rss1,
        open_seconds=round(t_open, 3),
        procs=procs,
        source_addresses=len(srcs_all),
        errors=errors,
        lost_connections=lost,
        ok=bool(ok and errors == 0 and lost == 0),
    )
    if first:
        res["first_errors"] = first[:5]
    return res


def wait_quiet(pid: int, timeout: float) -> None:
    """Wait until the server has used (almost) no CPU for 100 ms."""
    deadline = time.monotonic() + timeout
    hz = os.sysconf("SC_CLK_TCK")
    while time.monotonic() < deadline:
        c0 = proc_cpu_ticks(pid)
        time.sleep(0.1)
        if proc_cpu_ticks(pid) - c0 <= 0.01 * hz:
            return


def _fanout_child(a, n, conn, srcs, sample_every, index0, port, path):
    """Child process: n subscribers of ``a.protocol`` on (port, path)."""

    async def main():
        stats = Stats()
        mask = mask_from(random.Random(a.seed + index0))
        req = upgrade_request(a.host, port, path, a.deflate)
        samples = array.array("q")
        idx = [index0]
        sub_cls = fanout_classes(a)[0]

        def factory():
            i = idx[0]
            idx[0] += 1
            return sub_cls(req, stats, mask, a.size, samples if i % sample_every == 0 else None)

        clients = await open_many(n, factory, a.host, port, srcs=srcs, stats=stats)
        conn.send(("open", len(clients)))
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        w0 = time.monotonic()
        msg = await read_pipe(conn)  # ("count", M, timeout)
        count, timeout = msg[1], msg[2]
        loop = asyncio.get_running_loop()
        futs = []
        for c in clients:
            c.waiter = (count, loop.create_future())
            c.on_delivered()
            futs.append(c.waiter[1])
        if futs:
            await asyncio.wait(futs, timeout=timeout)
        complete = sum(1 for c in clients if c.next_seq == count)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / max(1e-9, time.monotonic() - w0)
        conn.send((
            "done", complete, len(clients), sum(c.next_seq for c in clients),
            max((c.last_ns for c in clients), default=0), samples.tobytes(),
            stats.errors, stats.first_errors, stats.lost, round(cpu, 3),
            sum(getattr(c, "compressed", 0) for c in clients),
        ))
        await read_pipe(conn)  # "close"
        await close_all(clients, 1.0)

    run_loop(main())


async def probe_path(a, nodes, timeout: float) -> str | None:
    """Until one message published on the first node reaches a subscriber on
    the last one (fresh pair of connections per try, bounded): the broker
    path is live. Returns an error, or None."""
    sub_cls, pub_cls, _ = PROTOCOLS[a.protocol]
    mask = mask_from(random.Random(a.seed - 1))
    (port_a, path_a), (port_b, path_b) = nodes[0], nodes[-1]
    deadline = time.monotonic() + timeout
    last = "no try"
    while time.monotonic() < deadline:
        stats = Stats()
        # (the lambdas below are called within this iteration: B023 does not apply)
        subs = await open_many(1, lambda: sub_cls(upgrade_request(a.host, port_b, path_b), stats,  # noqa: B023
                                                  mask, a.size, None),
                               a.host, port_b, stats=stats)
        pubs = await open_many(1, lambda: pub_cls(
            upgrade_request(a.host, port_a, path_a), stats, mask, a.size, None, window=1, size=a.size,  # noqa: B023
            max_msgs=1, deadline_ns=now_ns() + int(60e9), rate=0), a.host, port_a, stats=stats)
        if subs and pubs:
            pubs[0].start()
            if await wait_until(lambda: subs[0].next_seq and pubs[0].next_seq or stats.errors,  # noqa: B023
                                min(1.0, max(0.05, deadline - time.monotonic()))) and not stats.errors:
                await close_all(subs + pubs, 0.5)
                return None
        last = "; ".join(stats.first_errors) or "the message did not arrive"
        await close_all(subs + pubs, 0.5)
        await asyncio.sleep(0.1)
    return f"broker path from port {port_a} to port {port_b} not live within {timeout:.0f}s: {last}"


async def worker_connections(host: str, port: int) -> dict:
    """``websocket_worker_connections{worker="i"}`` from GET /metrics (fastws
    with --workers; empty for any other server)."""
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
        w.write(f"GET /metrics HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
        body = await asyncio.wait_for(r.read(4 << 20), 5.0)
        w.close()
    except (OSError, asyncio.TimeoutError):
        return {}
    out = {}
    for line in body.decode("latin-1").splitlines():
        if line.startswith('websocket_worker_connections{worker="'):
            name = line.split('"')[1]
            out[name] = int(float(line.rsplit(" ", 1)[1]))
    return out


def run_fanout(a) -> dict:
    """N subscribers (one of them publishes); deliveries/s and latency."""
    return fanout(a, [(a.port, a.path)], "fanout")


def run_crossnode(a) -> dict:
    """Subscribers split over node A (--port) and node B (--port-b; the same
    port when absent: one server with workers); the publisher on node A; a
    subscriber on node B also acknowledges (the window spans both nodes)."""
    port_b = a.port_b or a.port
    return fanout(a, [(a.port, a.path), (port_b, a.path)], "crossnode", witness=True)


SAME_PORT_WITNESSES = 8


def fanout(a, nodes, scenario: str, witness: bool = False) -> dict:
    """The fan-out driver of ``fanout`` and ``crossnode``.

    ``nodes``: [(port, path)]; subscribers are split over them, the publisher
    (a subscriber too, in this process) on the first, the witnesses (with
    ``witness``: subscribers in this process whose copies also acknowledge)
    on the last; the rest live in forked child processes, per node.

    One witness when the last node is another port.  When both "nodes" are
    the same port (``--workers N`` behind one SO_REUSEPORT port), the kernel
    puts each connection on a worker by the hash of its addresses, so one
    witness lands on the publisher's own worker half of the time, and then
    nothing bounds what the publisher sends ahead of the other worker: its
    queue, and the latency, grow for the whole run.  So there are
    ``SAME_PORT_WITNESSES`` of them, and all land with the publisher only
    once in 2^8 runs.
    """
    n_subs = a.subscribers
    n_wits = (SAME_PORT_WITNESSES if nodes[0][0] == nodes[-1][0] else 1) if witness else 0
    n_parent = 1 + n_wits
    if n_subs < n_parent:
        raise SystemExit(f"{scenario} needs at least {n_parent} subscribers")
    per_node = spread(n_subs, len(nodes))  # as even as possible; node A gets the odd one
    res = result_base(a, scenario)
    res.update(subscribers=n_subs, size=a.size, window=a.window, rate=a.rate, protocol=a.protocol)
    if len(nodes) > 1:
        res.update(nodes=[p for p, _ in nodes], subscribers_per_node=per_node)
    if witness:
        err = run_loop(probe_path(a, nodes, a.probe_timeout))
        if err:
            stats = Stats()
            stats.error(err)
            res["value"] = 0
            return finish(res, stats, False)
    ctx = multiprocessing.get_context("fork")
    srcs_all = source_addresses(n_subs, a.src_addrs)
    sample_every = max(1, n_subs // 200)
    # (node, count) of each child process
    in_parent = [0] * len(nodes)
    in_parent[0] += 1
    in_parent[-1] += n_wits
    plan = []
    for node, total in enumerate(per_node):
        left = total - in_parent[node]
        if left > 0:
            procs = a.procs or max(1, math.ceil(left / 15000))
            plan += [(node, k) for k in spread(left, procs) if k]
    nprocs = len(plan)
    pipes, children, child_node = [], [], []
    start = n_parent  # subscriber 0 is the publisher, then the witnesses (all in this process)
    for i, (node, n) in enumerate(plan):
        parent, child = ctx.Pipe()
        srcs = srcs_all[i::nprocs] or srcs_all
        port, path = nodes[node]
        p = ctx.Process(target=_fanout_child, args=(a, n, child, srcs, sample_every, start, port, path),
                        daemon=True)
        start += n
        p.start()
        pipes.append(parent)
        children.append(p)
        child_node.append(node)
    opened = 0
    deadline = time.monotonic() + 60 + n_subs / 500
    for pipe in pipes:
        if pipe.poll(max(0.1, deadline - time.monotonic())):
            opened += pipe.recv()[1]
    sub_cls, pub_cls = fanout_classes(a)

    async def publish():
        stats = Stats()
        mask = mask_from(random.Random(a.seed))
        samples = array.array("q")
        wsamples = array.array("q")
        deadline_ns = now_ns() + int(a.duration * 1e9)
        port_a, path_a = nodes[0]
        pubs = await open_many(
            1,
            lambda: pub_cls(
                upgrade_request(a.host, port_a, path_a, a.deflate), stats, mask, a.size, samples, window=a.window,
                size=a.size, max_msgs=a.max_messages, deadline_ns=deadline_ns, rate=a.rate,
            ),
            a.host, port_a, stats=stats,
        )
        wits = []
        if witness:
            port_b, path_b = nodes[-1]
            wits = await open_many(
                n_wits, lambda: sub_cls(upgrade_request(a.host, port_b, path_b), stats, mask, a.size, wsamples),
                a.host, port_b, stats=stats,
            )
        if not pubs or len(wits) != n_wits:
            await close_all(pubs + wits, 0.5)
            return None, stats
        pub = pubs[0]
        for w in wits:
            pub.watch(w)
        # let the servers register the last subscribers (and their nodes subscribe at the broker)
        await asyncio.sleep(min(a.settle_subs, a.duration))
        pub.deadline_ns = now_ns() + int(a.duration * 1e9)
        cpu = CpuMeter(a.server_pid, a.server_pid_b)
        cpu.start()
        pub.start()
        # until the publisher is done, or one of this process's connections failed
        if not await wait_until(lambda: pub.finished.done() or stats.errors or stats.lost, a.duration + 30):
            stats.error("publisher stalled (its acknowledging copies stopped arriving)")
        if pub.finished.done():
            published = pub.finished.result()
        else:
            published = pub.published
            pub.finished.cancel()
        if pub.timer:
            pub.timer.cancel()
        # room for the slowest server measured (python-socketio delivers ~6,000/s to a room of
        # 10,000): wait for the queued deliveries at 4,000/s or more, never more than 5 minutes
        timeout = min(300.0, 15.0 + published * n_subs / 4000) if not (stats.errors or stats.lost) else 2.0
        for pipe in pipes:
            pipe.send(("count", published, timeout))
        loop = asyncio.get_running_loop()
        mine = pubs + wits
        for c in mine:
            c.waiter = (published, loop.create_future())
            c.on_delivered()
        await asyncio.wait([c.waiter[1] for c in mine], timeout=timeout)
        results = [await read_pipe(p) for p in pipes]
        cpu_res = cpu.stop()
        workers = {}
        if a.metrics:
            # per-worker connection counts (snapshots are up to ~1 s old)
            until = time.monotonic() + 3.0
            while True:
                workers = await worker_connections(a.host, port_a)
                if sum(workers.values()) >= n_subs or time.monotonic() >= until:
                    break
                await asyncio.sleep(0.25)
        out = dict(published=published, stats=stats, first_ns=pub.first_ns, samples=samples,
                   wsamples=wsamples, results=results, cpu=cpu_res, workers=workers,
                   own=[c.next_seq for c in mine], last=[c.last_ns for c in mine],
                   extensions=pub.extensions, compressed=sum(getattr(c, "compressed", 0) for c in mine))
        await close_all(mine, 0.5)
        return out, stats

    out, stats = run_loop(publish())
    res.update(opened=opened + (len(out["own"]) if out else 0), procs=nprocs,
               source_addresses=len(srcs_all))
    if out is None:
        for pipe in pipes:
            try:
                pipe.send(("count", 0, 0.1))
                pipe.poll(5)
                pipe.send("close")
            except OSError:
                pass
        for p in children:
            p.join(5)
            if p.is_alive():
                p.kill()
        res["value"] = 0
        return finish(res, stats, False)
    published = out["published"]
    results = out["results"]
    for pipe in pipes:
        pipe.send("close")
    for p in children:
        p.join(5)
        if p.is_alive():
            p.kill()
    complete = sum(1 for own in out["own"] if own == published) + sum(r[1] for r in results)
    delivered = sum(out["own"]) + sum(r[3] for r in results)
    last_ns = max(out["last"] + [r[4] for r in results])
    samples = out["samples"]
    by_node = [array.array("q") for _ in nodes]
    by_node[0].extend(samples)
    by_node[-1].extend(out["wsamples"])
    for r, node in zip(results, child_node, strict=False):
        by_node[node].frombytes(r[5])
        stats.errors += r[6]
        for e in r[7]:
            if len(stats.first_errors) < 5:
                stats.first_errors.append(e)
        stats.lost += r[8]
    s = sorted(x for arr in by_node for x in arr)
    secs = max(1e-9, (last_ns - out["first_ns"]) / 1e9)
    us = lambda v: round(v / 1000, 1)  # noqa: E731
    res.update(out["cpu"])
    # CPU of each subscriber process, from its last connection open to its last delivery.
    res["subscriber_procs_cpu"] = [r[9] for r in results]
    res.update(
        value=round(delivered / secs) if a.rate == 0 else us(percentile(s, 99)),
        unit="deliveries/s" if a.rate == 0 else "µs p99",
        deliveries_per_s=round(delivered / secs),
        published=published,
        deliveries=delivered,
        expected_deliveries=published * n_subs,
        subscribers_complete=complete,
        seconds=round(secs, 3),
        latency_samples=len(s),
        p50_us=us(percentile(s, 50)),
        p99_us=us(percentile(s, 99)),
        max_us=us(s[-1]) if s else None,
    )
    if len(nodes) > 1:
        res["latency_by_node"] = [
            {"port": nodes[i][0], "samples": len(arr), "p50_us": us(percentile(sorted(arr), 50)),
             "p99_us": us(percentile(sorted(arr), 99))}
            for i, arr in enumerate(by_node)
        ]
    if out["workers"]:
        res["worker_connections"] = out["workers"]
    if a.deflate:
        res.update(deflate=out["extensions"], received_compressed=out["compressed"] + sum(r[10] for r in results))
    ok = res["opened"] == n_subs and complete == n_subs and published > 0
    return finish(res, stats, ok)


# ---------------------------------------------------------------- command


def run_loop(coro):
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(coro)
    return uvloop.run(coro)


DEFAULTS = {
    "echo": dict(path="/echo", conns=64, window=16, size=32, duration=3.0),
    "latency": dict(path="/echo", conns=1, size=32, duration=3.0),
    "large": dict(path="/echo", conns=1, size=65536, duration=3.0),
    "handshake": dict(path="/echo", conns=5000, duration=20.0),
    "memory": dict(path="/echo", conns=10000, duration=60.0),
    "fanout": dict(subscribers=1000, size=64, duration=3.0, window=8, settle_subs=0.2),
    "crossnode": dict(subscribers=2000, size=64, duration=3.0, window=8, settle_subs=0.5),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastws.bench.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("scenario", choices=sorted(DEFAULTS))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path")
    p.add_argument("--conns", type=int)
    p.add_argument("--window", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--duration", type=float, help="measuring time bound, seconds")
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--max-messages", type=int, default=50_000_000, help="count bound")
    p.add_argument("--rounds", type=int, default=100_000, help="latency: round trips (count bound)")
    p.add_argument("--warmup-rounds", type=int, default=1000)
    p.add_argument("--subscribers", type=int)
    p.add_argument("--rate", type=float, default=0.0, help="fanout: publish at a fixed rate (msg/s)")
    p.add_argument("--concurrency", type=int, default=100, help="handshake: in flight")
    p.add_argument("--procs", type=int, default=0, help="processes (0 = as many as needed)")
    p.add_argument("--src-addrs", type=int, default=0, help="loopback source addresses (0 = auto)")
    p.add_argument("--server-pid", type=int, default=0)
    p.add_argument("--port-b", type=int, default=0,
                   help="crossnode: node B's port (default: --port, i.e. one server with workers)")
    p.add_argument("--server-pid-b", type=int, default=0, help="crossnode: node B's pid (CPU is summed)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="ws",
                   help="fanout/crossnode: plain WebSocket relay (binary), or Socket.IO events "
                        "(sio: text event with a --size-character string; sio-binary: binary attachment)")
    p.add_argument("--metrics", action="store_true",
                   help="fanout/crossnode: report per-worker connections from the server's GET /metrics")
    p.add_argument("--probe-timeout", type=float, default=10.0,
                   help="crossnode: seconds to wait for the broker path to carry a first message")
    p.add_argument("--settle-subs", type=float,
                   help="fanout/crossnode: seconds between the last subscriber's open and the first publish")
    p.add_argument("--settle", type=float, default=0.5, help="memory: settle time before RSS reads")
    p.add_argument("--binary", action="store_true", help="echo/latency: binary instead of text")
    p.add_argument("--raw", action="store_true", help="server echoes raw bytes (our masked frames)")
    p.add_argument("--deflate", action="store_true",
                   help="echo/fanout: offer permessage-deflate (fail if declined), send --size-byte JSON ticks "
                        "compressed, inflate and check every message received")
    p.add_argument("--tls", action="store_true",
                   help="connect with TLS (wss://), accepting any certificate (the server's is self-signed); "
                        "handshake then times TLS + WebSocket handshakes")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    for k, v in DEFAULTS[a.scenario].items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    for k in ("conns", "window", "size", "subscribers"):
        if getattr(a, k, None) is None:
            setattr(a, k, 1)
    if a.path is None:
        a.path = PROTOCOLS[a.protocol][2]
    if a.deflate and (a.scenario not in ("echo", "fanout") or a.protocol != "ws" or a.raw or a.binary
                      or a.size < DEFLATE_MIN_SIZE):
        p.error(f"--deflate: echo or fanout, --protocol ws, text, --size {DEFLATE_MIN_SIZE} or more")
    if a.scenario in ("fanout", "crossnode"):
        low = 32 if a.protocol == "sio" else 16
        if a.size < low or (a.protocol == "sio" and a.size + len(SIO_EVENT) + len(SIO_END) > 125):
            p.error(f"--size: {a.size} does not fit protocol {a.protocol} (at least {low}"
                    + (", at most 113)" if a.protocol == "sio" else ")"))
    return a


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv=None) -> int:
    global TLS_CONTEXT
    a = parse_args(argv)
    raise_nofile()
    if a.tls:
        TLS_CONTEXT = tls_client_context()  # before any fork: the children inherit it
    if a.procs > 1 and a.scenario in ("echo", "handshake") and not a.deflate:
        res = run_split(a)
    elif a.scenario == "memory":
        res = run_memory(a)
    elif a.scenario == "fanout":
        res = run_fanout(a)
    elif a.scenario == "crossnode":
        res = run_crossnode(a)
    else:
        fn = {"echo": run_echo, "latency": run_latency, "large": run_large, "handshake": run_handshake}[a.scenario]
        if a.deflate:
            fn = run_deflate_echo
        res = run_loop(fn(a))
    if a.tls and "tls" not in res:
        res["tls"] = {"enabled": True, **TLS_INFO}
    print(json.dumps(res), flush=True)
    return 0 if res.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
