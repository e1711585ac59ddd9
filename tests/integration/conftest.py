"""Real ``fastws serve`` processes for the integration tests.

Every test here talks to a real server subprocess over real sockets:

    fastws serve examples.echo:app --host 127.0.0.1 --port N [extra args]

Fixtures
--------
``engine``          module-scoped, parametrized: "cython" (the compiled
                    ``fastws._core``) and "wsproto" (``FASTWS_NO_EXTENSIONS=1``,
                    the fallback engine). Every test that uses a server runs on
                    both engines.
``server_factory``  ``server_factory(*extra_cli_args, env=None) -> Server``:
                    a running echo server on a free port for the current
                    engine. Servers are shared within a test module (one per
                    engine + arguments + env) and stopped (SIGTERM, then
                    SIGKILL) when the module is done. After each test, every
                    server the test used must still be alive: bad input from
                    the network must never crash the process.
``echo_server``     ``server_factory()`` with the default configuration.

The server's stderr/stdout go to a log file; when a test fails, the tail of
the log of every server it used is attached to the report.

A missing real client (Node ``ws``, Chromium) or an unbuilt Cython engine
fails the tests: nothing passes by skipping (``bash .ci/run`` installs all).

Redis: the tests use ``$FASTWS_TEST_REDIS`` (default
``redis://127.0.0.1:6379/0``) through ``tests/broker/brokerutil.py``
(importable from here: ``from brokerutil import REDIS_URL, STREAMS_URL,
new_prefix, OwnRedis``).  Every broker prefix of the run starts with
``brokerutil.RUN_PREFIX`` and the keys left under it are deleted when the
session ends; a test that changes server state (ACL, CONFIG, SHUTDOWN)
runs its own ``redis-server`` (``OwnRedis``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "tests" / "broker") not in sys.path:      # brokerutil: the test Redis, prefixes
    sys.path.insert(0, str(REPO / "tests" / "broker"))

import brokerutil  # noqa: E402

APP = "examples.echo:app"
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
LOG_TAIL = 6000  # characters of server log shown on failure

ENGINES = ("cython", "wsproto")



def missing_client(reason: str):
    """A missing real client fails the test (`.ci/run` installs them all)."""
    pytest.fail(f"{reason} (bash .ci/run installs it)", pytrace=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def fastws_command() -> list[str]:
    """The ``fastws`` console script of this interpreter's environment.

    ``FASTWS_SERVER_CMD`` (shell words) overrides it, e.g. to run this suite
    against another installation.
    """
    override = os.environ.get("FASTWS_SERVER_CMD")
    if override:
        return shlex.split(override)
    script = Path(sys.executable).with_name("fastws")
    if script.exists():
        return [str(script)]
    found = shutil.which("fastws")
    if found:
        return [found]
    # Not installed as a console script: same entry point, same interpreter.
    return [sys.executable, "-c", "from fastws.cli.main import main; main()"]


@dataclass
class Server:
    engine: str
    args: tuple[str, ...]
    env: dict[str, str]
    log_path: Path
    host: str = HOST
    port: int = 0
    proc: subprocess.Popen | None = None
    cmd: list[str] = field(default_factory=list)
    stopped: bool = False
    app: str = APP

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/"

    def __iter__(self):  # allows ``host, port = server``
        return iter(self.address)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self) -> str:
        text = self.log()
        if len(text) > LOG_TAIL:
            text = "...\n" + text[-LOG_TAIL:]
        return text

    def describe(self) -> str:
        return (
            f"engine={self.engine} cmd={' '.join(self.cmd)}\n"
            f"env={self.env}\nlog={self.log_path}"
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        last_error = ""
        for _attempt in range(3):  # a free port can be taken in between
            self.port = free_port()
            self.cmd = [
                *fastws_command(),
                "serve",
                self.app,
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--log-level",
                "info",
                *self.args,
            ]
            env = dict(os.environ)
            env.pop("FASTWS_NO_EXTENSIONS", None)
            env.update(self.env)
            env.setdefault("PYTHONUNBUFFERED", "1")
            with open(self.log_path, "ab") as log:
                log.write(f"\n=== {' '.join(self.cmd)}  env={self.env}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    self.cmd,
                    cwd=REPO,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if self._wait_ready():
                self._check_engine()
                return
            last_error = self.log_tail()
            if "in use" not in last_error.lower():
                break
        self.stop()
        pytest.fail(
            f"fastws server did not start within {STARTUP_TIMEOUT}s\n"
            f"{self.describe()}\n--- server log ---\n{last_error}",
            pytrace=False,
        )

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError), socket.create_connection(self.address, timeout=0.5):
                return True
            time.sleep(0.05)
        return False

    def _check_engine(self) -> None:
        """The server logs ``engine=NAME`` at startup: it must be ours."""
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            match = re.search(r"engine=(\w+)", self.log().rpartition("\n=== ")[2])
            if match:
                if match.group(1) != self.engine:
                    self.stop()
                    pytest.fail(
                        f"server runs engine {match.group(1)!r}, expected "
                        f"{self.engine!r}\n{self.describe()}\n{self.log_tail()}",
                        pytrace=False,
                    )
                return
            time.sleep(0.05)
        # no engine line in the log: nothing to check

    def stop(self) -> int | None:
        """SIGTERM, wait, then SIGKILL. Returns the exit code."""
        self.stopped = True
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
                with open(self.log_path, "ab") as log:
                    log.write(b"\n=== did not exit on SIGTERM; killed\n")
        return proc.returncode


# -- fixtures ---------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _leave_redis_as_found():
    """Delete every key this run made on the test Redis (all under RUN_PREFIX)."""
    yield
    if brokerutil.redis_available():
        import asyncio

        asyncio.run(brokerutil.delete_keys(brokerutil.RUN_PREFIX))


@pytest.fixture
def redis_url() -> str:
    """The test Redis (``$FASTWS_TEST_REDIS``); the test fails when it is not reachable."""
    brokerutil.need_redis()
    return brokerutil.REDIS_URL


@pytest.fixture
def broker_prefix() -> str:
    """A broker prefix of the test's own (under the run's prefix)."""
    return brokerutil.new_prefix()

_active_servers: dict[str, list[Server]] = {}  # nodeid -> servers used


def _cython_built() -> bool:
    try:
        import fastws._core  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module", params=ENGINES)
def engine(request) -> str:
    name = request.param
    if name == "cython" and not _cython_built():
        pytest.fail("fastws._core (Cython engine) is not built in this environment", pytrace=False)
    return name


@pytest.fixture(scope="module")
def _server_pool(engine, tmp_path_factory):
    pool: dict[tuple, Server] = {}
    logdir = tmp_path_factory.mktemp(f"fastws-{engine}")

    def get(args: tuple[str, ...], env: dict[str, str], app: str = APP) -> Server:
        key = (app, args, tuple(sorted(env.items())))
        server = pool.get(key)
        if server is not None and server.alive():
            return server
        full_env = dict(env)
        if engine == "wsproto":
            full_env["FASTWS_NO_EXTENSIONS"] = "1"
        server = Server(
            engine=engine,
            args=args,
            env=full_env,
            log_path=logdir / f"server-{len(pool)}.log",
            app=app,
        )
        server.start()
        pool[key] = server
        return server

    yield get
    for server in pool.values():
        server.stop()


@pytest.fixture
def server_factory(_server_pool, request):
    used: list[Server] = []
    _active_servers[request.node.nodeid] = used

    def factory(*args: str, env: dict[str, str] | None = None, app: str = APP) -> Server:
        server = _server_pool(tuple(args), dict(env or {}), app)
        if server not in used:
            used.append(server)
        return server

    yield factory
    _active_servers.pop(request.node.nodeid, None)
    dead = [s for s in used if not s.alive()]
    if dead:
        details = "\n\n".join(
            f"{s.describe()}\nexit code {s.proc.returncode}\n"
            f"--- server log ---\n{s.log_tail()}"
            for s in dead
        )
        pytest.fail(f"the fastws server died during the test\n{details}", pytrace=False)


@pytest.fixture
def echo_server(server_factory) -> Server:
    return server_factory()


@pytest.fixture(name="missing_client")
def _missing_client_fixture():
    """``missing_client(reason)``: fail the test, naming what is missing."""
    return missing_client


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for server in _active_servers.get(item.nodeid, ()):
            report.sections.append(
                (
                    f"fastws server log ({server.engine}, port {server.port}, "
                    f"args {' '.join(server.args) or '-'})",
                    f"{server.describe()}\n{server.log_tail()}",
                )
            )
