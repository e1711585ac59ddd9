"""``fastws bench --quick``: every scenario against fastws and every peer.

The smoke mode uses tiny sizes and asserts correctness only (every message
echoed byte for byte, every subscriber got every broadcast in order, every
connection upgraded); it never asserts a timing. A peer whose library is not
installed is skipped by the runner with a line saying so; here only socketify
(optional, not in ``[bench]``: also its compressed setups) may be. The cross-node scenarios need the test
Redis, ``$FASTWS_TEST_REDIS`` (``.ci/run`` starts it), given to the bench
with ``--redis-url``; the Node peers need ``ws`` (tests/integration/node) and
``socket.io`` with its Redis adapter (``npm ci`` in fastws/bench/peers, which
``.ci/run`` does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from brokerutil import REDIS_URL

REPO = Path(__file__).resolve().parents[2]
NODE_MODULES = REPO / "tests" / "integration" / "node" / "node_modules"


def test_example_relay_is_the_shipped_app():
    sys.path.insert(0, str(REPO))
    try:
        from examples.relay import app as example
        from fastws.bench.peers.fastws_relay import app as shipped
    finally:
        sys.path.remove(str(REPO))
    assert example is shipped


@pytest.mark.timeout(420)
def test_bench_quick(tmp_path):
    env = dict(os.environ)
    if NODE_MODULES.is_dir():
        env["NODE_PATH"] = os.pathsep.join(filter(None, [str(NODE_MODULES), env.get("NODE_PATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "fastws.bench", "--quick", "--out", str(tmp_path), "--redis-url", REDIS_URL],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )
    report = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, report
    files = sorted(tmp_path.glob("quick-*.json"))
    assert files, report
    results = json.loads(files[-1].read_text())

    skipped = results["skipped"]
    assert "fastws" not in skipped, skipped
    # every peer of the [bench] extra must run; socketify is optional (not in [bench])
    assert set(skipped) <= {"socketify", "socketify-deflate", "socketify-dedicated-deflate", "socketify-tls"}, skipped

    from fastws.bench.runner import SCENARIO_NAMES

    assert set(results["scenarios"]) == set(SCENARIO_NAMES)
    for name, sc in results["scenarios"].items():
        assert "fastws" in sc["runs"], name
        for server, runs in sc["runs"].items():
            for r in runs:
                assert r["ok"], (name, server, r)
                assert r["errors"] == 0 and r["lost_connections"] == 0, (name, server, r)
                if r["scenario"] == "echo":
                    assert r["echoed_total"] == r["sent_total"] > 0, r
                elif r["scenario"] in ("fanout", "crossnode"):
                    assert r["deliveries"] == r["expected_deliveries"] > 0, r
                    assert r["subscribers_complete"] == r["subscribers"], r
                elif r["scenario"] in ("memory", "handshake"):
                    assert r["opened"] == r["conns" if r["scenario"] == "memory" else "requested"], r
                elif r["scenario"] == "large":
                    assert r["messages"] > 0 and r["parser_fallbacks"] == 0, r
                elif r["scenario"] == "sio-ackecho":
                    assert r["opened"] == r["conns"] and r["bad"] == 0 and r["drained"] and r["value"] > 0, r
                elif r["scenario"] == "sio-memory":
                    assert r["opened"] == r["alive"] == r["conns"], r
    # the store-and-forward ceiling echoes whole frames: byte for byte, one and two large messages in flight
    for name in ("large-64k", "large-1m", "large-64k-w2", "large-1m-w2"):
        assert {"fastws", "raw", "raw-whole"} <= set(results["scenarios"][name]["runs"]), name
    # ASGI scenarios: the same Starlette app (fastws.bench.peers.asgi_apps) on every ASGI server;
    # fastws broadcasts through fastws.asgi.rooms, the others through FastAPI's ConnectionManager.
    for name in ("asgi-echo", "asgi-broadcast", "asgi-memory"):
        runs = results["scenarios"][name]["runs"]
        assert not set(runs) & {"raw", "websockets", "aiohttp", "picows", "node-ws", "socketify"}, (name, set(runs))
        assert {"uvicorn-websockets-asgi", "uvicorn-wsproto-asgi", "hypercorn-asgi",
                "granian-asgi"} <= set(runs), (name, set(runs))
    for server, runs in results["scenarios"]["asgi-broadcast"]["runs"].items():
        want = "/rooms/bench" if server == "fastws" else "/manager/bench"
        assert all(r["path"] == want for r in runs), (server, runs)
    assert all(r["path"] == "/echo" for runs in results["scenarios"]["asgi-echo"]["runs"].values() for r in runs)
    # Cross-node: the relay on 2 nodes through Redis (fastws, python-socketio with AsyncRedisManager)
    # and on one `fastws serve --workers 2` (embedded broker); every subscriber got every message in
    # order (checked per message by the load generator), on both nodes / both workers.
    for name in ("crossnode", "crossnode-latency"):
        runs = results["scenarios"][name]["runs"]
        assert set(runs) == {"fastws", "fastws-embedded", "socketio-redis"}, (name, set(runs))
        for server, rs in runs.items():
            for r in rs:
                assert r["subscribers_complete"] == r["subscribers"] == r["opened"], (name, server, r)
                assert r["protocol"] == ("sio" if server == "socketio-redis" else "ws"), (name, server, r)
                if server == "fastws-embedded":
                    workers = r["worker_connections"]
                    assert len(workers) == 2 and sum(workers.values()) == r["subscribers"], (name, r)
                    assert all(n > 0 for n in workers.values()), (name, r)  # members on both workers
                else:
                    assert len(set(r["nodes"])) == 2, (name, server, r)
                    assert all(n > 0 for n in r["subscribers_per_node"]), (name, server, r)
    # Socket.IO: the same relay on fastws.socketio, python-socketio (uvicorn) and Node's socket.io, one
    # process each; and on 2 nodes through Redis (fastws --broker, AsyncRedisManager, the Node Redis
    # adapter). Every load generator client spoke Engine.IO/Socket.IO and got every event in order.
    for name in ("sio-fanout-1k", "sio-fanout-10k", "sio-ackecho", "sio-memory"):
        runs = results["scenarios"][name]["runs"]
        assert set(runs) == {"fastws", "socketio", "node-socketio"}, (name, set(runs))
    for name in ("sio-crossnode", "sio-crossnode-10k"):
        runs = results["scenarios"][name]["runs"]
        assert set(runs) == {"fastws", "socketio-redis", "node-socketio-redis"}, (name, set(runs))
        for server, rs in runs.items():
            for r in rs:
                assert r["subscribers_complete"] == r["subscribers"] == r["opened"], (name, server, r)
                assert len(set(r["nodes"])) == 2 and all(n > 0 for n in r["subscribers_per_node"]), (name, r)
    for name in ("sio-fanout-1k", "sio-fanout-10k", "sio-crossnode", "sio-crossnode-10k"):
        for server, rs in results["scenarios"][name]["runs"].items():
            assert all(r["protocol"] == "sio" for r in rs), (name, server, rs)
    assert "fastws.socketio" in results["scenarios"]["sio-ackecho"]["servers"]["fastws"]["label"]
    # permessage-deflate: the relay with compression on (fastws --compression and each peer that has
    # it; picows has none). Every client offered the extension, the server accepted it (recorded as
    # answered), every message came back compressed and was inflated and checked byte for byte.
    deflate_peers = {"fastws", "websockets-deflate", "aiohttp-deflate", "uvicorn-websockets-deflate", "node-ws-deflate",
                     "socketify-deflate", "socketify-dedicated-deflate"} - set(skipped)
    for name in ("deflate-echo", "deflate-fanout-1k", "deflate-fanout-10k"):
        sc = results["scenarios"][name]
        assert set(sc["runs"]) == deflate_peers, (name, set(sc["runs"]))
        assert "--compression" in sc["servers"]["fastws"]["label"], sc["servers"]["fastws"]
        for server, rs in sc["runs"].items():
            for r in rs:
                assert r["deflate"].startswith("permessage-deflate"), (name, server, r)
                got = r["echoed_total"] if name == "deflate-echo" else r["deliveries"]
                assert r["received_compressed"] == got > 0, (name, server, r)
                if server == "fastws":  # the default: no server context takeover
                    assert "server_no_context_takeover" in r["deflate"], (name, r)
    # TLS (wss://): the relay behind TLS on fastws (--ssl-certfile) and on every peer that serves it, the
    # raw uvloop TLS echo on the echo, handshake and memory scenarios; every connection went through TLS.
    tls_peers = {"fastws", "websockets-tls", "aiohttp-tls", "picows-tls", "uvicorn-websockets-tls", "node-ws-tls",
                 "socketify-tls"} - set(skipped)
    for name in ("tls-echo", "tls-fanout-1k", "tls-fanout-10k", "tls-handshake", "tls-memory"):
        sc = results["scenarios"][name]
        want = tls_peers if "fanout" in name else tls_peers | {"raw-tls"}
        assert set(sc["runs"]) == want, (name, set(sc["runs"]))
        assert "--ssl-certfile" in sc["servers"]["fastws"]["label"], sc["servers"]["fastws"]
        for server, rs in sc["runs"].items():
            for r in rs:
                assert r["tls"]["enabled"] and r["tls"]["version"].startswith("TLSv1."), (name, server, r)
    assert list(tmp_path.glob("quick-*.md")), report
    assert list(tmp_path.glob("quick-*-echo.png")), report


@pytest.mark.timeout(200)
def test_bench_runs_outside_the_repository(tmp_path):
    """A user who ran ``pip install "fastws[bench]"`` runs ``fastws bench`` in
    any directory: the runner serves the shipped copy of the relay app (there
    is no examples/relay.py there) and says where the results went."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "fastws.cli.main", "bench", "--quick", "--vs", "raw,websockets",
         "--scenario", "echo,fanout-1k,handshake", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )
    report = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, report
    assert f"results: {out}" in proc.stdout, report
    files = sorted(out.glob("quick-*.json"))
    assert files, report
    results = json.loads(files[-1].read_text())
    assert set(results["scenarios"]) == {"echo", "fanout-1k", "handshake"}
    for name, sc in results["scenarios"].items():
        assert "fastws.bench.peers.fastws_relay:app" in sc["servers"]["fastws"]["label"], sc["servers"]
        assert set(sc["runs"]) >= {"fastws", "websockets"}, name
        for server, runs in sc["runs"].items():
            assert runs and all(r.get("ok") for r in runs), (name, server, runs)
