"""permessage-deflate must not let a client get past --max-message-size.

Attacks over raw TCP sockets (127.0.0.1 only) against real ``fastws serve
--compression`` processes, on both engines (cython, wsproto) and in four
modes: native (``examples.echo:app``), ASGI (``examples.starlette_app:app``,
whose connections are handed over to the same engine after the accept), TLS
(native, wss) and ``--workers 2`` (the worker that gets the connection is
measured).

* a compressed frame whose header declares 4 GiB, followed by a stream of
  zeros: the server must refuse it from the header (close 1009) instead of
  storing the compressed bytes;
* a compressed message cut into many continuation frames of empty deflate
  blocks (they inflate to nothing): the running total of compressed bytes
  must hit the limit (1009) instead of growing forever;
* a zip bomb (1 MiB on the wire, just within the limit's deflate bound;
  1 GiB inflated): 1009, and inflating stops at the limit.

Each attack is bounded (at most ATTACK_BYTES sent, DEADLINE seconds) and
stops by itself. Every test asserts the close frame with code 1009, that the
server is still alive, and that the peak resident memory of its serving
process(es) during the attack (VmHWM, reset just before through
/proc/PID/clear_refs) grew by less than the message limit plus a small
constant.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import select
import socket
import ssl
import struct
import time
import zlib

import pytest

from asgi_helpers import LIMIT as ASGI_LIMIT
from asgi_helpers import AsgiProcess

HOST = "127.0.0.1"
LIMIT = 1 << 20                # --max-message-size of every server here
SLACK = 8 << 20                # allowed RSS growth on top of the limit
ATTACK_BYTES = 64 << 20        # most bytes one attack sends
CHUNK = 256 << 10              # bytes per send
DEADLINE = 60.0                # seconds one attack may take
ZERO_MASK = b"\x00\x00\x00\x00"  # payload bytes go through unchanged

assert ASGI_LIMIT == LIMIT     # the ASGI helper passes --max-message-size itself


# -- the server under attack -------------------------------------------------------


class Target:
    """One running server: the processes that serve connections, the port,
    the WebSocket path to attack, and the client TLS context (or None)."""

    def __init__(self, pids, port, path, alive, log, tls=None) -> None:
        self.pids = pids
        self.port = port
        self.path = path
        self.alive = alive
        self.log = log
        self.tls = tls


@pytest.fixture(scope="module")
def _asgi_servers(engine, tmp_path_factory):
    """The Starlette example app with --compression, one per engine (module-wide)."""
    pool: dict[str, AsgiProcess] = {}
    logdir = tmp_path_factory.mktemp(f"attack-asgi-{engine}")

    def get() -> AsgiProcess:
        server = pool.get("app")
        if server is None or not server.alive():
            server = AsgiProcess("examples.starlette_app:app", engine, logdir / f"{len(pool)}.log",
                                 args=("--compression",)).start()
            pool["app"] = server
        return server

    yield get
    for server in pool.values():
        server.stop()


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (its own CA), made here."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    crt = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
           .public_key(key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - datetime.timedelta(minutes=5))
           .not_valid_after(now + datetime.timedelta(days=1))
           .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
                          critical=False)
           .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
           .sign(key, hashes.SHA256()))
    (d / "cert.pem").write_bytes(crt.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return d


@pytest.fixture(params=["native", "asgi", "tls", "workers"])
def target(request, server_factory, _asgi_servers, cert) -> Target:
    mode = request.param
    args = ("--compression", "--max-message-size", str(LIMIT))
    if mode == "asgi":
        server = _asgi_servers()
        t = Target([server.proc.pid], server.port, "/ws/echo", server.alive,
                   lambda: server.log()[-4000:])
    elif mode == "tls":
        server = server_factory(*args, "--ssl-certfile", str(cert / "cert.pem"),
                                "--ssl-keyfile", str(cert / "key.pem"))
        tls = ssl.create_default_context(cafile=str(cert / "cert.pem"))
        t = Target([server.proc.pid], server.port, "/", server.alive, server.log_tail, tls)
    elif mode == "workers":
        server = server_factory(*args, "--workers", "2")
        deadline = time.monotonic() + 30
        while len(_children(server.proc.pid)) < 2:
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.1)
        t = Target([int(pid) for pid in _children(server.proc.pid)], server.port, "/",
                   server.alive, server.log_tail)
    else:
        server = server_factory(*args)
        t = Target([server.proc.pid], server.port, "/", server.alive, server.log_tail)
    if mode != "workers":
        assert not _children(t.pids[0]), "one process serves: its memory is what is measured"
    yield t
    assert t.alive(), f"the server died during the attack\n{t.log()}"


def _children(pid: int) -> list[str]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return f.read().split()


def status_kib(pid: int, field: str) -> int:
    """A memory figure (kB) from /proc/PID/status: VmRSS, VmHWM."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux clear_refs, value 5)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


# -- the client side ---------------------------------------------------------------


def open_compressed(target: Target) -> socket.socket:
    """A raw socket (TLS-wrapped for a TLS target) upgraded with
    permessage-deflate accepted."""
    port, path = target.port, target.path
    sock = socket.create_connection((HOST, port), timeout=10)
    if target.tls is not None:
        sock = target.tls.wrap_socket(sock, server_hostname=HOST)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
         "Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n").encode()
    )
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


def header(opcode: int, length: int, *, fin: bool = True, rsv1: bool = False) -> bytes:
    """A masked client frame header (64-bit length form past 65535)."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    if length < 126:
        return struct.pack("!BB", first, 0x80 | length) + ZERO_MASK
    if length < 1 << 16:
        return struct.pack("!BBH", first, 0x80 | 126, length) + ZERO_MASK
    return struct.pack("!BBQ", first, 0x80 | 127, length) + ZERO_MASK


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


def attack(target: Target, first: bytes, stream) -> tuple[int, int, int]:
    """Send ``first``, then chunks from ``stream`` until the server's close
    frame arrives (at most ATTACK_BYTES, DEADLINE seconds).

    Returns (close code, bytes sent, peak RSS growth in bytes: the largest
    of the serving processes')."""
    sock = open_compressed(target)
    retry = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
    try:
        base_kib = [status_kib(pid, "VmRSS") for pid in target.pids]
        for pid in target.pids:
            reset_peak(pid)
        sock.setblocking(False)
        pending = memoryview(first)
        sent = 0
        received = b""
        code = None
        deadline = time.monotonic() + DEADLINE
        while code is None:
            assert time.monotonic() < deadline, f"no close after {sent} bytes in {DEADLINE}s"
            want_write = bool(pending) or sent < ATTACK_BYTES
            buffered = target.tls is not None and sock.pending()
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
        # the peak is read after the server has given up on the message
        growth = max((status_kib(pid, "VmHWM") - base) * 1024
                     for pid, base in zip(target.pids, base_kib))
        return code, sent, growth
    finally:
        sock.close()


def zeros():
    block = bytes(CHUNK)
    while True:
        yield block


def empty_deflate_fragments():
    """Continuation frames full of empty stored deflate blocks (a byte for
    the block header, then LEN 0000 and NLEN ffff): valid compressed data
    that inflates to nothing."""
    payload = b"\x00\x00\x00\xff\xff" * ((CHUNK - 14) // 5)
    frame = header(0x0, len(payload), fin=False) + payload
    while True:
        yield frame


def deflate_bomb(inflated: int) -> bytes:
    """Raw deflate data (RFC 7692 form: no tail) inflating to ``inflated``
    zero bytes: one sync-flushed segment of 16 MiB of zeros, repeated (each
    segment comes from a fresh compressor, so they chain into one stream)."""
    segment_size = 16 << 20
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = comp.compress(bytes(segment_size)) + comp.flush(zlib.Z_SYNC_FLUSH)
    assert segment.endswith(b"\x00\x00\xff\xff")
    data = segment * (inflated // segment_size)
    assert zlib.decompressobj(-15).decompress(data[: len(segment)]) == bytes(segment_size)
    return data[:-4]


def deflate_bound(n: int) -> int:
    """zlib's compressBound: how far a compressed message may pass the limit."""
    return n + (n >> 12) + (n >> 14) + (n >> 25) + 13


def check(target: Target, code: int, sent: int, growth: int, what: str) -> None:
    print(f"{what}: close {code} after {sent} bytes sent, peak RSS growth {growth / 2**20:.1f} MiB")
    assert code == 1009, f"{what}: close code {code}"
    assert target.alive(), f"the server died\n{target.log()}"
    assert growth < LIMIT + SLACK, f"{what}: the server's RSS grew by {growth} bytes"


# -- the attacks -------------------------------------------------------------------


def test_declared_4gib_compressed_frame_is_refused_from_its_header(target):
    code, sent, growth = attack(target, header(0x2, 1 << 32, rsv1=True), zeros())
    check(target, code, sent, growth, "4 GiB compressed frame")
    # Refused on the header: far less than the attack's budget went through.
    assert sent < ATTACK_BYTES


def test_compressed_message_in_endless_fragments_hits_the_limit(target):
    first = header(0x2, 0, fin=False, rsv1=True)
    code, sent, growth = attack(target, first, empty_deflate_fragments())
    check(target, code, sent, growth, "endless compressed fragments")
    assert sent < ATTACK_BYTES


@pytest.mark.parametrize("fragmented", [False, True], ids=["one-frame", "fragments"])
def test_zip_bomb_is_not_inflated_past_the_limit(target, fragmented):
    bomb = deflate_bomb(1 << 30)             # 1 GiB of zeros, about 1 MiB on the wire:
    assert len(bomb) <= deflate_bound(LIMIT)  # the header check lets it in
    if fragmented:
        step = 16 << 10
        pieces = [bomb[i : i + step] for i in range(0, len(bomb), step)]
        data = b"".join(
            header(0x2 if i == 0 else 0x0, len(p), fin=i == len(pieces) - 1, rsv1=i == 0) + p
            for i, p in enumerate(pieces)
        )
    else:
        data = header(0x2, len(bomb), rsv1=True) + bomb
    code, sent, growth = attack(target, data, zeros())
    check(target, code, sent, growth, f"zip bomb ({'fragments' if fragmented else 'one frame'})")
    assert sent < ATTACK_BYTES


def test_compressed_message_at_the_limit_is_still_echoed(target):
    """The limit applies to the inflated size: an incompressible message of
    exactly the limit (slightly larger once deflated) is accepted."""
    message = os.urandom(LIMIT)
    comp = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    z = (comp.compress(message) + comp.flush(zlib.Z_SYNC_FLUSH))[:-4]
    assert len(z) > LIMIT
    sock = open_compressed(target)
    try:
        sock.sendall(header(0x2, len(z), rsv1=True) + z)
        while True:  # heartbeat pings may come first
            first, body = read_frame(sock)
            if first & 0x0F not in (0x9, 0xA):
                break
        assert first & 0x0F == 0x2, f"expected the binary echo, got opcode {first & 0x0F}: {body[:32]!r}"
        if first & 0x40:
            body = zlib.decompressobj(-15).decompress(body + b"\x00\x00\xff\xff")
        assert body == message
    finally:
        sock.close()


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
