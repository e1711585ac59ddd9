"""Command-line handling shared by the Python peers."""

from __future__ import annotations

import argparse
import resource
import ssl

MAX_SIZE = 16 * 1024 * 1024


def parse_args(description: str, compression: tuple[str, ...] = ()) -> argparse.Namespace:
    """--host, --port, --certfile/--keyfile (serve TLS, ``wss://``); with
    ``compression`` (the modes the peer has, the first the default) also
    ``--compression [MODE]``: negotiate permessage-deflate (``a.compression``
    is None without the flag)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    if compression:
        p.add_argument("--compression", nargs="?", const=compression[0], default=None, choices=compression,
                       help=f"negotiate permessage-deflate (mode: {', '.join(compression)}; "
                            f"default {compression[0]})")
    p.add_argument("--certfile", help="serve TLS (wss://) with this certificate (PEM)")
    p.add_argument("--keyfile", help="the certificate's private key (PEM)")
    a = p.parse_args()
    if bool(a.certfile) != bool(a.keyfile):
        p.error("--certfile and --keyfile go together")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return a


def server_ssl_context(a: argparse.Namespace) -> ssl.SSLContext | None:
    """The server's TLS context for ``--certfile``/``--keyfile`` (None: plain
    TCP): Python's defaults for a server (TLS 1.2 or newer)."""
    if not a.certfile:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(a.certfile, a.keyfile)
    return ctx
