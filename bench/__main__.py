"""``python -m bench`` in the repository: the same runner as ``fastws bench``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastws.bench.runner import bench_command

bench_command.main(prog_name="python -m bench")
