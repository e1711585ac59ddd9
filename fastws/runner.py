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
import configparser
import importlib.metadata
import json
import logging
import logging.config
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

try:                       # the standard library from Python 3.11
    import tomllib
except ImportError:        # Python 3.10: the same parser, as a package
    import tomli as tomllib  # type: ignore[no-redef,import-not-found]
import uvloop

from . import core
from .app import App
from .asgi import AsgiServer
from .config import Config
from .errors import ConfigError
from .limits import raise_nofile_limit
from .server import NativeServer, Server
from .supervisor import run_workers

log = logging.getLogger("fastws")

#: What :func:`run` and :func:`serve` serve: a :class:`fastws.App`, or an ASGI 3
#: application (any callable ``app(scope, receive, send)``).
Application = App | Callable[..., Any]


def make_server(app: Application, config: Config) -> Server:
    """The front for ``app``: :class:`NativeServer` for a :class:`fastws.App`,
    :class:`fastws.asgi.AsgiServer` for any other callable (an ASGI 3 app)."""
    if isinstance(app, App):
        return NativeServer(app, config)
    if callable(app):
        return AsgiServer(app, config)
    raise TypeError(f"{app!r} is neither a fastws.App nor an ASGI application")


def _config(config: Config | None, options: dict[str, Any]) -> Config:
    if config is not None:
        return config.replace(**options) if options else config
    return Config(**options)


async def serve(app: Application, config: Config | None = None, *, sock: socket.socket | None = None,
                started: Callable[[Server], object] | None = None, **options: Any) -> None:
    """Serve ``app`` in the running loop until cancelled, then shut down
    gracefully.  Settings come from ``config`` and/or keyword ``options``
    (the fields of :class:`fastws.Config`: ``host``, ``port``, ...);
    ``started(server)`` (optional) is called once it listens (e.g. to read
    ``server.port`` when ``port=0``).  ``workers`` > 1 is for
    :func:`run` only."""
    config = _config(config, options)
    engine_notice()
    server = make_server(app, config)
    await server.start(sock)
    if started is not None:
        started(server)
    try:
        await server.serve_forever()
    finally:
        await asyncio.shield(server.shutdown())


def run(app: Application, config: Config | None = None, *, sock: socket.socket | None = None,
        **options: Any) -> None:
    """Serve ``app`` (blocking) on uvloop until SIGINT/SIGTERM, then shut
    down gracefully; with ``workers`` > 1 as the supervisor of that many
    worker processes sharing the port (and an embedded broker, unless
    ``broker`` names one).  Raises :class:`fastws.errors.ServerStartError`
    (one clear line) when it cannot start."""
    config = _config(config, options)
    configure_logging(config.log_level, config.log_format, config.log_config,
                      level_given=config.sources.get("log_level", "default") != "default")
    engine_notice()
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

    async def main() -> None:
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


def configure_logging(level: str, fmt: str = "text", config_file: str | None = None, *,
                      level_given: bool = False) -> None:
    """Log to stderr at ``level`` in ``fmt`` ("text" or "json"); or, with
    ``config_file`` (the ``log_config`` setting), as that file says: a
    ``logging.config.dictConfig`` in ``.json`` or ``.toml``, or a
    ``fileConfig`` ``.ini`` (any other suffix).  ``level_given``: the level
    was asked for explicitly, so it also applies to the ``fastws`` loggers
    under a file.  A file that does not load raises
    :class:`~fastws.errors.ConfigError` naming ``log_config``."""
    if config_file:
        load_log_config(config_file)
        if level_given:
            logging.getLogger("fastws").setLevel(getattr(logging, level.upper()))
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if fmt == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def load_log_config(path: str) -> None:
    """Apply the logging configuration file ``path`` (see configure_logging)."""
    suffix = os.path.splitext(path)[1].lower()
    allowed = "a logging dictConfig (.json or .toml) or fileConfig (.ini) file"
    try:
        if suffix in (".json", ".toml"):
            with open(path, "rb") as fh:
                data = json.load(fh) if suffix == ".json" else tomllib.load(fh)
            if not isinstance(data, dict):
                raise ValueError("the top level is not a table/object")
            data.setdefault("version", 1)
            data.setdefault("disable_existing_loggers", False)
            logging.config.dictConfig(data)
        else:
            logging.config.fileConfig(path, disable_existing_loggers=False)
    except OSError as exc:
        raise ConfigError("log_config", path, f"a readable file ({exc.strerror})") from None
    except (ValueError, TypeError, KeyError, AttributeError, ImportError, RuntimeError,
            configparser.Error, tomllib.TOMLDecodeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError("log_config", path, f"{allowed}; {type(exc).__name__}: {detail}") from None


def engine_notice() -> None:
    """Say which engine serves: a WARNING, with how to build the compiled one,
    when fastws runs on the pure-Python engine without being asked to
    (``FASTWS_NO_EXTENSIONS=1``)."""
    if core.IMPLEMENTATION == "cython":
        return
    if os.environ.get("FASTWS_NO_EXTENSIONS") == "1":
        log.info("fastws: running on the pure-Python wsproto engine (FASTWS_NO_EXTENSIONS=1)")
        return
    here = os.path.dirname(os.path.abspath(core.__file__))
    installed = None
    for dist in importlib.metadata.distributions(name="fastws"):    # an installed copy with the engine
        copy = os.path.abspath(str(dist.locate_file("fastws")))
        if copy != here and any(str(f).startswith("fastws/_core.") and str(f).endswith((".so", ".pyd"))
                                for f in dist.files or ()):
            installed = copy
            break
    if installed:
        how = (f"this process imports fastws from the source folder {here}, which hides the installed copy "
               f"at {installed} (the one with the compiled engine): run from another directory, or build "
               "the engine in this folder with `pip install -e .` (needs a C compiler and Cython)")
    else:
        how = (f"fastws._core is not built in {here}: build it with `pip install -e .` in the "
               "repository (needs a C compiler and Cython)")
    log.warning("fastws: running on the pure-Python wsproto engine, several times slower than the "
                "compiled one (%s)", how)


__all__ = ["Application", "run", "serve", "make_server", "run_until_signal", "configure_logging", "load_log_config",
           "engine_notice", "JsonLogFormatter"]
