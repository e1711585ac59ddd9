"""``fastws serve MODULE:APP ...`` and friends.

Startup failures print one line and exit with a distinct code:
2 for a bad argument or an app path that does not import, 1 for a port in use
or another listen error.  Nothing printed shows a credential: the password of
a URL (``--broker redis://user:****@host``) and secret settings are masked.
"""

from __future__ import annotations

import importlib
import os
import resource
import sys

import click

from fastws.app import App
from fastws.config import Config, mask_url
from fastws.errors import ConfigError, ServerStartError
from fastws.runner import run

from .bench import bench

EXIT_USAGE = 2
EXIT_LISTEN = 1


def load_app(path: str, interface: str = "auto"):
    """Import ``module:attribute`` (the current directory is importable).

    Returns ``(kind, obj)``: kind is "fastws" for a fastws.App, "asgi" for an
    ASGI 3 application (any other callable, or ``--interface asgi``).
    """
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


def _config_options(fn):
    """One CLI option per Config field (``max_message_size`` -> ``--max-message-size``).

    Every option defaults to None (= not given, the lower layers decide) and
    takes its value as a string that ``Config.load`` parses and checks, so a
    bad value gets the same one-line error from every layer."""
    for name, default, meta in reversed(Config.knobs()):
        flag = "--" + name.replace("_", "-")
        shown = "no" if default is None else default
        if meta.get("secret"):
            shown = "none"
        help_text = f"{meta['help']} [default: {str(shown).lower() if isinstance(shown, bool) else shown}]"
        if meta["kind"] == "bool":
            fn = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)(fn)
        else:
            metavar = {"int": "INTEGER", "bytes": "BYTES", "float": "NUMBER", "seconds": "SECONDS",
                       "path": "FILE", "choice": "[" + "|".join(meta["choices"]) + "]"}.get(meta["kind"], "TEXT")
            fn = click.option(flag, name, default=None, metavar=metavar, help=help_text)(fn)
    return fn


def build_config(config_file, overrides):
    """Config.load with the CLI's overrides; a bad value -> one line, exit 2."""
    try:
        return Config.load(file=config_file, overrides=overrides)
    except ConfigError as exc:
        click.echo(f"fastws: {mask_url(str(exc))}", err=True)
        sys.exit(EXIT_USAGE)


@cli.command(context_settings={"max_content_width": 120})
@click.argument("app")
@click.option("--config", "config_file", default=None, metavar="FILE",
              help="TOML file of settings (also $FASTWS_CONFIG); FASTWS_* env vars and flags override it.")
@click.option("--interface", default="auto", show_default=True,
              type=click.Choice(["auto", "fastws", "asgi"]),
              help="What APP is: a fastws.App, an ASGI 3 app, or detect it.")
@_config_options
def serve(app, config_file, interface, **overrides):
    """Serve APP (MODULE:ATTRIBUTE): a fastws.App or an ASGI application.

    Settings: defaults < --config FILE < FASTWS_* environment < these flags.
    Sizes take units (64KiB, 1MiB), durations too (500ms, 2s, 1m).
    """
    config = build_config(config_file, overrides)
    _, application = load_app(app, interface)
    try:
        run(application, config)
    except ServerStartError as exc:
        click.echo(f"fastws: {mask_url(str(exc))}", err=True)
        sys.exit(EXIT_LISTEN)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "?"


@cli.command()
@click.option("--connections", "-n", default=100_000, show_default=True, type=int,
              help="How many concurrent connections you plan for.")
@click.option("--bytes-per-connection", default=2048, show_default=True, type=int,
              help="Server memory per idle connection (see bench/README.md).")
def check(connections, bytes_per_connection):
    """Print the host limits that bound capacity, and what to change for N connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    somaxconn = _read("/proc/sys/net/core/somaxconn")
    ports = _read("/proc/sys/net/ipv4/ip_local_port_range").split()
    tcp_mem = _read("/proc/sys/net/ipv4/tcp_mem")
    file_max = _read("/proc/sys/fs/file-max")
    nr_open = _read("/proc/sys/fs/nr_open")
    page = os.sysconf("SC_PAGE_SIZE")
    n = connections
    click.echo(f"open files (this process)   soft {soft}  hard {hard}  (fastws raises soft to hard at start)")
    click.echo(f"fs.nr_open / fs.file-max     {nr_open} / {file_max}")
    click.echo(f"net.core.somaxconn           {somaxconn}")
    if len(ports) == 2 and ports[0].isdigit():
        span = int(ports[1]) - int(ports[0]) + 1
        click.echo(f"ip_local_port_range          {ports[0]}-{ports[1]}  ({span} ports per client address "
                   f"and server address:port)")
    click.echo(f"net.ipv4.tcp_mem (pages)     {tcp_mem}  (page = {page} bytes)")
    click.echo("")
    click.echo(f"for {n:,} connections:")
    advice = []
    if hard < n:
        workers = -(-n // max(1, hard - 1000))
        advice.append(f"- hard open-file limit {hard} < {n:,}: raise it (LimitNOFILE={n + 10000} in systemd, "
                      f"`ulimit -Hn {n + 10000}`) or run --workers {workers} (each worker holds "
                      f"at most {hard - 1000:,})")
    if somaxconn.isdigit() and int(somaxconn) < 4096:
        advice.append("- sysctl -w net.core.somaxconn=65535 (accept backlog for connection bursts)")
    if nr_open.isdigit() and int(nr_open) < n:
        advice.append(f"- sysctl -w fs.nr_open={n + 10000}")
    if len(ports) == 2 and ports[0].isdigit() and int(ports[1]) - int(ports[0]) + 1 < n:
        advice.append("- clients (or a proxy in front) need several source addresses, or a wider "
                      "net.ipv4.ip_local_port_range, to open that many connections to one address:port")
    fields_ = tcp_mem.split()
    if len(fields_) == 3 and fields_[2].isdigit():
        need_pages = n * 8192 // page   # ~8 KiB of kernel buffers per mostly idle socket
        if int(fields_[2]) < need_pages:
            advice.append(f"- net.ipv4.tcp_mem max {fields_[2]} pages < ~{need_pages} pages for {n:,} "
                          f"sockets: raise it")
    mem = n * bytes_per_connection
    advice.append(f"- fastws itself: ~{mem / 2**20:,.0f} MiB of RSS at {bytes_per_connection} B per idle "
                  f"connection, plus kernel socket buffers")
    for line in advice:
        click.echo(line)


@cli.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("show")
@click.option("--config", "config_file", default=None, metavar="FILE",
              help="TOML file of settings (also $FASTWS_CONFIG).")
def config_show(config_file):
    """Print the effective settings (as TOML) and where each came from
    (secrets and the passwords of URLs masked)."""
    config = build_config(config_file, {})
    click.echo(config.to_toml(), nl=False)


# `fastws bench` needs the [bench] extra's packages only when it runs; the
# command itself is always there (it says what to install when a peer is missing)
cli.add_command(bench)


def main() -> None:
    cli(prog_name="fastws")


if __name__ == "__main__":
    main()
