"""The command line a newcomer meets: its errors, and what uvicorn users look for.

Every test runs the real ``fastws`` command (``python -m fastws``, and the
console script where the name matters) in a subprocess, with real servers,
sockets and clients:

* one error style: ``fastws: <what> (<how to fix>)`` on one line, exit 2 for
  bad input (a setting, the app path, the broker URL: every part and every
  option checked at startup, with the password masked), exit 1 for a
  failure to start (a port in use); the app module's own traceback when it
  raises at import; an unreachable Redis is no failure (the broker retries);
* ``--app-dir``, ``--reload`` (a file of the app changed in a temporary
  directory, the new behaviour seen over a real WebSocket within a bounded
  time), ``--log-config`` (JSON and TOML dictConfig, INI fileConfig),
  ``python -m fastws``, ``--version``;
* the fallback engine's WARNING (and no warning when it was asked for);
* ``fastws bench``: it records fastws's own commit, not the one of the git
  repository it happens to run in, and it exits non-zero with one line when
  it cannot start a server it was asked to measure.

Each server listens on 127.0.0.1 and is stopped by the test (SIGTERM, then
SIGKILL); every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import websockets

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
FASTWS = [sys.executable, "-m", "fastws"]

ECHO = """import fastws

app = fastws.App()


@app.on_message("*")
def echo(conn, data):
    conn.send("{tag}" + data)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def env_without_fastws(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def cli(*args, cwd=REPO, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([*FASTWS, *args], cwd=cwd, env=env or env_without_fastws(), capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(r: subprocess.CompletedProcess, code: int = 2) -> str:
    """The run failed with ``code`` and said so in exactly one ``fastws:`` line."""
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastws: "), r.stderr
    assert "Traceback" not in r.stderr and not re.search(r"^Error:", r.stderr, re.M)
    return lines[0]


class Running:
    """A background ``fastws`` process with its output in a file."""

    def __init__(self, args, cwd, log: Path, env=None) -> None:
        self.log_path = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([*FASTWS, *args], cwd=cwd, env=env or env_without_fastws(),
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_port(self, port: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.log()}"
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
                return
            time.sleep(0.05)
        raise AssertionError(f"not listening on {port}:\n{self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode


@contextlib.contextmanager
def running(args, cwd, log: Path, port: int, env=None):
    server = Running(args, cwd, log, env)
    try:
        server.wait_port(port)
        yield server
    finally:
        server.stop()


async def ask(port: int, text: str, path: str = "/") -> str:
    async with websockets.connect(f"ws://{HOST}:{port}{path}", open_timeout=5) as ws:
        await ws.send(text)
        return await asyncio.wait_for(ws.recv(), 5)


# ---------------------------------------------------------------- the app path


def test_app_path_errors_are_one_line_exit_2(tmp_path):
    (tmp_path / "good.py").write_text(ECHO.format(tag=""))
    (tmp_path / "notapp.py").write_text("x = 1\n")
    cases = {
        ("serve", "nosuchmodule:app"): "no module named 'nosuchmodule'",
        ("serve", "good:nope"): "module 'good' has no attribute 'nope' (it has: app)",
        ("serve", "good"): "app must be given as MODULE:ATTRIBUTE",
        ("serve", "notapp:x"): "neither a fastws.App nor an ASGI application",
        ("serve", "good:app", "--interface", "asgi"): "good:app is a fastws.App, not an ASGI application "
                                                       "(drop --interface asgi",
        ("serve", "good:app", "extra"): "unexpected extra argument",
        ("serve", "good:app", "--app-dir", str(tmp_path / "missing")): "is not a directory",
        ("nosuchcommand",): "No such command",
    }
    for args, expected in cases.items():
        line = one_error_line(cli(*args, "--port", "0", cwd=tmp_path) if args[0] == "serve" else cli(*args))
        assert expected in line, (args, line)
        assert re.search(r"\(.+\)$", line), f"no '(how to fix)' in {line!r}"


@pytest.mark.parametrize("level", ["info", "debug"])
def test_app_module_that_raises_shows_its_traceback(tmp_path, level):
    (tmp_path / "broken.py").write_text("import fastws\n\n\ndef setup():\n    raise RuntimeError('no database')\n\n\n"
                                        "setup()\napp = fastws.App()\n")
    (tmp_path / "needs.py").write_text("import fastws\nimport some_dependency_that_is_missing\napp = fastws.App()\n")
    for module, error in (("broken", "RuntimeError: no database"),
                          ("needs", "ModuleNotFoundError: No module named 'some_dependency_that_is_missing'")):
        r = cli("serve", f"{module}:app", "--log-level", level, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert lines[0] == "Traceback (most recent call last):", r.stderr
        assert f'File "{tmp_path / module}.py"' in r.stderr, r.stderr      # the app's own frames
        assert "importlib" not in r.stderr, r.stderr                        # not the loader's
        assert lines[-2] == error, r.stderr
        assert lines[-1].startswith(f"fastws: importing '{module}' raised ") and lines[-1].endswith(
            "(the traceback above is from the app's module)"), lines[-1]


# ---------------------------------------------------------------- settings and broker URLs


BAD_BROKERS = [
    ("redis://127.0.0.1:xx/0", "port 'xx' is not a port number 1..65535"),
    ("redis+streams://127.0.0.1:6379/0?maxlne=5", "unknown option 'maxlne' (known options: db, ssl_ca_certs, "
                                                  "ssl_cert_reqs, maxlen, block, count, ttl)"),
    ("redis+streams://127.0.0.1:6379/0?maxlen=0", "maxlen=0 is not allowed (maxlen: an integer >= 1)"),
    ("redis+streams://127.0.0.1:6379/0?block=never", "block=never is not allowed"),
    ("redis://127.0.0.1:6379/zero", "database 'zero' is not a number"),
    ("redis://127.0.0.1:6379/0?db=1", "database given twice"),
    ("redis://127.0.0.1:6379/0?ssl_cert_reqs=none", "option 'ssl_cert_reqs' needs TLS"),
    ("rediss://127.0.0.1:6379/0?ssl_cert_reqs=maybe", "ssl_cert_reqs 'maybe' is not allowed"),
    ("rediss://127.0.0.1:6379/0?ssl_ca_certs=/nonexistent.pem", "ssl_ca_certs '/nonexistent.pem' is not a readable"),
    ("redis+cluster://127.0.0.1:7000,127.0.0.1:x", "port 'x' of seed '127.0.0.1:x'"),
    ("redis+cluster://127.0.0.1:7000/2", "unexpected path '/2'"),
    ("redis+sentinel://127.0.0.1:26379", "no service name"),
    ("redis+sentinel://127.0.0.1:26379,127.0.0.1:x/mymaster", "port 'x' of Sentinel '127.0.0.1:x'"),
    ("unix://relative.sock", "socket path 'relative.sock' is not absolute"),
    ("unix:///tmp/x.sock?mode=1", "unexpected options"),
    ("memory://bus?x=1", "unexpected ? after the bus name"),
    ("kafka://127.0.0.1:9092", "unknown scheme 'kafka'"),
    ("no.such.module.Broker", "cannot import Broker from no.such.module"),
]


@pytest.mark.parametrize("url,problem", BAD_BROKERS, ids=[u for u, _ in BAD_BROKERS])
def test_bad_broker_url_is_one_line_exit_2(url, problem):
    """Checked whole at startup, before anything listens: each part, each
    option by name; the same with --workers (before any worker starts)."""
    for extra in ([], ["--workers", "2"]):
        line = one_error_line(cli("serve", "examples.echo:app", "--port", "0", "--broker", url, *extra))
        assert line.startswith(f"fastws: broker URL {url!r}: "), line
        assert problem in line, line
        assert "invalid literal" not in line and line.count("broker URL") == 1, line


def test_broker_url_password_is_masked():
    line = one_error_line(cli("serve", "examples.echo:app", "--port", "0", "--broker",
                              "redis://user:hunter2secret@127.0.0.1:bad/0"))
    assert "hunter2secret" not in line and "user:****@" in line, line


def test_bad_setting_names_the_key_and_what_is_allowed():
    line = one_error_line(cli("serve", "examples.echo:app", "--port", "70000"))
    assert line == "fastws: invalid config port='70000' (expected an integer 0..65535)", line
    line = one_error_line(cli("serve", "examples.echo:app", env=env_without_fastws(FASTWS_PING_INTERVAL="often")))
    assert line.startswith("fastws: invalid config ping_interval='often' (expected seconds"), line


def test_port_in_use_is_one_line_exit_1():
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_error_line(cli("serve", "examples.echo:app", "--port", str(port)), code=1)
    assert "in use" in line and line.endswith("(stop the other server or pick another --port)"), line


def test_unreachable_redis_is_not_a_failure(tmp_path):
    """The broker retries in the background: the server serves, /health says 503."""
    dead = free_port()                       # nothing listens there
    port = free_port()
    with running(["serve", "examples.echo:app", "--port", str(port), "--broker", f"redis://127.0.0.1:{dead}/0"],
                 REPO, tmp_path / "log", port) as server:
        assert asyncio.run(ask(port, "still serving")) == "still serving"
        try:
            urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=5)
            status = 200
        except urllib.error.HTTPError as exc:
            status, body = exc.code, json.loads(exc.read())
        assert status == 503 and body["checks"]["broker"]["ok"] is False, body
        assert server.stop() == 0, server.log()


# ---------------------------------------------------------------- what uvicorn users look for


def test_app_dir(tmp_path):
    """--app-dir DIR imports the app from DIR, whatever the current directory."""
    appdir = tmp_path / "project" / "src"
    appdir.mkdir(parents=True)
    (appdir / "service.py").write_text(ECHO.format(tag="from app-dir: "))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    line = one_error_line(cli("serve", "service:app", "--port", "0", cwd=elsewhere))
    assert "no module named 'service'" in line and "--app-dir" in line, line
    port = free_port()
    with running(["serve", "service:app", "--app-dir", str(appdir), "--port", str(port)], elsewhere,
                 tmp_path / "log", port):
        assert asyncio.run(ask(port, "hi")) == "from app-dir: hi"


@pytest.mark.timeout(120)
def test_reload_restarts_on_a_changed_file(tmp_path):
    """Change the app's file: the new code answers over a real WebSocket
    within a bounded time; an edit that breaks the import leaves the
    reloader waiting, the next good edit serves again; SIGTERM stops both."""
    app = tmp_path / "app.py"
    app.write_text(ECHO.format(tag="v1:"))
    port = free_port()
    server = Running(["serve", "app:app", "--reload", "--port", str(port)], tmp_path, tmp_path / "log")

    def answer_within(expected_prefix: str, seconds: float = 20) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            with contextlib.suppress(OSError, asyncio.TimeoutError, websockets.WebSocketException):
                if asyncio.run(ask(port, "x")).startswith(expected_prefix):
                    return time.monotonic() - t0
            time.sleep(0.1)
        raise AssertionError(f"no {expected_prefix!r} answer within {seconds}s:\n{server.log()}")

    try:
        server.wait_port(port)
        answer_within("v1:")
        time.sleep(1.1)                      # a new mtime even on coarse file systems
        app.write_text(ECHO.format(tag="v2:"))
        assert answer_within("v2:") < 20
        app.write_text("import fastws\ndef broken(:\n")
        deadline = time.monotonic() + 20
        while "waiting for a change" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "waiting for a change" in server.log(), server.log()
        assert "SyntaxError" in server.log() and server.proc.poll() is None
        app.write_text(ECHO.format(tag="v3:"))
        answer_within("v3:")
    finally:
        code = server.stop()
    assert code == 0, server.log()
    with pytest.raises(OSError):                # the serving child went with it
        socket.create_connection((HOST, port), timeout=1).close()
    assert server.log().count("restarting the server") >= 2


def test_reload_refuses_workers():
    line = one_error_line(cli("serve", "examples.echo:app", "--reload", "--workers", "2"))
    assert "--reload" in line and "--workers 2" in line, line


LOG_CONFIGS = {
    "log.json": json.dumps({
        "version": 1,
        "formatters": {"f": {"format": "JSONCFG %(levelname)s %(name)s %(message)s"}},
        "handlers": {"h": {"class": "logging.StreamHandler", "formatter": "f"}},
        "root": {"handlers": ["h"], "level": "INFO"},
    }),
    "log.toml": """version = 1
[formatters.f]
format = "TOMLCFG %(levelname)s %(name)s %(message)s"
[handlers.h]
class = "logging.StreamHandler"
formatter = "f"
[root]
handlers = ["h"]
level = "INFO"
""",
    "log.ini": """[loggers]
keys = root
[handlers]
keys = h
[formatters]
keys = f
[logger_root]
level = INFO
handlers = h
[handler_h]
class = StreamHandler
formatter = f
args = (sys.stderr,)
[formatter_f]
format = INICFG %(levelname)s %(name)s %(message)s
""",
}


@pytest.mark.parametrize("name", sorted(LOG_CONFIGS))
def test_log_config(tmp_path, name):
    """--log-config FILE configures logging as the file says (uvicorn's
    formats); a file that does not load is one line naming log_config."""
    (tmp_path / name).write_text(LOG_CONFIGS[name])
    tag = name.split(".")[1].upper() + "CFG"
    port = free_port()
    with running(["serve", "examples.echo:app", "--port", str(port), "--log-config", str(tmp_path / name)], REPO,
                 tmp_path / "log", port) as server:
        assert asyncio.run(ask(port, "logged")) == "logged"
        assert server.stop() == 0
    lines = [ln for ln in server.log().splitlines() if "listening on" in ln]
    assert lines and lines[0].startswith(f"{tag} INFO fastws "), server.log()
    broken = tmp_path / ("broken." + name.split(".")[1])
    broken.write_text("[x\n" if not name.endswith(".json") else "{not json")
    line = one_error_line(cli("serve", "examples.echo:app", "--log-config", str(broken)))
    assert line.startswith(f"fastws: invalid config log_config='{broken}'"), line


def test_python_m_fastws_is_the_fastws_command(tmp_path):
    r = cli("--version")
    script = subprocess.run([str(Path(sys.executable).with_name("fastws")), "--version"], capture_output=True,
                            text=True, timeout=60, env=env_without_fastws())
    assert r.returncode == 0 and r.stdout == script.stdout, (r.stdout, script.stdout, script.stderr)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert re.fullmatch(rf"fastws \S+ \(commit {head}(-dirty)?(, built from \S+)?, engine cython\)\n", r.stdout), \
        r.stdout
    port = free_port()
    with running(["serve", "examples.echo:app", "--port", str(port)], REPO, tmp_path / "log", port):
        assert asyncio.run(ask(port, "via -m")) == "via -m"


def test_fallback_engine_warns_unless_asked(tmp_path):
    """On the pure-Python engine without FASTWS_NO_EXTENSIONS=1 (here: the
    compiled module made unimportable), a WARNING says how to build the
    fast one; asked for with FASTWS_NO_EXTENSIONS=1, no warning."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n\n\nclass _NoCore:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'fastws._core':\n"
        "            raise ImportError('fastws._core hidden for this test')\n\n\n"
        "sys.meta_path.insert(0, _NoCore())\n")
    for env, warned in ((env_without_fastws(PYTHONPATH=str(blocker)), True),
                        (env_without_fastws(FASTWS_NO_EXTENSIONS="1"), False)):
        port = free_port()
        with running(["serve", "examples.echo:app", "--port", str(port)], REPO, tmp_path / f"log{port}", port,
                     env) as server:
            assert asyncio.run(ask(port, "slow")) == "slow"
        text = server.log()
        assert "engine=wsproto" in text, text
        warnings = [ln for ln in text.splitlines() if " WARNING " in ln and "pure-Python" in ln]
        if warned:
            assert len(warnings) == 1 and "pip install -e ." in warnings[0] and "C compiler" in warnings[0], text
        else:
            assert not warnings and "FASTWS_NO_EXTENSIONS=1" in text, text


# ---------------------------------------------------------------- fastws bench


@pytest.mark.timeout(200)
def test_bench_records_fastws_commit_not_the_surrounding_repository(tmp_path):
    """Run inside another git repository: the results name fastws's version
    and commit (from the package), not that repository's."""
    other = tmp_path / "other-project"
    other.mkdir()
    for args in (["init", "-q"], ["-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty",
                                  "-m", "unrelated"]):
        subprocess.run(["git", "-C", str(other), *args], check=True, capture_output=True, timeout=30)
    theirs = subprocess.run(["git", "-C", str(other), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    ours = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = tmp_path / "results"
    r = cli("bench", "--quick", "--vs", "raw", "--scenario", "echo", "--out", str(out), cwd=other, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    env = json.loads(next(out.glob("quick-*.json")).read_text())["environment"]
    assert env["commit"].startswith(ours) and theirs not in json.dumps(env), env["commit"]
    assert env["version"] and env["implementation"] == "cython", env


@pytest.mark.timeout(120)
def test_bench_exits_nonzero_when_an_asked_server_cannot_start(tmp_path):
    """A peer named with --vs that cannot run here (Node not on PATH) stops
    the run before it measures anything: exit 2, one line naming it and why."""
    out = tmp_path / "results"
    r = cli("bench", "--quick", "--vs", "node-ws", "--scenario", "echo", "--out", str(out), cwd=tmp_path,
            env=env_without_fastws(PATH=str(tmp_path)), timeout=100)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("fastws bench: cannot measure")]
    assert lines == ["fastws bench: cannot measure node-ws: node is not installed"], r.stderr[-2000:]
    assert not out.exists() or not list(out.glob("*.json"))
