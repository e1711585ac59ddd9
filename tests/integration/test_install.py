"""A newcomer's first commands, on a fresh clone, in the README's order.

``test_readme_install_then_tests``: ``git clone`` of this repository into a
temporary directory, a virtualenv that sees the system's site-packages (the
dependencies are already installed on this machine, so only the build
requirements, setuptools/Cython/wheel, come from pip's configured index, as
for any user; see :func:`venv` for why not ``--system-site-packages``
itself), then, in the clone, with the venv first on ``PATH``:

1. README's quick-start block (``by test_install.py#quickstart``) as
   written, its port rewritten to a free one: it builds the engine and
   serves; a WebSocket echo goes through, the log says ``engine=cython``
   and has no fallback WARNING, and
   ``python -c "import fastws; print(fastws.IMPLEMENTATION)"`` run from the
   clone prints ``cython``;
2. README's test command (``by test_install.py#tests``) on one test file
   (``tests`` replaced by ``tests/unit/test_config.py``): it passes from the
   clone; and ``.ci/run`` runs exactly that README command;
3. ``fastws --version`` names the clone's commit and the engine.

``test_plain_install_warns_and_bench_refuses``: the trap the README warns
about: ``pip install .`` (not editable) into another venv, then work from
the clone, whose ``fastws/`` folder hides the installed copy. Serving logs
a WARNING that says how to build the fast engine, and ``fastws bench``,
which cannot start the fastws server it was asked to measure, exits
non-zero with one line saying which and why.

The clone is of the committed ``HEAD`` (what a newcomer gets); the README
blocks are read from it. Bounded: each build ~30 s, every wait has a
timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import websockets

from docblocks import REPO, block

HOST = "127.0.0.1"
BUILD_TIMEOUT = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def fresh_clone(tmp: Path) -> Path:
    clone = tmp / "clone"
    r = subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return clone


def venv(tmp: Path, name: str) -> dict:
    """A virtualenv that sees the system's site-packages (so the dependencies
    need no download) but not the ``.pth`` hooks there: this machine's own
    editable install of the repository (``__editable__.fastws...pth``) would
    otherwise answer imports of ``fastws._core`` from the repository instead
    of the clone.  Returns the environment that runs in it."""
    path = tmp / name
    r = subprocess.run([sys.executable, "-m", "venv", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    own = subprocess.run([str(path / "bin" / "python"), "-c",
                          "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, timeout=60).stdout.strip()
    system = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    Path(own, "_system_site_packages.pth").write_text("\n".join(system) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTWS_", "PYTHON"))}
    env.update(VIRTUAL_ENV=str(path), PATH=f"{path / 'bin'}{os.pathsep}{os.environ['PATH']}",
               PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def sh(cmd: str, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def wait_port(proc: subprocess.Popen, port: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before listening:\n{log.read_text()[-6000:]}", pytrace=False)
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.2)
    pytest.fail(f"not listening on {port} after {timeout}s:\n{log.read_text()[-6000:]}", pytrace=False)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (bash and the server it started), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


async def echo(port: int, text: str) -> str:
    async with websockets.connect(f"ws://{HOST}:{port}/", open_timeout=10) as ws:
        await ws.send(text)
        return await asyncio.wait_for(ws.recv(), 10)


@pytest.mark.timeout(900)
def test_readme_install_then_tests(tmp_path):
    quick = block("README.md", "quickstart").text.strip()
    test_cmd = block("README.md", "tests").text.strip()
    assert quick.startswith("pip install -e . && fastws serve ") and "--port 8000" in quick, quick
    assert re.fullmatch(r"python -m pytest tests -q", test_cmd), test_cmd
    ci = (REPO / ".ci" / "run").read_text()
    assert f'TEST_CMD="{test_cmd}"' in ci, "the CI script must run the README's test command"

    clone = fresh_clone(tmp_path)
    env = venv(tmp_path, "venv")
    port = free_port()
    log = tmp_path / "quickstart.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "-c", quick.replace("--port 8000", f"--port {port}")], cwd=clone, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_port(proc, port, log, BUILD_TIMEOUT)
        assert asyncio.run(echo(port, "first message")) == "first message"
    finally:
        stop_group(proc)
    text = log.read_text()
    assert "engine=cython" in text, text[-4000:]
    assert "pure-Python" not in text, text[-4000:]
    assert "fastws: stopped" in text, text[-4000:]

    r = sh('python -c "import fastws; print(fastws.IMPLEMENTATION)"', clone, env, 60)
    assert r.stdout.strip() == "cython", (r.stdout, r.stderr)

    part = test_cmd.replace(" tests ", " tests/unit/test_config.py ")
    r = sh(part, clone, env, 400)
    assert r.returncode == 0 and " passed" in r.stdout, (r.stdout[-3000:], r.stderr[-2000:])

    head = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    r = sh("fastws --version", clone, env, 60)
    assert r.returncode == 0 and head in r.stdout and "engine cython" in r.stdout, (head, r.stdout, r.stderr)


@pytest.mark.timeout(900)
def test_plain_install_warns_and_bench_refuses(tmp_path):
    clone = fresh_clone(tmp_path)
    env = venv(tmp_path, "venv-plain")
    r = sh("pip install .", clone, env, BUILD_TIMEOUT)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])

    r = sh('python -c "import fastws; print(fastws.IMPLEMENTATION)"', clone, env, 60)
    assert r.stdout.strip() == "wsproto", (r.stdout, r.stderr)          # the clone's fastws/ hides the build

    port = free_port()
    app = tmp_path / "app.py"
    app.write_text("import fastws\n\napp = fastws.App()\n\n\n@app.on_message('*')\ndef echo(conn, data):\n"
                   f"    conn.send(data)\n\n\nif __name__ == '__main__':\n    fastws.run(app, port={port})\n")
    (clone / "app.py").write_text(app.read_text())
    log = tmp_path / "plain.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["python", "app.py"], cwd=clone, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(proc, port, log, 60)
        assert asyncio.run(echo(port, "slow path")) == "slow path"
    finally:
        stop_group(proc)
    warning = [line for line in log.read_text().splitlines() if "WARNING" in line and "pure-Python" in line]
    assert warning and "pip install -e ." in warning[0] and "C compiler" in warning[0], log.read_text()
    assert "hides the installed copy" in warning[0], warning[0]

    out = tmp_path / "bench"
    r = sh(f"fastws bench --quick --vs raw --scenario echo --out {out}", clone, env, 300)
    assert r.returncode != 0, (r.stdout[-2000:], r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.startswith("fastws bench: cannot measure fastws")]
    assert len(lines) == 1 and "fastws.cli" in lines[0], r.stderr[-3000:]
    assert not list(out.glob("*.json")), "nothing measured, nothing recorded"
