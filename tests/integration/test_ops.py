"""Operations on a real ``fastws serve`` process: /metrics, /health, /livez,
drain, TLS, JSON logs and the /stats page in headless Chromium.

Metrics are parsed with prometheus_client's own text parser, and every
counter must move by exactly what the test did.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "from fastws.cli.main import main; main()"]
CHROMIUM = os.environ.get("FASTWS_CHROMIUM", "/usr/bin/chromium")
TOKEN = "s3cret-stats-token"


# -- helpers -------------------------------------------------------------------


def http_get(server, path, *, headers=None, context=None, scheme="http"):
    """(status, body bytes, headers) of GET path."""
    req = urllib.request.Request(f"{scheme}://{server.host}:{server.port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def scrape(server) -> dict:
    """{(sample name, frozenset(labels)): value} from /metrics."""
    status, body, headers = http_get(server, "/metrics")
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


def raw_request(server, head: bytes) -> bytes:
    with socket.create_connection(server.address, timeout=5) as s:
        s.sendall(head)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data


def wait_for(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# -- /metrics --------------------------------------------------------------------


def test_metrics_counters_move_by_exactly_what_the_test_did(server_factory, engine):
    server = server_factory()
    before = scrape(server)
    sizes = [1, 10, 100, 3, 30, 300, 125]          # 7 messages, all < 126 bytes: 2-byte headers
    close_1000, close_4000 = 2, 3

    async def traffic():
        clients = [await websockets.connect(server.url) for _ in range(5)]
        for i, n in enumerate(sizes):
            c = clients[i % 5]
            await c.send("x" * n)
            assert await c.recv() == "x" * n
        for c in clients[:close_1000]:
            await c.close(1000)
        return clients[close_1000:]

    async def close_rest(clients):
        for c in clients:
            await c.close(4000, "bye")

    loop = asyncio.new_event_loop()
    try:
        rest = loop.run_until_complete(traffic())
        mid = wait_for(lambda: (lambda m: m if metric(m, "websocket_closes_total", code="1000")
                                - metric(before, "websocket_closes_total", code="1000") >= close_1000
                                else None)(scrape(server)))
        assert mid, "closes with 1000 never showed in /metrics"
        d = lambda name, **labels: metric(mid, name, **labels) - metric(before, name, **labels)  # noqa: E731
        assert d("websocket_connections_total", region="", server_id=_server_id(mid)) == 5 - close_1000
        assert d("websocket_handshakes_total", result="101") == 5
        assert d("websocket_messages_total", direction="inbound") == len(sizes)
        assert d("websocket_messages_total", direction="outbound") == len(sizes)
        assert d("websocket_closes_total", code="1000") == close_1000
        assert d("websocket_bytes_total", direction="outbound") >= sum(2 + n for n in sizes)
        assert d("websocket_bytes_total", direction="inbound") >= sum(6 + n for n in sizes)
        assert d("websocket_slow_consumer_closes_total") == 0
        assert sum(v for (name, _), v in mid.items() if name == "websocket_dropped_messages_total") == \
            sum(v for (name, _), v in before.items() if name == "websocket_dropped_messages_total")
        loop.run_until_complete(close_rest(rest))
    finally:
        loop.close()

    # two refused handshakes: no Sec-WebSocket-Key (400), an old version (426)
    base = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    assert raw_request(server, (base + "Sec-WebSocket-Version: 13\r\n\r\n").encode()).startswith(b"HTTP/1.1 400")
    assert raw_request(server, (base + "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                "Sec-WebSocket-Version: 8\r\n\r\n").encode()).startswith(b"HTTP/1.1 426")
    # application codes (3000-4999) share one series per thousand: the label set stays bounded
    after = wait_for(lambda: (lambda m: m if metric(m, "websocket_closes_total", code="4xxx")
                              - metric(before, "websocket_closes_total", code="4xxx") >= close_4000
                              else None)(scrape(server)))
    assert after, "closes with 4000 never showed in /metrics"
    d = lambda name, **labels: metric(after, name, **labels) - metric(before, name, **labels)  # noqa: E731
    assert d("websocket_connections_total", region="", server_id=_server_id(after)) == 0
    assert d("websocket_closes_total", code="4xxx") == close_4000
    assert d("websocket_closes_total", code="1000") == close_1000
    assert d("websocket_handshakes_total", result="101") == 5
    assert d("websocket_handshakes_total", result="400") == 1
    assert d("websocket_handshakes_total", result="426") == 1
    assert d("websocket_messages_total", direction="inbound") == len(sizes)


def _server_id(samples) -> str:
    for (name, labels), _ in samples.items():
        if name == "websocket_connections_total":
            return dict(labels)["server_id"]
    raise AssertionError("no websocket_connections_total")


def test_metrics_families_and_labels(server_factory):
    server = server_factory("--region", "eu-west", "--server-id", "node-7")
    m = scrape(server)
    assert ("websocket_connections_total", frozenset({("region", "eu-west"), ("server_id", "node-7")})) in m
    buckets = [dict(labels)["le"] for (name, labels) in m if name == "websocket_message_latency_ms_bucket"]
    assert buckets == ["1.0", "5.0", "10.0", "25.0", "50.0", "100.0", "250.0", "500.0", "1000.0", "+Inf"]
    for name in ("websocket_slow_consumer_closes_total", "websocket_queued_bytes", "websocket_queued_bytes_max",
                 "websocket_rooms", "websocket_broker_publishes_total", "websocket_broker_failures_total",
                 "websocket_broker_reconnects_total", "websocket_event_loop_lag_seconds",
                 "process_resident_memory_bytes"):
        assert (name, frozenset()) in m, name


def test_message_latency_histogram_is_fed(server_factory):
    """websocket_message_latency_ms: the loop's queueing delay, sampled 4x/s
    (no per-message cost), in the article's buckets, cumulative, count growing."""
    server = server_factory()
    status, body, _ = http_get(server, "/metrics")
    assert status == 200
    help_text = [line for line in body.decode().splitlines()
                 if line.startswith("# HELP websocket_message_latency_ms ")]
    assert help_text and "waits before the server can handle it" in help_text[0], help_text
    first = wait_for(lambda: (lambda m: m if metric(m, "websocket_message_latency_ms_count") > 0
                              else None)(scrape(server)), timeout=5)
    assert first, "the latency histogram never got a sample"
    time.sleep(1.6)
    second = scrape(server)
    c1, c2 = metric(first, "websocket_message_latency_ms_count"), metric(second, "websocket_message_latency_ms_count")
    assert c1 > 0 and 4 <= c2 - c1 <= 9, (c1, c2)           # 4 samples a second
    les = ["1.0", "5.0", "10.0", "25.0", "50.0", "100.0", "250.0", "500.0", "1000.0", "+Inf"]
    counts = [metric(second, "websocket_message_latency_ms_bucket", le=le) for le in les]
    assert counts == sorted(counts) and counts[-1] == c2       # cumulative, +Inf == _count
    assert counts[les.index("100.0")] == c2                    # an idle loop is never 100 ms late
    assert 0 <= metric(second, "websocket_message_latency_ms_sum") <= c2 * 100


def test_no_metrics_flag(server_factory):
    server = server_factory("--no-metrics")
    status, _, _ = http_get(server, "/metrics")
    assert status != 200


# -- /health and /livez ---------------------------------------------------------------


def test_health_ok(echo_server):
    status, body, headers = http_get(echo_server, "/health")
    assert status == 200, body
    doc = json.loads(body)
    assert doc["status"] == "healthy"
    assert set(doc) >= {"status", "connections", "memory", "checks"}
    assert doc["checks"]["draining"]["ok"] is True
    assert doc["checks"]["loop_lag"]["ok"] is True
    assert doc["memory"]["rss_bytes"] > 0
    assert http_get(echo_server, "/livez")[0] == 200


def test_health_503_over_memory_limit(server_factory):
    server = server_factory("--health-max-memory", "1KiB")
    status, body, _ = http_get(server, "/health")
    assert status == 503
    doc = json.loads(body)
    assert doc["status"] == "unhealthy"
    assert doc["checks"]["memory"]["ok"] is False
    assert doc["checks"]["memory"]["detail"]["limit_bytes"] == 1024
    assert http_get(server, "/livez")[0] == 200   # alive, just not ready


class OwnServer:
    """A server this test stops itself (the shared pool must not see it die)."""

    def __init__(self, engine, tmp_path, *args):
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
        if engine == "wsproto":
            env["FASTWS_NO_EXTENSIONS"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        self.host = "127.0.0.1"
        with socket.socket() as s:
            s.bind((self.host, 0))
            self.port = s.getsockname()[1]
        self.address = (self.host, self.port)
        self.url = f"ws://{self.host}:{self.port}/"
        self.log_path = tmp_path / "server.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([*CLI, "serve", "examples.echo:app", "--port", str(self.port), *args],
                                         cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        ok = wait_for(lambda: self.proc.poll() is not None or _can_connect(self.address), timeout=30)
        assert ok and self.proc.poll() is None, self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _can_connect(address) -> bool:
    try:
        socket.create_connection(address, timeout=0.5).close()
        return True
    except OSError:
        return False


def test_drain_health_503_livez_200_then_exit(engine, tmp_path):
    server = OwnServer(engine, tmp_path, "--drain-delay", "3")
    try:
        loop = asyncio.new_event_loop()
        client = loop.run_until_complete(websockets.connect(server.url))
        assert http_get(server, "/health")[0] == 200
        server.proc.send_signal(signal.SIGTERM)
        got = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(http_get(server, "/health")), timeout=5)
        assert got, "/health did not turn 503 after SIGTERM"
        doc = json.loads(got[1])
        assert doc["status"] == "draining" and doc["checks"]["draining"]["ok"] is False
        assert http_get(server, "/livez")[0] == 200          # liveness holds during the drain
        with pytest.raises(websockets.InvalidStatus) as refused:
            loop.run_until_complete(websockets.connect(server.url))
        assert refused.value.response.status_code == 503
        # the open connection is closed with 1001 once the drain delay is over
        with pytest.raises(websockets.ConnectionClosed):
            loop.run_until_complete(asyncio.wait_for(client.recv(), 15))
        assert client.close_code == 1001
        loop.close()
        assert server.proc.wait(15) == 0
        assert "draining for 3s" in server.log()
    finally:
        server.stop()


class OwnRedis:
    """A redis-server of this test's own on a free port (the shared one is never stopped)."""

    def __init__(self, tmp_path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.tmp_path = tmp_path
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", str(self.tmp_path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        assert wait_for(lambda: _can_connect(("127.0.0.1", self.port)), timeout=10), "redis did not start"

    def terminate(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def test_health_503_while_redis_is_down_200_after(engine, tmp_path, missing_client):
    import shutil

    if shutil.which("redis-server") is None:
        missing_client("redis-server is not installed")
    redis = OwnRedis(tmp_path)
    server = None
    try:
        server = OwnServer(engine, tmp_path, "--broker", f"redis://127.0.0.1:{redis.port}/0")
        livez = []

        def health():
            livez.append(http_get(server, "/livez")[0])          # liveness, polled all along
            status, body, _ = http_get(server, "/health")
            return status, json.loads(body)

        up = wait_for(lambda: (lambda r: r if r[0] == 200 else None)(health()), timeout=15, interval=0.1)
        assert up, health()
        assert up[1]["checks"]["broker"]["ok"] is True

        redis.terminate()                                       # SIGTERM
        down = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(health()), timeout=15, interval=0.1)
        assert down, f"/health never said 503 with Redis stopped: {health()}\n{server.log()}"
        assert down[1]["status"] == "unhealthy"
        assert down[1]["checks"]["broker"]["ok"] is False
        assert down[1]["checks"]["draining"]["ok"] is True       # only the broker fails
        time.sleep(0.5)
        assert health()[0] == 503                               # and it stays 503 while Redis is down

        redis.start()                                           # the same port again
        back = wait_for(lambda: (lambda r: r if r[0] == 200 else None)(health()), timeout=30, interval=0.1)
        assert back, f"/health never came back to 200 after Redis restarted: {health()}\n{server.log()}"
        assert back[1]["status"] == "healthy" and back[1]["checks"]["broker"]["ok"] is True
        assert livez and set(livez) == {200}, livez            # liveness never wavered
        assert server.proc.poll() is None
    finally:
        if server is not None:
            server.stop()
        redis.terminate()


# -- TLS ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA and a server certificate for 127.0.0.1 / localhost, made here."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("certs")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fastws test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return d


def test_wss_echo_verified(server_factory, certs):
    server = server_factory("--ssl-certfile", str(certs / "cert.pem"), "--ssl-keyfile", str(certs / "key.pem"))
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))   # verifies chain and hostname
    big = os.urandom(200_000)

    async def go():
        async with websockets.connect(f"wss://127.0.0.1:{server.port}/", ssl=ctx) as ws:
            await ws.send("hello over TLS")
            assert await ws.recv() == "hello over TLS"
            await ws.send(big)
            assert await ws.recv() == big
        # a client that does not trust the CA refuses the server
        with pytest.raises(ssl.SSLCertVerificationError):
            await websockets.connect(f"wss://127.0.0.1:{server.port}/", ssl=ssl.create_default_context())

    asyncio.run(go())
    status, body, _ = http_get(server, "/health", context=ctx, scheme="https")
    assert status == 200 and json.loads(body)["status"] == "healthy"
    assert "listening on wss://" in server.log()


def test_bad_certificate_exits_1_with_one_line(tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    r = subprocess.run([*CLI, "serve", "examples.echo:app", "--port", "0", "--ssl-certfile", str(junk),
                        "--ssl-keyfile", str(junk)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastws: cannot load TLS certificate"), r.stderr


# -- logs ----------------------------------------------------------------------------


def test_json_log_format(server_factory):
    server = server_factory("--log-format", "json")
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert any("listening on ws://" in rec["msg"] and rec["level"] == "info" for rec in lines), lines
    assert all({"ts", "level", "logger", "msg"} <= set(rec) for rec in lines)


# -- /stats ----------------------------------------------------------------------------


def _chromium(tmp_path, url, *extra, timeout=60) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=4000", *extra, url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, start_new_session=True)
    return r.stdout


def test_stats_page_is_token_protected(server_factory):
    server = server_factory("--stats", "--stats-token", TOKEN, "--stats-interval", "0.5")
    assert http_get(server, "/stats")[0] == 401
    assert http_get(server, "/stats?token=wrong-token")[0] == 401
    assert http_get(server, "/stats.json")[0] == 401
    assert http_get(server, f"/stats?token={TOKEN}")[0] == 200
    status, body, _ = http_get(server, "/stats.json", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and "now" in json.loads(body)
    assert http_get(echo_server_default := server_factory(), "/stats")[0] != 200, echo_server_default


def test_stats_page_in_chromium_matches_metrics(server_factory, engine, tmp_path, missing_client):
    if not os.path.exists(CHROMIUM):
        missing_client(f"{CHROMIUM} is not installed (apt-get install chromium)")
    server = server_factory("--stats", "--stats-token", TOKEN, "--stats-interval", "0.5")
    loop = asyncio.new_event_loop()

    async def traffic(clients, rounds):
        for r in range(rounds):
            for i, c in enumerate(clients[: 1 + r % len(clients)]):
                for _ in range(5 + 7 * ((r + i) % 4)):
                    await c.send("tick")
                    await c.recv()
            await asyncio.sleep(0.1)

    async def open_clients():
        return [await websockets.connect(server.url) for _ in range(4)]

    try:
        clients = loop.run_until_complete(open_clients())
        loop.run_until_complete(traffic(clients, 25))           # a few seconds of history for the charts
        time.sleep(0.6)                                          # quiet: the numbers stand still
        m = scrape(server)
        dom = _chromium(tmp_path, f"http://127.0.0.1:{server.port}/stats?token={TOKEN}", "--dump-dom")
        shown = dict(re.findall(r'<div class="v" id="([a-z_]+)">([^<]*)</div>', dom))
        assert shown, dom[-2000:]
        assert "updated" in dom                                  # the browser's refresh ran
        sid = _server_id(m)
        assert int(shown["connections"]) == metric(m, "websocket_connections_total", region="", server_id=sid) == 4
        assert int(shown["messages_in"]) == metric(m, "websocket_messages_total", direction="inbound")
        assert int(shown["messages_out"]) == metric(m, "websocket_messages_total", direction="outbound")
        assert int(shown["queued_bytes_total"]) == metric(m, "websocket_queued_bytes")
        assert int(shown["rooms"]) == metric(m, "websocket_rooms")
        assert int(shown["slow_consumer_closes"]) == metric(m, "websocket_slow_consumer_closes_total")
        assert int(shown["dropped_total"]) == sum(
            v for (name, _), v in m.items() if name == "websocket_dropped_messages_total")
        # the README's screenshot: written when missing or with FASTWS_UPDATE_SCREENSHOT=1
        # (not on every run, so the tests do not dirty the working tree)
        if engine == "cython" and (not (REPO / "docs" / "stats.png").exists()
                                   or os.environ.get("FASTWS_UPDATE_SCREENSHOT") == "1"):
            docs = REPO / "docs"
            docs.mkdir(exist_ok=True)
            shot = tmp_path / "stats.png"
            _chromium(tmp_path, f"http://127.0.0.1:{server.port}/stats?token={TOKEN}",
                      "--window-size=1000,560", f"--screenshot={shot}")
            if shot.exists() and shot.stat().st_size > 1000:
                shot.replace(docs / "stats.png")
        async def close_all():
            await asyncio.gather(*(c.close() for c in clients))

        loop.run_until_complete(close_all())
    finally:
        loop.close()


def test_handshake_timeout_is_counted(server_factory, engine):
    server = server_factory("--handshake-timeout", "0.3")
    before = scrape(server)
    with socket.create_connection(server.address, timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")            # never finishes the head
        with contextlib.suppress(OSError):
            s.recv(100)                                          # returns when the server's timer closes it
    after = wait_for(lambda: (lambda m: m if metric(m, "websocket_timeouts_total", kind="handshake")
                              > metric(before, "websocket_timeouts_total", kind="handshake") else None)(scrape(server)))
    assert after, "the handshake timeout never showed in /metrics"
    assert metric(after, "websocket_timeouts_total", kind="handshake") - \
        metric(before, "websocket_timeouts_total", kind="handshake") == 1
