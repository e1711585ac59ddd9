"""``fastws bench``: fastws against its peers, with a neutral load generator.

* ``fastws.bench.loadgen`` - the load generator (raw uvloop sockets, no fastws code);
* ``fastws.bench.peers`` - the same relay app for every peer, and the raw uvloop ceiling;
* ``fastws.bench.runner`` - alternates servers, repeats, writes JSON, markdown and PNG charts.

See ``bench/README.md`` in the repository for what each scenario measures.
"""
