"""``python -m fastws.bench [--vs ...] [--scenario ...] [--repeat N] [--quick]``."""

from fastws.bench.runner import main

main()
