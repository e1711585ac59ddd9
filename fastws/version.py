"""The version of fastws and what it was built from (layer 1: imports
nothing from fastws).

:func:`build_info` is what ``fastws --version`` prints and what ``fastws
bench`` records with its results: the version, the git commit the package
was built from (written by ``setup.py`` into ``fastws/_build_info.json``)
and, for a source checkout installed with ``pip install -e .``, the commit
that checkout is at now.  It never asks a git repository that merely
contains the installed package (a virtualenv inside some other project):
only fastws's own checkout, recognised by its ``setup.py`` and
``fastws/_core.pyx`` beside a ``.git``.
"""

from __future__ import annotations

import json
import os
import subprocess

__version__ = "0.1.0.dev0"

_HERE = os.path.dirname(os.path.abspath(__file__))


def _git(root: str, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def source_checkout() -> str | None:
    """The root of the fastws git checkout this package is imported from
    (an editable install, or the source tree itself), else None."""
    root = os.path.dirname(_HERE)
    marks = (os.path.join(root, "setup.py"), os.path.join(_HERE, "_core.pyx"), os.path.join(root, ".git"))
    if not all(os.path.exists(m) for m in marks):
        return None
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or not os.path.samefile(top, root):
        return None
    return root


def build_info() -> dict[str, str | None]:
    """``{"version", "commit", "build_commit", "source"}``.

    ``build_commit``: the commit ``setup.py`` recorded when this copy was
    built (None: built outside git, or never built: a bare source tree).
    ``commit``: the code that runs; the checkout's current ``HEAD`` (with
    ``-dirty`` when tracked files differ from it) for a source checkout,
    else ``build_commit``.  ``source``: "checkout PATH", "build" or
    "unknown"."""
    recorded = None
    try:
        with open(os.path.join(_HERE, "_build_info.json")) as fh:
            recorded = json.load(fh).get("commit")
    except (OSError, ValueError, AttributeError):
        pass
    info: dict[str, str | None] = {"version": __version__, "commit": recorded, "build_commit": recorded,
            "source": "build" if recorded else "unknown"}
    root = source_checkout()
    if root is not None:
        head = _git(root, "rev-parse", "HEAD")
        if head:
            if _git(root, "status", "--porcelain", "--untracked-files=no"):
                head += "-dirty"
            info["commit"] = head
            info["source"] = f"checkout {root}"
    return info


__all__ = ["__version__", "build_info", "source_checkout"]
