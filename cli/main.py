"""``fastws serve MODULE:APP ...`` and friends (also ``python -m fastws``).

Every error the command line reports is one line on stderr in one style,
``fastws: <what went wrong> (<how to fix it>)``, and its exit code says
whose it is:

* 2 - bad input: a setting (flag, ``FASTWS_*``, TOML file), the app path,
  the broker URL, the log configuration, a flag combination;
* 1 - a failure to start: the port is in use, the certificate does not
  load, an ASGI app's lifespan startup failed.

An app module that raises while it is imported is the one exception to
"one line": its full traceback is printed first (it is the app's bug),
then the ``fastws:`` line, exit 2.  An unreachable Redis is no failure to
start: the broker retries in the background and ``/health`` says 503 until
it is reached.  Nothing printed shows a credential: the password of a URL
(``--broker redis://user:****@host``) and secret settings are masked.
"""

from __future__ import annotations

import importlib
import inspect
import os
import resource
import sys
import traceback

import click

from fastws import core
from fastws.app import App
from fastws.broker import create_broker
from fastws.config import Config, mask_url
from fastws.errors import BrokerURLError, ConfigError, ServerStartError
from fastws.runner import configure_logging, run
from fastws.version import build_info

from .bench import bench
from .reload import Reloader, child_command

EXIT_USAGE = 2
EXIT_LISTEN = 1


class CliError(click.ClickException):
    """One ``fastws: <what> (<how to fix>)`` line and an exit code
    (2: bad input, 1: a failure to start)."""

    def __init__(self, what: str, fix: str = "", code: int = EXIT_USAGE) -> None:
        what = mask_url(what)           # a URL's password never shows (the fix text is ours)
        super().__init__(f"{what} ({fix})" if fix else what)
        self.exit_code = code


def config_error(exc: ConfigError) -> CliError:
    """The one line for a bad setting: names the key, the value and what is allowed."""
    if isinstance(exc, BrokerURLError):
        return CliError(f"broker URL {exc.url!r}: {exc.problem}", exc.allowed)
    return CliError(f"invalid config {exc.key}={exc.value!r}", f"expected {exc.allowed}")


def _app_frames(tb_exc: traceback.TracebackException) -> traceback.TracebackException:
    """The traceback without the frames of this file and of importlib's
    machinery, so it starts in the app's own module."""
    skip = {__file__, importlib.__file__}
    frames = [f for f in tb_exc.stack if not f.filename.startswith("<frozen ") and f.filename not in skip]
    tb_exc.stack = traceback.StackSummary.from_list(frames)
    return tb_exc


def load_app(path: str, interface: str = "auto", app_dir: str | None = None):
    """Import ``module:attribute``, with ``app_dir`` (default: the current
    directory) first on ``sys.path``.

    Returns ``(kind, obj)``: kind is "fastws" for a fastws.App, "asgi" for an
    ASGI 3 application (any other callable).  Bad input raises
    :class:`CliError` (exit 2); an exception raised by the app's module while
    it is imported is printed with its traceback first."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"app must be given as MODULE:ATTRIBUTE, got {path!r}",
                       "e.g. fastws serve examples.echo:app")
    where = os.path.abspath(app_dir) if app_dir else os.getcwd()
    if app_dir is not None and not os.path.isdir(where):
        raise CliError(f"--app-dir {app_dir!r} is not a directory", "give the directory that holds the app's module")
    if where in sys.path:
        sys.path.remove(where)
    sys.path.insert(0, where)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise CliError(f"no module named {exc.name!r} in {where}",
                           "run from the directory that holds it, or pass --app-dir DIR") from None
        _print_app_traceback(exc)
        raise CliError(f"importing {module_name!r} raised {type(exc).__name__}: {exc}",
                       "the traceback above is from the app's module") from None
    except Exception as exc:            # the app's own module failed: its bug, show where
        _print_app_traceback(exc)
        raise CliError(f"importing {module_name!r} raised {type(exc).__name__}: {exc}",
                       "the traceback above is from the app's module") from None
    try:
        app = getattr(module, attr)
    except AttributeError:
        names = [n for n, v in vars(module).items() if not n.startswith("_") and _servable(v)]
        hint = f"it has: {', '.join(names[:8])}" if names else "it defines no fastws.App or ASGI callable"
        raise CliError(f"module {module_name!r} has no attribute {attr!r}", hint) from None
    if isinstance(app, App):
        if interface == "asgi":
            raise CliError(f"{path} is a fastws.App, not an ASGI application",
                           "drop --interface asgi: a fastws.App is served as it is")
        return "fastws", app
    if interface == "fastws":
        raise CliError(f"{path} is {type(app).__name__}, not a fastws.App",
                       "use --interface asgi (or auto) for an ASGI application")
    if callable(app):
        return "asgi", app
    raise CliError(f"{path} is {type(app).__name__}: neither a fastws.App nor an ASGI application",
                   "point MODULE:ATTRIBUTE at one")


def _servable(obj) -> bool:
    """Looks like something ``fastws serve`` takes: a fastws.App, an ASGI
    ``async def app(scope, receive, send)``, or an instance with ``__call__``
    (Starlette, FastAPI)."""
    if isinstance(obj, App):
        return True
    if inspect.iscoroutinefunction(obj):
        return len(inspect.signature(obj).parameters) == 3
    return (callable(obj) and not isinstance(obj, type) and not inspect.isroutine(obj)
            and not inspect.ismodule(obj))


def _print_app_traceback(exc: BaseException) -> None:
    tb_exc = _app_frames(traceback.TracebackException.from_exception(exc))
    sys.stderr.write("".join(tb_exc.format()))
    sys.stderr.flush()


def _version(ctx, param, value) -> None:
    if not value or ctx.resilient_parsing:
        return
    info = build_info()
    commit = info["commit"] or "unknown"
    built = info["build_commit"]
    extra = f", built from {built}" if built and built != info["commit"] else ""
    click.echo(f"fastws {info['version']} (commit {commit}{extra}, engine {core.IMPLEMENTATION})")
    ctx.exit(0)


@click.group()
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version,
              help="Print the version, the commit it was built from and the engine, then exit.")
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


def build_config(config_file, overrides) -> Config:
    """Config.load with the CLI's overrides; a bad value -> one line, exit 2."""
    try:
        return Config.load(file=config_file, overrides=overrides)
    except ConfigError as exc:
        raise config_error(exc) from None


def check_broker(config: Config) -> None:
    """Parse and check the broker URL now (no connection is made), so a
    malformed one is one line and exit 2 before anything listens."""
    if not config.broker:
        return
    try:
        create_broker(config.broker, prefix=config.broker_prefix)
    except ConfigError as exc:
        raise config_error(exc) from None


@cli.command(context_settings={"max_content_width": 120})
@click.argument("app", required=False)
@click.option("--config", "config_file", default=None, metavar="FILE",
              help="TOML file of settings (also $FASTWS_CONFIG); FASTWS_* env vars and flags override it.")
@click.option("--interface", default="auto", show_default=True,
              type=click.Choice(["auto", "fastws", "asgi"]),
              help="What APP is: a fastws.App, an ASGI 3 app, or detect it.")
@click.option("--app-dir", "app_dir", default=None, metavar="DIR",
              help="Import APP from DIR (put first on sys.path instead of the current directory).")
@click.option("--reload", "reload", is_flag=True, default=False,
              help="Development: restart the server when a .py file under the app's directory "
                   "(--app-dir, else the current one) changes. One process: not with --workers > 1.")
@_config_options
def serve(app, config_file, interface, app_dir, reload, **overrides):
    """Serve APP (MODULE:ATTRIBUTE): a fastws.App or an ASGI application.

    Without APP, --gateway URL serves every WebSocket path from that backend (gateway mode).
    Settings: defaults < --config FILE < FASTWS_* environment < these flags.
    Sizes take units (64KiB, 1MiB), durations too (500ms, 2s, 1m).
    """
    config = build_config(config_file, overrides)
    if app is None and not config.gateway:
        raise CliError("missing APP (MODULE:ATTRIBUTE)", "e.g. fastws serve examples.echo:app, or "
                       "--gateway URL to hand every connection's events to a backend")
    if reload and config.workers > 1:
        raise CliError(f"--reload runs one server process; it cannot be combined with --workers {config.workers}",
                       "drop --reload, or serve with --workers 1")
    check_broker(config)
    if reload:
        _serve_reloading(app, config, app_dir)
        return
    application = load_app(app, interface, app_dir)[1] if app is not None else App()   # gateway mode alone
    try:
        run(application, config)
    except ConfigError as exc:
        raise config_error(exc) from None
    except ServerStartError as exc:
        text = str(exc)
        fix = "stop the other server or pick another --port" if "in use" in text else ""
        raise CliError(text, fix, EXIT_LISTEN) from None


def _serve_reloading(app: str, config: Config, app_dir: str | None) -> None:
    """``--reload``: this process watches, a child serves (see cli/reload.py)."""
    try:
        configure_logging(config.log_level, config.log_format, config.log_config,
                          level_given=config.sources.get("log_level", "default") != "default")
    except ConfigError as exc:
        raise config_error(exc) from None
    watch = os.path.abspath(app_dir) if app_dir else os.getcwd()
    if not os.path.isdir(watch):
        raise CliError(f"--app-dir {app_dir!r} is not a directory", "give the directory that holds the app's module")
    stop = config.drain_delay + config.shutdown_timeout + 5
    sys.exit(Reloader(child_command(sys.argv[1:]), watch, stop_timeout=stop).run())


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


def main(argv: list[str] | None = None, prog_name: str = "fastws") -> None:
    """The ``fastws`` command: runs :func:`cli` and turns every error into
    one ``fastws: ...`` line on stderr with its exit code (see the module doc)."""
    try:
        cli.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx is not None else prog_name
        click.echo(f"fastws: {exc.format_message()} (see '{cmd} --help')", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        click.echo(f"fastws: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("fastws: aborted", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
