"""The ``fastws`` command line (installed as ``fastws.cli``)."""
