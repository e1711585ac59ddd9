"""``fastws serve --workers N``: N worker processes sharing one port.

Each worker is a forked child running its own uvloop loop and its own
listening socket bound with SO_REUSEPORT, so the kernel spreads new
connections over them. The supervisor (the parent) does no network work:

* it starts the workers and, when one dies unexpectedly (a crash, SIGKILL),
  logs it and starts a replacement (with a back-off if it keeps dying fast);
* SIGTERM / SIGINT to the supervisor reach every worker (each drains
  gracefully), the supervisor waits for them up to a deadline, kills any
  straggler, and exits 0;
* optionally it runs a service shared by the workers on its own thread
  (``shared_service``), e.g. the embedded broker over a Unix socket;
* it makes the directory where the workers leave their metric snapshots
  (``FASTWS_METRICS_DIR``, see :mod:`fastws.metrics`) so that one scrape of
  /metrics shows every worker, removes a dead worker's snapshot before it
  starts the replacement, and removes the directory when it exits.

Files of a run live in a private directory of the supervisor
(``$TMPDIR/fastws-sup-<pid>-XXXX``, mode 0700): ``broker.sock``, the embedded
broker's socket, and ``metrics/``.  A supervisor killed with SIGKILL cannot
remove it, so the next supervisor to start removes the directories of
supervisors that are gone (:func:`sweep_stale`): only this user's, only when
the pid no longer exists and nothing listens on the socket.

A worker does not outlive its supervisor: right after the fork it asks Linux
to send it SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``), and a
thread checks ``os.getppid()`` every :data:`PARENT_CHECK_INTERVAL` seconds as
a fallback (other systems, or a parent gone before the prctl).  SIGTERM is
the graceful path: the worker stops accepting, closes its connections with
1001 and exits.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

from .broker.embedded import EmbeddedRelay
from .errors import ServerStartError
from .metrics import METRICS_DIR_ENV, worker_metrics_file
from .server import bind_socket

log = logging.getLogger("fastws")

RESPAWN_FAST = 1.0      # a worker that dies within this many seconds of starting ...
RESPAWN_BACKOFF_MAX = 10.0   # ... is restarted after a growing delay, up to this

#: Seconds between a worker's checks that its supervisor still lives (fallback for prctl).
PARENT_CHECK_INTERVAL = 1.0
#: Name prefix of a supervisor's private directory in the temp dir (then "<pid>-").
RUN_DIR_PREFIX = "fastws-sup-"
BROKER_SOCKET = "broker.sock"   # the embedded broker's Unix socket, in the private directory
_PR_SET_PDEATHSIG = 1           # from <linux/prctl.h>


class Supervisor:
    """Start, watch and stop ``workers`` processes running ``target(index)``."""

    def __init__(self, target, workers: int, *, stop_timeout: float = 30.0,
                 metrics_dir: str | None = None) -> None:
        self.target = target            # callable(worker_index) run in each child
        self.metrics_dir = metrics_dir  # the workers' metric snapshots, or None
        self.workers = workers
        self.stop_timeout = stop_timeout  # seconds to wait for workers after SIGTERM
        self.procs: dict[int, multiprocessing.Process] = {}   # index -> process
        self.started_at: dict[int, float] = {}
        self.backoff: dict[int, float] = {}
        self.restarts = 0
        self._stopping = False
        self._ctx = multiprocessing.get_context("fork")

    def _forget_metrics(self, index: int) -> None:
        """Remove a dead worker's snapshot: its numbers leave the totals."""
        if self.metrics_dir:
            path = worker_metrics_file(self.metrics_dir, index)
            for name in (path, path + ".tmp"):
                try:
                    os.unlink(name)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("fastws: cannot remove %s: %s", name, exc)

    def _spawn(self, index: int) -> None:
        self._forget_metrics(index)
        p = self._ctx.Process(target=_child, args=(self.target, index, os.getpid()),
                              name=f"fastws-worker-{index}")
        p.daemon = False
        p.start()
        self.procs[index] = p
        self.started_at[index] = time.monotonic()
        log.info("fastws: worker %d started (pid %d)", index, p.pid)

    def _on_signal(self, signum, frame) -> None:
        if not self._stopping:
            log.info("fastws: supervisor got %s; stopping %d workers", signal.Signals(signum).name,
                     len(self.procs))
        self._stopping = True
        for p in self.procs.values():
            if p.pid and p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for i in range(self.workers):
            self._spawn(i)
        pending: dict[int, float] = {}   # index -> when to respawn
        while not self._stopping:
            time.sleep(0.1)
            now = time.monotonic()
            for index, p in list(self.procs.items()):
                if p.exitcode is None or self._stopping:
                    continue
                lived = now - self.started_at[index]
                delay = 0.0
                if lived < RESPAWN_FAST:
                    delay = min(RESPAWN_BACKOFF_MAX, max(0.5, self.backoff.get(index, 0.25) * 2))
                self.backoff[index] = delay
                log.error("fastws: worker %d (pid %d) exited with code %s after %.1fs; restarting%s",
                          index, p.pid, p.exitcode, lived, f" in {delay:.1f}s" if delay else "")
                del self.procs[index]
                self._forget_metrics(index)
                pending[index] = now + delay
            for index, when in list(pending.items()):
                if now >= when and not self._stopping:
                    del pending[index]
                    self.restarts += 1
                    self._spawn(index)
        deadline = time.monotonic() + self.stop_timeout
        for p in self.procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
        for index, p in self.procs.items():
            if p.is_alive():
                log.error("fastws: worker %d (pid %d) did not stop in time; killing it", index, p.pid)
                p.kill()
                p.join(5)
        log.info("fastws: all workers stopped")
        return 0


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies
    (Linux ``prctl(PR_SET_PDEATHSIG)``); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, index: int) -> None:
    """A worker's thread: once the supervisor ``parent`` is gone (this
    process was re-parented), SIGTERM to itself, the graceful stop."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_INTERVAL)
    log.warning("fastws: worker %d (pid %d): the supervisor (pid %d) is gone; closing connections "
                "with 1001 and exiting", index, os.getpid(), parent)
    os.kill(os.getpid(), signal.SIGTERM)


def _child(target, index: int, parent: int) -> None:
    # the child must not run the supervisor's handlers; the worker's loop
    # installs its own
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:      # gone between the fork and the prctl: nothing to serve yet
        log.warning("fastws: worker %d: the supervisor (pid %d) is gone; not starting", index, parent)
        return
    threading.Thread(target=_watch_parent, args=(parent, index), name="fastws-parent-watch",
                     daemon=True).start()
    os.environ["FASTWS_WORKER"] = str(index)
    target(index)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # stopped: a late SIGTERM must not cut the exit short


# -- the supervisor's private directory ---------------------------------------------

_STALE = (re.compile(re.escape(RUN_DIR_PREFIX) + r"(\d+)-"),   # this version's private directories
          re.compile(r"fastws-metrics-(\d+)-"),                 # earlier versions' metrics dirs ...
          re.compile(r"fastws-(\d+)\.sock$"))                   # ... and embedded broker sockets


def _pid_exists(pid: int) -> bool:
    """True unless no process ``pid`` exists (another user's counts; so does
    anything that is not a plain pid, so it is never swept)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def socket_in_use(path: str) -> bool:
    """True if a process accepts connections on the Unix socket ``path``
    (False: no such file, or a stale socket file nobody listens on)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    except OSError as exc:
        return exc.errno not in (errno.ENOTSOCK, errno.ECONNREFUSED, errno.ENOENT)
    finally:
        s.close()
    return True


def sweep_stale(base: str | None = None) -> list:
    """Remove what supervisors that died without cleaning up left in the
    temp dir ``base``: their private directories (and the sockets and metrics
    directories of earlier versions).  Only entries owned by this user, whose
    supervisor pid no longer exists and whose socket nobody listens on.
    Returns the removed paths."""
    base = base or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        m = next((m for m in (p.match(name) for p in _STALE) if m), None)
        if m is None or int(m.group(1)) == os.getpid() or _pid_exists(int(m.group(1))):
            continue
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid != os.geteuid():
            continue
        sock = os.path.join(path, BROKER_SOCKET) if os.path.isdir(path) else path
        if socket_in_use(sock):
            continue
        try:
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except OSError as exc:
            log.warning("fastws: cannot remove %s, left by a supervisor that is gone: %s", path, exc)
            continue
        removed.append(path)
    if removed:
        log.info("fastws: removed %d file(s) left by supervisors that are gone: %s", len(removed),
                 ", ".join(removed))
    return removed


def run_workers(target, config) -> int:
    """Check the port can be bound, then supervise ``config.workers``
    processes, each running ``target(index)`` with SO_REUSEPORT on."""
    config.reuse_port = True
    # fail fast, in the supervisor, if the port is taken by something else
    probe = bind_socket(config.host, config.port, reuse_port=True, backlog=1, listen=False)
    if config.port == 0:
        config.port = probe.getsockname()[1]
    probe.close()
    log.info("fastws: supervisor (pid %d) starting %d workers on %s:%d", os.getpid(),
             config.workers, config.host, config.port)
    timeout = config.shutdown_timeout + config.drain_delay + 5.0
    sweep_stale()                                   # what a supervisor killed earlier left behind
    run_dir = tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-")   # mode 0700, ours alone
    relay = None
    try:
        if not config.broker:
            # no broker given: the workers share an embedded one, run here, so a
            # room message reaches members on every worker with nothing else to run
            path = os.path.join(run_dir, BROKER_SOCKET)
            relay = EmbeddedRelay(path)
            try:
                relay.run_in_thread()
            except OSError as exc:        # e.g. a $TMPDIR too long for a Unix socket path
                relay = None
                raise ServerStartError(f"cannot start the embedded broker at {path}: {exc}") from None
            config.broker = f"unix://{path}"
            log.info("fastws: embedded broker for the workers at %s", path)
        # the workers' metric snapshots: one scrape of any worker shows them all
        metrics_dir = os.path.join(run_dir, "metrics")
        os.mkdir(metrics_dir, 0o700)
        previous = os.environ.get(METRICS_DIR_ENV)
        os.environ[METRICS_DIR_ENV] = metrics_dir      # inherited by every forked worker
        try:
            return Supervisor(target, config.workers, stop_timeout=timeout, metrics_dir=metrics_dir).run()
        finally:
            if previous is None:
                os.environ.pop(METRICS_DIR_ENV, None)
            else:
                os.environ[METRICS_DIR_ENV] = previous
    finally:
        if relay is not None:
            relay.stop_thread()
        shutil.rmtree(run_dir, ignore_errors=True)
