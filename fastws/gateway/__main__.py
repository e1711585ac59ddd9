"""``python -m fastws.gateway MODULE:HANDLER --url redis://...``: a Streams worker process.

Runs :func:`fastws.gateway.run_worker` with the handler ``HANDLER`` of
``MODULE`` (imported from the current directory, or ``--app-dir``) until
SIGINT/SIGTERM; then the entries in hand are finished and acknowledged.
Start as many as the load needs: they share the stream's consumer group.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .sdk import run_worker


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastws.gateway", description=__doc__.splitlines()[0])
    p.add_argument("handler", metavar="MODULE:HANDLER", help="the handle(event, api) function")
    p.add_argument("--url", required=True, help="the gateway's redis://host:port/db[?stream=..&group=..]")
    p.add_argument("--consumer", default=None, help="this worker's name in the group (default: host-pid)")
    p.add_argument("--concurrency", type=int, default=16, help="stream entries handled at once")
    p.add_argument("--claim-idle", type=float, default=30.0,
                   help="seconds after which entries another worker read and did not acknowledge are claimed")
    p.add_argument("--app-dir", default=None, help="import MODULE from this directory")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    a = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, a.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(message)s")
    module_name, sep, attr = a.handler.partition(":")
    if not sep:
        p.error("give the handler as MODULE:HANDLER")
    sys.path.insert(0, os.path.abspath(a.app_dir) if a.app_dir else os.getcwd())
    handle = getattr(importlib.import_module(module_name), attr)
    run_worker(handle, a.url, consumer=a.consumer, concurrency=a.concurrency, claim_idle=a.claim_idle)


if __name__ == "__main__":
    main()
