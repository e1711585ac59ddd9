"""The Origin check against cross-site WebSocket hijacking
(``fastws.origins.OriginPolicy``), the ``ops_hosts`` host names, and the
two settings that carry them (``allowed_origins``, ``ops_hosts``) through
every Config layer.
"""

from __future__ import annotations

import pytest

from fastws import App
from fastws.config import Config
from fastws.errors import ConfigError
from fastws.handshake import parse_request
from fastws.origins import OriginPolicy, host_name, ops_host_set

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def upgrade(host="example.com", *origins):
    lines = [f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Version: 13"]
    lines += [f"Origin: {o}" for o in origins]
    return parse_request(("GET / HTTP/1.1\r\n" + "".join(x + "\r\n" for x in lines) + "\r\n").encode())


# -- same-host (the default) ---------------------------------------------------


@pytest.mark.parametrize("origin,host", [
    ("http://example.com", "example.com"),
    ("https://example.com", "example.com"),
    ("http://example.com:8000", "example.com:8000"),
    ("https://EXAMPLE.com:8443", "example.COM:8443"),
    ("HTTP://example.com", "example.com"),
    ("https://example.com", "example.com:443"),      # the default port, written or not
    ("http://example.com:80", "example.com"),
    ("http://127.0.0.1:9000", "127.0.0.1:9000"),
    ("http://[::1]:9000", "[::1]:9000"),
])
def test_same_host_allows_the_page_of_the_host_asked(origin, host):
    assert OriginPolicy("same-host").allows(origin, host)


@pytest.mark.parametrize("origin,host", [
    ("http://evil.example", "example.com"),
    ("http://example.com.evil.example", "example.com"),
    ("http://evil.example/example.com", "example.com"),
    ("http://example.com:8080", "example.com:8000"),  # another port is another origin
    ("http://example.com:8000", "example.com"),
    ("https://example.com", "example.com:80"),
    ("http://sub.example.com", "example.com"),
    ("ftp://example.com", "example.com"),
    ("chrome-extension://example.com", "example.com"),
    ("null", "example.com"),
    ("", "example.com"),
    ("example.com", "example.com"),
    ("http://example.com/", "example.com"),
    ("http://user@example.com", "example.com"),
    ("http://example.com", None),                     # no Host at all
    ("http://", ""),
])
def test_same_host_refuses_every_other_page(origin, host):
    assert not OriginPolicy("same-host").allows(origin, host)


def test_no_origin_is_not_a_browser_and_always_passes():
    for spec in ("same-host", "https://app.example.com", "null"):
        assert OriginPolicy(spec).allows(None, "example.com")
        assert OriginPolicy(spec).allows_request(upgrade("example.com"))


def test_star_allows_every_origin():
    p = OriginPolicy("*")
    assert p.allows("http://evil.example", "example.com") and p.allows("null", None)
    assert p.allows_request(upgrade("a", "http://evil.example"))
    assert p.fast_mode == "*"


# -- an explicit list ----------------------------------------------------------


def test_explicit_origins_match_scheme_host_and_port_exactly():
    p = OriginPolicy("https://app.example.com, http://localhost:3000")
    assert p.allows("https://app.example.com", "ws.example.com")
    assert p.allows("https://APP.Example.com:443", "ws.example.com")   # case, default port
    assert p.allows("http://localhost:3000", "127.0.0.1:8000")
    assert not p.allows("http://app.example.com", "ws.example.com")     # scheme
    assert not p.allows("https://app.example.com:8443", "x")            # port
    assert not p.allows("http://localhost:3001", "x")
    assert not p.allows("https://other.example.com", "x")
    assert not p.allows("https://app.example.com.evil", "x")
    # a list without same-host does not let the server's own host in
    assert not p.allows("http://ws.example.com", "ws.example.com")
    assert p.fast_mode == "none"


def test_wildcard_subdomains():
    p = OriginPolicy(["https://*.example.com", "http://*.example.org:8080"])
    assert p.allows("https://a.example.com", "x") and p.allows("https://a.b.example.com", "x")
    assert not p.allows("https://example.com", "x")          # the bare domain is not a subdomain
    assert not p.allows("https://evilexample.com", "x")
    assert not p.allows("https://a.example.com.evil", "x")
    assert not p.allows("http://a.example.com", "x")          # scheme
    assert p.allows("http://a.example.org:8080", "x")
    assert not p.allows("http://a.example.org", "x")          # port


def test_same_host_combined_with_origins():
    p = OriginPolicy("same-host,https://app.example.com")
    assert p.allows("http://ws.example.com", "ws.example.com")
    assert p.allows("https://app.example.com", "ws.example.com")
    assert not p.allows("https://evil.example", "ws.example.com")
    assert p.fast_mode == "same-host"


def test_null_only_when_listed():
    assert not OriginPolicy("https://a.com").allows("null", "x")
    assert OriginPolicy("https://a.com,null").allows("null", "x")


def test_every_origin_header_must_pass():
    p = OriginPolicy("same-host")
    assert p.allows_request(upgrade("example.com", "http://example.com"))
    assert not p.allows_request(upgrade("example.com", "http://example.com", "http://evil.example"))
    assert not p.allows_request(upgrade("example.com", "http://evil.example", "http://example.com"))


@pytest.mark.parametrize("spec", ["", " , ", "foo", "https://", "https://a.com/path",
                                  "https://a.com:99999", "https://a.com:0", "*.example.com",
                                  "http://a.com?x"])
def test_bad_entries_are_refused(spec):
    with pytest.raises(ValueError):
        OriginPolicy(spec)


# -- ops_hosts -------------------------------------------------------------------


def test_ops_hosts_names():
    assert ops_host_set("") == frozenset()
    assert ops_host_set("Admin.Internal, localhost,[::1], 10.0.0.7") == {
        "admin.internal", "localhost", "::1", "10.0.0.7"}
    for bad in ("admin:8080", "http://admin", "a b", "a/b", ".x"):
        with pytest.raises(ValueError):
            ops_host_set(bad)


@pytest.mark.parametrize("value,name", [
    ("Admin.Internal:8000", "admin.internal"), ("admin.internal", "admin.internal"),
    ("[::1]:8000", "::1"), ("[::1]", "::1"), ("127.0.0.1:80", "127.0.0.1"),
    (None, None), ("", None), ("a b", None),
])
def test_host_name_of_a_host_header(value, name):
    assert host_name(value) == name


# -- the settings ------------------------------------------------------------------


def test_settings_defaults_and_layers(tmp_path):
    c = Config()
    assert c.allowed_origins == "same-host" and c.ops_hosts == ""
    toml = tmp_path / "f.toml"
    toml.write_text('allowed_origins = ["https://a.example.com", "https://*.example.org"]\n'
                    'ops_hosts = "admin.internal"\n')
    c = Config.load(file=toml, env={})
    assert c.allowed_origins == "https://a.example.com,https://*.example.org"
    assert c.ops_hosts == "admin.internal"
    assert c.sources["allowed_origins"] == f"file {toml}"
    c = Config.load(file=toml, env={"FASTWS_ALLOWED_ORIGINS": "*"},
                    overrides={"ops_hosts": "a.internal, b.internal"})
    assert c.allowed_origins == "*" and c.ops_hosts == "a.internal,b.internal"
    assert c.sources["ops_hosts"] == "cli --ops-hosts"
    assert 'allowed_origins = "*"' in c.to_toml()


@pytest.mark.parametrize("key,value", [
    ("allowed_origins", "app.example.com"), ("allowed_origins", ""), ("allowed_origins", 5),
    ("allowed_origins", ["https://a.com", 3]), ("ops_hosts", "admin:9000"), ("ops_hosts", "https://x"),
])
def test_bad_settings_name_the_key(key, value):
    with pytest.raises(ConfigError) as info:
        Config(**{key: value})
    assert key in str(info.value) and "\n" not in str(info.value)


def test_app_takes_no_settings_and_says_where_they_live():
    """Every setting lives in Config: App(allowed_origins=...) is refused with
    a message that names the setting and where to give it."""
    with pytest.raises(TypeError) as info:
        App(allowed_origins="https://a.com")
    assert "allowed_origins" in str(info.value) and "fastws.Config" in str(info.value)
