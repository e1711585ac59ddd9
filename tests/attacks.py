"""The attack set against one fastws server, in one place.

Used by the per-attack tests (``tests/integration/test_attack_*.py`` take the
building blocks), by ``tests/integration/test_attack_all.py`` (the whole set
at once against one server while a good client keeps talking) and by
``bench/attack.py`` (what the attack costs that good client).

Each attack is one entry of :data:`ATTACKS`::

    Attack(name, run, expect)

``run(target, source)`` is a coroutine function, or a plain function (run in
a thread), that attacks the server described by ``target`` from the local
address ``source`` and returns what it observed, boiled down to a small JSON
value (a close code, a status, counts of outcomes ...).  ``expect(target)``
is what a hardened server must answer; :func:`run_attacks` runs every entry
at once and compares.  Every attack:

* sends only to ``target.host`` (127.0.0.0/8), from its own source address
  127.0.0.N with N >= 2 (:func:`source_for`; a block of them per round), or
  from a pool 127.N.x.y of its own when it opens many connections
  (:func:`spread`), so a per-IP guard of the server counts the attacker,
  never a good client on 127.0.0.1;
* is bounded in connections, bytes and seconds, and stops by itself.

The set assumes the server of ``tests/integration/apps/attack_app.py``
(echo, ``/rooms`` commands, ``/undecided``, ``/private`` behind a JWT,
``POST /upload``, rooms ``locked-*`` refused) served with ``--compression``
and the limits given in the :class:`Target` (:func:`hardened_args` and
:func:`hardened_target` give both).  The guards of a public server have an
entry each: per-address connection and upgrade limits, per-connection
message and byte rates, JWT authentication, room authorization; an entry's
expectation follows the target's settings (a guard that is off expects
the attack to get through).

:class:`GoodClient` is the well-behaved client next to the attack: a real
``websockets`` client sending a message every few milliseconds and checking
that every reply comes back, in order; :class:`FreshClients` opens a new
connection now and then to check that new good clients are still accepted.

From the command line, against a server you started yourself::

    fastws serve tests.integration.apps.attack_app:app --port 9001 --compression \\
        --max-message-size 65536 --handshake-timeout 2s --body-timeout 1s \\
        --publish-token attack-token-0123 --broker memory://
    python -m tests.attacks --port 9001 --limit 65536 --handshake-timeout 2 --body-timeout 1

prints one JSON line per attack (name, outcome, expected, ok, seconds) and
exits 1 if any outcome is not the expected one.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import datetime
import functools
import inspect
import ipaddress
import itertools
import json
import os
import random
import select
import socket
import ssl
import struct
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
TOKEN = "attack-token-0123"     # --publish-token of the attacked server
EVIL = "http://evil.example"    # a cross-site page's Origin

# -- bounds of the attacks ----------------------------------------------------------------

ATTACK_BYTES = 64 << 20         # most bytes one compressed-stream attack sends
CHUNK = 256 << 10               # bytes per send of those
DEADLINE = 60.0                 # seconds one compressed-stream attack may take
SLOWLORIS = 100                 # concurrent slow request heads
ROOM_JOINS = 40_000             # joins one connection asks for
ROOM_CHUNK = 2_000              # joins per command
ORIGIN_TRIES = 30               # cross-site upgrades
CLOSE_CODES = range(3000, 5000)  # 2,000 client close codes, one connection each
CLOSE_CONCURRENCY = 50
VIOLATION_CONCURRENCY = 8
#: A connect (and TLS handshake) that fails is tried again, this many times
#: in all, by the attacks that aim past it (slow requests, rooms): over TLS
#: a busy attacking process can take longer than the server's
#: handshake_timeout for its own half of the handshake, and the server then
#: rightly drops it (the good clients, in another process, are never
#: allowed a second try).
CONNECT_TRIES = 3
MAX_CLOSE_SERIES = 16 + 3       # websocket_closes_total: 1000..1015, "3xxx", "4xxx", "other"
ZERO_MASK = b"\x00\x00\x00\x00"  # payload bytes go through unchanged

SLOW_HEAD = (b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slowloris\r\n"
             b"X-Padding: " + b"a" * 200 + b"\r\n\r\n")   # never completes at one byte per 1-2 s
UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\n"


def source_for(index: int, round_no: int = 0) -> str:
    """The local address of attack number ``index`` in round ``round_no`` of
    the set: 127.0.0.2 .. 127.0.0.251, a block of 40 per round (127.0.0.1 is
    the good clients'), so a round never finds the per-address buckets a
    round before it emptied."""
    return f"127.0.0.{2 + (index + 40 * round_no) % 250}"


def spread(source: str, k: int) -> str:
    """Address number ``k`` of the pool of the attack whose own address is
    ``source`` (127.0.0.N): 127.N.x.y, for attacks that come from many
    addresses at once (the per-address limits are other entries' business)."""
    n = int(source.rsplit(".", 1)[1])
    return f"127.{n}.{k // 250 % 250}.{k % 250 + 1}"


# -- the server under attack ------------------------------------------------------------------


@dataclass
class Target:
    """One running server and the settings it was started with.

    ``tls`` is the client's TLS context when the server speaks TLS (None:
    plain TCP).  ``pids`` are the processes that serve connections (for
    memory and fd figures); ``alive`` and ``log`` (callables) are for the
    tests' messages."""

    port: int
    host: str = HOST
    front: str = "native"                # or "asgi"
    echo_path: str = "/"
    rooms_path: str = "/rooms"
    undecided_path: str = "/undecided"
    upload_path: str = "/upload"
    tls: ssl.SSLContext | None = None
    limit: int = 1 << 20                 # --max-message-size
    max_body: int = 1 << 20              # --max-body-size
    handshake_timeout: float = 10.0      # --handshake-timeout
    body_timeout: float = 30.0           # --body-timeout
    max_rooms: int = 1000                # --max-rooms-per-connection (0: no cap)
    max_room_name: int = 256             # --max-room-name
    publish_token: str | None = TOKEN    # --publish-token
    max_connections_per_ip: int = 0      # --max-connections-per-ip (0: no limit)
    handshake_rate_per_ip: float = 0.0   # --handshake-rate-per-ip (0: no limit)
    handshake_burst_per_ip: int = 0      # --handshake-burst-per-ip
    max_messages_per_second: float = 0.0  # --max-messages-per-second (0: no limit)
    max_bytes_per_second: int = 0        # --max-bytes-per-second (0: no limit)
    rate_burst_seconds: float = 2.0      # --rate-burst-seconds
    cafile: str | None = None            # the certificate behind ``tls`` (to attack from a child)
    pids: list = field(default_factory=list)
    alive: Callable[[], bool] | None = None
    log: Callable[[], str] | None = None

    @property
    def path(self) -> str:
        """The WebSocket path that echoes (the compressed-stream attacks' aim)."""
        return self.echo_path

    def url(self, path: str) -> str:
        return f"{'wss' if self.tls else 'ws'}://{self.host}:{self.port}{path}"

    def argv(self) -> list[str]:
        """The arguments of ``python -m tests.attacks`` for this target."""
        if self.tls is not None and not self.cafile:
            raise ValueError("a TLS target attacked from a child process needs its cafile")
        args = ["--host", self.host, "--port", str(self.port), "--front", self.front,
                "--echo-path", self.echo_path, "--limit", str(self.limit), "--max-body", str(self.max_body),
                "--handshake-timeout", str(self.handshake_timeout), "--body-timeout", str(self.body_timeout),
                "--max-rooms", str(self.max_rooms), "--publish-token", self.publish_token or "",
                "--max-connections-per-ip", str(self.max_connections_per_ip),
                "--handshake-rate-per-ip", str(self.handshake_rate_per_ip),
                "--handshake-burst-per-ip", str(self.handshake_burst_per_ip),
                "--max-messages-per-second", str(self.max_messages_per_second),
                "--max-bytes-per-second", str(self.max_bytes_per_second),
                "--rate-burst-seconds", str(self.rate_burst_seconds)]
        return args + (["--cafile", self.cafile] if self.tls is not None else [])

    @property
    def handshake_burst(self) -> int:
        """Upgrades one address may make at once (the per-address bucket's size)."""
        return self.handshake_burst_per_ip or max(1, int(self.handshake_rate_per_ip))


#: The settings of a server open to the public, as the combined test and the
#: benchmark run it (``hardened_args``, ``hardened_target``).
HARDENED = {"limit": 64 << 10, "max_body": 256 << 10, "handshake_timeout": 2.0, "body_timeout": 1.0,
            "max_rooms": 1000, "max_room_name": 256, "max_connections_per_ip": 16,
            "handshake_rate_per_ip": 5.0, "handshake_burst_per_ip": 24,
            "max_messages_per_second": 1000.0, "max_bytes_per_second": 1 << 20, "rate_burst_seconds": 2.0}
MAX_CONNECTIONS = 4096
#: (app, echo path, extra arguments) of each front of attack_app.py
FRONTS = {"native": ("tests.integration.apps.attack_app:app", "/", ()),
          "asgi": ("tests.integration.apps.attack_app:asgi", "/ws", ("--interface", "asgi"))}


def hardened_args(front: str, cert: Path | None = None) -> tuple[str, ...]:
    """The ``fastws serve`` arguments (after the app) of the hardened server:
    compression on, a 64 KiB message limit, a 256 KiB body limit, 2 s for a
    request head, 1 s for a body, 1,000 rooms per connection, room names of
    256 bytes at most, a connection cap, 16 connections and 5 upgrades a
    second (24 at once) per client address, 1,000 messages and 1 MiB a
    second per connection, the publish API behind a token; TLS with the
    certificate of :func:`make_cert` in ``cert``."""
    h = HARDENED
    args = ("--compression", "--max-message-size", str(h["limit"]), "--max-body-size", str(h["max_body"]),
            "--handshake-timeout", f"{h['handshake_timeout']}s", "--body-timeout", f"{h['body_timeout']}s",
            "--max-rooms-per-connection", str(h["max_rooms"]), "--max-room-name", str(h["max_room_name"]),
            "--max-connections", str(MAX_CONNECTIONS),
            "--max-connections-per-ip", str(h["max_connections_per_ip"]),
            "--handshake-rate-per-ip", str(h["handshake_rate_per_ip"]),
            "--handshake-burst-per-ip", str(h["handshake_burst_per_ip"]),
            "--max-messages-per-second", str(h["max_messages_per_second"]),
            "--max-bytes-per-second", str(h["max_bytes_per_second"]),
            "--rate-burst-seconds", f"{h['rate_burst_seconds']}s",
            "--publish-token", TOKEN, "--broker", "memory://", *FRONTS[front][2])
    return args + (tls_args(cert) if cert is not None else ())


def hardened_target(port: int, front: str, cert: Path | None = None, **extra) -> Target:
    """The :class:`Target` of a server started with :func:`hardened_args`."""
    tls = client_context(cert) if cert is not None else None
    return Target(port=port, front=front, echo_path=FRONTS[front][1], tls=tls,
                  cafile=str(Path(cert) / "cert.pem") if cert is not None else None,
                  **HARDENED, **extra)


# -- the server's process: memory and descriptors -----------------------------------------------


def status_kib(pid: int, name: str) -> int:
    """A memory figure (kB) from /proc/PID/status: VmRSS, VmHWM."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux clear_refs, value 5)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def children(pid: int) -> list[str]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return f.read().split()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_fds_back(pid: int, baseline: int, timeout: float = 10.0) -> int:
    """The process's open fd count once it is back to ``baseline`` (or what
    it is after ``timeout`` seconds, for the assertion message)."""
    deadline = time.monotonic() + timeout
    while True:
        n = open_fds(pid)
        if n <= baseline or time.monotonic() > deadline:
            return n
        time.sleep(0.1)


def settled_fds(pid: int) -> int:
    """The fd count once it stops moving (connections of earlier tests on a
    shared server may still be closing)."""
    last = open_fds(pid)
    for _ in range(50):
        time.sleep(0.2)
        n = open_fds(pid)
        if n == last:
            return n
        last = n
    return last


def make_cert(directory: Path, host: str = HOST) -> Path:
    """A self-signed certificate for ``host`` and localhost (its own CA):
    ``directory/cert.pem`` and ``directory/key.pem``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    crt = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
           .public_key(key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - datetime.timedelta(minutes=5))
           .not_valid_after(now + datetime.timedelta(days=1))
           .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)),
                                                       x509.DNSName("localhost")]), critical=False)
           .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
           .sign(key, hashes.SHA256()))
    directory = Path(directory)
    (directory / "cert.pem").write_bytes(crt.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    return directory


def tls_args(cert: Path) -> tuple[str, ...]:
    """The ``fastws serve`` arguments for the certificate of :func:`make_cert`."""
    return ("--ssl-certfile", str(Path(cert) / "cert.pem"), "--ssl-keyfile", str(Path(cert) / "key.pem"))


def client_context(cert: Path) -> ssl.SSLContext:
    """A client TLS context trusting that certificate (chain and host verified)."""
    return ssl.create_default_context(cafile=str(Path(cert) / "cert.pem"))


# -- frames ---------------------------------------------------------------------------------------


def header(opcode: int, length: int, *, fin: bool = True, rsv1: bool = False) -> bytes:
    """A client frame header masked with zeros (64-bit length form past 65535)."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    if length < 126:
        return struct.pack("!BB", first, 0x80 | length) + ZERO_MASK
    if length < 1 << 16:
        return struct.pack("!BBH", first, 0x80 | 126, length) + ZERO_MASK
    return struct.pack("!BBQ", first, 0x80 | 127, length) + ZERO_MASK


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, masked: bool = True,
          rsv: int = 0) -> bytes:
    """A client frame with a random mask (or none: ``masked=False``); ``rsv``
    is the three RSV bits as a number (4 = RSV1)."""
    head = bytearray([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mbit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head.append(mbit | n)
    elif n < 1 << 16:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if not masked:
        return bytes(head) + payload
    mask = os.urandom(4)
    if not n:
        return bytes(head) + mask
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return bytes(head) + mask + (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def close_frame(code: int | None = 1000, reason: bytes = b"") -> bytes:
    return frame(0x8, b"" if code is None else struct.pack("!H", code) + reason)


def parse_close(data: bytes) -> int | None:
    """The close code in ``data`` (server frames) once a whole close frame is
    in; pings and pongs before it (heartbeats) are skipped, anything else fails."""
    at = 0
    while len(data) - at >= 2:
        first, second = data[at], data[at + 1]
        n = second & 0x7F
        assert n < 126 and not second & 0x80, f"unexpected frame {data[at : at + 16]!r}"
        if len(data) - at < 2 + n:
            return None
        if first == 0x88:
            assert n >= 2, data[at : at + 2 + n]
            return struct.unpack("!H", data[at + 2 : at + 4])[0]
        assert first in (0x89, 0x8A), f"expected a close frame, got {data[at : at + 16]!r}"
        at += 2 + n
    return None


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """One whole server frame (blocking): its first byte and its payload."""
    def exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            data = sock.recv(min(n - len(out), 1 << 20))
            assert data, f"connection closed in a frame ({len(out)} of {n} bytes)"
            out += data
        return out

    first, second = exact(2)
    n = second & 0x7F
    if n == 126:
        n = struct.unpack("!H", exact(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", exact(8))[0]
    return first, exact(n)


async def read_frame_async(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One whole server frame: its first byte and its payload."""
    first, second = await reader.readexactly(2)
    n = second & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return first, await reader.readexactly(n)


async def read_close_async(reader: asyncio.StreamReader) -> int | None:
    """The code of the server's close frame (pings, pongs and data before it
    are skipped); None for a close without a code."""
    while True:
        first, payload = await read_frame_async(reader)
        if first & 0x0F == 0x8:
            return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


def upgrade_head(target: Target, path: str, *, origin: str | None = None, extensions: str | None = None,
                 headers: dict | None = None, extra: tuple = ()) -> bytes:
    """An upgrade request; a header set to None in ``headers`` is left out."""
    base = {"Host": f"{target.host}:{target.port}", "Upgrade": "websocket", "Connection": "Upgrade",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
            "Sec-WebSocket-Version": "13"}
    if origin is not None:
        base["Origin"] = origin
    if extensions is not None:
        base["Sec-WebSocket-Extensions"] = extensions
    base.update(headers or {})
    lines = [f"GET {path} HTTP/1.1", *(f"{k}: {v}" for k, v in base.items() if v is not None),
             *(f"{k}: {v}" for k, v in extra)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- connections ------------------------------------------------------------------------------------


def open_socket(target: Target, source: str | None = None, timeout: float = 10) -> socket.socket:
    """A blocking socket to the target (TLS-wrapped for a TLS target)."""
    sock = socket.create_connection((target.host, target.port), timeout=timeout,
                                    source_address=(source, 0) if source else None)
    if target.tls is not None:
        sock = target.tls.wrap_socket(sock, server_hostname=target.host)
    return sock


async def open_stream(target: Target, source: str | None = None, *, tls: bool = True):
    """(reader, writer) to the target; over TLS when the target speaks it
    (``tls=False``: plain TCP to it anyway)."""
    return await asyncio.open_connection(
        target.host, target.port, ssl=target.tls if tls else None,
        local_addr=(source, 0) if source else None)


async def response_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def status_of(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


async def ws_raw(target: Target, path: str, source: str | None = None, **head_args):
    """(reader, writer) of a raw WebSocket the server upgraded (101 checked)."""
    reader, writer = await open_stream(target, source)
    writer.write(upgrade_head(target, path, **head_args))
    head = await response_head(reader)
    if not head.startswith(b"HTTP/1.1 101"):
        writer.transport.abort()
        raise AssertionError(f"upgrade refused: {head[:80]!r}")
    return reader, writer


async def http_request(target: Target, method: str, path: str, *, headers=(), body: bytes = b"",
                       source: str | None = None, declared: int | None = None) -> tuple[int, bytes]:
    """(status, body) of one request (``Connection: close``); ``declared``
    sends that Content-Length instead of the body's (the rest never comes)."""
    reader, writer = await open_stream(target, source)
    try:
        length = len(body) if declared is None else declared
        lines = [f"{method} {path} HTTP/1.1", f"Host: {target.host}:{target.port}",
                 "Connection: close", f"Content-Length: {length}", *headers]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        head = await response_head(reader)
        try:
            rest = await reader.read()
        except (ConnectionResetError, ssl.SSLError):
            rest = b""
        return status_of(head), rest
    finally:
        writer.transport.abort()


# -- compressed streams (blocking; the combined run gives each a thread) -----------------------------


def open_compressed(target: Target, source: str | None = None) -> socket.socket:
    """A raw socket (TLS-wrapped for a TLS target) upgraded with
    permessage-deflate accepted."""
    sock = open_socket(target, source)
    sock.sendall(upgrade_head(target, target.echo_path, extensions="permessage-deflate"))
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        assert data, f"connection closed during the upgrade: {head!r}"
        head += data
    head, _, rest = head.partition(b"\r\n\r\n")
    assert rest == b"", "the server sent a frame before any input"
    assert head.startswith(b"HTTP/1.1 101"), head
    assert b"permessage-deflate" in head.lower(), f"compression not negotiated:\n{head.decode()}"
    return sock


def send_until_close(sock: socket.socket, tls: bool, first: bytes, stream,
                     budget: int = ATTACK_BYTES, seconds: float = DEADLINE) -> tuple[int, int]:
    """Send ``first``, then chunks from ``stream`` until the server's close
    frame arrives (at most ``budget`` bytes, ``seconds`` seconds).

    Returns (close code, bytes sent)."""
    retry = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
    sock.setblocking(False)
    pending = memoryview(first)
    sent = 0
    received = b""
    code = None
    deadline = time.monotonic() + seconds
    while code is None:
        assert time.monotonic() < deadline, f"no close after {sent} bytes in {seconds}s"
        want_write = bool(pending) or sent < budget
        buffered = tls and sock.pending()
        readable, writable, _ = select.select(
            [sock], [sock] if want_write else [], [], 0 if buffered else 1.0)
        if readable or buffered:
            try:
                data = sock.recv(65536)
            except retry:
                data = None
            if data is not None:
                assert data, f"connection closed without a close frame after {sent} bytes"
                received += data
                code = parse_close(received)
                continue
        if writable:
            if not pending:
                pending = memoryview(next(stream))
            try:
                n = sock.send(pending)
            except retry:
                continue
            pending = pending[n:]
            sent += n
    return code, sent


def zeros():
    block = bytes(CHUNK)
    while True:
        yield block


def empty_deflate_fragments():
    """Continuation frames full of empty stored deflate blocks (a byte for
    the block header, then LEN 0000 and NLEN ffff): valid compressed data
    that inflates to nothing."""
    payload = b"\x00\x00\x00\xff\xff" * ((CHUNK - 14) // 5)
    data = header(0x0, len(payload), fin=False) + payload
    while True:
        yield data


BOMB_SEGMENT = 16 << 20         # inflated bytes of one segment of a bomb


@functools.lru_cache(maxsize=1)
def _bomb_segment() -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = comp.compress(bytes(BOMB_SEGMENT)) + comp.flush(zlib.Z_SYNC_FLUSH)
    assert segment.endswith(b"\x00\x00\xff\xff")
    return segment


def deflate_bomb(inflated: int) -> bytes:
    """Raw deflate data (RFC 7692 form: no tail) inflating to ``inflated``
    zero bytes: one sync-flushed segment of 16 MiB of zeros, repeated (each
    segment comes from a fresh compressor, so they chain into one stream)."""
    segment = _bomb_segment()
    data = segment * (inflated // BOMB_SEGMENT)
    assert zlib.decompressobj(-15).decompress(data[: len(segment)]) == bytes(BOMB_SEGMENT)
    return data[:-4]


def deflate_bound(n: int) -> int:
    """zlib's compressBound: how far a compressed message may pass the limit."""
    return n + (n >> 12) + (n >> 14) + (n >> 25) + 13


def bomb_within(limit: int) -> bytes:
    """The largest bomb (at most 1 GiB inflated) whose compressed size stays
    within the deflate bound of ``limit``: the header check lets it in, only
    bounded inflating stops it."""
    segments = max(1, min(64, deflate_bound(limit) // len(_bomb_segment())))
    bomb = deflate_bomb(segments * BOMB_SEGMENT)
    assert len(bomb) <= deflate_bound(limit)
    return bomb


def bomb_frames(bomb: bytes, fragmented: bool, step: int = 16 << 10) -> bytes:
    """``bomb`` as one compressed message: one frame, or fragments of ``step`` bytes."""
    if not fragmented:
        return header(0x2, len(bomb), rsv1=True) + bomb
    pieces = [bomb[i : i + step] for i in range(0, len(bomb), step)]
    return b"".join(
        header(0x2 if i == 0 else 0x0, len(p), fin=i == len(pieces) - 1, rsv1=i == 0) + p
        for i, p in enumerate(pieces))


def _compressed(target: Target, source: str, first: bytes, stream) -> str:
    sock = open_compressed(target, source)
    try:
        code, sent = send_until_close(sock, target.tls is not None, first, stream)
    finally:
        sock.close()
    return f"close {code}" if sent < ATTACK_BYTES else f"close {code} after the whole budget"


def compressed_4gib_header(target: Target, source: str) -> str:
    """A compressed frame whose header declares 4 GiB, then zeros."""
    return _compressed(target, source, header(0x2, 1 << 32, rsv1=True), zeros())


def compressed_endless_fragments(target: Target, source: str) -> str:
    """A compressed message of endless fragments inflating to nothing."""
    return _compressed(target, source, header(0x2, 0, fin=False, rsv1=True), empty_deflate_fragments())


def zip_bomb_one_frame(target: Target, source: str) -> str:
    return _compressed(target, source, bomb_frames(bomb_within(target.limit), False), zeros())


def zip_bomb_fragments(target: Target, source: str) -> str:
    return _compressed(target, source, bomb_frames(bomb_within(target.limit), True), zeros())


# -- slow clients -----------------------------------------------------------------------------------------


async def read_all(reader: asyncio.StreamReader, limit: float) -> tuple[bytes, bool]:
    """(everything read, closed by the server) within ``limit`` seconds."""
    got = bytearray()
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(4096), max(0.01, end - loop.time()))
            if not chunk:
                return bytes(got), True
            got += chunk
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        return bytes(got), True
    except asyncio.TimeoutError:
        return bytes(got), False


async def trickle(port: int, data: bytes, delay: tuple[float, float], limit: float,
                  first: bytes = b"", ssl_ctx=None, *, host: str = HOST,
                  source: str | None = None) -> tuple[bytes, bool, float]:
    """Send ``first`` at once, then ``data`` one byte per ``delay`` seconds
    (uniform), while reading: (what the server sent, closed by the server,
    seconds from the connect call to close: the clock starts before the
    connect, so a busy client never makes the server look early)."""
    t0 = time.monotonic()
    for attempt in range(CONNECT_TRIES):
        try:
            reader, writer = await asyncio.open_connection(host, port, ssl=ssl_ctx,
                                                           local_addr=(source, 0) if source else None)
            break
        except (OSError, ssl.SSLError) as exc:
            if attempt + 1 == CONNECT_TRIES:
                raise ConnectionError(f"connect{' and TLS handshake' if ssl_ctx else ''} failed "
                                      f"{CONNECT_TRIES} times, the last after {time.monotonic() - t0:.2f}s: "
                                      f"{exc!r}") from None
            t0 = time.monotonic()

    async def feed():
        if first:
            writer.write(first)
        for i in range(len(data)):
            writer.write(data[i:i + 1])
            await asyncio.sleep(random.uniform(*delay))

    feeder = asyncio.create_task(feed())
    try:
        got, closed = await read_all(reader, limit)
    finally:
        feeder.cancel()
        writer.transport.abort()
    return got, closed, time.monotonic() - t0


def _slow_outcome(result: tuple[bytes, bool, float], deadline: float) -> str:
    """What became of one slow connection: "408", "dropped" (closed, nothing
    sent), or what went wrong (still open, closed too early or too late)."""
    got, closed, took = result
    if not closed:
        return "still open"
    if took < deadline * 0.4:
        return f"closed after {took:.1f}s, before its deadline of {deadline}s"
    if took > deadline + 6.0:
        return f"closed after {took:.1f}s, long past its deadline of {deadline}s"
    if got.startswith(TIMEOUT_408):
        return "408"
    if got == b"":
        return "dropped"
    return f"answered {got[:40]!r}"


async def slowloris(target: Target, source: str) -> dict:
    """SLOWLORIS request heads at once, one byte every 1-2 s each."""
    t = target.handshake_timeout
    results = await asyncio.gather(*(
        trickle(target.port, SLOW_HEAD, (1.0, 2.0), t + 10, ssl_ctx=target.tls, host=target.host,
                source=source) for _ in range(SLOWLORIS)))
    return dict(collections.Counter(_slow_outcome(r, t) for r in results))


async def slow_upgrade(target: Target, source: str) -> str:
    """An upgrade request one byte every 0.3-0.5 s."""
    t = target.handshake_timeout
    head = UPGRADE.replace(b"/ws", target.echo_path.encode())
    return _slow_outcome(await trickle(target.port, head, (0.3, 0.5), t + 10, ssl_ctx=target.tls,
                                       host=target.host, source=source), t)


async def slow_body(target: Target, source: str) -> str:
    """A request body one byte every 0.3-0.5 s after a complete head."""
    t = max(target.body_timeout, target.handshake_timeout)
    head = (f"POST {target.upload_path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n").encode()
    return _slow_outcome(await trickle(target.port, b"x" * 100, (0.3, 0.5), t + 10, first=head,
                                       ssl_ctx=target.tls, host=target.host, source=source),
                         target.body_timeout)


async def silent_connection(target: Target, source: str) -> str:
    """TCP connected, then not a byte (for a TLS server: no ClientHello)."""
    t = target.handshake_timeout
    return _slow_outcome(await trickle(target.port, b"", (0, 0), t + 10, host=target.host,
                                       source=source), t)


async def undecided_upgrade(target: Target, source: str) -> str:
    """An upgrade the application takes 30 s to decide on."""
    t = target.handshake_timeout
    head = UPGRADE.replace(b"/ws", target.undecided_path.encode())
    return _slow_outcome(await trickle(target.port, b"", (0, 0), t + 10, first=head, ssl_ctx=target.tls,
                                       host=target.host, source=source), t)


# -- rooms ------------------------------------------------------------------------------------------------


async def _ws_client(target: Target, path: str, source: str):
    import websockets

    for attempt in range(CONNECT_TRIES):
        try:
            return await websockets.connect(target.url(path), ssl=target.tls, open_timeout=10,
                                            max_size=None, local_addr=(source, 0), compression=None)
        except (OSError, ssl.SSLError, websockets.InvalidMessage):
            if attempt + 1 == CONNECT_TRIES:
                raise


async def ask(ws, cmd: dict, timeout: float = 30.0) -> dict:
    """Send ``cmd`` to /rooms; the app's JSON answer (room messages, not JSON, are skipped)."""
    await ws.send(json.dumps(cmd))
    deadline = time.monotonic() + timeout
    while True:
        data = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        if data.startswith("{"):
            return json.loads(data)


async def room_flood(target: Target, source: str) -> dict:
    """One connection asks to join ROOM_JOINS rooms, ROOM_CHUNK per command."""
    ws = await _ws_client(target, target.rooms_path, source)
    try:
        joined, refused = 0, collections.Counter()
        for start in range(0, ROOM_JOINS, ROOM_CHUNK):
            reply = await ask(ws, {"join_range": "flood-", "start": start, "count": ROOM_CHUNK})
            joined += reply["joined"]
            if reply["error"]:
                refused[reply["error"]["type"]] += 1
        served = await ask(ws, {"ping": "after"}) == {"pong": "after"}
    finally:
        await ws.close()
    return {"joined": joined, "refused": dict(refused), "still served": served}


def room_flood_expect(target: Target) -> dict:
    chunks = ROOM_JOINS // ROOM_CHUNK
    if not target.max_rooms or target.max_rooms >= ROOM_JOINS:
        return {"joined": ROOM_JOINS, "refused": {}, "still served": True}
    refused = chunks - target.max_rooms // ROOM_CHUNK
    return {"joined": target.max_rooms, "refused": {"RoomLimitError": refused}, "still served": True}


async def long_room_names(target: Target, source: str) -> dict:
    """Room names past max_room_name (as long as a message allows), a lone
    surrogate, a publish to a long name, and a 70,000-byte name through
    the HTTP publish API."""
    name = "n" * min(60_000, target.limit - 200)
    ws = await _ws_client(target, target.rooms_path, source)
    try:
        join = await ask(ws, {"join": [f"fine-{os.getpid()}-{random.random()}", name]})
        surrogate = await ask(ws, {"join": ["\ud800"]})
        publish = await ask(ws, {"publish": name, "text": "x"})
        served = await ask(ws, {"ping": "after"}) == {"pong": "after"}
    finally:
        await ws.close()
    body = json.dumps({"room": "n" * 70_000, "text": "x"}).encode()
    status, _ = await http_request(target, "POST", "/publish", body=body, source=source, headers=(
        f"Authorization: Bearer {target.publish_token}", "Content-Type: application/json"))

    def kind(reply):
        return reply["error"]["type"] if reply["error"] else "accepted"

    return {"join": [join["joined"], kind(join)], "lone surrogate": kind(surrogate),
            "publish": kind(publish), "still served": served, "HTTP publish": status}


def long_room_names_expect(target: Target) -> dict:
    return {"join": [1, "RoomNameError"], "lone surrogate": "RoomNameError", "publish": "RoomNameError",
            "still served": True, "HTTP publish": 400 if target.publish_token else 404}


# -- Origin, the publish API, close codes -------------------------------------------------------------


async def upgrade_status(target: Target, path: str, source: str, **head_args) -> int:
    reader, writer = await open_stream(target, source)
    try:
        writer.write(upgrade_head(target, path, **head_args))
        return status_of(await response_head(reader))
    finally:
        writer.transport.abort()


async def cross_site_origin(target: Target, source: str) -> dict:
    """Upgrades from another site's page (evil, opaque, same host on another port)."""
    origins = (EVIL, "null", f"http://{target.host}:{target.port + 1}")
    statuses = collections.Counter()
    for i in range(ORIGIN_TRIES):
        statuses[str(await upgrade_status(target, target.echo_path, spread(source, i),
                                          origin=origins[i % len(origins)]))] += 1
    return dict(statuses)


async def publish_api_abuse(target: Target, source: str) -> dict:
    """The HTTP publish API: lone surrogates, wrong bearer tokens, a JSON
    body nested past the recursion limit, a body past max_body_size; a
    bearer scheme in lower case still works."""
    token = target.publish_token
    room = f"publish-attack-{os.getpid()}-{random.randrange(1 << 30)}"

    async def post(doc_or_raw, auth=f"Bearer {token}", declared=None, why=b"") -> int | str:
        """The status; a 400 whose error does not contain ``why`` is told apart."""
        body = doc_or_raw if isinstance(doc_or_raw, bytes) else json.dumps(doc_or_raw).encode()
        status, answer = await http_request(target, "POST", "/publish", body=body, source=source,
                                            declared=declared, headers=(
                                                f"Authorization: {auth}", "Content-Type: application/json"))
        if status == 400 and why not in answer:
            return f"400 {answer[:80]!r}"
        return status

    surrogates = [await post(doc, why=b"lone surrogate") for doc in (
        {"room": room, "text": "x\ud800y"}, {"room": room + "\udfff", "text": "t"},
        {"room": room, "namespace": "\ud800", "text": "t"})]
    refused = [await post({"room": room, "text": "no"}, auth) for auth in (
        f"Bearer {token}x", f"Bearer{token}", f"Basic {token}", str(token), "bearer ", "",
        f"Bearer {str(token)[:-1]}")]
    nested = await post(b'{"room": ' + b"[" * 100_000 + b"]" * 100_000 + b', "text": "x"}', why=b"nest")
    oversize = await post(b'{"room": "' + b"x" * 100, declared=target.max_body + 1)
    lower = await post({"room": room, "text": "fine"}, f"bearer   {token}")
    return {"lone surrogates": surrogates, "wrong bearer": refused, "nested JSON": nested,
            "body past max_body_size": oversize, "lower-case bearer": lower}


def publish_api_expect(target: Target) -> dict:
    if not target.publish_token:
        return {"lone surrogates": [404] * 3, "wrong bearer": [404] * 7, "nested JSON": 404,
                "body past max_body_size": 413, "lower-case bearer": 404}
    return {"lone surrogates": [400] * 3, "wrong bearer": [401] * 7, "nested JSON": 400,
            "body past max_body_size": 413, "lower-case bearer": 200}


async def open_and_close(target: Target, code: int, path: str, source: str | None = None) -> int:
    """Upgrade on a raw socket, close with ``code``; the code the server echoes."""
    reader, writer = await ws_raw(target, path, source)
    try:
        writer.write(close_frame(code))
        echoed = await read_close_async(reader)
        await reader.read()                       # then TCP closes
        return echoed
    finally:
        writer.transport.abort()


async def metric_samples(target: Target, source: str | None = None) -> dict:
    """{(sample name, frozenset(labels)): value} of a scrape of /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = await http_request(target, "GET", "/metrics", source=source)
    assert status == 200, body[:200]
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def close_series(samples: dict) -> dict:
    """{code label: count} of websocket_closes_total."""
    return {dict(labels)["code"]: v for (name, labels), v in samples.items()
            if name == "websocket_closes_total"}


async def client_close_codes(target: Target, source: str) -> dict:
    """2,000 connections, each closed by the client with its own code."""
    sem = asyncio.Semaphore(CLOSE_CONCURRENCY)

    async def one(k, code):
        async with sem:
            return await asyncio.wait_for(open_and_close(target, code, target.echo_path, spread(source, k)), 20)

    echoed = await asyncio.gather(*(one(k, c) for k, c in enumerate(CLOSE_CODES)))
    wrong = [(c, e) for c, e in zip(CLOSE_CODES, echoed, strict=True) if c != e]
    series = close_series(await metric_samples(target, source))
    return {"echoed": len(echoed) - len(wrong), "first wrong": wrong[:1],
            "close-code series bounded": len(series) <= MAX_CLOSE_SERIES}


# -- protocol violations and bad requests ---------------------------------------------------------------


def violations(limit: int) -> list[tuple[str, bytes, Any]]:
    """(case, bytes sent after the upgrade, close code the server must send);
    a code of "1002|1009" takes either."""
    big = b"\x00" * (limit + 1)
    half = b"\x01" * (limit // 2 + 1)
    cases = [
        ("continuation without a start", frame(0x0, b"x"), 1002),
        ("new text inside a fragmented message", frame(0x1, b"a", fin=False) + frame(0x1, b"b"), 1002),
        ("new binary inside a fragmented message", frame(0x2, b"a", fin=False) + frame(0x2, b"b"), 1002),
        ("fragmented ping", frame(0x9, b"a", fin=False) + frame(0x0, b"b"), 1002),
        ("ping of 126 bytes", frame(0x9, b"p" * 126), 1002),
        ("close of 126 bytes", frame(0x8, b"\x03\xe8" + b"r" * 124), 1002),
        ("RSV1 without an extension", frame(0x1, b"x", rsv=4), 1002),
        ("RSV2", frame(0x1, b"x", rsv=2), 1002),
        ("RSV3 on a ping", frame(0x9, b"x", rsv=1), 1002),
        ("reserved opcode 3", frame(0x3, b"x"), 1002),
        ("reserved opcode 0xB", frame(0xB, b"x"), 1002),
        ("unmasked text frame", frame(0x1, b"hello", masked=False), 1002),
        ("unmasked ping", frame(0x9, b"", masked=False), 1002),
        ("close with a one-byte payload", frame(0x8, b"\x03"), 1002),
        *((f"close code {c}", close_frame(c), 1002) for c in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999,
                                                             5000, 65535)),
        ("text 0xff", frame(0x1, b"\xff"), 1007),
        ("text with a surrogate", frame(0x1, b"ab\xed\xa0\x80cd"), 1007),
        ("overlong UTF-8", frame(0x1, b"\xc0\xaf"), 1007),
        ("UTF-8 cut at the end", frame(0x1, b"abc\xe2\x82"), 1007),
        ("UTF-8 cut at the end of fragments",
         frame(0x1, b"abc", fin=False) + frame(0x0, b"\xf0\x9f\x98"), 1007),
        ("beyond U+10FFFF", frame(0x1, b"\xf4\x90\x80\x80"), 1007),
        ("invalid first fragment, rest never sent", frame(0x1, b"valid so far \xce\xba\xff", fin=False), 1007),
        ("close reason not UTF-8", close_frame(1000, b"\xce\xba\xe1\xbd\xb9\xed\xa0\x80"), 1007),
        ("limit + 1 declared, 100 bytes sent", frame(0x2, big)[:14 + 100], 1009),
        ("limit + 1 sent whole", frame(0x2, big), 1009),
        ("limit + 1 of text", frame(0x1, b"a" * (limit + 1)), 1009),
        ("fragments past the limit", frame(0x2, half, fin=False) + frame(0x0, half), 1009),
        ("length 2**63-1", bytes([0x82, 0xFF]) + struct.pack("!Q", (1 << 63) - 1) + os.urandom(4) + b"xx",
         "1002|1009"),
        ("length with its top bit set", bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 63) + os.urandom(4),
         "1002|1009"),
    ]
    return cases


async def _violation(target: Target, data: bytes, source: str) -> int | None:
    reader, writer = await ws_raw(target, target.echo_path, source)
    try:
        writer.write(data)
        try:
            await writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            pass
        return await asyncio.wait_for(read_close_async(reader), 15)
    finally:
        writer.transport.abort()


async def protocol_violations(target: Target, source: str) -> dict:
    """Every case of :func:`violations`, each on a connection of its own."""
    sem = asyncio.Semaphore(VIOLATION_CONCURRENCY)
    cases = violations(target.limit)

    async def one(k, case, data, want):
        async with sem:
            try:
                code = await _violation(target, data, spread(source, k))
            except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
                return f"no close frame ({type(exc).__name__})"
            return want if want == "1002|1009" and code in (1002, 1009) else code

    codes = await asyncio.gather(*(one(k, *c) for k, c in enumerate(cases)))
    return {case: code for (case, _, _), code in zip(cases, codes, strict=True)}


def protocol_violations_expect(target: Target) -> dict:
    return {case: want for case, _, want in violations(target.limit)}


def bad_requests(target: Target) -> list[tuple[str, bytes, Any]]:
    """(case, request bytes, status the server must answer; "closed": the
    connection ends, with 400, 408 or no answer)."""
    p = target.echo_path
    not_upgrade = 404 if target.front == "asgi" else 400
    return [
        ("head over 8 KiB", upgrade_head(target, p, extra=[("X-Pad", "a" * 9000)]), 431),
        ("head that never ends", upgrade_head(target, p)[:-2] + b"".join(
            b"X-Pad-%d: %s\r\n" % (i, b"b" * 100) for i in range(100)), 431),
        ("POST upgrade", upgrade_head(target, p).replace(b"GET ", b"POST ", 1), 400),
        ("no Sec-WebSocket-Key", upgrade_head(target, p, headers={"Sec-WebSocket-Key": None}), 400),
        ("key not base64", upgrade_head(target, p, headers={"Sec-WebSocket-Key": "not base64!!"}), 400),
        # no upgrade asked: the native front refuses it, an ASGI app gets a plain GET (404 here)
        ("Upgrade: h2c", upgrade_head(target, p, headers={"Upgrade": "h2c"}), not_upgrade),
        ("Connection: keep-alive", upgrade_head(target, p, headers={"Connection": "keep-alive"}),
         not_upgrade),
        ("version 8", upgrade_head(target, p, headers={"Sec-WebSocket-Version": "8"}), 426),
        ("TLS record bytes", b"\x16\x03\x01\x02\x00" + os.urandom(200), "closed"),
        ("blank lines", b"\r\n\r\n", "closed"),
        ("GET and nothing", b"GET\r\n\r\n", "closed"),
    ]


async def _bad_request(target: Target, data: bytes, source: str):
    reader, writer = await open_stream(target, source)
    try:
        writer.write(data)
        got, closed = await read_all(reader, 15)
    finally:
        writer.transport.abort()
    if not closed:
        return "still open"
    if got.startswith(b"HTTP/1.1 "):
        return status_of(got)
    return "closed"


async def bad_request_heads(target: Target, source: str) -> dict:
    """Handshakes that break the rules, plain garbage, and a connection reset
    in the middle of a message."""
    out = {}
    for k, (case, data, want) in enumerate(bad_requests(target)):
        got = await _bad_request(target, data, spread(source, k))
        out[case] = "closed" if want == "closed" and got in ("closed", 400, 408) else got
    reader, writer = await ws_raw(target, target.echo_path, source)
    writer.write(frame(0x2, b"q" * 100_000)[:5000])
    await writer.drain()
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()                          # RST in the middle of a message
    out["reset mid-message"] = "sent"
    return out


def bad_request_heads_expect(target: Target) -> dict:
    out = {case: want for case, _, want in bad_requests(target)}
    out["reset mid-message"] = "sent"
    return out


# -- the guards of a public server: per-address limits, rate limits, tokens, room rules ----------------


async def _upgrade(target: Target, path: str, source: str, headers: dict | None = None):
    """(status, response head, (reader, writer) or None): an upgrade; an
    upgraded connection is left open for the caller."""
    reader, writer = await open_stream(target, source)
    try:
        writer.write(upgrade_head(target, path, headers=headers))
        head = await asyncio.wait_for(response_head(reader), 15)
    except BaseException:
        writer.transport.abort()
        raise
    if head.startswith(b"HTTP/1.1 101"):
        return 101, head, (reader, writer)
    writer.transport.abort()
    return status_of(head), head, None


def _retry_after(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"retry-after":
            return int(value.strip())
    return None


async def connection_flood(target: Target, source: str) -> dict:
    """Upgrades from one address, each held open: 10 more than the address
    may hold (or 40 without a limit); the refused ones must carry Retry-After."""
    limit = target.max_connections_per_ip
    held, statuses, hints = [], collections.Counter(), []
    try:
        for _ in range((limit or 30) + 10):
            status, head, stream = await _upgrade(target, target.echo_path, source)
            statuses[str(status)] += 1
            if stream is not None:
                held.append(stream[1])
            else:
                hints.append(_retry_after(head))
    finally:
        for writer in held:
            writer.transport.abort()
    return {"statuses": dict(statuses), "Retry-After on every refusal": all(h and h > 0 for h in hints)}


def connection_flood_expect(target: Target) -> dict:
    limit = target.max_connections_per_ip
    if not limit:
        return {"statuses": {"101": 40}, "Retry-After on every refusal": True}
    return {"statuses": {"101": limit, "429": 10}, "Retry-After on every refusal": True}


async def upgrade_burst(target: Target, source: str) -> dict:
    """Upgrades from one address as fast as they go (a few at a time, fewer
    than the address may hold, each closed at once): the address's bucket
    (burst, then the rate) lets some through, 429 for the rest."""
    tries = target.handshake_burst + 60
    at_once = max(1, min(10, (target.max_connections_per_ip or 20) // 2))
    statuses = collections.Counter()
    left = iter(range(tries))

    async def worker():
        for _ in left:
            status, _, stream = await _upgrade(target, target.echo_path, source)
            statuses[status] += 1
            if stream is not None:             # a whole close handshake, then the next
                reader, writer = stream
                writer.write(close_frame(1000))
                try:
                    await read_all(reader, 10)
                finally:
                    writer.transport.abort()

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(at_once)))
    took = time.monotonic() - t0
    accepted, refused = statuses[101], statuses[429]
    if not target.handshake_rate_per_ip:
        return {"accepted": accepted, "refused with 429": refused, "other": tries - accepted - refused}
    most = target.handshake_burst + target.handshake_rate_per_ip * took + at_once
    return {"accepted": "the burst, then the rate" if target.handshake_burst <= accepted <= most
            else f"{accepted} in {took:.2f}s (bucket {target.handshake_burst} + rate)",
            "refused with 429": refused > 0, "other": tries - accepted - refused}


def upgrade_burst_expect(target: Target) -> dict:
    tries = target.handshake_burst + 60
    if not target.handshake_rate_per_ip:
        return {"accepted": tries, "refused with 429": 0, "other": 0}
    return {"accepted": "the burst, then the rate", "refused with 429": True, "other": 0}


async def _flood(target: Target, source: str, count: int, message) -> str:
    """Send ``count`` messages as fast as they go on one connection (the
    echoes read meanwhile); how the connection ended."""
    import websockets

    ws = await websockets.connect(target.url(target.echo_path), ssl=target.tls, open_timeout=10,
                                  max_size=None, compression=None, local_addr=(source, 0))
    echoes = 0

    async def read():
        nonlocal echoes
        try:
            async for _ in ws:
                echoes += 1
        except websockets.ConnectionClosed:
            pass

    reader = asyncio.create_task(read())
    try:
        for i in range(count):
            await ws.send(message(i))
    except websockets.ConnectionClosed:
        pass
    await ws.close()
    await asyncio.wait_for(reader, 20)
    return f"close {ws.close_code} {ws.close_reason}".strip()


async def message_flood(target: Target, source: str) -> str:
    """Small messages on one connection, three burst windows' worth."""
    rate = target.max_messages_per_second or 1000
    count = int(min(50_000, rate * target.rate_burst_seconds * 3 + 100))
    return await _flood(target, source, count, lambda i: f"flood {i}")


async def byte_flood(target: Target, source: str) -> str:
    """32 KiB messages on one connection, three burst windows' worth (at most 16 MiB)."""
    size = min(32 << 10, target.limit)
    rate = target.max_bytes_per_second or (1 << 20)
    count = int(min(16 << 20, rate * target.rate_burst_seconds * 3) // size + 1)
    return await _flood(target, source, count, lambda i: bytes(size))


def flood_expect(kind: str):
    def expect(target: Target) -> str:
        limited = target.max_messages_per_second if kind == "messages" else target.max_bytes_per_second
        return "close 1008 rate limit exceeded" if limited else "close 1000"
    return expect


def forged_tokens() -> dict:
    """{case: Authorization header value or None} of tokens that must not get in."""
    import jwt

    from tests.integration.apps.attack_app import JWT_AUDIENCE, JWT_ISSUER, JWT_SECRET

    now = int(time.time())
    good = {"sub": "mallory", "iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "exp": now + 600}

    def signed(claims, key=JWT_SECRET, **kw):
        return "Bearer " + jwt.encode(claims, key, algorithm="HS256", **kw)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    unsigned = b64(b'{"alg":"none","typ":"JWT"}') + "." + b64(json.dumps(good).encode()) + "."
    return {
        "no token": None,
        "not a JWT": "Bearer not.a.jwt",
        "alg none": "Bearer " + unsigned,
        "another key": signed(good, key="an-attackers-own-secret-0123456789abcdef"),
        "expired": signed({**good, "exp": now - 60}),
        "not yet valid": signed({**good, "nbf": now + 600}),
        "another audience": signed({**good, "aud": "another-app"}),
        "another issuer": signed({**good, "iss": "https://evil.example"}),
        "no exp": signed({k: v for k, v in good.items() if k != "exp"}),
        "a valid token": signed(good),
    }


async def forged_token_upgrades(target: Target, source: str) -> dict:
    """Upgrades of the JWT-guarded route with forged, expired and otherwise
    bad tokens (one good one, which must get in)."""
    statuses, bodies = {}, set()
    for k, (case, value) in enumerate(forged_tokens().items()):
        headers = {"Authorization": value} if value else None
        reader, writer = await open_stream(target, spread(source, k))
        try:
            writer.write(upgrade_head(target, "/private", headers=headers))
            head = await asyncio.wait_for(response_head(reader), 15)
            if head.startswith(b"HTTP/1.1 101"):
                writer.write(frame(0x1, b"in"))
                first, payload = await asyncio.wait_for(read_frame_async(reader), 15)
                statuses[case] = 101 if payload == b"in" else f"101, then {payload[:20]!r}"
            else:
                statuses[case] = status_of(head)
                body, _ = await read_all(reader, 5)
                bodies.add(body)
        finally:
            writer.transport.abort()
    return {"statuses": statuses, "one answer for every refusal": len(bodies) == 1}


def forged_token_expect(target: Target) -> dict:
    cases = forged_tokens()
    return {"statuses": {c: 101 if c == "a valid token" else 401 for c in cases},
            "one answer for every refusal": True}


async def locked_rooms(target: Target, source: str) -> dict:
    """Joins of and publishes to rooms the application's rules refuse
    (``locked-*``), over the WebSocket and the HTTP publish API."""
    ws = await _ws_client(target, target.rooms_path, source)
    try:
        join = await ask(ws, {"join": ["open-1", "locked-1"]})
        publish = await ask(ws, {"publish": "locked-1", "text": "x"})
        served = await ask(ws, {"ping": "after"}) == {"pong": "after"}
    finally:
        await ws.close()
    body = json.dumps({"room": "locked-1", "text": "x"}).encode()
    status, _ = await http_request(target, "POST", "/publish", body=body, source=source, headers=(
        f"Authorization: Bearer {target.publish_token}", "Content-Type: application/json"))

    def kind(reply):
        return reply["error"]["type"] if reply["error"] else "accepted"

    return {"join": [join["joined"], kind(join)], "publish": kind(publish), "still served": served,
            "HTTP publish": status}


def locked_rooms_expect(target: Target) -> dict:
    # an ASGI app has no authorize hooks: the HTTP publish API does not ask it
    http = 200 if target.front == "asgi" else 403
    return {"join": [1, "RoomDeniedError"], "publish": "RoomDeniedError", "still served": True,
            "HTTP publish": http if target.publish_token else 404}


# -- the table ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    """One entry of the attack set: ``run(target, source)`` (a coroutine
    function, or a plain function run in a thread) returns the outcome;
    ``expect(target)`` is the outcome a hardened server gives; ``seconds``
    bounds the whole attack."""

    name: str
    run: Callable
    expect: Callable[[Target], Any]
    seconds: float = 90.0


def _const(value):
    return lambda target: value


ATTACKS: list[Attack] = [
    Attack("compressed frame declaring 4 GiB", compressed_4gib_header, _const("close 1009")),
    Attack("compressed message in endless fragments", compressed_endless_fragments, _const("close 1009")),
    Attack("zip bomb in one frame", zip_bomb_one_frame, _const("close 1009")),
    Attack("zip bomb in fragments", zip_bomb_fragments, _const("close 1009")),
    Attack("slowloris request heads", slowloris, _const({"408": SLOWLORIS})),
    Attack("slow upgrade request", slow_upgrade, _const("408")),
    Attack("slow request body", slow_body, _const("408")),
    Attack("silent connection", silent_connection, _const("dropped")),
    Attack("undecided upgrade", undecided_upgrade, _const("dropped")),
    Attack("40,000 room joins", room_flood, room_flood_expect),
    Attack("long room names", long_room_names, long_room_names_expect),
    Attack("cross-site Origin", cross_site_origin, _const({"403": ORIGIN_TRIES})),
    Attack("publish API abuse", publish_api_abuse, publish_api_expect),
    Attack("2,000 client close codes", client_close_codes,
           _const({"echoed": len(CLOSE_CODES), "first wrong": [], "close-code series bounded": True})),
    Attack("protocol violations", protocol_violations, protocol_violations_expect),
    Attack("bad request heads", bad_request_heads, bad_request_heads_expect),
    Attack("connection flood from one address", connection_flood, connection_flood_expect),
    Attack("upgrade burst from one address", upgrade_burst, upgrade_burst_expect),
    Attack("message flood", message_flood, flood_expect("messages")),
    Attack("byte flood", byte_flood, flood_expect("bytes")),
    Attack("forged tokens", forged_token_upgrades, forged_token_expect),
    Attack("rooms the app locks", locked_rooms, locked_rooms_expect),
]


@dataclass
class Result:
    name: str
    outcome: Any
    expected: Any
    seconds: float

    @property
    def ok(self) -> bool:
        return self.outcome == self.expected

    def as_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "seconds": round(self.seconds, 2),
                "outcome": self.outcome, "expected": self.expected}


def _plain(value):
    """``value`` as JSON would give it back (tuples are lists, keys strings)."""
    return json.loads(json.dumps(value, default=str))


async def run_one(attack: Attack, target: Target, source: str) -> Result:
    """Run one attack, bounded by its ``seconds``; an exception or a timeout
    is its outcome (never raised)."""
    t0 = time.monotonic()
    try:
        if inspect.iscoroutinefunction(attack.run):
            outcome = await asyncio.wait_for(attack.run(target, source), attack.seconds)
        else:
            outcome = await asyncio.wait_for(asyncio.to_thread(attack.run, target, source), attack.seconds)
    except asyncio.TimeoutError:
        outcome = f"not done within {attack.seconds}s"
    except Exception as exc:  # the outcome of a failed attack, reported with the others
        outcome = f"error: {type(exc).__name__}: {exc}"[:400]
    return Result(attack.name, _plain(outcome), _plain(attack.expect(target)), time.monotonic() - t0)


async def run_attacks(target: Target, attacks: list[Attack] | None = None,
                      round_no: int = 0) -> list[Result]:
    """Every attack at once, each from its own source address (those of
    round ``round_no``); the results in table order."""
    attacks = ATTACKS if attacks is None else attacks
    await asyncio.to_thread(bomb_within, target.limit)      # built before the clock starts
    return list(await asyncio.gather(*(run_one(a, target, source_for(ATTACKS.index(a), round_no))
                                       for a in attacks)))


REPO = Path(__file__).resolve().parents[1]


async def run_attacks_in_child(target: Target, names: list[str] | None = None, round_no: int = 0,
                               timeout: float = 150.0) -> list[Result]:
    """:func:`run_attacks` in a child process (``python -m tests.attacks``),
    so that the attackers' work never shares an interpreter with a good
    client measured next to them."""
    args = [sys.executable, "-m", "tests.attacks", *target.argv(), "--round", str(round_no)]
    for name in names or ():
        args += ["--only", name]
    proc = await asyncio.create_subprocess_exec(*args, cwd=REPO, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"the attack set took longer than {timeout}s") from None
    results = []
    for line in out.decode().splitlines():
        d = json.loads(line)
        results.append(Result(d["name"], d["outcome"], d["expected"], d["seconds"]))
    if proc.returncode not in (0, 1) or not results:
        raise AssertionError(f"the attacker exited with {proc.returncode}:\n{err.decode()[-3000:]}")
    return results


def report(results: list[Result]) -> str:
    """One line per attack: ok or what came instead of the expected outcome."""
    lines = []
    for r in results:
        if r.ok:
            lines.append(f"ok    {r.name} ({r.seconds:.1f}s)")
        else:
            lines.append(f"WRONG {r.name} ({r.seconds:.1f}s): got {json.dumps(r.outcome)}, "
                         f"expected {json.dumps(r.expected)}")
    return "\n".join(lines)


# -- the good clients -------------------------------------------------------------------------------------


class GoodClient:
    """A well-behaved ``websockets`` client on one connection: sends a text
    message every ``period`` seconds (without waiting for replies) and
    checks that the echoes come back, all of them, in order.

    ``rtts`` are the seconds from each send to its echo (``sent_times``:
    when each was sent, ``time.perf_counter()``); ``failures`` says
    what went wrong (refused, dropped, a reply missing, wrong or out of
    order); ``close_code`` is the code of the close handshake at the end."""

    END = "good end"

    def __init__(self, url: str, *, ssl_ctx=None, period: float = 0.005, size: int = 64,
                 reply_timeout: float = 10.0, max_messages: int = 200_000,
                 source: str | None = None, compression: str | None = "deflate") -> None:
        self.url = url
        self.ssl_ctx = ssl_ctx
        self.period = period
        self.filler = "x" * max(0, size - 14)
        self.reply_timeout = reply_timeout
        self.max_messages = max_messages
        self.source = source
        self.compression = compression
        self.sent = 0
        self.received = 0
        self.rtts: list[float] = []
        self.sent_times: list[float] = []    # perf_counter() of each echoed message's send
        self.failures: list[str] = []
        self.close_code: int | None = None
        self.ready = asyncio.Event()

    def message(self, i: int) -> str:
        return f"good {i:08d} {self.filler}"

    async def run(self, stop: asyncio.Event) -> None:
        """Talk until ``stop`` is set (or ``max_messages``), then wait for
        the last echoes and close with 1000."""
        import websockets

        try:
            ws = await websockets.connect(self.url, ssl=self.ssl_ctx, open_timeout=10,
                                          compression=self.compression,
                                          local_addr=(self.source, 0) if self.source else None)
        except Exception as exc:
            self.failures.append(f"refused: {type(exc).__name__}: {exc}")
            self.ready.set()
            return
        self.ready.set()
        sent_at: collections.deque = collections.deque()
        receiver = asyncio.create_task(self._receive(ws, sent_at))
        try:
            next_at = time.perf_counter()
            while not stop.is_set() and self.sent < self.max_messages and not receiver.done():
                sent_at.append(time.perf_counter())
                await ws.send(self.message(self.sent))
                self.sent += 1
                next_at += self.period
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            if not receiver.done():
                await ws.send(self.END)
            await receiver
            await ws.close()
            self.close_code = ws.close_code
        except Exception as exc:
            self.failures.append(f"dropped after {self.sent} sent, {self.received} echoed: "
                                 f"{type(exc).__name__}: {exc}")
        finally:
            receiver.cancel()
            await ws.close()

    async def _receive(self, ws, sent_at) -> None:
        while True:
            try:
                data = await asyncio.wait_for(ws.recv(), self.reply_timeout)
            except asyncio.TimeoutError:
                self.failures.append(f"no echo within {self.reply_timeout}s of message {self.received} "
                                     f"({self.sent} sent)")
                return
            except Exception as exc:
                self.failures.append(f"dropped after {self.sent} sent, {self.received} echoed: "
                                     f"{type(exc).__name__}: {exc}")
                return
            now = time.perf_counter()
            if data == self.END:
                if self.received != self.sent:
                    self.failures.append(f"{self.sent - self.received} echoes missing")
                return
            if data != self.message(self.received):
                self.failures.append(f"echo {self.received} is {data[:40]!r}: wrong or out of order")
                return
            sent = sent_at.popleft()
            self.sent_times.append(sent)
            self.rtts.append(now - sent)
            self.received += 1


class FreshClients:
    """A new ``websockets`` connection every ``every`` seconds: upgrade, one
    echo, close 1000.  ``done`` counts the ones that went through,
    ``failures`` says what happened to the others."""

    def __init__(self, url: str, *, ssl_ctx=None, every: float = 0.5, timeout: float = 10.0,
                 max_connections: int = 1000, source: str | None = None) -> None:
        self.url = url
        self.ssl_ctx = ssl_ctx
        self.every = every
        self.timeout = timeout
        self.max_connections = max_connections
        self.source = source
        self.done = 0
        self.failures: list[str] = []

    async def _one(self, i: int) -> None:
        import websockets

        async with websockets.connect(self.url, ssl=self.ssl_ctx, open_timeout=self.timeout,
                                      local_addr=(self.source, 0) if self.source else None) as ws:
            await ws.send(f"fresh {i}")
            reply = await asyncio.wait_for(ws.recv(), self.timeout)
            assert reply == f"fresh {i}", reply
        assert ws.close_code == 1000, ws.close_code

    async def run(self, stop: asyncio.Event) -> None:
        for i in itertools.count():
            if stop.is_set() or i >= self.max_connections:
                return
            try:
                await asyncio.wait_for(self._one(i), 2 * self.timeout)
                self.done += 1
            except Exception as exc:
                self.failures.append(f"fresh connection {i}: {type(exc).__name__}: {exc}"[:300])
            try:
                await asyncio.wait_for(stop.wait(), self.every)
            except asyncio.TimeoutError:
                pass


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]


# -- command line -------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.attacks", description=(
        "Run the whole attack set once against a fastws server of "
        "tests/integration/apps/attack_app.py on 127.0.0.0/8 and print one JSON line per attack."))
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--echo-path", default="/")
    parser.add_argument("--front", choices=("native", "asgi"), default="native")
    parser.add_argument("--cafile", help="the server's certificate (PEM): the server speaks TLS")
    parser.add_argument("--limit", type=int, default=1 << 20, help="the server's --max-message-size")
    parser.add_argument("--max-body", type=int, default=1 << 20, help="the server's --max-body-size")
    parser.add_argument("--handshake-timeout", type=float, default=10.0)
    parser.add_argument("--body-timeout", type=float, default=30.0)
    parser.add_argument("--max-rooms", type=int, default=1000)
    parser.add_argument("--publish-token", default=TOKEN)
    parser.add_argument("--max-connections-per-ip", type=int, default=0)
    parser.add_argument("--handshake-rate-per-ip", type=float, default=0.0)
    parser.add_argument("--handshake-burst-per-ip", type=int, default=0)
    parser.add_argument("--max-messages-per-second", type=float, default=0.0)
    parser.add_argument("--max-bytes-per-second", type=int, default=0)
    parser.add_argument("--rate-burst-seconds", type=float, default=2.0)
    parser.add_argument("--round", type=int, default=0, dest="round_no",
                        help="which block of source addresses to attack from (0..5)")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run this attack only (repeatable; default: all)")
    args = parser.parse_args(argv)
    if not ipaddress.ip_address(args.host).is_loopback:
        parser.error("the attack set only runs against 127.0.0.0/8")
    target = Target(port=args.port, host=args.host, front=args.front, echo_path=args.echo_path,
                    tls=ssl.create_default_context(cafile=args.cafile) if args.cafile else None,
                    cafile=args.cafile,
                    limit=args.limit, max_body=args.max_body, handshake_timeout=args.handshake_timeout,
                    body_timeout=args.body_timeout, max_rooms=args.max_rooms,
                    publish_token=args.publish_token or None,
                    max_connections_per_ip=args.max_connections_per_ip,
                    handshake_rate_per_ip=args.handshake_rate_per_ip,
                    handshake_burst_per_ip=args.handshake_burst_per_ip,
                    max_messages_per_second=args.max_messages_per_second,
                    max_bytes_per_second=args.max_bytes_per_second,
                    rate_burst_seconds=args.rate_burst_seconds)
    attacks = ATTACKS
    if args.only:
        attacks = [a for a in ATTACKS if a.name in args.only]
        if len(attacks) != len(set(args.only)):
            parser.error(f"unknown attack names; known: {'; '.join(a.name for a in ATTACKS)}")
    results = asyncio.run(run_attacks(target, attacks, args.round_no))
    for r in results:
        print(json.dumps(r.as_dict()), flush=True)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
