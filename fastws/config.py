"""One Config for the CLI and the library: every knob, its default and check.

Every setting is a field of :class:`Config` with its default, its kind (which
fixes the type, the unit and how a string is parsed), what values are allowed,
and a help line.  The CLI options of ``fastws serve`` are generated from these
fields, so the two cannot drift apart.

Layering, lowest first::

    defaults  <  TOML file (--config F, or FASTWS_CONFIG)  <  FASTWS_* env  <  CLI flags

:meth:`Config.load` applies the layers and records in ``config.sources``
where each value came from (``fastws config show`` prints it).  The keyword
constructor ``Config(host=..., port=...)`` (used by ``fastws.run`` and
``App.serve``) validates the same way.  Any bad value raises
:class:`~fastws.errors.ConfigError` naming the key, the value and what is
allowed; the CLI turns it into one line and exit code 2.

String values (environment, CLI, or strings in the TOML file) are parsed by
kind: ``bytes`` accepts ``65536``, ``64KiB``, ``1MiB``, ``2GiB`` (also ``k``,
``M``, ``G``: all binary); ``seconds`` accepts ``2.5``, ``500ms``, ``2s``,
``1m``; ``bool`` accepts ``true/false``, ``1/0``, ``yes/no``, ``on/off``;
``list`` accepts ``a,b,c`` (a TOML array too) and is kept as ``"a,b,c"``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any
from urllib.parse import parse_qsl, urlsplit

try:                       # the standard library from Python 3.11
    import tomllib
except ImportError:        # Python 3.10: the same parser, as a package
    import tomli as tomllib  # type: ignore[no-redef,import-not-found]

from .errors import ConfigError
from .origins import OriginPolicy, ops_host_set
from .proxy import parse_networks

ENV_PREFIX = "FASTWS_"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
#: Largest allowed max_room_name: with any prefix and namespace, a room's
#: channel stays far below what the embedded broker carries per channel
#: (fastws.broker.embedded.MAX_CHANNEL, 1 MiB); Redis takes 512 MB.
MAX_ROOM_NAME_CAP = 65536


def knob(default: Any, help: str, *, kind: str, allowed: str = "", check: Callable[[Any], object] | None = None,
         choices: tuple[str, ...] = (), flag: str | None = None, secret: bool = False) -> Any:
    """A Config field.  ``kind``: int, bytes, float, seconds, bool, str,
    choice or path; ``check(value) -> bool`` on the typed value, with
    ``allowed`` describing what passes.  Returns a dataclass field (typed
    Any, so that the annotation of the Config attribute is its type)."""
    if choices:
        allowed = allowed or "one of " + ", ".join(choices)
        check = check or choices.__contains__
    return field(default=default, metadata={
        "help": help, "kind": kind, "allowed": allowed, "check": check,
        "choices": choices, "flag": flag, "secret": secret,
    })


_KIND_ALLOWED = {
    "int": "an integer",
    "bytes": "a size in bytes (e.g. 65536, 64KiB, 1MiB)",
    "float": "a number",
    "seconds": "a duration in seconds (e.g. 2.5, 500ms, 1m)",
    "bool": "true or false",
    "str": "a string",
    "choice": "a string",
    "path": "a path to a readable file",
    "list": "a comma-separated list",
}

_SIZE = re.compile(r"^\s*(\d+)\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)\s*$", re.I)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
               "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
               "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(|ms|s|m)\s*$", re.I)
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0}
_REDIS_SCHEMES = ("redis", "rediss", "redis+streams", "rediss+streams", "redis+cluster", "rediss+cluster")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass
class Config:
    # -- listening -------------------------------------------------------
    host: str = knob("127.0.0.1", "Address to listen on.", kind="str",
                     check=bool, allowed="a non-empty address")
    port: int = knob(8000, "TCP port (0: pick a free one).", kind="int",
                     check=lambda v: 0 <= v <= 65535, allowed="an integer 0..65535")
    backlog: int = knob(4096, "listen(2) backlog.", kind="int",
                        check=lambda v: v > 0, allowed="an integer > 0")
    reuse_port: bool = knob(False, "SO_REUSEPORT: several processes share the port.", kind="bool")
    ssl_certfile: str | None = knob(None, "TLS certificate chain (PEM): serve wss://.", kind="path")
    ssl_keyfile: str | None = knob(None, "TLS private key (PEM) for --ssl-certfile.", kind="path")
    uds: str | None = knob(None, "Listen on this Unix domain socket path instead of host:port "
                           "(a stale socket file is replaced; one that a process listens on is "
                           "an error).", kind="str", check=lambda v: v is None or (0 < len(v.encode()) < 108),
                           allowed="a path of 1..107 bytes")
    root_path: str = knob("", "ASGI apps: the path prefix a proxy mounts the app under, given to "
                          "the app as scope['root_path'] (ASGI only: a fastws.App refuses it).",
                          kind="str", check=lambda v: v == "" or (v.startswith("/") and not v.endswith("/")),
                          allowed="empty, or a path starting with / and not ending with /")
    # -- protocol limits ---------------------------------------------------
    max_message_size: int = knob(1 << 20, "Largest message in bytes; larger ones close with 1009 "
                                 "(0 = no limit).", kind="bytes", check=lambda v: v >= 0,
                                 allowed="bytes >= 0 (0 = no limit)")
    max_frame_size: int = knob(0, "Largest frame in bytes (0 = bounded by --max-message-size only).",
                               kind="bytes", check=lambda v: v >= 0, allowed="bytes >= 0 (0 = no limit)")
    max_head_size: int = knob(8192, "Largest HTTP request head in bytes; larger ones get 431.",
                              kind="bytes", check=lambda v: v >= 256, allowed="bytes >= 256")
    max_body_size: int = knob(1 << 20, "Largest HTTP request body in bytes (the publish API, a "
                              "fastws.App's HTTP routes, an ASGI app's requests); larger ones get 413 "
                              "(0 = no limit).", kind="bytes", check=lambda v: v >= 0,
                              allowed="bytes >= 0 (0 = no limit)")
    compression: bool = knob(False, "Negotiate permessage-deflate (RFC 7692).", kind="bool")
    deflate_server_no_context_takeover: bool = knob(
        True, "With --compression: the server compresses every message on its own, from one "
        "compressor per process (no compression state per connection; "
        "--no-deflate-server-no-context-takeover keeps a compressor per connection: smaller "
        "frames for repetitive messages, ~100 KB more per connection).", kind="bool")
    deflate_client_no_context_takeover: bool = knob(
        False, "With --compression: ask clients to compress every message on its own.", kind="bool")
    close_timeout: float = knob(5.0, "Seconds to wait for the peer's close frame.", kind="seconds",
                                check=lambda v: v >= 0, allowed="seconds >= 0")
    # -- delivery policy (per-connection send budget, see fastws._core.Hub) --
    high_water: int = knob(65536, "Transport write-buffer high-water mark per connection, bytes.",
                           kind="bytes", check=lambda v: v >= 1024, allowed="bytes >= 1024")
    max_queue: int = knob(1 << 20, "Hard cap on a connection's queued output, bytes; past it the "
                          "connection is closed as a slow consumer.", kind="bytes",
                          check=lambda v: v >= 1024, allowed="bytes >= 1024")
    slow_grace: float = knob(5.0, "Seconds a connection may stay backed up before it is closed.",
                             kind="seconds", check=lambda v: v > 0, allowed="seconds > 0")
    # -- timers (one timer wheel per hub, nothing per connection) -------------
    ping_interval: float = knob(20.0, "Seconds between server pings to each connection (0 = no pings).",
                                kind="seconds", check=lambda v: v >= 0, allowed="seconds >= 0 (0 = off)")
    ping_timeout: float = knob(20.0, "Seconds to wait for any sign of life after a ping; then close 1011.",
                               kind="seconds", check=lambda v: v > 0, allowed="seconds > 0")
    idle_timeout: float = knob(0.0, "Close a connection after this long without a message (0 = never).",
                               kind="seconds", check=lambda v: v >= 0, allowed="seconds >= 0 (0 = never)")
    handshake_timeout: float = knob(10.0, "Seconds a client has to complete the TLS handshake, then each "
                                    "HTTP request head (then 408 and close) and the opening handshake.",
                                    kind="seconds", check=lambda v: v > 0, allowed="seconds > 0")
    body_timeout: float = knob(30.0, "Seconds a client has to send a whole HTTP request body once its "
                               "head is in (plain HTTP routes and ASGI apps); then 408 and close.",
                               kind="seconds", check=lambda v: v > 0, allowed="seconds > 0")
    # -- per-connection rate limits (counted in the hub, see fastws.core) -------
    max_messages_per_second: float = knob(
        0.0, "Messages per second one connection may send (a burst of --rate-burst-seconds worth "
        "passes); past it the connection is closed with 1008 'rate limit exceeded' (0 = no limit).",
        kind="float", check=lambda v: 0 <= v <= 1e9, allowed="a number 0..1e9 (0 = no limit)")
    max_bytes_per_second: int = knob(
        0, "Bytes per second one connection may send, frames of every kind counted as read (a burst "
        "of --rate-burst-seconds worth passes); past it the connection is closed with 1008 'rate "
        "limit exceeded' (0 = no limit).", kind="bytes", check=lambda v: 0 <= v <= 1 << 30,
        allowed="bytes 0..1GiB per second (0 = no limit)")
    rate_burst_seconds: float = knob(
        2.0, "Window of the per-connection rate limits, seconds: a connection may send this many "
        "seconds' worth of its rates at once.", kind="seconds", check=lambda v: 0 < v <= 3600,
        allowed="seconds > 0, at most 3600")
    # -- admission (limits that protect the server, see fastws.limits) ----------
    max_connections: int = knob(0, "Open connections at most; past it upgrades get 503 with a jittered "
                                "Retry-After (0 = no limit).", kind="int", check=lambda v: v >= 0,
                                allowed="an integer >= 0 (0 = no limit)")
    handshake_rate: float = knob(0.0, "Upgrades accepted per second (token bucket); excess gets 503 "
                                 "with a jittered Retry-After (0 = no limit).", kind="float",
                                 check=lambda v: v >= 0, allowed="a number >= 0 (0 = no limit)")
    handshake_burst: int = knob(0, "Burst of the handshake token bucket (0 = one second's worth).",
                                kind="int", check=lambda v: v >= 0, allowed="an integer >= 0")
    retry_after: float = knob(5.0, "Base of the Retry-After hint on 503, seconds (jittered up to twice it).",
                              kind="seconds", check=lambda v: v >= 1, allowed="seconds >= 1")
    max_connections_per_ip: int = knob(0, "Open connections (and upgrades in progress) per client address "
                                       "at most; past it upgrades get 429 with a jittered Retry-After. IPv6 "
                                       "clients count per /64; behind a proxy see --proxy-headers "
                                       "(0 = no limit).", kind="int", check=lambda v: v >= 0,
                                       allowed="an integer >= 0 (0 = no limit)")
    handshake_rate_per_ip: float = knob(0.0, "Upgrades per second per client address (token bucket); excess "
                                        "gets 429 with a jittered Retry-After (0 = no limit).", kind="float",
                                        check=lambda v: v >= 0, allowed="a number >= 0 (0 = no limit)")
    handshake_burst_per_ip: int = knob(0, "Burst of the per-address handshake token bucket (0 = one "
                                       "second's worth, at least 1).", kind="int", check=lambda v: v >= 0,
                                       allowed="an integer >= 0")
    # -- behind a reverse proxy (see fastws.proxy) ---------------------------------
    proxy_headers: bool = knob(False, "Take the client's address and scheme from X-Forwarded-For / "
                               "X-Forwarded-Proto (or Forwarded) when the direct peer is one of "
                               "--forwarded-allow-ips: for request.remote_address, the per-address "
                               "limits, logs and an ASGI scope's client and scheme.", kind="bool")
    forwarded_allow_ips: str = knob("127.0.0.1", "Peers trusted to say who the client is (with "
                                    "--proxy-headers): IP addresses and CIDR networks, comma-separated, "
                                    "or * for any peer.", kind="list", check=lambda v: _valid(_networks, v),
                                    allowed="* or a comma-separated list of IP addresses and networks "
                                    "(10.0.0.0/8, ::1)")
    # -- browsers and operations endpoints (see fastws.origins.OriginPolicy) ----------
    allowed_origins: str = knob("same-host", "Browser pages allowed to open a WebSocket, by their Origin: "
                                "same-host (the page's host[:port] is the request's Host), * (any), or "
                                "origins such as https://app.example.com, https://*.example.com, null; "
                                "same-host may be combined with origins. Others get 403. A request "
                                "without Origin (not a browser) is always allowed.", kind="list",
                                check=lambda v: _valid(_origin_policy, v),
                                allowed="same-host, *, or a comma-separated list of origins "
                                "(scheme://host[:port], https://*.example.com, null)")
    ops_hosts: str = knob("", "Host names (comma-separated, no port) on which /health, /livez, /metrics, "
                          "/stats and the HTTP publish API answer; for any other Host they are 404 "
                          "(empty: any Host).", kind="list", check=lambda v: _valid(_ops_hosts, v),
                          allowed="a comma-separated list of host names without scheme or port")
    # -- scale-out (fastws.broker) ------------------------------------------------
    broker: str = knob("", "Broker URL for rooms across workers and nodes: redis://host:port/db, "
                       "rediss://..., redis+streams://host:port/db (no loss over short outages, room history), "
                       "redis+cluster://host:port[,host:port], redis+sentinel://host:port[,host:port]/service[/db] "
                       "(follows a Sentinel failover), unix:///path.sock, "
                       "memory:// (empty: rooms are local to the process; with --workers an "
                       "embedded broker joins the workers).", kind="str")
    broker_prefix: str = knob("", "Prefix of the broker's channel names (several apps on one Redis).",
                              kind="str")
    presence: bool = knob(False, "Keep who is in which room, across nodes, in the broker's Redis "
                          "(app.presence, GET /presence); needs a redis://, rediss://, redis+streams:// "
                          "or redis+cluster:// broker and the redis package.", kind="bool")
    presence_ttl: float = knob(30.0, "With --presence: seconds a node's presence entries live "
                               "without a refresh (a crashed node's members vanish after it).",
                               kind="seconds", check=lambda v: 3 <= v <= 3600, allowed="seconds 3..3600")
    # -- regions (fastws.regions) ---------------------------------------------------
    region_peers: str = knob("", "The other regions, name=redis-url pairs, comma-separated "
                             "(eu=redis://10.1.0.5:6379/0,ap=rediss://...): each region's own Redis, "
                             "reached to hand it messages and to ask it where a user is. An entry "
                             "for this node's --region is skipped (every region can be given the "
                             "same list). Needs --region and a redis://, rediss://, redis+sentinel:// "
                             "or redis+cluster:// broker, which is this region's Redis (empty: one "
                             "region).", kind="list")
    region_queue_max: int = knob(100_000, "With --region-peers: messages queued for one unreachable "
                                 "region at most; the oldest past it are dropped and counted "
                                 "(fastws_region_dropped_total{reason=\"length\"}).", kind="int",
                                 check=lambda v: 1 <= v <= 100_000_000, allowed="an integer 1..100000000")
    region_queue_age: float = knob(3600.0, "With --region-peers: seconds a message may wait for an "
                                   "unreachable region; older ones are dropped and counted "
                                   "(fastws_region_dropped_total{reason=\"age\"}; 0 = no age bound).",
                                   kind="seconds", check=lambda v: 0 <= v <= 7 * 86400,
                                   allowed="seconds 0..604800 (0 = no age bound)")
    region_directory_ttl: float = knob(30.0, "With --region-peers: seconds a user's entry in the region's "
                                       "directory lives without a refresh (refreshed every third of it "
                                       "while the user is connected; a crashed node's users vanish "
                                       "after it).", kind="seconds", check=lambda v: 3 <= v <= 3600,
                                       allowed="seconds 3..3600")
    # -- rooms (fastws.rooms) -------------------------------------------------------
    max_rooms_per_connection: int = knob(1000, "Rooms one connection may be in at once; a join past it "
                                         "raises fastws.errors.RoomLimitError in the app (0 = no limit).",
                                         kind="int", check=lambda v: v >= 0,
                                         allowed="an integer >= 0 (0 = no limit)")
    max_room_name: int = knob(256, "Longest room name, bytes of UTF-8; a join or publish with a longer "
                              "one raises fastws.errors.RoomNameError.", kind="bytes",
                              check=lambda v: 1 <= v <= MAX_ROOM_NAME_CAP,
                              allowed=f"bytes 1..{MAX_ROOM_NAME_CAP} (what every broker carries)")
    max_joins_per_second: float = knob(0.0, "Room joins one connection may make per second, counted over "
                                       "--rate-burst-seconds; past it the connection is closed with 1008 "
                                       "(0 = no limit).", kind="float", check=lambda v: v >= 0,
                                       allowed="a number >= 0 (0 = no limit)")
    publish_token: str | None = knob(None, "Bearer token of the HTTP API (POST /publish, "
                                     "POST and DELETE /connections/{id}, GET /presence, GET /history); "
                                     "unset: the API is off.", kind="str",
                                     check=lambda v: v is None or len(v) >= 8,
                                     allowed="a string of at least 8 characters", secret=True)
    # -- gateway mode (fastws.gateway: the application runs elsewhere) -----------
    gateway: str = knob("", "Gateway mode: hand the connect, message and disconnect events of "
                        "WebSocket connections to a backend and do what it answers: "
                        "http://host:port/path or https://... (JSON POSTs), or redis://host:port/db"
                        "[?stream=NAME&group=NAME] (a Redis Stream read by a worker group). "
                        "Serves --gateway-routes (empty: off; a fastws.App and no app at all, not ASGI).",
                        kind="str", check=lambda v: v == "" or _valid(_gateway_url, v),
                        allowed="empty, http(s)://host[:port][/path] or redis(s)://host[:port][/db]"
                        "[?stream=NAME&group=NAME]")
    gateway_routes: str = knob("*", "With --gateway: the WebSocket paths whose connections go to the "
                               "backend, comma-separated (* = every path the app has no route for).",
                               kind="list", check=lambda v: _valid(_gateway_paths, v),
                               allowed="* or a comma-separated list of paths starting with /")
    gateway_token: str | None = knob(None, "With --gateway http(s)://: sent as 'Authorization: Bearer "
                                     "<token>' with every event, for the backend to check.", kind="str",
                                     check=lambda v: v is None or len(v) >= 8,
                                     allowed="a string of at least 8 characters", secret=True)
    gateway_timeout: float = knob(5.0, "With --gateway: seconds the backend has to answer an event; a "
                                  "connect not answered in time gets 503 with a Retry-After.",
                                  kind="seconds", check=lambda v: 0.05 <= v <= 300,
                                  allowed="seconds 0.05..300")
    gateway_concurrency: int = knob(32, "With --gateway: requests (HTTP: pooled keep-alive connections) "
                                    "or stream entries waiting for the backend at once.", kind="int",
                                    check=lambda v: 1 <= v <= 4096, allowed="an integer 1..4096")
    gateway_batch: int = knob(100, "With --gateway: events per request at most, once an HTTP backend "
                              "opts in (its answer says Fastws-Gateway-Batch: N), or per stream entry "
                              "(1 = one event per request).", kind="int",
                              check=lambda v: 1 <= v <= 10000, allowed="an integer 1..10000")
    gateway_retries: int = knob(3, "With --gateway: attempts after the first for a connect or disconnect "
                                "event whose request failed after it was sent (messages are retried only "
                                "when the backend cannot have seen them; otherwise they are counted as "
                                "failed).", kind="int", check=lambda v: 0 <= v <= 100,
                                allowed="an integer 0..100")
    gateway_queue: int = knob(256, "With --gateway: events of one connection waiting for the backend at "
                              "most; past it --gateway-overflow applies.", kind="int",
                              check=lambda v: 1 <= v <= 1_000_000, allowed="an integer 1..1000000")
    gateway_overflow: str = knob("close", "With --gateway: what happens to a message past --gateway-queue: "
                                 "close (the connection is closed 1013 'try again later') or drop (the "
                                 "message is dropped and counted).", kind="choice", choices=("close", "drop"))
    # -- workers ----------------------------------------------------------------
    workers: int = knob(1, "Worker processes sharing the port with SO_REUSEPORT, supervised "
                        "(1 = a single process, no supervisor).", kind="int",
                        check=lambda v: 1 <= v <= 256, allowed="an integer 1..256")
    # -- lifecycle -----------------------------------------------------------
    shutdown_timeout: float = knob(10.0, "Seconds a graceful shutdown waits for close handshakes.",
                                   kind="seconds", check=lambda v: v >= 0, allowed="seconds >= 0")
    drain_delay: float = knob(0.0, "Seconds to keep listening after SIGTERM while /health says 503 "
                              "and new upgrades get 503, so a load balancer can stop sending "
                              "(0 = close at once).", kind="seconds",
                              check=lambda v: 0 <= v <= 3600, allowed="seconds 0..3600")
    drain_rate: float = knob(0.0, "Connections closed per second during a graceful shutdown "
                             "(0 = all at once).", kind="float", check=lambda v: v >= 0,
                             allowed="a number >= 0 (0 = all at once)")
    reconnect_delay: float = knob(1.0, "Close reason on shutdown tells each client to reconnect after "
                                  "this many seconds, spread with jitter up to twice it.",
                                  kind="seconds", check=lambda v: v >= 0, allowed="seconds >= 0")
    # -- logging ---------------------------------------------------------------
    log_level: str = knob("info", "Log level: lifecycle events at info, per-connection at debug.",
                          kind="choice", choices=LOG_LEVELS)
    log_format: str = knob("text", "Log line format.", kind="choice", choices=LOG_FORMATS)
    log_config: str | None = knob(None, "A logging configuration file, as uvicorn's --log-config: a "
                                  "dictConfig in .json or .toml, or a fileConfig .ini; it replaces "
                                  "--log-format (a --log-level given too sets the fastws loggers' level).",
                                  kind="path")
    access_log: bool = knob(False, "Log every WebSocket upgrade, refused upgrade and close (with its "
                            "code and duration), one line each at info on logger fastws.access.",
                            kind="bool")
    # -- metrics -----------------------------------------------------------------
    metrics: bool = knob(True, "Serve Prometheus metrics at GET /metrics on the same port.", kind="bool")
    region: str = knob("", "This node's region: the 'region' label of the metrics, and with "
                       "--region-peers the region whose users this node serves (letters, digits, "
                       "'.', '_', '-').", kind="str")
    server_id: str = knob("", "Value of the 'server_id' label (empty: the host name).", kind="str")
    # -- health --------------------------------------------------------------------
    health: bool = knob(True, "Serve GET /health (readiness) and GET /livez (liveness).", kind="bool")
    health_max_loop_lag: float = knob(1.0, "Event-loop lag above which /health says 503 (0 = no check).",
                                      kind="seconds", check=lambda v: v >= 0, allowed="seconds >= 0")
    health_max_memory: int = knob(0, "Resident memory above which /health says 503 (0 = no check).",
                                  kind="bytes", check=lambda v: v >= 0, allowed="bytes >= 0 (0 = no check)")
    # -- clients -------------------------------------------------------------------
    serve_client_js: bool = knob(False, "Serve the browser client at GET /fastws.js (an ES module) and "
                                 "GET /fastws.global.js (a plain script defining fastws).", kind="bool")
    # -- live stats page ---------------------------------------------------------------
    stats: bool = knob(False, "Serve the live stats page at GET /stats (needs --stats-token).", kind="bool")
    stats_token: str | None = knob(None, "Token for /stats: ?token=... or 'Authorization: Bearer ...'.",
                                   kind="str", check=lambda v: v is None or len(v) >= 8,
                                   allowed="a string of at least 8 characters", secret=True)
    stats_window: float = knob(300.0, "Seconds of history the stats page shows.", kind="seconds",
                               check=lambda v: 10 <= v <= 86400, allowed="seconds 10..86400")
    stats_interval: float = knob(2.0, "Seconds between two samples of the stats page.", kind="seconds",
                                 check=lambda v: 0.1 <= v <= 60, allowed="seconds 0.1..60")

    def __post_init__(self) -> None:
        #: key -> where its value came from ("default", "argument", "file F",
        #: "env FASTWS_X", "cli --x"); filled in by load().
        self.sources: dict[str, str] = {
            f.name: "default" if getattr(self, f.name) == f.default else "argument"
            for f in fields(self)
        }
        self.validate()

    # -- validation -------------------------------------------------------------

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            typed = _coerce(f, value)
            if typed is not value:
                setattr(self, f.name, typed)
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            key = "ssl_keyfile" if self.ssl_certfile else "ssl_certfile"
            raise ConfigError(key, getattr(self, key), "both ssl_certfile and ssl_keyfile, or neither")
        if self.stats and not self.stats_token:
            raise ConfigError("stats_token", self.stats_token,
                              "a token of at least 8 characters when stats is on")
        self._cross_check()

    def _cross_check(self) -> None:
        """Settings that cannot apply without another one: ConfigError naming
        both keys (a value left at its default is never refused)."""
        def given(name: str) -> bool:
            return bool(getattr(self, name) != _DEFAULTS[name])

        rules: tuple[tuple[str, str, Callable[[], bool]], ...] = (
                ("broker_prefix", "broker", lambda: bool(self.broker)),
                ("stats_token", "stats", lambda: self.stats),
                ("stats_window", "stats", lambda: self.stats),
                ("stats_interval", "stats", lambda: self.stats),
                ("deflate_server_no_context_takeover", "compression", lambda: self.compression),
                ("deflate_client_no_context_takeover", "compression", lambda: self.compression),
                ("handshake_burst", "handshake_rate", lambda: self.handshake_rate > 0),
                ("handshake_burst_per_ip", "handshake_rate_per_ip", lambda: self.handshake_rate_per_ip > 0),
                ("forwarded_allow_ips", "proxy_headers", lambda: self.proxy_headers),
                ("health_max_loop_lag", "health", lambda: self.health),
                ("health_max_memory", "health", lambda: self.health),
                ("presence_ttl", "presence", lambda: self.presence),
                ("region_queue_max", "region_peers", lambda: bool(self.region_peers)),
                ("region_queue_age", "region_peers", lambda: bool(self.region_peers)),
                ("region_directory_ttl", "region_peers", lambda: bool(self.region_peers)),
                *((name, "gateway", lambda: bool(self.gateway)) for name in _GATEWAY_KNOBS))
        for name, needs, ok in rules:
            if given(name) and not ok():
                raise ConfigError(name, self._shown(name), f"unset unless {needs} is set: "
                                  f"without {needs} it has no effect")
        if self.presence:
            scheme = self.broker.split("://", 1)[0].lower() if "://" in self.broker else ""
            if scheme not in _REDIS_SCHEMES:
                raise ConfigError("presence", True, "unset unless broker is a Redis broker "
                                  "(redis://, rediss://, redis+streams://, redis+cluster://): "
                                  "presence is kept in Redis")
        if ("{" in self.broker_prefix or "}" in self.broker_prefix) and \
                self.broker.split("://", 1)[0].lower() in ("redis+cluster", "rediss+cluster"):
            raise ConfigError("broker_prefix", self.broker_prefix, "no '{' or '}' with a redis+cluster:// "
                              "broker: Redis Cluster hashes the part between braces, so they would put every "
                              "room (and a region's keys) in one slot of the prefix's choosing")
        if self.region_peers:
            try:
                parse_region_peers(self.region_peers)
            except ValueError as exc:
                raise ConfigError("region_peers", mask_url(self.region_peers), "name=redis://host:port[/db] "
                                  f"pairs, comma-separated, names of letters, digits, '.', '_', '-', each "
                                  f"name once ({exc})") from None
            if not _REGION_NAME.match(self.region):
                raise ConfigError("region", self.region, "a region name (letters, digits, '.', '_', '-', "
                                  "at most 64) when region_peers is set")
            scheme = self.broker.split("://", 1)[0].lower() if "://" in self.broker else ""
            if scheme not in ("redis", "rediss", "redis+sentinel", "rediss+sentinel", "redis+cluster",
                              "rediss+cluster"):
                raise ConfigError("region_peers", mask_url(self.region_peers), "unset unless broker is a "
                                  "redis://, rediss://, redis+sentinel:// or redis+cluster:// URL: it is this "
                                  "region's Redis, whose pub/sub carries what other regions send")
        if self.gateway_token is not None and self.gateway.split("://", 1)[0].lower() not in ("http", "https"):
            raise ConfigError("gateway_token", "********", "unset unless gateway is an http:// or https:// "
                              "URL: a Streams backend is reached through Redis")
        if self.uds is not None:
            for name in ("host", "port", "reuse_port", "workers"):
                if given(name):
                    raise ConfigError(name, self._shown(name), "left unset with uds: the server "
                                      "listens on the Unix socket, not on host:port")

    def _shown(self, name: str) -> Any:
        value = getattr(self, name)
        secret = next(f for f in fields(self) if f.name == name).metadata.get("secret")
        return "********" if secret and value else value

    # -- layering ---------------------------------------------------------------

    @classmethod
    def load(cls, file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
             overrides: Mapping[str, Any] | None = None, *, override_source: str = "cli") -> Config:
        """defaults < TOML ``file`` (or ``$FASTWS_CONFIG``) < ``FASTWS_*`` in
        ``env`` < ``overrides`` (CLI flags, by field name; None = not given)."""
        env = os.environ if env is None else env
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        sources: dict[str, str] = {name: "default" for name in known}

        if file is None:
            file = env.get(ENV_PREFIX + "CONFIG") or None
        if file is not None:
            for key, value in _read_toml(os.fspath(file)).items():
                name = key.replace("-", "_")
                if name not in known:
                    raise ConfigError(key, value, "a known setting (see: fastws config show)")
                values[name] = _coerce(known[name], value)
                sources[name] = f"file {os.fspath(file)}"

        for name, f in known.items():
            var = ENV_PREFIX + name.upper()
            if var in env:
                values[name] = _coerce(f, env[var])
                sources[name] = f"env {var}"

        for name, value in (overrides or {}).items():
            if value is None:
                continue
            if name not in known:
                raise ConfigError(name, value, "a known setting (see: fastws config show)")
            values[name] = _coerce(known[name], value)
            flag = known[name].metadata.get("flag") or "--" + name.replace("_", "-")
            sources[name] = f"{override_source} {flag}" if override_source == "cli" else override_source

        config = cls(**values)
        config.sources = sources
        return config

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied (validated), sources kept."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        new = type(self)(**values)
        new.sources = dict(self.sources, **{k: "argument" for k in changes})
        return new

    # -- introspection ------------------------------------------------------------

    @classmethod
    def knobs(cls) -> list[tuple[str, Any, Mapping[str, Any]]]:
        """(name, default, metadata) of every setting, in declaration order."""
        return [(f.name, f.default, f.metadata) for f in fields(cls)]

    def items(self) -> list[tuple[str, Any, str]]:
        """(name, value, source) of every setting; secrets masked."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = "********"
            elif isinstance(value, str) and "://" in value:
                value = mask_url(value)            # a broker URL's password
            out.append((f.name, value, self.sources.get(f.name, "default")))
        return out

    def to_toml(self) -> str:
        """The effective settings as TOML, each line commented with its source."""
        lines = []
        for name, value, source in self.items():
            text = f"{name} = {_toml_value(value)}"
            lines.append(f"{text:<40} # {source}")
        return "\n".join(lines) + "\n"


#: every setting's default (the cross-checks refuse only values that were set)
_DEFAULTS = {f.name: f.default for f in fields(Config)}


# -- parsing and checking --------------------------------------------------------


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError("config", path, f"a readable TOML file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", path, f"valid TOML ({exc})") from None
    # Settings may sit at the top level or in a [fastws] table.
    table = data.pop("fastws", None)
    if isinstance(table, dict):
        data.update(table)
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(key, value, "a setting, not a table (only [fastws] is allowed)")
    return data


def _coerce(f: Field[Any], value: Any) -> Any:
    """The typed value of field ``f`` from ``value`` (a string from env/CLI,
    or a native value); ConfigError when it is not allowed."""
    meta = f.metadata
    kind = meta["kind"]
    name = f.name
    allowed = meta.get("allowed") or _KIND_ALLOWED[kind]
    optional = f.default is None and f.default is not MISSING

    def bad() -> ConfigError:
        shown = "********" if meta.get("secret") else mask_url(value) if isinstance(value, str) else value
        return ConfigError(name, shown, allowed)

    v = value
    if v is None or (optional and v == ""):
        if optional:
            return None
        raise bad()
    if kind in ("int", "bytes"):
        if isinstance(v, str):
            m = _SIZE.match(v) if kind == "bytes" else re.match(r"^\s*[+-]?\d+\s*$", v)
            if not m:
                raise bad()
            v = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()] if kind == "bytes" else int(v)
        elif isinstance(v, bool) or not isinstance(v, int):
            raise bad()
    elif kind in ("float", "seconds"):
        if isinstance(v, str):
            m = _DURATION.match(v) if kind == "seconds" else None
            try:
                v = float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()] if m else float(v)
            except ValueError:
                raise bad() from None
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad()
        v = float(v)
        if v != v or v in (float("inf"), float("-inf")):
            raise bad()
    elif kind == "bool":
        if isinstance(v, str):
            low = v.strip().lower()
            if low in _TRUE:
                v = True
            elif low in _FALSE:
                v = False
            else:
                raise bad()
        elif not isinstance(v, bool):
            raise bad()
    elif kind in ("str", "choice"):
        if not isinstance(v, str):
            raise bad()
        if kind == "choice":
            v = v.strip().lower()
    elif kind == "list":
        if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
            v = ",".join(v)
        if not isinstance(v, str):
            raise bad()
        v = ",".join(x.strip() for x in v.split(",") if x.strip())
    elif kind == "path":
        if not isinstance(v, str):
            raise bad()
        if not os.path.isfile(v) or not os.access(v, os.R_OK):
            raise ConfigError(name, value, "a path to a readable file")
    check = meta.get("check")
    if check is not None and not check(v):
        raise bad()
    if v == value and type(v) is type(value):
        return value
    return v


def _valid(parse: Callable[[Any], object], value: object) -> bool:
    """True if ``parse(value)`` raises no ValueError."""
    try:
        parse(value)
    except ValueError:
        return False
    return True


def _origin_policy(value: str) -> OriginPolicy:
    return OriginPolicy(value)


def _ops_hosts(value: str) -> frozenset[str]:
    return ops_host_set(value)


_REGION_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def parse_region_peers(value: str) -> dict[str, str]:
    """``{name: redis URL}`` of a ``region_peers`` value
    (``name=redis://host:port/db,...``); ValueError naming the bad pair."""
    peers: dict[str, str] = {}
    # a pair starts after a comma followed by "name=" (a redis+sentinel:// URL
    # has commas of its own, between its Sentinels)
    for pair in (p.strip() for p in re.split(r",(?=\s*[A-Za-z0-9._-]+=)", value)):
        if not pair:
            continue
        name, eq, url = pair.partition("=")
        name, url = name.strip(), url.strip()
        if not eq or not _REGION_NAME.match(name):
            raise ValueError(f"{pair!r}: not name=redis-url")
        u = urlsplit(url)
        if u.scheme.lower() in ("redis+sentinel", "rediss+sentinel"):
            if not u.netloc.rpartition("@")[2] or not u.path.strip("/"):
                raise ValueError(f"{name}: a redis+sentinel:// URL names its Sentinels and the service")
        elif u.scheme.lower() in ("redis+cluster", "rediss+cluster"):
            if not u.netloc.rpartition("@")[2] or u.path.strip("/"):
                raise ValueError(f"{name}: a redis+cluster:// URL names its seed nodes (host:port, "
                                 "comma-separated) and no database")
        elif u.scheme.lower() not in ("redis", "rediss") or not u.hostname:
            raise ValueError(f"{name}: not a redis://, rediss://, redis+sentinel:// or redis+cluster:// URL")
        else:
            try:
                _ = u.port
            except ValueError:
                raise ValueError(f"{name}: the port of {mask_url(url)!r} is not a number (pairs are "
                                 "name=redis-url, separated by commas)") from None
            if u.path.strip("/") and not u.path.strip("/").isdigit():
                raise ValueError(f"{name}: the database is not a number")
        if name in peers:
            raise ValueError(f"{name}: named twice")
        peers[name] = url
    return peers


#: the settings that mean something only with ``gateway`` set
_GATEWAY_KNOBS = ("gateway_routes", "gateway_token", "gateway_timeout", "gateway_concurrency", "gateway_batch",
                  "gateway_retries", "gateway_queue", "gateway_overflow")


def _gateway_url(value: str) -> None:
    """A backend URL of gateway mode: http(s)://host[:port][/path] or
    redis(s)://host[:port][/db][?stream=..&group=..] (ValueError otherwise)."""
    u = urlsplit(value)
    scheme = u.scheme.lower()
    if scheme not in ("http", "https", "redis", "rediss") or not u.hostname:
        raise ValueError("scheme or host")
    _ = u.port                    # ValueError for a port that is not a number
    if scheme.startswith("redis"):
        if u.path.strip("/") and not u.path.strip("/").isdigit():
            raise ValueError("db")
        for key, _v in parse_qsl(u.query, keep_blank_values=True):
            if key not in ("stream", "group"):
                raise ValueError(key)
    elif u.query or u.fragment:
        raise ValueError("query")


def _gateway_paths(value: str) -> None:
    for path in value.split(","):
        if path != "*" and not path.startswith("/"):
            raise ValueError(path)
    if not value:
        raise ValueError("empty")


def _networks(value: str) -> Any:
    any_peer, nets = parse_networks(value)
    if not any_peer and not nets:
        raise ValueError("no address")
    return nets


_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:@/\s'\"]*):[^\s'\"]*@")   # up to the last @
_QUERY_SECRET = re.compile(r"(?i)([?&](?:\w*_)?(?:password|passwd|pass|pwd|token|secret)=)[^&#\s]*")


def mask_url(text: str) -> str:
    """``text`` (a URL, or a message or log line holding URLs) with the
    password of every URL's userinfo, and of ``?password=``-like query
    parameters, replaced by ``****``: ``redis://user:****@host:6379/0``.
    Used wherever a URL is printed (``config show``, logs, /health, errors)."""
    if not isinstance(text, str) or "://" not in text:
        return text
    return _QUERY_SECRET.sub(r"\1****", _URL_PASSWORD.sub(r"\1:****@", text))


def _toml_value(value: object) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


__all__ = ["Config", "ConfigError", "ENV_PREFIX", "LOG_LEVELS", "LOG_FORMATS", "mask_url", "parse_region_peers"]
