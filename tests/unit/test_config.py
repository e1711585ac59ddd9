"""One Config: defaults < TOML file < FASTWS_* env < CLI flags, and bad values.

The layering is checked on ``Config.load`` directly and through the real CLI
(``fastws config show`` and ``fastws serve`` in subprocesses); every bad value
in the table must make ``fastws serve`` exit 2 with exactly one line on
stderr that names the key, and no traceback.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastws.config import Config
from fastws.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "from fastws.cli.main import main; main()"]


def run_cli(*args, env=None, timeout=30):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    full_env.update(env or {})
    return subprocess.run([*CLI, *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


# -- Config.load ----------------------------------------------------------------


def test_defaults_and_keyword_constructor():
    c = Config()
    assert (c.host, c.port, c.max_message_size, c.metrics, c.stats) == ("127.0.0.1", 8000, 1 << 20, True, False)
    assert set(c.sources.values()) == {"default"}
    c = Config(host="0.0.0.0", port=9000, compression=True)   # what fastws.run / App.serve do
    assert (c.host, c.port, c.compression) == ("0.0.0.0", 9000, True)
    assert c.sources["port"] == "argument" and c.sources["backlog"] == "default"
    with pytest.raises(ConfigError) as err:
        Config(port=-1)
    assert err.value.key == "port"


def test_each_layer_overrides_the_one_below(tmp_path):
    toml = tmp_path / "fastws.toml"
    toml.write_text('port = 1111\nmax_message_size = "2MiB"\nregion = "file"\nlog_level = "debug"\n'
                    'close_timeout = 3\n')
    env = {"FASTWS_PORT": "2222", "FASTWS_REGION": "env", "FASTWS_CLOSE_TIMEOUT": "250ms"}
    c = Config.load(file=toml, env=env, overrides={"port": "3333", "log_level": None})
    assert c.port == 3333 and c.sources["port"] == "cli --port"                    # cli > env > file
    assert c.region == "env" and c.sources["region"] == "env FASTWS_REGION"        # env > file
    assert c.close_timeout == 0.25 and c.sources["close_timeout"] == "env FASTWS_CLOSE_TIMEOUT"
    assert c.max_message_size == 2 << 20 and c.sources["max_message_size"] == f"file {toml}"
    assert c.log_level == "debug" and c.sources["log_level"] == f"file {toml}"    # None = flag not given
    assert c.backlog == 4096 and c.sources["backlog"] == "default"


def test_config_file_from_env_and_fastws_table(tmp_path):
    toml = tmp_path / "f.toml"
    toml.write_text("[fastws]\nmax-queue = \"4MiB\"\nmetrics = false\n")
    c = Config.load(env={"FASTWS_CONFIG": str(toml)})
    assert c.max_queue == 4 << 20 and c.metrics is False


@pytest.mark.parametrize("text,value", [("65536", 65536), ("64KiB", 65536), ("1m", 1 << 20), ("2 GiB", 2 << 30)])
def test_sizes(text, value):
    assert Config.load(env={"FASTWS_MAX_MESSAGE_SIZE": text}).max_message_size == value


@pytest.mark.parametrize("text,value", [("2", 2.0), ("2.5s", 2.5), ("500ms", 0.5), ("1m", 60.0)])
def test_durations(text, value):
    assert Config.load(env={"FASTWS_SHUTDOWN_TIMEOUT": text}).shutdown_timeout == value


def test_every_knob_has_help_and_kind():
    for name, _default, meta in Config.knobs():
        assert meta["help"] and meta["kind"], name


def test_secret_is_masked():
    c = Config(stats=True, stats_token="0123456789")
    assert "0123456789" not in c.to_toml()


# -- the CLI ---------------------------------------------------------------------


def test_config_show_names_sources(tmp_path):
    toml = tmp_path / "fastws.toml"
    toml.write_text("port = 1111\nbacklog = 100\n")
    r = run_cli("config", "show", "--config", str(toml), env={"FASTWS_PORT": "2222"})
    assert r.returncode == 0, r.stderr
    lines = {line.split("=")[0].strip(): line for line in r.stdout.splitlines()}
    assert re.match(r"port = 2222\s+# env FASTWS_PORT$", lines["port"])
    assert re.match(rf"backlog = 100\s+# file {re.escape(str(toml))}$", lines["backlog"])
    assert re.match(r"host = \"127.0.0.1\"\s+# default$", lines["host"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_flag_beats_env_beats_file(tmp_path):
    toml = tmp_path / "fastws.toml"
    toml.write_text(f"port = {_free_port()}\nhealth = false\n")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    env.update(FASTWS_PORT=str(_free_port()), FASTWS_HEALTH="true", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([*CLI, "serve", "examples.echo:app", "--config", str(toml), "--port", str(port),
                             "--no-health"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                    answer = s.recv(200)
                break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail("server did not listen on the --port given on the command line")
        # --no-health (flag) beat FASTWS_HEALTH=true (env): no /health route, so
        # the request is treated as a (bad) WebSocket upgrade.
        assert not answer.startswith(b"HTTP/1.1 200"), answer
    finally:
        proc.terminate()
        out = proc.communicate(timeout=15)[0]
    assert proc.returncode == 0, out


BAD = [
    # (arguments, env, key named in the message)
    (["--port", "abc"], {}, "port"),
    (["--port", "70000"], {}, "port"),
    (["--port", "-1"], {}, "port"),
    (["--max-message-size", "lots"], {}, "max_message_size"),
    (["--max-message-size", "-5"], {}, "max_message_size"),
    (["--max-head-size", "100"], {}, "max_head_size"),
    (["--close-timeout", "soon"], {}, "close_timeout"),
    (["--close-timeout", "-1"], {}, "close_timeout"),
    (["--backlog", "0"], {}, "backlog"),
    (["--log-level", "loud"], {}, "log_level"),
    (["--log-format", "xml"], {}, "log_format"),
    (["--host", ""], {}, "host"),
    (["--ssl-certfile", "/nonexistent.pem", "--ssl-keyfile", "/nonexistent.key"], {}, "ssl_certfile"),
    (["--stats"], {}, "stats_token"),
    (["--stats", "--stats-token", "short"], {}, "stats_token"),
    (["--stats-window", "1"], {}, "stats_window"),
    (["--drain-delay", "1e9"], {}, "drain_delay"),
    ([], {"FASTWS_PORT": "eighty"}, "port"),
    ([], {"FASTWS_COMPRESSION": "maybe"}, "compression"),
    ([], {"FASTWS_MAX_QUEUE": "1"}, "max_queue"),
    ([], {"FASTWS_HEALTH_MAX_LOOP_LAG": "nan"}, "health_max_loop_lag"),
]


@pytest.mark.parametrize("args,env,key", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_value_exits_2_with_one_line(args, env, key):
    r = run_cli("serve", "examples.echo:app", *args, env=env)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"fastws: invalid config {key}="), lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize("content,key", [
    ("port = 'x'\n", "port"),
    ("nosuchknob = 1\n", "nosuchknob"),
    ("port = [\n", "config"),
    ("[server]\nport = 1\n", "server"),
])
def test_bad_config_file_exits_2(tmp_path, content, key):
    toml = tmp_path / "bad.toml"
    toml.write_text(content)
    for args in (["serve", "examples.echo:app", "--config", str(toml)], ["config", "show", "--config", str(toml)]):
        r = run_cli(*args)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"fastws: invalid config {key}="), r.stderr


def test_missing_config_file_exits_2(tmp_path):
    r = run_cli("config", "show", "--config", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and r.stderr.startswith("fastws: invalid config config=")
