"""The pure parts of the guards: who the client is behind trusted proxies
(fastws.proxy), the per-client limits table (fastws.limits.ClientLimits),
TokenAuth's key loading and its import without PyJWT.  The same guards
against real server processes: tests/integration/test_guards.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastws.config import Config, ConfigError
from fastws.limits import ClientLimits
from fastws.proxy import TrustedProxies, client_key, parse_networks

PEER = ("127.0.0.1", 50000)


# -- trusted proxy headers ----------------------------------------------------------


def test_untrusted_peer_is_the_client_whatever_it_says():
    p = TrustedProxies("127.0.0.1")
    peer = ("10.1.2.3", 4000)
    assert p.resolve(peer, "6.6.6.6", "https", 'for="7.7.7.7"') == (peer, None)


def test_x_forwarded_for_right_most_untrusted_entry():
    p = TrustedProxies("127.0.0.1,10.0.0.0/8")
    # the client wrote 6.6.6.6; the edge proxy appended the real client; an inner proxy itself
    assert p.resolve(PEER, "6.6.6.6, 203.0.113.7, 10.0.0.5") == (("203.0.113.7", 0), None)
    assert p.resolve(PEER, "203.0.113.7") == (("203.0.113.7", 0), None)
    # every hop trusted: the left-most one
    assert p.resolve(PEER, "10.0.0.9, 10.0.0.5") == (("10.0.0.9", 0), None)
    # several header lines, joined
    assert p.resolve(PEER, "6.6.6.6,198.51.100.1") == (("198.51.100.1", 0), None)


def test_x_forwarded_for_forms_and_garbage():
    p = TrustedProxies("127.0.0.1")
    assert p.resolve(PEER, "198.51.100.1:4711")[0] == ("198.51.100.1", 4711)
    assert p.resolve(PEER, "2001:db8::1")[0] == ("2001:db8::1", 0)
    assert p.resolve(PEER, "[2001:db8::1]:443")[0] == ("2001:db8::1", 443)
    assert p.resolve(PEER, "::ffff:192.0.2.9")[0] == ("192.0.2.9", 0)
    for bad in ("unknown", "_hidden", "1.2.3.4.5", "[::1", "1.2.3.4:99999", "  ", "a, b"):
        assert p.resolve(PEER, bad) == (PEER, None), bad


def test_forwarded_proto():
    p = TrustedProxies("127.0.0.1")
    assert p.resolve(PEER, "198.51.100.1", "https") == (("198.51.100.1", 0), True)
    assert p.resolve(PEER, "198.51.100.1", "http") == (("198.51.100.1", 0), False)
    assert p.resolve(PEER, "198.51.100.1", "WSS") == (("198.51.100.1", 0), True)
    assert p.resolve(PEER, "198.51.100.1", "gopher") == (("198.51.100.1", 0), None)
    # positional when both lists have the same length: the client's hop spoke https
    assert p.resolve(PEER, "198.51.100.1, 127.0.0.1", "https, http") == (("198.51.100.1", 0), True)
    # only the scheme said
    assert p.resolve(PEER, None, "https") == (PEER, True)


def test_rfc7239_forwarded_used_without_x_forwarded_for():
    p = TrustedProxies("127.0.0.1")
    value = 'for=6.6.6.6;proto=http, for="[2001:db8:cafe::17]:4711";proto=https;by=127.0.0.1'
    assert p.resolve(PEER, None, None, value) == (("2001:db8:cafe::17", 4711), True)
    assert p.resolve(PEER, None, None, "for=unknown") == (PEER, None)
    # X-Forwarded-For wins when both are there
    assert p.resolve(PEER, "198.51.100.1", None, "for=6.6.6.6")[0] == ("198.51.100.1", 0)


def test_any_peer_and_unix_socket_peer():
    p = TrustedProxies("*")
    assert p.resolve(("8.8.8.8", 1), "198.51.100.1")[0] == ("198.51.100.1", 0)
    q = TrustedProxies("127.0.0.1")
    assert q.resolve(None, "198.51.100.1")[0] == ("198.51.100.1", 0)     # --uds: a local process
    assert q.resolve("", "198.51.100.1")[0] == ("198.51.100.1", 0)


def test_networks_setting():
    assert parse_networks("*") == (True, ())
    any_peer, nets = parse_networks("127.0.0.1, 10.0.0.0/8,::1")
    assert not any_peer and [str(n) for n in nets] == ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]
    with pytest.raises(ValueError, match="nginx"):
        parse_networks("127.0.0.1,nginx")
    with pytest.raises(ConfigError, match="forwarded_allow_ips"):
        Config(forwarded_allow_ips="10.0.0.0/33")
    with pytest.raises(ConfigError, match="forwarded_allow_ips"):
        Config(forwarded_allow_ips="*,10.0.0.1")
    c = Config.load(env={"FASTWS_PROXY_HEADERS": "1", "FASTWS_FORWARDED_ALLOW_IPS": "10.0.0.0/8"})
    assert c.proxy_headers is True and c.forwarded_allow_ips == "10.0.0.0/8"


def test_per_ip_settings_checked():
    for key, bad in (("max_connections_per_ip", -1), ("handshake_rate_per_ip", -0.5),
                     ("handshake_burst_per_ip", -2)):
        with pytest.raises(ConfigError, match=key):
            Config(**{key: bad})
    c = Config.load(env={"FASTWS_MAX_CONNECTIONS_PER_IP": "20", "FASTWS_HANDSHAKE_RATE_PER_IP": "2.5"})
    assert (c.max_connections_per_ip, c.handshake_rate_per_ip) == (20, 2.5)


def test_client_key():
    assert client_key("192.0.2.9") == "192.0.2.9"
    assert client_key("::ffff:192.0.2.9") == "192.0.2.9"
    # one IPv6 subscriber holds a /64
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("not-an-ip") == "not-an-ip"


# -- the per-client limits table ------------------------------------------------------


class Holder:
    """Stands for an upgrade: over once its transport is closing."""

    def __init__(self):
        self.closing = False

    def is_closing(self):
        return self.closing


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_concurrent_limit_counts_until_over():
    lim = ClientLimits(max_connections=2)
    a, b = Holder(), Holder()
    assert lim.check("k", a) is None and lim.check("k", b) is None
    refused = lim.check("k", Holder())
    assert refused is not None and refused[0] == "too many connections from this address"
    assert 5 <= refused[1] <= 10                 # retry_after 5 s, jittered up to twice it
    assert lim.check("other", Holder()) is None
    a.closing = True                             # one is over: room for one more
    assert lim.check("k", Holder()) is None
    assert lim.check("k", Holder()) is not None
    assert lim.refused["connections_per_ip"] == 2
    assert lim.open_count("k") == 2


def test_sweep_keeps_the_table_near_the_open_connections():
    lim = ClientLimits(max_connections=5)
    holders = []
    for i in range(5000):                        # 5000 short connections from 5000 addresses
        h = Holder()
        assert lim.check(f"10.0.{i // 250}.{i % 250}", h) is None
        h.closing = True
        holders.append(h)
    assert len(lim.holders) < 1100               # swept as it grew, not 5000 keys
    lim.sweep()
    assert lim.holders == {}


def test_rate_bucket_and_retry_after():
    clock = Clock()
    lim = ClientLimits(rate=2, burst=3, clock=clock)
    for _ in range(3):
        assert lim.check("k", None) is None
    reason, retry = lim.check("k", None)
    assert reason == "too many handshakes from this address" and retry >= 1
    assert lim.check("other", None) is None
    clock.now += 0.5                             # one token back
    assert lim.check("k", None) is None
    assert lim.check("k", None) is not None
    assert lim.refused["handshake_rate_per_ip"] == 2


def test_rate_table_is_bounded():
    clock = Clock()
    lim = ClientLimits(rate=1, burst=2, table_max=100, clock=clock)
    for i in range(1000):                        # a flood from 1000 addresses within one instant
        assert lim.check(f"a{i}", None) is None
    assert len(lim.buckets) == 100               # the cap: least recently seen dropped
    assert lim.evicted == 900
    clock.now += 2.0                             # every bucket refilled: they carry nothing
    lim.check("late", None)
    assert list(lim.buckets) == ["late"]


# -- TokenAuth's construction -------------------------------------------------------


def test_token_auth_key_loading():
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from fastws.auth import TokenAuth

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    auth = TokenAuth(keys=[pem, "a-long-enough-hmac-secret-for-hs256!"], algorithms=["RS256", "HS256"],
                     required_claims=())
    assert sorted(auth.keys) == ["HS256", "RS256"]
    assert len(auth.keys["RS256"]) == 1 and len(auth.keys["HS256"]) == 1   # the PEM is no HMAC secret
    # a private key object verifies with its public half
    auth2 = TokenAuth(keys=rsa_key, algorithms=["RS256"], required_claims=())
    token = jwt.encode({"sub": "u"}, rsa_key, algorithm="RS256")
    assert auth2.verify(token) == {"sub": "u"}
    with pytest.raises(ValueError, match="none"):
        TokenAuth(keys=["x" * 32], algorithms=["HS256", "none"])
    with pytest.raises(ValueError, match="key #1 suits none"):
        TokenAuth(keys=[pem], algorithms=["ES256"])
    with pytest.raises(ValueError, match="at least one key"):
        TokenAuth(keys=[], algorithms=["HS256"])
    with pytest.raises(ValueError, match="sources"):
        TokenAuth(keys=["x" * 32], sources=["url"])
    ec_key = ec.generate_private_key(ec.SECP256R1())
    auth3 = TokenAuth(keys={"e1": ec_key.public_key()}, algorithms=["ES256"], required_claims=())
    token = jwt.encode({"sub": "e"}, ec_key, algorithm="ES256", headers={"kid": "e1"})
    assert auth3.verify(token)["sub"] == "e"


def test_token_auth_import_without_pyjwt_names_the_extra():
    code = ("import sys; sys.modules['jwt'] = None\n"
            "try:\n import fastws.auth\nexcept ImportError as e:\n print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert 'pip install "fastws[auth]"' in out.stdout, out


def test_client_limits_release_and_hand_over_at_once():
    """An upgrade's holder is released when its connection ends (not at the
    next sweep, which kept closed TLS transports alive), and an ASGI
    hand-over swaps the transport for the connection in the count."""
    from fastws.limits import ClientLimits

    class Holder:
        def is_closing(self):
            return False

    limits = ClientLimits(max_connections=2)
    t1, t2, conn = Holder(), Holder(), Holder()
    assert limits.check("k", t1) is None and limits.check("k", t2) is None
    assert limits.check("k", Holder()) is not None          # at the limit
    limits.replace("k", t1, conn)
    assert limits.holders["k"] == [conn, t2]
    limits.release("k", t2)
    limits.release("k", conn)
    assert "k" not in limits.holders                        # nothing of them kept
    limits.release("k", conn)                               # twice: no error
    assert limits.check("k", Holder()) is None
