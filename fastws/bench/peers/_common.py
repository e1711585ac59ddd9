"""Command-line handling shared by the Python peers."""

from __future__ import annotations

import argparse
import resource

MAX_SIZE = 16 * 1024 * 1024


def parse_args(description: str, compression: tuple[str, ...] = ()) -> argparse.Namespace:
    """--host, --port; with ``compression`` (the modes the peer has, the first
    the default) also ``--compression [MODE]``: negotiate permessage-deflate
    (``a.compression`` is None without the flag)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    if compression:
        p.add_argument("--compression", nargs="?", const=compression[0], default=None, choices=compression,
                       help=f"negotiate permessage-deflate (mode: {', '.join(compression)}; "
                            f"default {compression[0]})")
    a = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return a
