"""``fastws serve MODULE:APP ...`` and friends.

Startup failures print one line and exit with a distinct code:
2 for a bad argument or an app path that does not import, 1 for a port in use
or another listen error.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

EXIT_USAGE = 2
EXIT_LISTEN = 1


def load_app(path: str, interface: str = "auto"):
    """Import ``module:attribute`` (the current directory is importable).

    Returns ``(kind, obj)``: kind is "fastws" for a fastws.App, "asgi" for an
    ASGI 3 application (any other callable, or ``--interface asgi``).
    """
    from fastws.app import App

    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise click.UsageError(f"app must be given as MODULE:ATTRIBUTE, got {path!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure is the user's module
        raise click.ClickException(f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}")
    try:
        app = getattr(module, attr)
    except AttributeError:
        raise click.ClickException(f"module {module_name!r} has no attribute {attr!r}") from None
    if isinstance(app, App) and interface in ("auto", "fastws"):
        return "fastws", app
    if interface == "fastws":
        raise click.ClickException(f"{path} is {type(app).__name__}, not a fastws.App")
    if callable(app):
        return "asgi", app
    raise click.ClickException(f"{path} is {type(app).__name__}: neither a fastws.App nor an ASGI app")


@click.group()
@click.version_option(package_name="fastws")
def cli() -> None:
    """fastws: a fast WebSocket server for Python."""


@cli.command()
@click.argument("app")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="TCP port.")
@click.option("--max-message-size", default=1 << 20, show_default=True, type=int,
              help="Largest message in bytes; larger ones close with 1009 (0 = no limit).")
@click.option("--max-frame-size", default=0, show_default=True, type=int,
              help="Largest frame in bytes (0 = bounded by --max-message-size only).")
@click.option("--compression/--no-compression", default=False, show_default=True,
              help="Negotiate permessage-deflate (RFC 7692).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--interface", default="auto", show_default=True,
              type=click.Choice(["auto", "fastws", "asgi"]),
              help="What APP is: a fastws.App, an ASGI 3 app, or detect it.")
def serve(app, host, port, max_message_size, max_frame_size, compression, log_level, interface):
    """Serve APP (MODULE:ATTRIBUTE): a fastws.App or an ASGI application."""
    from fastws.config import Config
    from fastws.errors import ConfigError
    from fastws.server import ServerStartError, run_server

    kind, application = load_app(app, interface)
    try:
        config = Config(host=host, port=port, max_message_size=max_message_size,
                        max_frame_size=max_frame_size, compression=compression,
                        log_level=log_level)
    except ConfigError as exc:
        click.echo(f"fastws: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    try:
        if kind == "asgi":
            from fastws.asgi import run_asgi

            run_asgi(application, config)
        else:
            run_server(application, config)
    except ServerStartError as exc:
        click.echo(f"fastws: {exc}", err=True)
        sys.exit(EXIT_LISTEN)


def _register_optional() -> None:
    try:
        from .bench import bench
    except ImportError:
        return
    cli.add_command(bench)


_register_optional()


def main() -> None:
    cli(prog_name="fastws")


if __name__ == "__main__":
    main()
