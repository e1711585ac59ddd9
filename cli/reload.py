"""``fastws serve --reload``: restart the server when a ``.py`` file changes.

For development only.  The ``fastws`` process given ``--reload`` does not
serve: it runs the same command without ``--reload`` as a child process and
polls the modification times of the ``.py`` files under one directory (the
app's: ``--app-dir``, else the current directory) twice a second.  When one
is added, changed or removed, it stops the child (SIGTERM: the child closes
its connections with 1001 and exits) and starts a new one, which imports the
new code.  A child that exits on its own (an import error after an edit, a
crash) is reported once; the next change starts it again.  SIGINT/SIGTERM
stop the child, then the reloader exits 0.

The standard library is enough: no ``watchfiles`` or inotify needed, and the
cost is one ``stat`` per file per poll (directories that never hold app code
are not walked: hidden ones, ``__pycache__``, ``node_modules``,
virtualenvs, ``build``, ``dist``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger("fastws.reload")

POLL_INTERVAL = 0.5                     # seconds between two scans
SKIP_DIRS = {"__pycache__", "node_modules", "build", "dist", "site-packages"}


def snapshot(root: str) -> dict[str, float]:
    """``{path: mtime}`` of every ``.py`` file under ``root``."""
    found: dict[str, float] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS
                       and not os.path.exists(os.path.join(dirpath, d, "pyvenv.cfg"))]
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                try:
                    found[path] = os.stat(path).st_mtime_ns
                except OSError:
                    pass                        # removed between listing and stat
    return found


def changed(before: dict, after: dict) -> list[str]:
    """Paths added, removed or modified between two snapshots."""
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


class Reloader:
    """Runs ``command`` as a child process; restarts it when a ``.py`` file
    under ``watch_dir`` changes.  ``stop_timeout``: seconds a child gets to
    exit after SIGTERM before it is killed."""

    def __init__(self, command: list[str], watch_dir: str, *, stop_timeout: float = 15.0) -> None:
        self.command = command
        self.watch_dir = os.path.abspath(watch_dir)
        self.stop_timeout = stop_timeout
        self.child: subprocess.Popen | None = None
        self._stopping = False

    def _start(self) -> None:
        self.child = subprocess.Popen(self.command)
        self._reported = False

    def _stop_child(self) -> None:
        child, self.child = self.child, None
        if child is None or child.poll() is not None:
            return
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning("fastws: reload: the server did not stop within %.0fs; killing it", self.stop_timeout)
            child.kill()
            child.wait()

    def _on_signal(self, signum, frame) -> None:
        self._stopping = True

    def run(self) -> int:
        """Serve until SIGINT/SIGTERM; returns the exit code (0)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        log.warning("fastws: reload: watching .py files under %s (for development; one process)",
                    self.watch_dir)
        files = snapshot(self.watch_dir)
        self._start()
        try:
            while not self._stopping:
                time.sleep(POLL_INTERVAL)
                child = self.child
                if child is not None and child.poll() is not None and not self._reported:
                    self._reported = True
                    log.warning("fastws: reload: the server exited with code %s; waiting for a change "
                                "to restart it", child.returncode)
                now = snapshot(self.watch_dir)
                diff = changed(files, now)
                files = now
                if diff and not self._stopping:
                    shown = ", ".join(os.path.relpath(p, self.watch_dir) for p in diff[:3])
                    more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
                    log.warning("fastws: reload: %s changed; restarting the server", shown + more)
                    self._stop_child()
                    self._start()
        finally:
            self._stop_child()
        return 0


def child_command(argv: list[str]) -> list[str]:
    """The command a reloader runs: this same ``fastws`` invocation
    (``argv``: ``sys.argv[1:]``) without ``--reload``, through this
    interpreter."""
    return [sys.executable, "-m", "fastws", *[a for a in argv if a != "--reload"]]


__all__ = ["Reloader", "snapshot", "changed", "child_command", "POLL_INTERVAL"]
