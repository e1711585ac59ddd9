"""Running an application: pick the front, one process or supervised workers,
until SIGINT/SIGTERM.

    fastws.run(app, port=8000)              # blocking, on uvloop (a fastws.App or an ASGI app)
    await fastws.serve(app, port=8000)      # inside a running loop, until cancelled

``fastws serve MODULE:APP`` does the same from the command line with the
same settings (:class:`fastws.Config`; defaults < TOML file < ``FASTWS_*``
environment < flags).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import time

import uvloop

from .app import App
from .asgi import AsgiServer
from .config import Config
from .limits import raise_nofile_limit
from .server import NativeServer, Server
from .supervisor import run_workers

log = logging.getLogger("fastws")


def make_server(app, config: Config) -> Server:
    """The front for ``app``: :class:`NativeServer` for a :class:`fastws.App`,
    :class:`fastws.asgi.AsgiServer` for any other callable (an ASGI 3 app)."""
    if isinstance(app, App):
        return NativeServer(app, config)
    if callable(app):
        return AsgiServer(app, config)
    raise TypeError(f"{app!r} is neither a fastws.App nor an ASGI application")


def _config(config: Config | None, options: dict) -> Config:
    if config is not None:
        return config.replace(**options) if options else config
    return Config(**options)


async def serve(app, config: Config | None = None, *, sock: socket.socket | None = None,
                started=None, **options) -> None:
    """Serve ``app`` in the running loop until cancelled, then shut down
    gracefully.  Settings come from ``config`` and/or keyword ``options``
    (the fields of :class:`fastws.Config`: ``host``, ``port``, ...);
    ``started(server)`` (optional) is called once it listens (e.g. to read
    ``server.port`` when ``port=0``).  ``workers`` > 1 is for
    :func:`run` only."""
    server = make_server(app, _config(config, options))
    await server.start(sock)
    if started is not None:
        started(server)
    try:
        await server.serve_forever()
    finally:
        await asyncio.shield(server.shutdown())


def run(app, config: Config | None = None, *, sock: socket.socket | None = None, **options) -> None:
    """Serve ``app`` (blocking) on uvloop until SIGINT/SIGTERM, then shut
    down gracefully; with ``workers`` > 1 as the supervisor of that many
    worker processes sharing the port (and an embedded broker, unless
    ``broker`` names one).  Raises :class:`fastws.errors.ServerStartError`
    (one clear line) when it cannot start."""
    config = _config(config, options)
    configure_logging(config.log_level, config.log_format)
    if config.workers > 1 and sock is None:
        raise SystemExit(run_workers(lambda index: run_until_signal(make_server(app, config)), config))
    run_until_signal(make_server(app, config), sock)


def run_until_signal(server: Server, sock: socket.socket | None = None) -> None:
    """Run ``server`` on a new uvloop loop until SIGINT/SIGTERM, then shut it
    down gracefully.  Raises the soft open-file limit first."""
    soft, hard = raise_nofile_limit()
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()

    async def main():
        await server.start(sock)
        log.info("fastws: open files limit %d (hard %d)", soft, hard)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("fastws: shutting down")
        await server.shutdown()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if fmt == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


__all__ = ["run", "serve", "make_server", "run_until_signal", "configure_logging", "JsonLogFormatter"]
