"""Keep the inputs of a fuzz run that add coverage: ``tests/fuzz/corpus/<target>/``.

Run from the repository root after a long run, e.g.::

    FASTWS_FUZZ_NATIVE=1 python -m tests.fuzz.frames -max_total_time=600 /tmp/frames-run tests/fuzz/corpus/frames
    FASTWS_FUZZ_NATIVE=1 python -m tests.fuzz.merge frames /tmp/frames-run

The seeds (``seed-*``) are always kept; libFuzzer's ``-set_cover_merge=1``
then adds, from the kept corpus and the run directories, the smallest set of
inputs it finds that covers every edge and compared value the seeds do not
(a greedy set cover; ``-use_counters=0``: how often an edge runs does not
count, which keeps the corpus to dozens of files), named by their SHA-1.  Those replace the corpus'
other files.  Use the same coverage as the run (``FASTWS_FUZZ_NATIVE=1``
when the run had it), so that what only the native code tells apart is kept.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.fuzz._harness import CORPUS, ROOT, TARGETS

MAX_LEN = {"frames": 8192}


def merge(target: str, runs: list) -> None:
    corpus = CORPUS / target
    with tempfile.TemporaryDirectory(prefix=f"fuzz-merge-{target}-") as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        for seed in corpus.glob("seed-*"):
            shutil.copy2(seed, out / seed.name)
        cmd = [sys.executable, "-m", f"tests.fuzz.{target}", "-set_cover_merge=1", "-use_counters=0", "-timeout=30",
               "-rss_limit_mb=4096", f"-max_len={MAX_LEN.get(target, 4096)}",
               f"-merge_control_file={Path(tmp) / 'control'}", str(out), str(corpus), *map(str, runs)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        log = proc.stderr + proc.stdout
        if proc.returncode != 0 or not re.search(r"MERGE-OUTER: succes+ful+ in 1 attempt", log):
            raise SystemExit(f"the merge failed (exit {proc.returncode}); corpus left as it was:\n{log[-3000:]}")
        print("\n".join(line for line in log.splitlines() if line.startswith("MERGE-OUTER")))
        kept = sorted(p for p in out.iterdir() if not p.name.startswith("seed-"))
        for old in corpus.iterdir():
            if not old.name.startswith("seed-"):
                old.unlink()
        for p in kept:
            shutil.copy2(p, corpus / p.name)
    files = list(corpus.iterdir())
    print(f"{target}: {len(files)} files ({len(kept)} beyond the seeds), "
          f"{sum(f.stat().st_size for f in files)} bytes, largest {max(f.stat().st_size for f in files)}")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in TARGETS:
        raise SystemExit(f"usage: python -m tests.fuzz.merge <{'|'.join(TARGETS)}> RUN_DIR... "
                         "(FASTWS_FUZZ_NATIVE=1 for frames/upgrade runs made with it)")
    os.chdir(ROOT)
    merge(sys.argv[1], [Path(p).resolve() for p in sys.argv[2:]])
