"""Every setting works in both fronts, or one front refuses it at startup.

For each field of :class:`fastws.Config` (``Config.knobs()``) this file has
exactly one entry:

* in a *scenario* of :data:`SCENARIOS`: the setting is given a non-default
  value on a real ``fastws serve`` of the native front (a ``fastws.App``,
  ``apps/settings_app.py``) and of the ASGI front (a raw ASGI app,
  ``apps/asgi_scope_app.py``, same protocol) and its effect is observed over
  a real socket, the same way in both: limits by their close code or HTTP
  status, timers by what arrives when, admission by 503/429, the delivery
  policy by what a slow reader gets, TLS by a wss:// handshake, and so on;
* in :data:`REFUSED_BY`: one front cannot apply it and refuses to start,
  in one line (the other front's effect is observed by a scenario too);
* in :data:`FRONT_INDEPENDENT`: it does not depend on the front by nature,
  with the reason.

:func:`test_every_setting_has_one_entry` fails for a new setting without an
entry (and for an entry of a setting that is gone).  Everything runs on both
engines (the ``engine`` fixture) and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import websockets

from brokerutil import REDIS_URL, OwnRedis, need_redis, new_prefix
from fastws.config import Config
from gateway_helpers import Procs as GatewayProcs

REPO = Path(__file__).resolve().parents[2]
APPS = {"native": "tests.integration.apps.settings_app:app",
        "asgi": "tests.integration.apps.asgi_scope_app:app"}
FRONTS = ("native", "asgi")
TOKEN = "settings-token-123"
TIMEOUT = 10.0


# -- clients ---------------------------------------------------------------------------


def raw_http(srv, method: str, target: str, *, host: str | None = None, headers=(), body: bytes = b"",
             send_body: bytes | None = None, timeout: float = TIMEOUT):
    """One HTTP/1.1 request on its own connection: ``(status, headers, body,
    seconds until the answer)``; ``send_body`` (default ``body``) is what is
    actually sent after the head (less than the Content-Length: a slow body)."""
    host = host or f"127.0.0.1:{srv.port}"
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close",
             *([f"Content-Length: {len(body)}"] if body or method == "POST" else []), *headers]
    t0 = time.monotonic()
    with socket.create_connection((srv.host, srv.port), timeout=timeout) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + (body if send_body is None else send_body))
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    head, _, rest = data.partition(b"\r\n\r\n")
    first, *hlines = head.decode("latin-1").split("\r\n")
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in hlines)}
    return int(first.split()[1]), hdrs, rest, time.monotonic() - t0


class RawWS:
    """A WebSocket client on a plain socket that answers nothing by itself
    (no pong, no close echo): what a silent or broken peer does."""

    def __init__(self, srv, path="/raw", headers=(), rcvbuf=None) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect((srv.host, srv.port))
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{srv.port}", "Upgrade: websocket",
                 "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                 "Sec-WebSocket-Version: 13", *headers]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        self.head = head.decode("latin-1")
        self.status = int(self.head.split()[1]) if self.head else 0

    def send(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        n = len(payload)
        head = bytes([(0x80 if fin else 0) | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + body)

    def _read(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def frame(self):
        """``(opcode, payload)`` of the next frame, None at EOF."""
        head = self._read(2)
        if head is None:
            return None
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8))[0]
        payload = self._read(n)
        return (head[0] & 0x0F, payload) if payload is not None else None

    def until_close(self, timeout: float = TIMEOUT):
        """Read frames until a close frame: ``(code, reason, seconds, opcodes seen before)``."""
        self.sock.settimeout(timeout)
        t0, seen = time.monotonic(), []
        while True:
            f = self.frame()
            if f is None:
                return None, None, time.monotonic() - t0, seen
            if f[0] == 8:
                code = struct.unpack("!H", f[1][:2])[0] if len(f[1]) >= 2 else 1005
                return code, f[1][2:].decode(), time.monotonic() - t0, seen
            seen.append(f[0])

    def eof_after(self, timeout: float = TIMEOUT) -> float:
        """Seconds until the server ends the TCP connection."""
        self.sock.settimeout(timeout)
        t0 = time.monotonic()
        try:
            while self.sock.recv(65536):
                pass
        except (TimeoutError, ConnectionResetError):
            pass
        return time.monotonic() - t0

    def close(self) -> None:
        self.sock.close()


async def ws_connect(srv, path="/ws", **kw):
    """A websockets client past the app's hello (returned with it)."""
    ws = await websockets.connect(f"ws://{srv.host}:{srv.port}{path}", max_size=None, open_timeout=TIMEOUT, **kw)
    return ws, json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def until_reply(ws, want: str):
    while (got := await asyncio.wait_for(ws.recv(), TIMEOUT)) != want:
        pass
    return got


async def refused(url, **kw) -> websockets.InvalidStatus:
    with pytest.raises(websockets.InvalidStatus) as info:
        ws = await websockets.connect(url, open_timeout=TIMEOUT, **kw)
        await ws.close()
    return info.value


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# -- processes the fixture does not start ------------------------------------------------


def serve_cmd(app: str, *args: str) -> list[str]:
    return [sys.executable, "-c", "from fastws.cli.main import main; main()", "serve", app, *args]


def engine_env(engine: str) -> dict:
    env = dict(os.environ)
    env.pop("FASTWS_NO_EXTENSIONS", None)
    if engine == "wsproto":
        env["FASTWS_NO_EXTENSIONS"] = "1"
    return env


@dataclass
class Own:
    """A ``fastws serve`` of the test's own (stopped, or signalled, by the test)."""
    proc: subprocess.Popen
    log: Path
    host: str = "127.0.0.1"
    port: int = 0

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def start_own(ctx, *args: str, ready=None) -> Own:
    log = ctx.tmp_path / f"own-{len(ctx.owned)}.log"
    port = 0
    if not any(a == "--uds" for a in args):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        args = ("--host", "127.0.0.1", "--port", str(port), *args)
    with open(log, "wb") as out:
        proc = subprocess.Popen(serve_cmd(APPS[ctx.front], *args), cwd=REPO, env=engine_env(ctx.engine),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    own = Own(proc, log, port=port)
    ctx.owned.append(own)
    deadline = time.monotonic() + 30
    while "listening on" not in own.text():
        assert proc.poll() is None and time.monotonic() < deadline, own.text()
        time.sleep(0.05)
    return own


@dataclass
class Ctx:
    front: str
    engine: str
    tmp_path: Path
    factory: object
    owned: list = field(default_factory=list)

    def server(self, *args: str, env=None):
        return self.factory(*args, app=APPS[self.front], env=env)


# -- scenarios: (the settings they observe, the probe) -----------------------------------


def p_listen_and_protocol(ctx):
    """host, port, backlog, limits, timeouts, compression, origins, ops
    hosts, room limits, the HTTP API, metrics labels, health, stats, the
    access log: one server with all of them set."""
    srv = ctx.server(
        "--backlog", "77", "--region", "eu-test", "--server-id", "srv-test", "--access-log",
        "--max-head-size", "1KiB", "--max-message-size", "4KiB", "--max-frame-size", "2KiB",
        "--max-body-size", "2KiB", "--close-timeout", "1", "--handshake-timeout", "1", "--body-timeout", "1",
        "--compression", "--no-deflate-server-no-context-takeover", "--deflate-client-no-context-takeover",
        "--allowed-origins", "https://ok.example", "--ops-hosts", "opshost",
        "--max-rooms-per-connection", "2", "--max-room-name", "16", "--publish-token", TOKEN,
        "--health-max-memory", "1KiB", "--stats", "--stats-token", TOKEN, "--stats-window", "42",
        "--stats-interval", "0.5")
    # host/port: reached there; backlog: the listening socket's queue as the kernel shows it
    ss = subprocess.run(["ss", "-ltnH", f"sport = :{srv.port}"], capture_output=True, text=True).stdout.split()
    assert ss and ss[2] == "77", ss
    url = f"ws://{srv.host}:{srv.port}"

    async def websocket_side():
        # compression: the server keeps its context (not the default), asks the client not to
        ws, hello = await ws_connect(srv)
        ext = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert ext.startswith("permessage-deflate") and "server_no_context_takeover" not in ext \
            and "client_no_context_takeover" in ext, ext
        # room limits: 2 rooms, names of 16 bytes at most
        for cmd, want in (("join a", "joined a"), ("join b", "joined b"), ("join c", "refused RoomLimitError")):
            await ws.send(cmd)
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == want
        await ws.send("join " + "n" * 17)
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "refused RoomNameError"
        # max_message_size: 4 KiB passes, more closes 1009
        await ws.send("m" * 4096)
        assert len(await asyncio.wait_for(ws.recv(), TIMEOUT)) == 4096
        await ws.send("m" * 4097)
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert ws.close_code == 1009
        # allowed_origins: the listed page passes, another gets 403
        ok = await websockets.connect(url + "/ws", origin="https://ok.example")
        await ok.close()
        assert (await refused(url + "/ws", origin="https://evil.example")).response.status_code == 403

    run(websocket_side())
    # max_frame_size: a 3 KiB frame (within the message limit) closes 1009
    raw = RawWS(srv)
    assert raw.frame()[0] == 1    # the hello
    raw.send(2, b"f" * 3072)
    code, *_ = raw.until_close()
    raw.close()
    assert code == 1009
    # close_timeout: a peer that never answers our close frame is dropped after 1 s
    raw = RawWS(srv)
    raw.send(2, b"f" * 3072)
    code, _, _, _ = raw.until_close()
    assert code == 1009 and raw.eof_after() < 3.5
    raw.close()
    # max_head_size: a 2 KiB head gets 431
    status, *_ = raw_http(srv, "GET", "/ws", headers=[f"X-Pad: {'p' * 2048}"])
    assert status == 431
    # handshake_timeout: half a head, then nothing: 408 after ~1 s
    with socket.create_connection((srv.host, srv.port), timeout=TIMEOUT) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 4, answer
    # body_timeout: a POST whose body does not come: 408 after ~1 s
    status, _, _, took = raw_http(srv, "POST", "/echo", body=b"x" * 100, send_body=b"x" * 10)
    assert status == 408 and took < 4, (status, took)
    # max_body_size: 2 KiB passes, more gets 413
    assert raw_http(srv, "POST", "/echo", body=b"b" * 2048)[0] == 200
    assert raw_http(srv, "POST", "/echo", body=b"b" * 2049)[0] == 413
    # ops_hosts: the operations endpoints answer Host opshost only
    assert raw_http(srv, "GET", "/metrics")[0] == 404
    status, _, metrics, _ = raw_http(srv, "GET", "/metrics", host="opshost")
    # region / server_id: the metrics labels
    assert status == 200 and b'region="eu-test"' in metrics and b'server_id="srv-test"' in metrics
    # health_max_memory: over 1 KiB resident: /health says 503 (memory)
    status, _, body, _ = raw_http(srv, "GET", "/health", host="opshost")
    assert status == 503 and json.loads(body)["checks"]["memory"]["ok"] is False
    # stats, stats_token, stats_window, stats_interval
    assert raw_http(srv, "GET", "/stats", host="opshost")[0] == 401
    status, _, page, _ = raw_http(srv, "GET", f"/stats?token={TOKEN}", host="opshost")
    assert status == 200 and b"last 42 s" in page
    status, _, doc, _ = raw_http(srv, "GET", f"/stats.json?token={TOKEN}", host="opshost")
    assert status == 200 and json.loads(doc)["interval"] == 0.5
    # publish_token: the HTTP API answers with the token
    status, _, body, _ = raw_http(srv, "POST", "/publish", host="opshost", body=b'{"room": "a", "text": "x"}',
                                  headers=[f"Authorization: Bearer {TOKEN}"])
    assert status == 200, body
    # access_log: the upgrades, the refusal and the closes above are in the log
    log = srv.log()
    assert "101 upgraded" in log and '"/ws" 403' in log and "closed 1009" in log


def p_off_switches(ctx):
    """metrics, health: off, and the endpoints are gone."""
    srv = ctx.server("--no-metrics", "--no-health")
    for path in ("/metrics", "/health", "/livez"):
        # not served: the app's answer stands (the native app's catch-all WebSocket
        # route answers a plain GET 400, the ASGI app 404)
        status, _, body, _ = raw_http(srv, "GET", path)
        assert status in (400, 404) and b"websocket_" not in body and b"status" not in body, (path, status)
    on = ctx.server()
    assert raw_http(on, "GET", "/metrics")[0] == 200 and raw_http(on, "GET", "/health")[0] == 200


def p_ping(ctx):
    """ping_interval, ping_timeout: a silent peer gets a ping within 0.5 s
    of quiet, then 1011 'ping timeout' 0.5 s later."""
    srv = ctx.server("--ping-interval", "0.5", "--ping-timeout", "0.5")
    raw = RawWS(srv)
    code, reason, took, seen = raw.until_close()
    raw.close()
    assert 9 in seen and (code, reason) == (1011, "ping timeout") and took < 4, (code, reason, took, seen)


def p_idle(ctx):
    """idle_timeout: a connection without a message for 1 s is closed 1000."""
    srv = ctx.server("--ping-interval", "0", "--idle-timeout", "1")

    async def main():
        ws, _ = await ws_connect(srv)
        t0 = time.monotonic()
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert (ws.close_code, ws.close_reason) == (1000, "idle timeout") and time.monotonic() - t0 < 4

    run(main())


async def _slow_member(srv):
    """A member of room r that reads nothing (small receive buffer), and a publisher."""
    member = RawWS(srv, rcvbuf=4096)
    member.send(1, b"join r")
    pub, _ = await ws_connect(srv)
    await asyncio.sleep(0.3)
    return member, pub


async def _flood(pub, times, n=32, size=16384):
    for _ in range(times):
        await pub.send(f"flood r {n} {size}")
        await until_reply(pub, "flooded")


def _drain_member(member, timeout=3.0):
    """Everything the member gets until the server is quiet: (bytes, close reason or None)."""
    member.sock.settimeout(timeout)
    data = member.buf
    try:
        while chunk := member.sock.recv(1 << 20):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    member.close()
    return len(data), (b"slow consumer" in data)


def p_queue(ctx):
    """max_queue: a slow member past 1 KiB of queued output is closed 1008
    'slow consumer'; with 64 MiB it gets a 16 MiB flood whole (the default,
    1 MiB, drops part of it)."""
    async def main(args, times):
        srv = ctx.server(*args)
        member, pub = await _slow_member(srv)
        await _flood(pub, times)
        await pub.close()
        return await asyncio.to_thread(_drain_member, member)

    size, closed = run(main(("--max-queue", "1KiB"), 16))
    assert closed, size
    size, closed = run(main(("--max-queue", "64MiB"), 32))
    assert not closed and size >= 32 * 32 * 16384, size


def p_grace_and_high_water(ctx):
    """slow_grace: a member backed up for more than 0.3 s when the next
    message comes is closed 1008; high_water: with a 64 MiB transport
    buffer the same member is never backed up, so it is not closed."""
    async def main(args):
        srv = ctx.server("--max-queue", "64MiB", "--slow-grace", "0.3", *args)
        member, pub = await _slow_member(srv)
        await _flood(pub, 1, n=512)          # 8 MiB in one go
        await asyncio.sleep(0.8)
        await _flood(pub, 1, n=1, size=10)   # the next message
        await pub.close()
        return await asyncio.to_thread(_drain_member, member)

    size, closed = run(main(()))
    assert closed, size
    size, closed = run(main(("--high-water", "64MiB")))
    assert not closed and size >= 512 * 16384, size


def p_rates(ctx):
    """max_messages_per_second, max_bytes_per_second, rate_burst_seconds:
    10 messages/s and 10 KiB/s with a 0.5 s burst: 4 quick messages pass,
    12 close 1008 'rate limit exceeded', and so do 8 KiB at once."""
    srv = ctx.server("--max-messages-per-second", "10", "--max-bytes-per-second", "10KiB",
                     "--rate-burst-seconds", "0.5")

    async def main():
        ws, _ = await ws_connect(srv)
        for i in range(4):
            await ws.send(f"e{i}")
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == f"e{i}"
        await ws.close()
        for payloads in (["q"] * 12, ["k" * 4096] * 2):
            ws, _ = await ws_connect(srv)
            for p in payloads:
                try:
                    await ws.send(p)
                except websockets.ConnectionClosed:
                    break
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert (ws.close_code, ws.close_reason) == (1008, "rate limit exceeded"), payloads[0][:3]

    run(main())


def p_join_rate(ctx):
    """max_joins_per_second (with rate_burst_seconds): 3 joins a second over a
    1 s window: three joins pass, the fourth closes the connection with 1008
    'rate limit exceeded'."""
    srv = ctx.server("--max-joins-per-second", "3", "--rate-burst-seconds", "1")

    async def main():
        ws, _ = await ws_connect(srv)
        for room in ("a", "b", "c"):
            await ws.send("join " + room)
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "joined " + room
        await ws.send("join d")
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert (ws.close_code, ws.close_reason) == (1008, "rate limit exceeded")

    run(main())


def p_admission(ctx):
    """max_connections, retry_after: the third connection gets 503 with a
    Retry-After between 7 and 14 s."""
    srv = ctx.server("--max-connections", "2", "--retry-after", "7")

    async def main():
        a, _ = await ws_connect(srv)
        b, _ = await ws_connect(srv)
        no = await refused(f"ws://{srv.host}:{srv.port}/ws")
        assert no.response.status_code == 503
        assert 7 <= int(no.response.headers["Retry-After"]) <= 14
        await a.close()
        await b.close()

    run(main())


def p_handshake_rate(ctx):
    """handshake_rate, handshake_burst: at 0.5/s with a burst of 3, three
    quick upgrades pass and the fourth gets 503."""
    srv = ctx.server("--handshake-rate", "0.5", "--handshake-burst", "3")

    async def main():
        for _ in range(3):
            ws, _ = await ws_connect(srv)
            await ws.close()
        assert (await refused(f"ws://{srv.host}:{srv.port}/ws")).response.status_code == 503

    run(main())


def p_per_client(ctx):
    """max_connections_per_ip, handshake_rate_per_ip, handshake_burst_per_ip,
    proxy_headers, forwarded_allow_ips: behind a trusted proxy (127.0.0.1)
    the client is the X-Forwarded-For address (the app sees it), each
    address may hold one connection (429 for a second) and make two quick
    upgrades (429 for a third); a proxy not in forwarded_allow_ips is not
    believed."""
    srv = ctx.server("--max-connections-per-ip", "1", "--handshake-rate-per-ip", "0.2",
                     "--handshake-burst-per-ip", "2", "--proxy-headers", "--forwarded-allow-ips", "127.0.0.1")
    url = f"ws://{srv.host}:{srv.port}/ws"

    def xff(ip):
        return {"additional_headers": {"X-Forwarded-For": ip}}

    async def main():
        a, hello = await ws_connect(srv, **xff("10.1.0.1"))
        assert hello["client"][0] == "10.1.0.1"
        assert (await refused(url, **xff("10.1.0.1"))).response.status_code == 429   # one each
        b, hello = await ws_connect(srv, **xff("10.1.0.2"))                          # another client
        assert hello["client"][0] == "10.1.0.2"
        await a.close()
        await b.close()
        for _ in range(2):
            c, _ = await ws_connect(srv, **xff("10.1.0.3"))
            await c.close()
            await asyncio.sleep(0.1)
        assert (await refused(url, **xff("10.1.0.3"))).response.status_code == 429   # the burst is spent

    run(main())
    untrusted = ctx.server("--proxy-headers", "--forwarded-allow-ips", "10.9.9.9")

    async def not_believed():
        ws, hello = await ws_connect(untrusted, **xff("10.1.0.1"))
        assert hello["client"][0] == "127.0.0.1"
        await ws.close()

    run(not_believed())


def p_tls(ctx):
    """ssl_certfile, ssl_keyfile: wss:// with the certificate given."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    certfile, keyfile = ctx.tmp_path / "cert.pem", ctx.tmp_path / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    own = start_own(ctx, "--ssl-certfile", str(certfile), "--ssl-keyfile", str(keyfile))
    client = ssl.create_default_context(cafile=str(certfile))

    async def main():
        ws = await websockets.connect(f"wss://127.0.0.1:{own.port}/tls", ssl=client)
        hello = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert hello["path"] == "/tls"
        await ws.send("over tls")
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "over tls"
        await ws.close()

    run(main())


def p_reuse_port(ctx):
    """reuse_port: another socket may bind the server's port with
    SO_REUSEPORT (without the setting: address in use)."""
    def can_share(srv) -> bool:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                s.bind((srv.host, srv.port))
            except OSError:
                return False
            return True

    assert can_share(ctx.server("--reuse-port"))
    assert not can_share(ctx.server())


def p_broker(ctx):
    """broker, broker_prefix, presence, presence_ttl: two servers on the
    test Redis: a publish on one reaches a member on the other; the room's
    channel carries the prefix; GET /presence counts the members of both;
    a node's presence entry expires within presence_ttl."""
    need_redis()
    import redis

    prefix = new_prefix("set")
    args = ("--broker", REDIS_URL, "--broker-prefix", prefix, "--presence", "--presence-ttl", "7",
            "--publish-token", TOKEN)
    a, b = ctx.server(*args), ctx.server(*args, "--server-id", "b")

    async def main():
        member, _ = await ws_connect(b)
        await member.send("join news")
        assert await asyncio.wait_for(member.recv(), TIMEOUT) == "joined news"
        pub, _ = await ws_connect(a)
        await pub.send("join news")
        assert await asyncio.wait_for(pub.recv(), TIMEOUT) == "joined news"
        r = redis.Redis.from_url(REDIS_URL)
        try:
            deadline = time.monotonic() + TIMEOUT
            channel = f"fastws:{prefix}:room::news".encode()
            while dict(r.pubsub_numsub(channel)).get(channel, 0) < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await pub.send("pub news across nodes")
            assert await asyncio.wait_for(member.recv(), TIMEOUT) == "across nodes"
            while True:
                status, _, body, _ = await asyncio.to_thread(
                    raw_http, a, "GET", "/presence?room=news", headers=[f"Authorization: Bearer {TOKEN}"])
                if status == 200 and json.loads(body)["count"] == 2:
                    break
                assert time.monotonic() < deadline, body
                await asyncio.sleep(0.2)
            keys = [k for k in r.scan_iter(match=f"fastws:{prefix}:presence:*:node:*")]
            assert keys and all(0 < r.pttl(k) <= 7000 for k in keys), [(k, r.pttl(k)) for k in keys]
        finally:
            r.close()
        await member.close()
        await pub.close()

    run(main())


def p_workers(ctx):
    """workers: two processes share the port (connections land on both)."""
    own = start_own(ctx, "--workers", "2")

    async def main():
        pids = set()
        for _ in range(60):
            ws = await websockets.connect(f"ws://127.0.0.1:{own.port}/w")
            pids.add(json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["pid"])
            await ws.close()
            if len(pids) == 2:
                return pids
        return pids

    deadline = time.monotonic() + 20
    while len(re.findall(r"worker \d started", own.text())) < 2:
        assert time.monotonic() < deadline, own.text()
        time.sleep(0.1)
    time.sleep(1.0)                # both workers listening
    assert len(run(main())) == 2
    own.proc.send_signal(signal.SIGTERM)
    assert own.proc.wait(30) == 0


def p_lifecycle(ctx):
    """drain_delay, drain_rate, reconnect_delay, shutdown_timeout: after
    SIGTERM /health says 503 for 1 s before any connection is closed; then
    ten connections are closed at 10 per second, each told to reconnect in
    3..6 s; a peer that never answers the close does not hold the exit past
    shutdown_timeout (1 s; close_timeout is 30 s)."""
    own = start_own(ctx, "--drain-delay", "1", "--drain-rate", "10", "--reconnect-delay", "3",
                    "--shutdown-timeout", "1", "--close-timeout", "30")

    async def main():
        clients = [await websockets.connect(f"ws://127.0.0.1:{own.port}/c") for _ in range(10)]
        for c in clients:
            await asyncio.wait_for(c.recv(), TIMEOUT)
        silent = RawWS(own, "/silent")
        t0 = time.monotonic()
        own.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        status, *_ = await asyncio.to_thread(raw_http, own, "GET", "/health")
        assert status == 503

        async def closed_at(ws):
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            return time.monotonic() - t0, ws.close_code, ws.close_reason

        got = await asyncio.gather(*(closed_at(c) for c in clients))
        times = sorted(t for t, _, _ in got)
        assert times[0] >= 0.9, times                  # nothing closed during the delay
        assert times[-1] - times[0] >= 0.6, times      # paced: 10 at 10/s
        for _, code, reason in got:
            assert code == 1001
            delay = float(re.fullmatch(r"server restarting; reconnect in ([\d.]+)s", reason).group(1))
            assert 3 <= delay <= 6, reason
        assert (await asyncio.to_thread(own.proc.wait, 15)) == 0
        assert time.monotonic() - t0 < 6                # not held by the silent peer's 30 s close_timeout
        silent.close()

    run(main())


def p_uds(ctx):
    """uds: the server listens on a Unix socket (not on TCP)."""
    path = ctx.tmp_path / f"s-{ctx.front}.sock"
    own = start_own(ctx, "--uds", str(path))

    async def main():
        ws = await websockets.unix_connect(str(path), "ws://localhost/u")
        assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["path"] == "/u"
        await ws.send("unix")
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "unix"
        await ws.close()

    run(main())
    assert "listening on" in own.text() and str(path) in own.text()


def p_loop_lag(ctx):
    """health_max_loop_lag: after the loop was blocked 0.6 s, /health says
    503 (loop_lag) with a limit of 0.1 s."""
    srv = ctx.server("--health-max-loop-lag", "0.1")

    async def main():
        ws, _ = await ws_connect(srv)
        await ws.send("block 0.6")
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "blocked"
        status, _, body, _ = await asyncio.to_thread(raw_http, srv, "GET", "/health")
        assert status == 503 and json.loads(body)["checks"]["loop_lag"]["ok"] is False, body
        await ws.close()

    run(main())


def p_root_path(ctx):
    """root_path: the ASGI app's scopes carry it (see REFUSED_BY for the native front)."""
    srv = ctx.server("--root-path", "/mounted")

    async def main():
        ws, hello = await ws_connect(srv, "/x")
        assert hello["root_path"] == "/mounted" and hello["path"] == "/mounted/x"
        await ws.close()

    run(main())


def p_client_js(ctx):
    """serve_client_js: GET /fastws.js is the browser client (absent without it)."""
    srv = ctx.server("--serve-client-js")
    status, headers, body, _ = raw_http(srv, "GET", "/fastws.js")
    assert status == 200 and "javascript" in headers.get("content-type", "") and b"export" in body, \
        (status, headers, body[:200])
    assert raw_http(ctx.server(), "GET", "/fastws.js")[0] in (400, 404)


def p_gateway(ctx):
    """gateway and its settings: /gw of the native app goes to a real backend
    (a FastAPI app, tests/integration/apps/gateway_backend.py) while its own
    routes stay its own; the token reaches the backend, a slow connect gets
    503, requests at once and events per request are bounded, a failed
    connect is sent once more, a full queue closes 1013 (the ASGI front
    refuses the setting, REFUSED_BY)."""
    with GatewayProcs(ctx.tmp_path) as ps:
        be = ps.backend(GW_TOKEN="settings-gw-token", GW_BATCH="1000")
        srv = ctx.server("--gateway", be.url, "--gateway-routes", "/gw,/gw2", "--gateway-token", "settings-gw-token",
                         "--gateway-timeout", "1", "--gateway-concurrency", "2", "--gateway-batch", "5",
                         "--gateway-retries", "1", "--gateway-queue", "4", "--gateway-overflow", "close")
        url = f"ws://{srv.host}:{srv.port}"

        async def main():
            ws = await websockets.connect(url + "/gw", open_timeout=TIMEOUT)
            await ws.send("echo via backend")
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "via backend"       # gateway, gateway_routes
            own, hello = await ws_connect(srv, "/ws")
            assert hello["path"] == "/ws"                                             # the app's own route
            await own.close()
            conns = [await websockets.connect(url + "/gw2", open_timeout=TIMEOUT) for _ in range(6)]
            for c in conns:                      # batch, concurrency (before the slow requests below)
                for i in range(4):
                    await c.send(f"echo {i}")
            for c in conns:
                assert [await asyncio.wait_for(c.recv(), TIMEOUT) for _ in range(4)] == [str(i) for i in range(4)]
                await c.close()
            t0 = time.monotonic()                                                     # gateway_timeout
            assert (await refused(url + "/gw?sleep=3")).response.status_code == 503
            assert time.monotonic() - t0 < 2.5
            ok = await websockets.connect(url + "/gw?flaky=s1&fails=1", open_timeout=TIMEOUT)   # gateway_retries
            await ok.close()
            assert (await refused(url + "/gw?flaky=s2&fails=5")).response.status_code == 502
            await ws.send("sleep 2 slow")                                             # gateway_queue, _overflow
            await asyncio.sleep(0.3)
            for i in range(10):
                await ws.send(f"echo {i}")
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert (ws.close_code, ws.close_reason) == (1013, "try again later")

        run(main())
        stats = json.loads(subprocess.run(["curl", "-s", be.url.replace("/events/", "/stats")],
                                          capture_output=True, text=True, timeout=10).stdout)
        assert stats["auth"] == ["Bearer settings-gw-token"], stats                  # gateway_token
        assert stats["attempts"] == {"s1": 2, "s2": 2}, stats
        assert 1 < stats["max_events"] <= 5 and stats["max_concurrent"] <= 2, stats


def p_regions(ctx):
    """region_peers, region_queue_max, region_queue_age, region_directory_ttl:
    two regions, each on a redis-server of its own; a publish in region a
    reaches a member in region b; a user bound in b is in b's directory
    with the TTL; for a third region that cannot be reached, the queue keeps
    3 messages (the others dropped, reason length) and those age out after
    2 s (reason age), both counted in /metrics (the ASGI front refuses the
    settings, REFUSED_BY)."""
    ra, rb = OwnRedis(), OwnRedis()
    ctx.owned += [ra, rb]
    app = "tests.integration.apps.regions_app:app"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]            # nothing listens there once closed
    a = ctx.factory("--broker", ra.url, "--region", "a", "--region-peers", f"b={rb.url},dead=redis://127.0.0.1:{dead}/0",
                    "--region-queue-max", "3", "--region-queue-age", "2", app=app)
    b = ctx.factory("--broker", rb.url, "--region", "b", "--region-peers", f"a={ra.url}",
                    "--region-directory-ttl", "9", app=app)

    async def main():
        member = await websockets.connect(f"ws://{b.host}:{b.port}/ws?user=bea", open_timeout=TIMEOUT)
        await asyncio.wait_for(member.recv(), TIMEOUT)                             # hello
        await member.send(json.dumps({"op": "join", "room": "news"}))
        assert json.loads(await asyncio.wait_for(member.recv(), TIMEOUT))["op"] == "joined"
        pub = await websockets.connect(f"ws://{a.host}:{a.port}/ws", open_timeout=TIMEOUT)
        await asyncio.wait_for(pub.recv(), TIMEOUT)
        for i in range(9):
            await pub.send(json.dumps({"op": "pub", "room": "news", "data": f"m{i}"}))
        got = [json.loads(await asyncio.wait_for(member.recv(), TIMEOUT))["data"] for _ in range(9)]
        assert got == [f"m{i}" for i in range(9)]                                  # region_peers
        key = "fastws:region:b:user:bea"
        assert 0 < int(rb.cli("PTTL", key)) <= 9000, rb.cli("PTTL", key)          # region_directory_ttl
        deadline = time.monotonic() + 20
        want = {"length": 6.0, "age": 3.0}                                        # region_queue_max / _age
        while True:
            m = (await asyncio.to_thread(raw_http, a, "GET", "/metrics"))[2].decode()
            seen = {r: float(v) for r, v in re.findall(
                r'fastws_region_dropped_total\{peer="dead",reason="(length|age)",region="a"\} (\S+)', m)}
            if seen == want:
                break
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.3)
        await member.close()
        await pub.close()

    run(main())


SCENARIOS = {
    "listen-and-protocol": (p_listen_and_protocol, (
        "host", "port", "backlog", "region", "server_id", "access_log", "max_head_size", "max_message_size",
        "max_frame_size", "max_body_size", "close_timeout", "handshake_timeout", "body_timeout", "compression",
        "deflate_server_no_context_takeover", "deflate_client_no_context_takeover", "allowed_origins",
        "ops_hosts", "max_rooms_per_connection", "max_room_name", "publish_token", "health_max_memory",
        "stats", "stats_token", "stats_window", "stats_interval")),
    "off-switches": (p_off_switches, ("metrics", "health")),
    "ping": (p_ping, ("ping_interval", "ping_timeout")),
    "idle": (p_idle, ("idle_timeout",)),
    "queue": (p_queue, ("max_queue",)),
    "grace-and-high-water": (p_grace_and_high_water, ("slow_grace", "high_water")),
    "rates": (p_rates, ("max_messages_per_second", "max_bytes_per_second", "rate_burst_seconds")),
    "join-rate": (p_join_rate, ("max_joins_per_second",)),
    "admission": (p_admission, ("max_connections", "retry_after")),
    "handshake-rate": (p_handshake_rate, ("handshake_rate", "handshake_burst")),
    "per-client": (p_per_client, ("max_connections_per_ip", "handshake_rate_per_ip", "handshake_burst_per_ip",
                                  "proxy_headers", "forwarded_allow_ips")),
    "tls": (p_tls, ("ssl_certfile", "ssl_keyfile")),
    "reuse-port": (p_reuse_port, ("reuse_port",)),
    "broker": (p_broker, ("broker", "broker_prefix", "presence", "presence_ttl")),
    "workers": (p_workers, ("workers",)),
    "lifecycle": (p_lifecycle, ("drain_delay", "drain_rate", "reconnect_delay", "shutdown_timeout")),
    "uds": (p_uds, ("uds",)),
    "loop-lag": (p_loop_lag, ("health_max_loop_lag",)),
    "root-path": (p_root_path, ("root_path",)),
    "client-js": (p_client_js, ("serve_client_js",)),
    "regions": (p_regions, ("region_peers", "region_queue_max", "region_queue_age", "region_directory_ttl")),
    "gateway": (p_gateway, ("gateway", "gateway_routes", "gateway_token", "gateway_timeout", "gateway_concurrency",
                            "gateway_batch", "gateway_retries", "gateway_queue", "gateway_overflow")),
}

#: scenarios one front refuses at startup instead (front -> scenario): the
#: front's one-line refusal is checked in its place
REFUSED_BY = {"root_path": "native",
              # an ASGI application handles its own WebSockets (the gateway_* settings need gateway)
              **{k: "asgi" for k in ("gateway", "gateway_routes", "gateway_token", "gateway_timeout",
                                     "gateway_concurrency", "gateway_batch", "gateway_retries", "gateway_queue",
                                     "gateway_overflow")},
              # users are bound by a fastws.App (App.bind_user); an ASGI application has none
              **{k: "asgi" for k in ("region_peers", "region_queue_max", "region_queue_age",
                                     "region_directory_ttl")}}

#: settings that do not depend on the front, and why
FRONT_INDEPENDENT = {
    "log_level": "process-wide logging, set up by the runner before a front is built",
    "log_format": "process-wide logging, set up by the runner before a front is built",
    "log_config": "process-wide logging, set up by the runner before a front is built",
}


def test_every_setting_has_one_entry():
    knobs = {name for name, _, _ in Config.knobs()}
    observed = [k for _, (_, ks) in SCENARIOS.items() for k in ks]
    assert len(observed) == len(set(observed)), "a setting is in two scenarios"
    entries = set(observed) | set(FRONT_INDEPENDENT)
    assert not set(observed) & set(FRONT_INDEPENDENT)
    assert set(REFUSED_BY) <= set(observed)
    missing, stale = knobs - entries, entries - knobs
    assert not missing, f"settings without an entry in test_settings.py (observe them in both fronts, " \
                        f"or say why they do not depend on the front): {sorted(missing)}"
    assert not stale, f"entries of settings that no longer exist: {sorted(stale)}"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_setting_in_both_fronts(scenario, front, engine, server_factory, tmp_path):
    probe, knobs = SCENARIOS[scenario]
    refusing = [k for k in knobs if REFUSED_BY.get(k) == front]
    ctx = Ctx(front, engine, tmp_path, server_factory)
    try:
        if refusing:
            args = {"root_path": ("--root-path", "/mounted"),
                    "gateway": ("--gateway", "http://127.0.0.1:9/events"),
                    "region_peers": ("--broker", "redis://127.0.0.1:9/0", "--region", "a",
                                     "--region-peers", "b=redis://127.0.0.1:9/0")}[refusing[0]]
            out = subprocess.run(serve_cmd(APPS[front], "--port", "0", *args), cwd=REPO, env=engine_env(engine),
                                 capture_output=True, text=True, timeout=30)
            lines = [ln for ln in out.stderr.strip().splitlines() if not re.match(r"\d{4}-\d\d-\d\d ", ln)]
            assert out.returncode != 0 and len(lines) == 1 and refusing[0] in lines[0], out.stderr
            return
        probe(ctx)
    finally:
        for own in ctx.owned:
            own.stop()
