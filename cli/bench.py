"""``fastws bench``: the click command, defined with the runner in fastws.bench."""

from fastws.bench.runner import bench_command as bench

__all__ = ["bench"]
