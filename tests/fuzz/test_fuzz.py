"""The fuzz targets in the suite: a corpus replay and a short atheris run each.

* ``test_corpus_replays_clean[<target>]``: every file of
  ``tests/fuzz/corpus/<target>/`` through the target's ``TestOneInput``,
  plain Python (no atheris, no instrumentation): a fast regression check of
  every input that was ever interesting, the seeds included.
* ``test_fuzz_run_finds_nothing[<target>]``: ``python -m
  tests.fuzz.<target>`` under atheris for ``FASTWS_FUZZ_SECONDS`` seconds
  (default 20) with ``-rss_limit_mb`` and ``-timeout`` set, starting from the
  kept corpus (read only: new inputs go to a temporary directory).  It
  fails with the path of the input libFuzzer saved if the run finds a crash
  (an exception or a failed check), a leak past the RSS limit, a timeout or
  an out-of-memory; the output tail is in the message.

The four runs take under 2 minutes together (20 s of fuzzing and about 6 s
of start-up each).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # ``tests.fuzz.<target>`` is imported by its package name
    sys.path.insert(0, str(ROOT))

from tests.fuzz._harness import CORPUS, TARGETS  # noqa: E402

SECONDS = int(os.environ.get("FASTWS_FUZZ_SECONDS", "20"))
RSS_LIMIT_MB = 1024        # a run past it is a leak (the targets sit near 250 MB)
INPUT_TIMEOUT = 10         # seconds one input may take
MAX_LEN = {"frames": 8192}  # libFuzzer's default (4096) for the others
ARTIFACTS = ("crash-", "leak-", "timeout-", "oom-", "slow-unit-")


def corpus_files(target: str) -> list:
    files = sorted(p for p in (CORPUS / target).iterdir() if p.is_file())
    assert len(files) >= 10, f"the {target} corpus is missing ({CORPUS / target})"
    return files


@pytest.mark.parametrize("target", TARGETS)
def test_corpus_replays_clean(target):
    module = importlib.import_module(f"tests.fuzz.{target}")
    failures = []
    tracing = tracemalloc.is_tracing()      # the frames target turns it on
    try:
        for path in corpus_files(target):
            try:
                module.TestOneInput(path.read_bytes())
            except Exception as exc:  # every failure is reported, not just the first
                failures.append(f"{path.relative_to(ROOT)}: {type(exc).__name__}: {str(exc)[:500]}")
    finally:
        if not tracing and tracemalloc.is_tracing():
            tracemalloc.stop()
    assert not failures, "corpus inputs fail:\n" + "\n".join(failures)


@pytest.mark.timeout(SECONDS + 90)
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_run_finds_nothing(target, tmp_path):
    corpus_files(target)
    new = tmp_path / "new"
    new.mkdir()
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    cmd = [
        sys.executable, "-m", f"tests.fuzz.{target}",
        f"-max_total_time={SECONDS}", f"-rss_limit_mb={RSS_LIMIT_MB}", f"-timeout={INPUT_TIMEOUT}",
        f"-artifact_prefix={artifacts}/", "-print_final_stats=1",
        *([f"-max_len={MAX_LEN[target]}"] if target in MAX_LEN else []),
        str(new), str(CORPUS / target),
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("FASTWS_FUZZ_NATIVE", None)     # Python coverage only here: no clang build needed
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SECONDS + 80)
    log = proc.stderr + proc.stdout
    found = sorted(p for p in artifacts.iterdir() if p.name.startswith(ARTIFACTS))
    tail = "\n".join(log.splitlines()[-60:])
    assert not found, (
        f"the {target} fuzzer found {', '.join(str(p) for p in found)} "
        f"(replay: python -m tests.fuzz.{target} {found[0]})\n{tail}"
    )
    assert proc.returncode == 0, f"the {target} fuzzer exited with {proc.returncode}\n{tail}"
    assert "Done " in log and " runs in " in log, f"the {target} fuzzer did not finish its run\n{tail}"
