"""The suite leaves the Redis it finds as it was.

A part of the broker suite that touches server state and the network path
to Redis (the ACL test, outages through the TCP proxy, history, presence)
runs in a child pytest with ``FASTWS_TEST_REDIS`` naming a ``redis-server``
of this test's own and a known run prefix, while ``MONITOR`` watches the
shared Redis at 127.0.0.1:6379.  Afterwards:

* the own server is exactly as before: same ACL users, same CONFIG, no key;
* the shared server saw nothing of the child run: no command carrying its
  run prefix (the proxy tests used to go to 127.0.0.1:6379 whatever the
  setting) and no ``ACL``/``CONFIG SET`` (the ACL test used to create and
  delete a user there).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from brokerutil import OwnRedis, need_redis

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SHARED_PORT = 6379

#: the child run: tests that change ACLs, go through the TCP proxy, write
#: streams and presence keys
CHILD_TESTS = [
    "test_streams.py::test_without_the_client_command_changes_apply_at_the_next_read",
    "test_streams.py::test_an_outage_logs_its_lines_and_no_task_traceback",
    "test_streams.py::test_history_bounded_by_maxlen",
    "test_faults.py::test_reconnect_attempts_back_off",
    "test_bridge.py::test_presence_across_nodes_and_expiry_of_a_crashed_node",
]


def state(own: OwnRedis) -> dict:
    """What a test run must not change: ACL users, the settings, the keys."""
    config = own.cli("CONFIG", "GET", "*").splitlines()
    return {
        "acl": sorted(own.cli("ACL", "LIST").splitlines()),
        "config": dict(zip(config[::2], config[1::2], strict=False)),
        "keys": sorted(own.cli("--scan").splitlines()),
        "dbsize": own.cli("DBSIZE").strip(),
    }


@pytest.mark.timeout(300)
def test_the_suite_leaves_the_redis_it_uses_as_found(tmp_path):
    need_redis()                          # the shared one, watched below
    run_prefix = "tstate" + uuid.uuid4().hex[:8]
    with OwnRedis() as own:
        before = state(own)
        monitor_out = tmp_path / "monitor.txt"
        with open(monitor_out, "wb") as out:
            monitor = subprocess.Popen(["redis-cli", "-p", str(SHARED_PORT), "MONITOR"], stdout=out,
                                       stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)               # MONITOR is on
            env = dict(os.environ, FASTWS_TEST_REDIS=own.url, FASTWS_TEST_RUN=run_prefix)
            child = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *CHILD_TESTS],
                cwd=HERE, env=env, capture_output=True, text=True, timeout=240)
            time.sleep(0.3)
        finally:
            monitor.terminate()
            monitor.wait(10)
        assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-2000:]
        assert f"{len(CHILD_TESTS)} passed" in child.stdout, child.stdout[-2000:]
        after = state(own)
    assert after == before
    seen = monitor_out.read_text(errors="replace").splitlines()
    ours = [line for line in seen if run_prefix in line]
    assert not ours, ours[:5]
    state_changes = [line for line in seen
                     if '"ACL"' in line.upper() and ("SETUSER" in line.upper() or "DELUSER" in line.upper())
                     and "fastws-t" in line]
    assert not state_changes, state_changes[:5]
