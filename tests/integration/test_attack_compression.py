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

import os
import ssl
import time
import zlib

import pytest

from asgi_helpers import LIMIT as ASGI_LIMIT
from asgi_helpers import AsgiProcess
from tests.attacks import (
    ATTACK_BYTES,
    Target,
    bomb_frames,
    children,
    deflate_bomb,
    deflate_bound,
    empty_deflate_fragments,
    header,
    make_cert,
    open_compressed,
    read_frame,
    reset_peak,
    send_until_close,
    status_kib,
    zeros,
)

LIMIT = 1 << 20                # --max-message-size of every server here
SLACK = 8 << 20                # allowed RSS growth on top of the limit

assert ASGI_LIMIT == LIMIT     # the ASGI helper passes --max-message-size itself


# -- the server under attack -------------------------------------------------------


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
    return make_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(params=["native", "asgi", "tls", "workers"])
def target(request, server_factory, _asgi_servers, cert) -> Target:
    mode = request.param
    args = ("--compression", "--max-message-size", str(LIMIT))
    if mode == "asgi":
        server = _asgi_servers()
        t = Target(server.port, echo_path="/ws/echo", pids=[server.proc.pid], alive=server.alive,
                   log=lambda: server.log()[-4000:])
    elif mode == "tls":
        server = server_factory(*args, "--ssl-certfile", str(cert / "cert.pem"),
                                "--ssl-keyfile", str(cert / "key.pem"))
        tls = ssl.create_default_context(cafile=str(cert / "cert.pem"))
        t = Target(server.port, tls=tls, pids=[server.proc.pid], alive=server.alive, log=server.log_tail)
    elif mode == "workers":
        server = server_factory(*args, "--workers", "2")
        deadline = time.monotonic() + 30
        while len(children(server.proc.pid)) < 2:
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.1)
        t = Target(server.port, pids=[int(pid) for pid in children(server.proc.pid)],
                   alive=server.alive, log=server.log_tail)
    else:
        server = server_factory(*args)
        t = Target(server.port, pids=[server.proc.pid], alive=server.alive, log=server.log_tail)
    if mode != "workers":
        assert not children(t.pids[0]), "one process serves: its memory is what is measured"
    yield t
    assert t.alive(), f"the server died during the attack\n{t.log()}"


# -- the client side (tests/attacks.py: the connection, the frames, the streams) ----------


def attack(target: Target, first: bytes, stream) -> tuple[int, int, int]:
    """Send ``first``, then chunks from ``stream`` until the server's close
    frame arrives (at most ATTACK_BYTES, DEADLINE seconds of tests/attacks.py).

    Returns (close code, bytes sent, peak RSS growth in bytes: the largest
    of the serving processes')."""
    sock = open_compressed(target)
    try:
        base_kib = [status_kib(pid, "VmRSS") for pid in target.pids]
        for pid in target.pids:
            reset_peak(pid)
        code, sent = send_until_close(sock, target.tls is not None, first, stream)
        # the peak is read after the server has given up on the message
        growth = max((status_kib(pid, "VmHWM") - base) * 1024
                     for pid, base in zip(target.pids, base_kib, strict=True))
        return code, sent, growth
    finally:
        sock.close()


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
    code, sent, growth = attack(target, bomb_frames(bomb, fragmented), zeros())
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
