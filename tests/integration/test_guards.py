"""The guards of a public server, against real ``fastws serve`` processes on both engines.

* Authentication: ``fastws.auth.TokenAuth`` as ``on_connect``
  (tests/integration/apps/guards_app.py), tokens made here with PyJWT over
  keys made here with ``cryptography`` (HS256, RS256 with kid rotation,
  ES256): every token source gets in; every bad token (expired, not yet
  valid, wrong issuer/audience/key, alg none, alg confusion, unknown kid,
  malformed, missing) gets the same 401, byte for byte, and is counted in
  ``websocket_auth_failures_total``; ``then=`` refuses with 403; a real
  headless Chromium connects with ``new WebSocket(url, ["chat",
  "bearer.<jwt>"])``; the FastAPI dependency of docs/asgi.md in ASGI mode.
* Authorization per room: ``authorize_join`` / ``authorize_publish`` per
  namespace; denied joins raise ``RoomDeniedError`` in the app and change
  nothing; the HTTP publish API gets 403; refusals are counted.
* Per-client limits at the upgrade (native, ASGI, TLS with compression):
  ``--max-connections-per-ip`` and ``--handshake-rate-per-ip`` answer 429
  with a jittered ``Retry-After``, per source address (clients bind
  127.x.y.z source addresses), freed when a connection ends; a flood from
  thousands of addresses leaves the server's memory bounded.
* Trusted proxy headers behind a real nginx (native and ASGI): the app sees
  the client's address (and scheme), a spoofed ``X-Forwarded-For`` is
  ignored from an untrusted peer and cannot override what nginx appended,
  and the per-client limits count the forwarded address.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import http.client
import http.server
import ipaddress
import json
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from base64 import urlsafe_b64encode
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

APP = "tests.integration.apps.guards_app:app"
ASGI_APP = "tests.integration.apps.asgi_guards_app:app"
ISS = "https://issuer.test"
AUD = "fastws-tests"
TOKEN = "guards-publish-token"
HOST = "127.0.0.1"
CHROMIUM = os.environ.get("FASTWS_CHROMIUM", "/usr/bin/chromium")
TIMEOUT = 15


def run(coro, limit: float = 90):
    return asyncio.run(asyncio.wait_for(coro, limit))


# -- keys and tokens ----------------------------------------------------------------------


def _pem(private_key) -> str:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Keys made for this module; the server reads the public halves from a directory."""
    d = tmp_path_factory.mktemp("keys")
    k = SimpleNamespace(
        hs_old="hs-old-" + os.urandom(24).hex(), hs_new="hs-new-" + os.urandom(24).hex(),
        hs_other="hs-other-" + os.urandom(24).hex(),
        rs1=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rs2=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rs_other=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        es=ec.generate_private_key(ec.SECP256R1()), es_other=ec.generate_private_key(ec.SECP256R1()),
        dir=str(d))
    (d / "hs_old").write_text(k.hs_old)
    (d / "hs_new").write_text(k.hs_new)
    (d / "rs1.pub").write_text(_pem(k.rs1))
    (d / "rs2.pub").write_text(_pem(k.rs2))
    (d / "es.pub").write_text(_pem(k.es))
    k.env = {"FASTWS_TEST_AUTH_DIR": str(d)}
    return k


def token(key, alg: str = "HS256", headers=None, **claims) -> str:
    now = int(time.time())
    body = {"iss": ISS, "aud": AUD, "sub": "alice", "iat": now, "exp": now + 300}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm=alg, headers=headers)


def _b64(data: bytes) -> str:
    return urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict, claims: dict, secret: bytes | None) -> str:
    """A token written by hand: ``alg: none`` (no signature) or HS256 with ``secret``."""
    now = int(time.time())
    body = {"iss": ISS, "aud": AUD, "sub": "mallory", "iat": now, "exp": now + 300, **claims}
    signing = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(body).encode())
    sig = _b64(hmac.new(secret, signing.encode(), hashlib.sha256).digest()) if secret else ""
    return signing + "." + sig


# -- plumbing -------------------------------------------------------------------------------


def raw_upgrade(port: int, path: str, headers=(), source: str = HOST, timeout: float = 10) -> bytes:
    """The server's whole answer to an upgrade request sent over a raw socket
    (up to its end: EOF for a refusal, the blank line for a 101)."""
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
             "Sec-WebSocket-Version: 13", *(f"{k}: {v}" for k, v in headers)]
    with socket.create_connection((HOST, port), timeout, source_address=(source, 0)) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.startswith(b"HTTP/1.1 101") and b"\r\n\r\n" in data:
                break
        return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def header_of(response: bytes, name: str):
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == name.lower():
            return v.strip()
    return None


def metric(server, name: str, **labels) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://{HOST}:{server.port}/metrics", timeout=10) as r:
        text = r.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" ([0-9.e+]+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


async def connect(url: str, *, source: str = HOST, **kwargs):
    return await websockets.connect(url, local_addr=(source, 0), open_timeout=TIMEOUT,
                                    max_size=None, **kwargs)


async def hello(ws) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def ask(ws, cmd: dict) -> dict:
    await ws.send(json.dumps(cmd))
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def refused_status(url: str, **kwargs) -> tuple:
    """(status, headers) of an upgrade the server refuses."""
    with pytest.raises(websockets.InvalidStatus) as info:
        ws = await connect(url, **kwargs)
        await ws.close()
    response = info.value.response
    return response.status_code, response.headers


@pytest.fixture
def guards(server_factory, keys):
    """The guards app with the HTTP publish API on."""
    return server_factory("--publish-token", TOKEN, env=keys.env, app=APP)


# -- authentication ------------------------------------------------------------------------


def test_token_from_every_source(guards, keys):
    base = f"ws://{HOST}:{guards.port}"
    t = token(keys.hs_new, sub="alice", role="reader")

    async def main():
        for kwargs, path in (
                ({"additional_headers": {"Authorization": f"Bearer {t}"}}, "/hs"),
                ({"additional_headers": {"Authorization": f"bearer   {t}"}}, "/hs"),
                ({"additional_headers": {"Cookie": f"theme=dark; access_token={t}; x=1"}}, "/hs"),
                ({}, f"/hs?token={t}"),
                ({"subprotocols": [f"bearer.{t}"]}, "/hs")):
            async with await connect(base + path, **kwargs) as ws:
                got = await hello(ws)
                assert got["user"] == "alice", (kwargs, got)
                assert got["claims"]["role"] == "reader" and got["claims"]["iss"] == ISS
                # a token that came as a subprotocol is answered with that entry when it is the only one
                assert got["subprotocol"] == (f"bearer.{t}" if "subprotocols" in kwargs else None)
                assert ws.subprotocol == got["subprotocol"]
                await ws.send("still here")
                assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "still here"
        # the app speaks "chat": the answer is "chat", never the token entry
        async with await connect(base + "/chat", subprotocols=["x-other", f"bearer.{t}", "chat"]) as ws:
            got = await hello(ws)
            assert got["user"] == "alice" and got["subprotocol"] == "chat" == ws.subprotocol
        # nothing it speaks was offered besides the token: the token entry is echoed (a browser needs one)
        async with await connect(base + "/chat", subprotocols=["x-other", f"bearer.{t}"]) as ws:
            assert (await hello(ws))["subprotocol"] == f"bearer.{t}"
        # the /chat route takes the subprotocol only: a header token is not looked at
        status, headers = await refused_status(base + "/chat",
                                               additional_headers={"Authorization": f"Bearer {t}"})
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"

    run(main())


def test_every_bad_token_gets_the_same_401(guards, keys):
    now = int(time.time())
    pem1 = _pem(keys.rs1).encode()
    bad = {
        "missing": ("/hs", []),
        "not a jwt": ("/hs", [("Authorization", "Bearer abc.def")]),
        "garbage": ("/hs", [("Authorization", "Bearer " + "x" * 60)]),
        "other scheme": ("/hs", [("Authorization", "Basic " + _b64(b"alice:secret"))]),
        "expired": ("/hs", [("Authorization", "Bearer " + token(keys.hs_new, exp=now - 60))]),
        "not yet valid": ("/hs", [("Authorization", "Bearer " + token(keys.hs_new, nbf=now + 600))]),
        "wrong issuer": ("/hs", [("Authorization", "Bearer " + token(keys.hs_new, iss="https://evil.test"))]),
        "wrong audience": ("/hs", [("Authorization", "Bearer " + token(keys.hs_new, aud="other"))]),
        "no audience": ("/hs", [("Authorization", "Bearer " + token(keys.hs_new, aud=None))]),
        "no exp": ("/hs", [("Authorization", "Bearer " + token(keys.hs_new, exp=None))]),
        "wrong key": ("/hs", [("Authorization", "Bearer " + token(keys.hs_other))]),
        "wrong key, query": ("/hs?token=" + token(keys.hs_other), []),
        "alg none": ("/hs", [("Authorization", "Bearer " + forged({"alg": "none", "typ": "JWT"}, {}, None))]),
        "alg None": ("/hs", [("Authorization", "Bearer " + forged({"alg": "None"}, {}, None))]),
        "alg confusion": ("/rs", [("Authorization", "Bearer " + forged({"alg": "HS256", "kid": "k1"}, {}, pem1))]),
        "unknown kid": ("/rs", [("Authorization", "Bearer " + token(keys.rs1, "RS256", {"kid": "k3"}))]),
        "no kid": ("/rs", [("Authorization", "Bearer " + token(keys.rs1, "RS256"))]),
        "kid of another key": ("/rs", [("Authorization", "Bearer " + token(keys.rs2, "RS256", {"kid": "k1"}))]),
        "unlisted RSA key": ("/rs", [("Authorization", "Bearer " + token(keys.rs_other, "RS256", {"kid": "k1"}))]),
        "RS token on HS route": ("/hs", [("Authorization", "Bearer " + token(keys.rs1, "RS256"))]),
        "unlisted EC key": ("/es", [("Authorization", "Bearer " + token(keys.es_other, "ES256"))]),
        "kid not a string": ("/rs", [("Authorization", "Bearer " + forged({"alg": "RS256", "kid": [1]}, {}, None))]),
    }
    before = {r: metric(guards, "websocket_auth_failures_total", reason=r)
              for r in ("missing", "malformed", "expired", "invalid")}
    before_401 = metric(guards, "websocket_handshakes_total", result="401")
    answers = {name: raw_upgrade(guards.port, path, headers) for name, (path, headers) in bad.items()}
    first = answers["missing"]
    assert status_of(first) == 401, first
    assert header_of(first, "WWW-Authenticate") == "Bearer"
    assert first.endswith(b"\r\n\r\nunauthorized\n"), first
    for name, answer in answers.items():
        assert answer == first, f"{name}: {answer!r} differs from {first!r}"
    after = {r: metric(guards, "websocket_auth_failures_total", reason=r) for r in before}
    assert after["missing"] - before["missing"] == 2          # none, and a Basic header
    assert after["expired"] - before["expired"] == 1
    assert after["malformed"] - before["malformed"] >= 2       # "abc.def", garbage
    assert sum(after.values()) - sum(before.values()) == len(bad)
    assert metric(guards, "websocket_handshakes_total", result="401") - before_401 == len(bad)
    # the good token still gets in afterwards (nothing was cached against it)
    assert status_of(raw_upgrade(guards.port, "/hs", [("Authorization", "Bearer " + token(keys.hs_new))])) == 101


def test_key_rotation_and_algorithms(guards, keys):
    base = f"ws://{HOST}:{guards.port}"

    async def main():
        cases = [("/hs", token(keys.hs_old, sub="old")), ("/hs", token(keys.hs_new, sub="new")),
                 ("/rs", token(keys.rs1, "RS256", {"kid": "k1"}, sub="k1")),
                 ("/rs", token(keys.rs2, "RS256", {"kid": "k2"}, sub="k2")),
                 ("/es", token(keys.es, "ES256", sub="ec")),
                 # clock skew inside the claims' own validity
                 ("/hs", token(keys.hs_new, sub="fresh", iat=int(time.time()) - 5))]
        for path, t in cases:
            async with await connect(base + path,
                                     additional_headers={"Authorization": f"Bearer {t}"}) as ws:
                got = await hello(ws)
                assert got["user"] == jwt.decode(t, options={"verify_signature": False})["sub"]

    run(main())


def test_then_refuses_with_403(guards, keys):
    admin = token(keys.hs_new, sub="root", role="admin")
    user = token(keys.hs_new, sub="bob", role="user")
    for path in ("/admin", "/admin-async"):
        ok = raw_upgrade(guards.port, path, [("Authorization", f"Bearer {admin}")])
        assert status_of(ok) == 101, ok
        no = raw_upgrade(guards.port, path, [("Authorization", f"Bearer {user}")])
        assert status_of(no) == 403, no
        bad = raw_upgrade(guards.port, path, [("Authorization", f"Bearer {token(keys.hs_other)}")])
        assert status_of(bad) == 401, bad
    assert raw_upgrade(guards.port, "/admin-async",
                       [("Authorization", f"Bearer {user}")]).endswith(b"admins only\n")

    async def main():   # then's Accept adds to the store; the claims stay
        async with await connect(f"ws://{HOST}:{guards.port}/admin",
                                 additional_headers={"Authorization": f"Bearer {admin}"}) as ws:
            got = await hello(ws)
            assert got["user"] == "root" and got["store"] == {"admin": True}
            assert got["claims"]["role"] == "admin"

    run(main())


PAGE = """<!doctype html><html><body><pre id="out">running</pre><script>
const q = new URLSearchParams(location.search);
const result = {};
function attempt(protocols) {
  return new Promise((resolve) => {
    const ws = new WebSocket(q.get('ws'), protocols);
    const r = {};
    ws.onopen = () => { r.open = true; r.protocol = ws.protocol; };
    ws.onmessage = (ev) => { r.hello = JSON.parse(ev.data); ws.close(1000, 'bye'); };
    ws.onerror = () => { r.error = true; };
    ws.onclose = (ev) => { r.closeCode = ev.code; resolve(r); };
  });
}
(async () => {
  result.good = await attempt(['chat', 'bearer.' + q.get('good')]);
  result.bad = await attempt(['chat', 'bearer.' + q.get('bad')]);
})().catch((e) => { result.exception = String(e); }).finally(() => {
  document.getElementById('out').textContent = JSON.stringify(result);
  fetch('/result', {method: 'POST', body: JSON.stringify(result)});
});
</script></body></html>
"""


class _Pages(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        self.results: queue.Queue = queue.Queue()
        super().__init__((HOST, 0), _PageHandler)


class _PageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = PAGE.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.server.results.put(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_chromium_sends_the_token_as_a_subprotocol(server_factory, keys, tmp_path, missing_client):
    if not os.path.exists(CHROMIUM):
        missing_client(f"{CHROMIUM} is not installed (apt-get install chromium)")
    pages = _Pages()
    server = server_factory("--allowed-origins", f"http://{HOST}:{pages.server_address[1]}",
                            env=keys.env, app=APP)
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    good = token(keys.hs_new, sub="browser")
    bad = token(keys.hs_other, sub="browser")
    url = (f"http://{HOST}:{pages.server_address[1]}/page.html?ws="
           f"{quote(f'ws://{HOST}:{server.port}/chat', safe='')}&good={good}&bad={bad}")
    log_path = tmp_path / "chromium.log"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}", url]
    with open(log_path, "wb") as log:
        browser = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        try:
            raw = pages.results.get(timeout=90)
        except queue.Empty:
            pytest.fail(f"no result from the browser page within 90s\n"
                        f"{log_path.read_text(errors='replace')[-4000:]}", pytrace=False)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(browser.pid, signal.SIGTERM)
        try:
            browser.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(browser.pid, signal.SIGKILL)
            browser.wait(5)
        pages.shutdown()
        pages.server_close()
    result = json.loads(raw)
    assert result["good"]["open"] is True, result
    assert result["good"]["protocol"] == "chat", result
    assert result["good"]["hello"]["user"] == "browser", result
    assert result["good"]["closeCode"] == 1000, result
    assert "open" not in result["bad"] and result["bad"]["closeCode"] == 1006, result


def test_asgi_dependency_of_the_docs(server_factory, keys):
    server = server_factory(env=keys.env, app=ASGI_APP)
    base = f"ws://{HOST}:{server.port}"

    async def main():
        async with await connect(base + "/secure", additional_headers={
                "Authorization": f"Bearer {token(keys.hs_new, sub='asgi-user')}"}) as ws:
            assert await hello(ws) == {"user": "asgi-user"}
        async with await connect(base + f"/secure?token={token(keys.hs_new, sub='q')}") as ws:
            assert await hello(ws) == {"user": "q"}
        for headers in ({}, {"Authorization": f"Bearer {token(keys.hs_other)}"},
                        {"Authorization": f"Bearer {token(keys.hs_new, exp=int(time.time()) - 10)}"}):
            status, _ = await refused_status(base + "/secure", additional_headers=headers)
            assert status == 403

    run(main())


# -- authorization per room ---------------------------------------------------------------


def test_authorize_join_per_namespace(guards):
    base = f"ws://{HOST}:{guards.port}"
    before = metric(guards, "websocket_room_refusals_total", reason="denied")

    async def main():
        bob = await connect(base + "/rooms?user=bob")
        eve = await connect(base + "/rooms?user=eve")
        try:
            assert await ask(bob, {"join": "public-a"}) == {"joined": "public-a"}
            assert await ask(bob, {"join": "private-bob"}) == {"joined": "private-bob"}
            for room in ("private-eve", "secret", "public"):
                got = await ask(bob, {"join": room})
                assert got["error"] == "RoomDeniedError", got
            assert await ask(eve, {"join": "private-eve"}) == {"joined": "private-eve"}
            # the refused join changed nothing: eve's room reaches eve (a member), not bob
            await eve.send(json.dumps({"publish": "private-eve", "text": "for eve"}))
            got = {await asyncio.wait_for(eve.recv(), TIMEOUT) for _ in range(2)}
            assert got == {"for eve", json.dumps({"published": "private-eve"})}
            # namespace "/ns" has its own rule
            ns_bob = await connect(base + "/ns?user=bob")
            ns_staff = await connect(base + "/ns?user=staff")
            try:
                assert (await ask(ns_bob, {"join": "public-a"}))["error"] == "RoomDeniedError"
                assert await ask(ns_staff, {"join": "anything"}) == {"joined": "anything"}
            finally:
                await ns_bob.close()
                await ns_staff.close()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(bob.recv(), 0.5)
        finally:
            await bob.close()
            await eve.close()

    run(main())
    assert metric(guards, "websocket_room_refusals_total", reason="denied") - before == 4


def test_authorize_publish_and_the_http_api(guards):
    base = f"ws://{HOST}:{guards.port}"

    def http_publish(room: str, text: str) -> tuple:
        req = urllib.request.Request(f"http://{HOST}:{guards.port}/publish",
                                     data=json.dumps({"room": room, "text": text}).encode(),
                                     headers={"Authorization": f"Bearer {TOKEN}",
                                              "Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    async def main():
        bob = await connect(base + "/rooms?user=bob")
        try:
            assert await ask(bob, {"join": "public-b"}) == {"joined": "public-b"}
            assert await ask(bob, {"join": "private-bob"}) == {"joined": "private-bob"}
            got = await ask(bob, {"publish": "readonly-news", "text": "no"})
            assert got["error"] == "RoomDeniedError" and "publish" in got["detail"]
            await bob.send(json.dumps({"publish": "public-b", "text": "from bob"}))
            replies = {await asyncio.wait_for(bob.recv(), TIMEOUT) for _ in range(2)}
            assert replies == {"from bob", json.dumps({"published": "public-b"})}
            status, body = await asyncio.to_thread(http_publish, "public-b", "from the API")
            assert status == 200 and body["seq"] >= 1, body
            assert await asyncio.wait_for(bob.recv(), TIMEOUT) == "from the API"
            status, body = await asyncio.to_thread(http_publish, "private-bob", "not allowed")
            assert status == 403 and "not allowed" in body["error"], body
            with pytest.raises(asyncio.TimeoutError):      # nothing was sent
                await asyncio.wait_for(bob.recv(), 0.5)
        finally:
            await bob.close()

    run(main())


# -- per-client limits at the upgrade ------------------------------------------------------

LIMIT_MODES = ("native", "asgi", "native-tls")


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made here."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
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


def limited(server_factory, keys, cert, mode: str, *args):
    """(server, ws base URL, connect kwargs) of a server of ``mode`` with ``args``."""
    if mode == "asgi":
        server = server_factory(*args, env=keys.env, app=ASGI_APP)
        return server, f"ws://{HOST}:{server.port}/whoami", {}
    if mode == "native-tls":
        server = server_factory(*args, "--compression", "--ssl-certfile", str(cert / "cert.pem"),
                                "--ssl-keyfile", str(cert / "key.pem"), env=keys.env, app=APP)
        ctx = ssl.create_default_context(cafile=str(cert / "cert.pem"))
        return server, f"wss://{HOST}:{server.port}/rooms", {"ssl": ctx}
    server = server_factory(*args, env=keys.env, app=APP)
    return server, f"ws://{HOST}:{server.port}/rooms", {}


def source(mode: str, engine: str, test: int, host: int) -> str:
    """A source address of its own for each test, mode, engine and client."""
    return f"127.{10 + test}.{LIMIT_MODES.index(mode) * 2 + (engine == 'wsproto')}.{host}"


@pytest.mark.parametrize("mode", LIMIT_MODES)
def test_max_connections_per_ip(server_factory, keys, cert, engine, mode):
    server, url, kw = limited(server_factory, keys, cert, mode, "--max-connections-per-ip", "3")
    a, b = source(mode, engine, 1, 2), source(mode, engine, 1, 3)
    before = metric(server, "websocket_handshakes_total", result="429") if mode != "native-tls" else 0

    async def main():
        held = [await connect(url, source=a, **kw) for _ in range(3)]
        status, headers = await refused_status(url, source=a, **kw)
        assert status == 429
        assert 5 <= int(headers["Retry-After"]) <= 10          # retry_after 5 s, jittered to 2x
        other = await connect(url, source=b, **kw)             # another address is not counted
        await other.close()
        if mode != "asgi":   # compression negotiated where it is on
            assert ("permessage-deflate" in (held[0].response.headers.get("Sec-WebSocket-Extensions") or "")) \
                == (mode == "native-tls")
        await held.pop().close()                                # one ends: its slot comes back
        deadline = time.monotonic() + 10
        while True:
            try:
                held.append(await connect(url, source=a, **kw))
                break
            except websockets.InvalidStatus:
                assert time.monotonic() < deadline, "the slot of a closed connection never came back"
                await asyncio.sleep(0.1)
        status, _ = await refused_status(url, source=a, **kw)
        assert status == 429
        for ws in held:
            await ws.close()

    run(main())
    if mode != "native-tls":
        assert metric(server, "websocket_handshakes_total", result="429") - before == 2


@pytest.mark.parametrize("mode", LIMIT_MODES)
def test_handshake_rate_per_ip(server_factory, keys, cert, engine, mode):
    server, url, kw = limited(server_factory, keys, cert, mode,
                              "--handshake-rate-per-ip", "0.5", "--handshake-burst-per-ip", "3")
    a, b = source(mode, engine, 2, 2), source(mode, engine, 2, 3)

    async def main():
        t0 = time.monotonic()
        for _ in range(3):                                      # the burst
            ws = await connect(url, source=a, **kw)
            await ws.close()
        status, headers = await refused_status(url, source=a, **kw)
        assert time.monotonic() - t0 < 2.0, "too slow to test a rate of 0.5/s"
        assert status == 429 and 1 <= int(headers["Retry-After"]) <= 4   # up to 2 s, jittered to 2x
        ws = await connect(url, source=b, **kw)                 # another address has its own bucket
        await ws.close()
        await asyncio.sleep(max(0.0, 2.3 - (time.monotonic() - t0)))  # one token back (0.5/s)
        ws = await connect(url, source=a, **kw)
        await ws.close()

    run(main())


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.parametrize("mode", ("native", "asgi"))
def test_flood_from_many_addresses_keeps_memory_bounded(server_factory, keys, cert, engine, mode):
    """3,000 upgrades from 3,000 source addresses: each is admitted (its
    first), the tables stay bounded and the server's RSS barely moves."""
    server, url, _ = limited(server_factory, keys, cert, mode, "--handshake-rate-per-ip", "1",
                             "--max-connections-per-ip", "1")
    path = "/whoami" if mode == "asgi" else "/rooms"
    port = server.port
    third = 20 + LIMIT_MODES.index(mode) * 2 + (engine == "wsproto")

    def burst(first: int, count: int, statuses: list):
        for i in range(first, first + count):
            src = f"127.{third}.{i // 250}.{i % 250 + 1}"
            statuses.append(status_of(raw_upgrade(port, path, source=src, timeout=10)))

    warm: list = []
    burst(0, 200, warm)
    rss0 = _rss(server.proc.pid)
    statuses: list = []
    threads = [threading.Thread(target=burst, args=(200 + k * 700, 700, statuses)) for k in range(4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert time.monotonic() - t0 < 120
    assert statuses.count(101) == 2800, {s: statuses.count(s) for s in set(statuses)}
    grown = _rss(server.proc.pid) - rss0
    assert grown < 24 << 20, f"RSS grew by {grown / 2**20:.1f} MiB for 2,800 addresses"
    # the table still works: a fresh address gets one upgrade, then 429 (rate 1/s, burst 1)
    fresh = f"127.{third}.200.1"
    assert status_of(raw_upgrade(port, path, source=fresh)) == 101
    assert status_of(raw_upgrade(port, path, source=fresh)) == 429


# -- trusted proxy headers behind a real nginx -------------------------------------------------

NGINX_CONF = """
worker_processes 1;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{front};
        location / {{
            proxy_pass http://127.0.0.1:{port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout 60s;
        }}
        location /tls/ {{                    # as if nginx terminated TLS
            proxy_pass http://127.0.0.1:{port}/;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto https;
            proxy_read_timeout 60s;
        }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def nginx_in_front(port: int, tmp: Path):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        pytest.fail("nginx is not installed (apt-get install nginx)", pytrace=False)
    for d in ("body", "proxy", "fcgi", "uwsgi", "scgi"):
        (tmp / d).mkdir(exist_ok=True)
    front = _free_port()
    (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, port=port, front=front))
    proc = subprocess.Popen([nginx, "-c", str(tmp / "nginx.conf"), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection((HOST, front), 0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"nginx did not start: {(tmp / 'error.log').read_text(errors='replace')}",
                                pytrace=False)
                time.sleep(0.05)
        yield front
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_native_app_sees_the_client_behind_nginx(server_factory, keys, engine, tmp_path):
    server = server_factory("--proxy-headers", "--max-connections-per-ip", "2", "--access-log",
                            env=keys.env, app=APP)
    n = 30 + (engine == "wsproto")
    client, other, direct = f"127.{n}.0.5", f"127.{n}.0.6", f"127.{n}.0.9"

    async def main(front):
        via = f"ws://{HOST}:{front}/rooms"
        first = await connect(via, source=client)
        got = await ask(first, {"addr": 1})
        assert got["request"] == [client, 0] and got["app"] == [client, 0], got
        assert got["peer"][0] == HOST                     # the TCP peer is nginx
        # a client's own X-Forwarded-For cannot override what nginx appended
        spoof = await connect(via, source=client, additional_headers={"X-Forwarded-For": "6.6.6.6"})
        assert (await ask(spoof, {"addr": 1}))["app"] == [client, 0]
        # the limit counts the forwarded address: a third from it is refused, another client is not
        status, headers = await refused_status(via, source=client)
        assert status == 429 and int(headers["Retry-After"]) >= 5
        third = await connect(via, source=other)
        assert (await ask(third, {"addr": 1}))["app"] == [other, 0]
        # straight to the server from an untrusted peer: its X-Forwarded-For is ignored
        lone = await connect(f"ws://{HOST}:{server.port}/rooms", source=direct,
                             additional_headers={"X-Forwarded-For": "6.6.6.6", "Forwarded": "for=7.7.7.7"})
        got = await ask(lone, {"addr": 1})
        assert got["request"][0] == direct and got["app"][0] == direct, got
        for ws in (first, spoof, third, lone):
            await ws.close()

    with nginx_in_front(server.port, tmp_path) as front:
        run(main(front))
    assert_access_log(server, client, "/rooms")


def assert_access_log(server, client: str, path: str):
    """The access log names the forwarded client, for the upgrade and the 429."""
    text = server.log()
    assert re.search(rf'{re.escape(client)}:0 "{re.escape(path)}" 101', text), text[-3000:]
    assert re.search(rf'{re.escape(client)}:0 "{re.escape(path)}" 429', text), text[-3000:]
    assert "6.6.6.6" not in text and "7.7.7.7" not in text


def test_asgi_scope_sees_the_client_behind_nginx(server_factory, keys, engine, tmp_path):
    server = server_factory("--proxy-headers", "--max-connections-per-ip", "2", "--access-log",
                            env=keys.env, app=ASGI_APP)
    n = 40 + (engine == "wsproto")
    client, other, direct = f"127.{n}.0.5", f"127.{n}.0.6", f"127.{n}.0.9"

    def http_whoami(port: int, path: str, src: str, headers=None) -> dict:
        conn = http.client.HTTPConnection(HOST, port, timeout=10, source_address=(src, 0))
        try:
            conn.request("GET", path, headers=headers or {})
            r = conn.getresponse()
            assert r.status == 200
            return json.loads(r.read())
        finally:
            conn.close()

    async def main(front):
        first = await connect(f"ws://{HOST}:{front}/whoami", source=client)
        assert await hello(first) == {"client": [client, 0], "scheme": "ws"}
        tls = await connect(f"ws://{HOST}:{front}/tls/whoami", source=client,
                            additional_headers={"X-Forwarded-For": "6.6.6.6"})
        assert await hello(tls) == {"client": [client, 0], "scheme": "wss"}
        status, _ = await refused_status(f"ws://{HOST}:{front}/whoami", source=client)
        assert status == 429
        third = await connect(f"ws://{HOST}:{front}/whoami", source=other)
        assert (await hello(third))["client"] == [other, 0]
        lone = await connect(f"ws://{HOST}:{server.port}/whoami", source=direct,
                             additional_headers={"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"})
        got = await hello(lone)
        assert got["client"][0] == direct and got["scheme"] == "ws", got
        for ws in (first, tls, third, lone):
            await ws.close()
        # http scopes too, per request
        assert await asyncio.to_thread(http_whoami, front, "/whoami", client) == \
            {"client": [client, 0], "scheme": "http"}
        assert await asyncio.to_thread(http_whoami, front, "/tls/whoami", other) == \
            {"client": [other, 0], "scheme": "https"}
        got = await asyncio.to_thread(http_whoami, server.port, "/whoami", direct,
                                      {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"})
        assert got["client"][0] == direct and got["scheme"] == "http", got

    with nginx_in_front(server.port, tmp_path) as front:
        run(main(front))
    assert_access_log(server, client, "/whoami")


# -- the README's example ---------------------------------------------------------------------


def test_readme_example(tmp_path):
    """README.md "Authentication and limits": the app and the command, as written
    (only the port is changed), with a real client, up to the per-address
    limits of the command (test_docs.py's check_auth runs the same blocks for
    the tokens and rooms)."""
    from docblocks import blocks

    found = {(b.kind, b.arg): b.text for b in blocks("README.md")}
    app_src, command = found[("file", "chat.py")], found[("run", "auth")]
    port = _free_port()
    assert command.count("--port 8000") == 1
    command = command.replace("--port 8000", f"--port {port}")
    secret = re.search(r"JWT_SECRET=(\S+)", command).group(1)
    (tmp_path / "chat.py").write_text(app_src)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("FASTWS_NO_EXTENSIONS", None)
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 (closed in the finally below)
    proc = subprocess.Popen(["bash", "-c", command], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((HOST, port), 0.2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "server.log").read_text(errors="replace")
                time.sleep(0.05)
        now = int(time.time())
        good = jwt.encode({"sub": "alice", "aud": "chat", "exp": now + 60}, secret, algorithm="HS256")
        wrong = jwt.encode({"sub": "alice", "aud": "chat", "exp": now + 60}, "another-secret-of-32-bytes!!!!!!",
                           algorithm="HS256")

        async def main():
            url = f"ws://{HOST}:{port}/chat"
            async with await connect(url, additional_headers={"Authorization": f"Bearer {good}"}) as ws:
                for room, answer in (("lobby", "joined lobby"), ("dm-alice", "joined dm-alice"),
                                     ("dm-bob", "not allowed: dm-bob")):
                    await ws.send(room)
                    assert await asyncio.wait_for(ws.recv(), TIMEOUT) == answer
            assert (await refused_status(url, additional_headers={"Authorization": f"Bearer {wrong}"}))[0] == 401
            # --handshake-burst-per-ip 20 at 5/s: a quick run of 30 upgrades from one address
            statuses = []
            for _ in range(30):
                answer = await asyncio.to_thread(raw_upgrade, port, "/chat",
                                                 [("Authorization", f"Bearer {good}")], "127.0.50.1")
                statuses.append(status_of(answer))
            assert statuses[:15] == [101] * 15 and 429 in statuses, statuses

        run(main())
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()
